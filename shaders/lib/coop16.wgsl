// Cooperative-matrix types of shaders/matmul_coop.wgsl for adapters that run 16×16×16
// f16 × f16 → f32 products (NVIDIA and AMD tensor/matrix cores); after coop.wgsl. The
// 8×8×8 twin is coop8.wgsl.
const S: u32 = 16u;
alias coop_a = coop_mat16x16<f16, A>;
alias coop_b = coop_mat16x16<f16, B>;
alias coop_c = coop_mat16x16<f32, C>;
