// Reduction over one axis of x viewed as [outer, A, inner]:
//   y[o, p, i] = op over a = p, p + P, p + 2P, .. < A of x[o, a, i]      (then * scale)
// P = 1 gives the final result; a long axis is cut into P interleaved partials first and
// the [outer, P, inner] partials are reduced again (no atomics: deterministic). Neighbouring
// invocations read neighbouring values (coalesced on GPUs), no barriers, and each invocation
// loops at most ceil(A / P) times (llvmpipe stops loops after 65,535 iterations).
// OP: 0 sum, 1 max, 2 min (mean = sum with scale 1/A).

struct Params {
    outer: u32,
    a: u32,
    inner: u32,
    parts: u32,
    scale: f32,
    _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;          // [outer, A, inner]
@group(0) @binding(2) var<storage, read_write> y: array<f32>;    // [outer, P, inner]

override OP: u32 = 0u;
override WG: u32 = 256u;

fn init() -> f32 {
    switch OP {
        case 1u: { return bitcast<f32>(0xff800000u); }   // -inf
        case 2u: { return bitcast<f32>(0x7f800000u); }   // +inf
        default: { return 0.0; }
    }
}

fn combine(acc: f32, v: f32) -> f32 {
    switch OP {
        case 1u: { return max(acc, v); }
        case 2u: { return min(acc, v); }
        default: { return acc + v; }
    }
}

@compute @workgroup_size(WG)
fn reduce(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let id = grid_index(wid, nwg, WG, li);
    if id >= p.outer * p.parts * p.inner {
        return;
    }
    let i = id % p.inner;
    let t = id / p.inner;
    let part = t % p.parts;
    let o = t / p.parts;
    let base = o * p.a * p.inner + i;
    var acc = init();
    for (var a = part; a < p.a; a += p.parts) {
        acc = combine(acc, x[base + a * p.inner]);
    }
    if OP == 0u {
        acc *= p.scale;
    }
    y[id] = acc;
}
