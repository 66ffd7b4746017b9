// The second pass of a parallel split-K matmul (ops/matmul_split.rs): the first pass wrote
// the S partial products over K's S slices as a batch [S, M, N] (alpha applied, nothing
// else); here each output value is their sum with the epilogue the single-pass kernels fuse:
//   C[i, j] = act(sum_s P[s, i, j] + bias[j]) + res[i, j]
// One invocation per output value, the S partials summed in slice order.

struct Params {
    mn: u32,     // M * N values of C
    n: u32,      // N: the bias index is the value's column
    splits: u32, // S
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> part: array<f32>;       // [S, M, N]
@group(0) @binding(2) var<storage, read> bias: array<f32>;       // [N] (read only if HAS_BIAS)
@group(0) @binding(3) var<storage, read> res: array<f32>;        // [M, N] (read only if HAS_RES)
@group(0) @binding(4) var<storage, read_write> c: array<f32>;    // [M, N]

override HAS_BIAS: bool = false;
override HAS_RES: bool = false;
override ACT: u32 = 0u;
override WG: u32 = 256u;

@compute @workgroup_size(WG)
fn split_sum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) li: u32) {
    let e = grid_index(wid, nwg, WG, li);
    if e >= p.mn {
        return;
    }
    var x = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        x += part[s * p.mn + e];
    }
    if HAS_BIAS {
        x += bias[e % p.n];
    }
    x = apply_act(ACT, x);
    if HAS_RES {
        x += res[e];
    }
    c[e] = x;
}
