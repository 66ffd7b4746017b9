// Nearest-neighbour x2 upsample, NCHW: y[nc, i, j] = x[nc, i / 2, j / 2].
// One invocation per output element; the grid is folded into x/y (65,535 per dimension).

struct Params {
    total: u32,      // output elements
    h: u32,          // input height
    w: u32,          // input width
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;          // [N, C, H, W]
@group(0) @binding(2) var<storage, read_write> y: array<f32>;    // [N, C, 2H, 2W]

const WG: u32 = 256u;

@compute @workgroup_size(256, 1, 1)
fn upsample_nearest2(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) li: u32) {
    let i = grid_index(wid, nwg, WG, li);
    if i >= p.total {
        return;
    }
    let w2 = 2u * p.w;
    let h2 = 2u * p.h;
    let j = i % w2;
    let r = (i / w2) % h2;
    let nc = i / (w2 * h2);
    y[i] = x[(nc * p.h + r / 2u) * p.w + j / 2u];
}

// Backward: dx[nc, i, j] = Σ of g over the 2×2 block [2i, 2i+1] × [2j, 2j+1], one invocation
// per input element (`total` is then the number of input elements): one pass over g, no
// permuted copy. Summed as (g00 + g01) + (g10 + g11), as the reduction it replaces did.
@group(0) @binding(1) var<storage, read> g_up: array<f32>;           // [N, C, 2H, 2W]
@group(0) @binding(2) var<storage, read_write> dx_down: array<f32>;  // [N, C, H, W]

@compute @workgroup_size(256, 1, 1)
fn upsample_nearest2_backward(@builtin(workgroup_id) wid: vec3<u32>,
                              @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) li: u32) {
    let i = grid_index(wid, nwg, WG, li);
    if i >= p.total {
        return;
    }
    let j = i % p.w;
    let r = (i / p.w) % p.h;
    let nc = i / (p.w * p.h);
    let w2 = 2u * p.w;
    let top = (nc * 2u * p.h + 2u * r) * w2 + 2u * j;
    dx_down[i] = (g_up[top] + g_up[top + 1u]) + (g_up[top + w2] + g_up[top + w2 + 1u]);
}
