// Copies a block between two tensors viewed as [outer, A, inner] around one axis:
//   dst[o, d0 + a, i] = src[o, s0 + a, i]   for a < len
// slice is one such copy out of a larger source, concat one per input into a larger output.
// One invocation per value; values are copied as raw 32-bit words (f32 and u32 alike).

struct Params {
    n: u32,          // outer * len * inner
    len: u32,
    inner: u32,
    a_src: u32,      // axis size of src
    a_dst: u32,      // axis size of dst
    s0: u32,         // first src index along the axis
    d0: u32,         // first dst index along the axis
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> dst: array<u32>;  // [outer, A_dst, inner]
@group(0) @binding(2) var<storage, read> src: array<u32>;        // [outer, A_src, inner]

override WG: u32 = 256u;

@compute @workgroup_size(WG)
fn copy_slice(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let e = grid_index(wid, nwg, WG, li);
    if e >= p.n {
        return;
    }
    let i = e % p.inner;
    let t = e / p.inner;
    let a = t % p.len;
    let o = t / p.len;
    dst[(o * p.a_dst + p.d0 + a) * p.inner + i] = src[(o * p.a_src + p.s0 + a) * p.inner + i];
}
