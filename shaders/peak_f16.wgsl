// f16 FMA throughput for `vqclip bench peak`, the f16 twin of fma_f32 in shaders/peak.wgsl
// (its own module: `enable f16` needs the SHADER_F16 feature, which the host checks). Same
// params and grid; 8 vec4<f16> chains, 4 steps per trip: 256 FLOP per trip. The sum is
// stored widened to f32, in the same binding as fma_f32's. Unlike fma_f32 it keeps the inner
// loop over 8 chains: written out over 2 or 8 chains it measured 14-15 GFLOP/s on lavapipe
// (Mesa 22.3 and 26.1), against 20-25 this way.
enable f16;

struct Params {
    iters: u32,
    n: u32,
    row: u32,
    mul: f32,
    add: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;  // [n]

@compute @workgroup_size(64)
fn fma_f16(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.y * p.row + gid.x;
    let s = f16(f32(i & 1023u) * 1e-4);
    let m = vec4<f16>(f16(p.mul));
    let a = vec4<f16>(f16(p.add));
    var x0 = vec4<f16>(s, s + 0.1h, s + 0.2h, s + 0.3h);
    var x1 = x0 + 0.01h;
    var x2 = x0 + 0.02h;
    var x3 = x0 + 0.03h;
    var x4 = x0 + 0.04h;
    var x5 = x0 + 0.05h;
    var x6 = x0 + 0.06h;
    var x7 = x0 + 0.07h;
    for (var t = 0u; t < p.iters; t++) {
        for (var u = 0u; u < 4u; u++) {
            x0 = fma(x0, m, a);
            x1 = fma(x1, m, a);
            x2 = fma(x2, m, a);
            x3 = fma(x3, m, a);
            x4 = fma(x4, m, a);
            x5 = fma(x5, m, a);
            x6 = fma(x6, m, a);
            x7 = fma(x7, m, a);
        }
    }
    if i < p.n {
        dst[i] = vec4<f32>(((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)));
    }
}
