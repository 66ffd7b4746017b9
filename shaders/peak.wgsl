// Microkernels behind `vqclip bench peak`: the adapter's own limits, measured.
//   fma_f32  every invocation runs 8 independent vec4 FMA chains (enough independent work
//            to hide FMA latency on CPUs and GPUs alike), 4 steps per loop trip; the sum is
//            stored so that no compiler can drop the chains. 256 FLOP per trip.
//   copy     dst = src as vec4: one read and one write of 16 bytes per invocation (STREAM
//            "copy"), over buffers far larger than any cache.
// Both use a 2D grid of 64-wide workgroups (x up to 65,535); `n` bounds the flat index.

struct Params {
    iters: u32,    // loop trips per invocation (fma_f32), under llvmpipe's loop cap
    n: u32,        // invocations that store (fma_f32) or vec4s copied (copy)
    row: u32,      // invocations per grid row: 64 * workgroups in x
    mul: f32,      // FMA chain constants, uniforms so that nothing is folded
    add: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> src: array<vec4<f32>>;        // [n] (copy)
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;  // [n]

fn flat(gid: vec3<u32>) -> u32 {
    return gid.y * p.row + gid.x;
}

@compute @workgroup_size(64)
fn fma_f32(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = flat(gid);
    let s = f32(i & 1023u) * 1e-6;
    let m = vec4<f32>(p.mul);
    let a = vec4<f32>(p.add);
    var x0 = vec4<f32>(s, s + 0.1, s + 0.2, s + 0.3);
    var x1 = x0 + 0.01;
    var x2 = x0 + 0.02;
    var x3 = x0 + 0.03;
    var x4 = x0 + 0.04;
    var x5 = x0 + 0.05;
    var x6 = x0 + 0.06;
    var x7 = x0 + 0.07;
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
        dst[i] = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7));
    }
}

@compute @workgroup_size(64)
fn copy(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = flat(gid);
    if i < p.n {
        dst[i] = src[i];
    }
}
