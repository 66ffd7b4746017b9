// General permute (transpose) of up to 8 dims after merging:
//   out[i0, .., i{r-1}] = x[sum_d i_d * in_strides[d]]
// where in_strides[d] is the input stride of the dim that becomes output dim d. One
// invocation per output element; the data is copied as raw 32-bit words, so f32 and u32
// tensors share the kernel.
//
// `off` is added to the input index (permute: a strided view starting inside a buffer, such
// as one third of the fused QKV projection's rows) or to the output index (scatter: the
// inverse, writing the input's elements in order to `y[off + sum_d i_d * strides[d]]`).

struct Params {
    n: u32,          // elements
    rank: u32,       // dims used below
    off: u32,        // element offset: of the input (permute) or the output (scatter)
    _pad: u32,
    out_dims: array<vec4<u32>, 2>,    // output shape, innermost last
    in_strides: array<vec4<u32>, 2>,  // input (scatter: output) element stride per dim
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<u32>;          // input, any shape
@group(0) @binding(2) var<storage, read_write> y: array<u32>;    // output, out_dims

override WG: u32 = 256u;
// Consecutive elements (along the innermost output dim) one invocation copies: the index
// arithmetic, integer divisions that CPU adapters run lane by lane, is done once per run.
// 1 on GPUs, where neighbouring invocations must touch neighbouring words.
override RUN: u32 = 1u;

fn dim(i: u32) -> u32 { return p.out_dims[i / 4u][i % 4u]; }
fn stride(i: u32) -> u32 { return p.in_strides[i / 4u][i % 4u]; }

// The run invocation `r` copies: the flat index of its first element in the ordered
// (out_dims) tensor, the strided index of that element, and the run's length (0: none).
struct Run {
    i0: u32,
    at: u32,
    len: u32,
}

fn run_of(r: u32) -> Run {
    let last = p.rank - 1u;
    let inner = dim(last);
    let segs = (inner + RUN - 1u) / RUN;
    let row = r / segs;
    if row >= p.n / inner {
        return Run(0u, 0u, 0u);
    }
    let s0 = (r % segs) * RUN;
    var rem = row;
    var at = s0 * stride(last);
    for (var d = i32(last) - 1; d >= 0; d--) {
        let dd = u32(d);
        let c = rem % dim(dd);
        rem = rem / dim(dd);
        at += c * stride(dd);
    }
    return Run(row * inner + s0, at, min(RUN, inner - s0));
}

@compute @workgroup_size(WG)
fn permute(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    let r = run_of(grid_index(wid, nwg, WG, li));
    let st = stride(p.rank - 1u);
    for (var j = 0u; j < r.len; j++) {
        y[r.i0 + j] = x[p.off + r.at + j * st];
    }
}

// The inverse of permute: x is read in order (its shape is out_dims), element i goes to
// y[off + sum_d i_d * strides[d]]. Every target is written once when the strides do not
// overlap.
@compute @workgroup_size(WG)
fn scatter(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    let r = run_of(grid_index(wid, nwg, WG, li));
    let st = stride(p.rank - 1u);
    for (var j = 0u; j < r.len; j++) {
        y[p.off + r.at + j * st] = x[r.i0 + j];
    }
}
