// Cooperative-matrix types of shaders/matmul_coop.wgsl for adapters that run 8×8×8
// f16 × f16 → f32 products (lavapipe: Mesa 26.1 lists it, 25.0 does not); after coop.wgsl.
// The 16×16×16 twin is coop16.wgsl.
const S: u32 = 8u;
alias coop_a = coop_mat8x8<f16, A>;
alias coop_b = coop_mat8x8<f16, B>;
alias coop_c = coop_mat8x8<f32, C>;
