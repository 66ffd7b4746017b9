// The B operand of the matmul kernels stored as f16 (`--precision f16` weights), widened to
// f32 as it is loaded: products, accumulation and the epilogue stay f32, only B's storage
// and memory traffic halve. The f16 twin of shaders/lib/matmul_b_f32.wgsl, same accessors.
// Needs shaders/lib/f16.wgsl (the `enable f16;` directive) first in the module.

@group(0) @binding(2) var<storage, read> b: array<f16>;          // [batch, K, N], [batch, N, K] if TRANS_B
// The same buffer viewed as vec4 (the vec4 and subgroup kernels; no entry point uses both).
// The host pads f16 tensors to whole 16 bytes, so the last vec4 is always in the binding.
@group(0) @binding(2) var<storage, read> b4: array<vec4<f16>>;

// Element i of B, widened to f32.
fn b_load(i: u32) -> f32 {
    return f32(b[i]);
}

// Elements 4i .. 4i + 3 of B, widened to f32.
fn b4_load(i: u32) -> vec4<f32> {
    return vec4<f32>(b4[i]);
}
