// General permute (transpose) of up to 8 dims after merging:
//   out[i0, .., i{r-1}] = x[sum_d i_d * in_strides[d]]
// where in_strides[d] is the input stride of the dim that becomes output dim d. One
// invocation per output element; the data is copied as raw 32-bit words, so f32 and u32
// tensors share the kernel.

struct Params {
    n: u32,          // elements
    rank: u32,       // dims used below
    _pad0: u32,
    _pad1: u32,
    out_dims: array<vec4<u32>, 2>,    // output shape, innermost last
    in_strides: array<vec4<u32>, 2>,  // input element stride per output dim
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
    y[i] = x[src];
}
