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

fn dim(i: u32) -> u32 { return p.out_dims[i / 4u][i % 4u]; }
fn stride(i: u32) -> u32 { return p.in_strides[i / 4u][i % 4u]; }

@compute @workgroup_size(WG)
fn permute(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    let i = grid_index(wid, nwg, WG, li);
    if i >= p.n {
        return;
    }
    var rem = i;
    var src = 0u;
    for (var d = i32(p.rank) - 1; d >= 0; d--) {
        let dd = u32(d);
        let c = rem % dim(dd);
        rem = rem / dim(dd);
        src += c * stride(dd);
    }
    y[i] = x[p.off + src];
}

// The inverse of permute: x is read in order (its shape is out_dims), element i goes to
// y[off + sum_d i_d * strides[d]]. Every target is written once when the strides do not
// overlap.
@compute @workgroup_size(WG)
fn scatter(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    let i = grid_index(wid, nwg, WG, li);
    if i >= p.n {
        return;
    }
    var rem = i;
    var dst = 0u;
    for (var d = i32(p.rank) - 1; d >= 0; d--) {
        let dd = u32(d);
        let c = rem % dim(dd);
        rem = rem / dim(dd);
        dst += c * stride(dd);
    }
    y[p.off + dst] = x[i];
}
