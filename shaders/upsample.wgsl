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
