// Microkernels behind `vqclip bench peak`: the adapter's own limits, measured.
//   fma_f32  every invocation runs 2 independent vec4 FMA chains, 16 steps each per loop
//            trip, written out (fma8) rather than in an inner loop; the sum is stored so
//            that no compiler can drop the chains. 256 FLOP per trip. Two vec4 chains are
//            8 independent FMAs per invocation: enough to hide FMA latency on a GPU (whose
//            other warps hide the rest) and on lavapipe, where each is one 8-lane AVX FMA.
//            On lavapipe (Mesa 22.3 and 26.1, 2 cores) this measured 112-125 GFLOP/s,
//            against 54-60 for the earlier 8 chains in an inner loop of 4 steps (the
//            loop's own overhead and 32 live vectors held it down; an inner loop of 16
//            steps over 2 chains ran at 20-40), and 70 with 1 chain (latency-bound).
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

// Eight dependent FMAs: x = x * m + a, eight times.
fn fma8(x: vec4<f32>, m: vec4<f32>, a: vec4<f32>) -> vec4<f32> {
    let y = fma(fma(fma(fma(x, m, a), m, a), m, a), m, a);
    return fma(fma(fma(fma(y, m, a), m, a), m, a), m, a);
}

@compute @workgroup_size(64)
fn fma_f32(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = flat(gid);
    let s = f32(i & 1023u) * 1e-6;
    let m = vec4<f32>(p.mul);
    let a = vec4<f32>(p.add);
    var x0 = vec4<f32>(s, s + 0.1, s + 0.2, s + 0.3);
    var x1 = x0 + 0.01;
    for (var t = 0u; t < p.iters; t++) {
        x0 = fma8(x0, m, a);
        x1 = fma8(x1, m, a);
        x0 = fma8(x0, m, a);
        x1 = fma8(x1, m, a);
    }
    if i < p.n {
        dst[i] = x0 + x1;
    }
}

@compute @workgroup_size(64)
fn copy(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = flat(gid);
    if i < p.n {
        dst[i] = src[i];
    }
}
