// Columns of a convolution's input for a product with the weights (im2col):
//   cols[n, k, oy*Wo + ox] = xin[n, ci, oy*S + ky - pad_top, ox*S + kx - pad_left]
//   for k = (ci*KH + ky)*KW + kx < K;  cols[n, K, ·] = 1 (the bias row, with ONES_ROW);
//   rows past that up to Kp are 0 (padding K to a multiple of 4 for the vec4 products).
// xin is x zero-padded and, with UPSAMPLE, nearest-upsampled x2 first (xin[i, j] = x[i/2, j/2]).
// One invocation per row of Wo column values.

struct Params {
    n: u32,
    cin: u32,
    h: u32,         // input height (before the optional upsample)
    w: u32,
    ho: u32,
    wo: u32,
    hv: u32,        // height seen by the kernel window (2h with UPSAMPLE)
    wv: u32,
    pad_top: u32,
    pad_left: u32,
    k: u32,         // Cin * KH * KW
    kp: u32,        // rows of cols per image
    total: u32,     // n * kp * ho: rows of Wo values
    _pad0: u32, _pad1: u32, _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;           // [N, Cin, H, W]
@group(0) @binding(2) var<storage, read_write> cols: array<f32>;  // [N, Kp, Ho*Wo]

override KH: u32 = 3u;
override KW: u32 = 3u;
override STRIDE: u32 = 1u;
override UPSAMPLE: bool = false;
override ONES_ROW: bool = false;

const WG: u32 = 256u;

@compute @workgroup_size(256, 1, 1)
fn im2col(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    // One invocation per output row (n, k, oy): Wo values, divisions once per row.
    let r = grid_index(wid, nwg, WG, li);
    if r >= p.total {
        return;
    }
    let oy = r % p.ho;
    let t = r / p.ho;
    let k = t % p.kp;
    let n = t / p.kp;
    let base = (t * p.ho + oy) * p.wo;
    if k >= p.k {
        let v = select(0.0, 1.0, ONES_ROW && k == p.k);
        for (var ox = 0u; ox < p.wo; ox++) {
            cols[base + ox] = v;
        }
        return;
    }
    let kx = k % KW;
    let ky = (k / KW) % KH;
    let ci = k / (KW * KH);
    let iy = i32(oy * STRIDE + ky) - i32(p.pad_top);
    if iy < 0 || iy >= i32(p.hv) {
        for (var ox = 0u; ox < p.wo; ox++) {
            cols[base + ox] = 0.0;
        }
        return;
    }
    var sy = u32(iy);
    if UPSAMPLE {
        sy = sy / 2u;
    }
    let xrow = ((n * p.cin + ci) * p.h + sy) * p.w;
    var ix = i32(kx) - i32(p.pad_left);
    for (var ox = 0u; ox < p.wo; ox++) {
        var v = 0.0;
        if ix >= 0 && ix < i32(p.wv) {
            var sx = u32(ix);
            if UPSAMPLE {
                sx = sx / 2u;
            }
            v = x[xrow + sx];
        }
        cols[base + ox] = v;
        ix += i32(STRIDE);
    }
}
