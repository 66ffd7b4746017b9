// The B operand of the matmul kernels (shaders/matmul.wgsl, shaders/matmul_subgroup.wgsl)
// stored as f32. The kernels read B only through b_load / b4_load, so that the same kernel
// text assembled with shaders/lib/matmul_b_f16.wgsl instead reads f16 weights.

@group(0) @binding(2) var<storage, read> b: array<f32>;          // [batch, K, N], [batch, N, K] if TRANS_B
// The same buffer viewed as vec4 (the vec4 and subgroup kernels; no entry point uses both).
@group(0) @binding(2) var<storage, read> b4: array<vec4<f32>>;

// Element i of B.
fn b_load(i: u32) -> f32 {
    return b[i];
}

// Elements 4i .. 4i + 3 of B.
fn b4_load(i: u32) -> vec4<f32> {
    return b4[i];
}
