// 2-D convolution, NCHW, as an implicit GEMM with a 4x4 register tile:
//   y[n, co, oy, ox] = bias[co] + res[n, co, oy, ox]
//                    + sum_{ci, ky, kx} w[co, ci, ky, kx] * xin[n, ci, oy*S + ky - pad_top, ox*S + kx - pad_left]
// where xin is x zero-padded (any top/bottom/left/right padding; bottom/right padding is simply
// reads past the edge), and, with UPSAMPLE, x nearest-upsampled x2 first (xin[i, j] = x[i/2, j/2])
// so that the upsampled tensor is never materialised.
//
// Each invocation computes 4 output channels x 4 horizontally adjacent output pixels. For one
// (ci, ky) it loads the input row segment those 4 pixels need once (3*S + KW values) and reuses
// it for every kx and all 4 channels. No workgroup memory and no barriers (CPU Vulkan runs a
// workgroup's invocations as SIMD lanes; adjacent lanes take adjacent pixel blocks and share
// the same weights).

struct Params {
    n: u32,
    cin: u32,
    h: u32,          // input height (before the optional upsample)
    w: u32,
    cout: u32,
    ho: u32,
    wo: u32,
    wblocks: u32,    // ceil(wo / 4)
    blocks: u32,     // n * ho * wblocks: pixel blocks
    pad_top: u32,
    pad_left: u32,
    hv: u32,         // height seen by the kernel window (2h with UPSAMPLE)
    wv: u32,
    co_base: u32,    // first output channel of this dispatch (channel blocks past 65535 are split)
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;          // [N, Cin, H, W]
@group(0) @binding(2) var<storage, read> wt: array<f32>;         // [Cout, Cin, KH, KW]
@group(0) @binding(3) var<storage, read> bias: array<f32>;       // [Cout] (read only if HAS_BIAS)
@group(0) @binding(4) var<storage, read> res: array<f32>;        // [N, Cout, Ho, Wo] (read only if HAS_RES)
@group(0) @binding(5) var<storage, read_write> y: array<f32>;    // [N, Cout, Ho, Wo]

override KH: u32 = 3u;
override KW: u32 = 3u;
override STRIDE: u32 = 1u;
override HAS_BIAS: bool = false;
override HAS_RES: bool = false;
override UPSAMPLE: bool = false;

const WG: u32 = 64u;
// Longest input row segment: 3 * STRIDE + KW <= 16 (checked on the host).
const MAX_SPAN: u32 = 16u;

@compute @workgroup_size(64, 1, 1)
fn conv2d(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let blk = (wid.x + wid.y * nwg.x) * WG + li;
    if blk >= p.blocks {
        return;
    }
    let co0 = p.co_base + wid.z * 4u;
    let ox0 = (blk % p.wblocks) * 4u;
    let t = blk / p.wblocks;
    let oy = t % p.ho;
    let n = t / p.ho;
    let iy0 = i32(oy * STRIDE) - i32(p.pad_top);
    let ix0 = i32(ox0 * STRIDE) - i32(p.pad_left);
    let span = 3u * STRIDE + KW;
    let ksz = p.cin * KH * KW;
    // Channels past the end read the last channel's weights; their results are not stored.
    let w0 = co0 * ksz;
    let w1 = min(co0 + 1u, p.cout - 1u) * ksz;
    let w2 = min(co0 + 2u, p.cout - 1u) * ksz;
    let w3 = min(co0 + 3u, p.cout - 1u) * ksz;
    var acc: array<vec4<f32>, 4>;   // acc[j][i]: pixel ox0 + j, channel co0 + i
    for (var ci = 0u; ci < p.cin; ci++) {
        let xb = (n * p.cin + ci) * p.h * p.w;
        let wc = ci * KH * KW;
        for (var ky = 0u; ky < KH; ky++) {
            let iy = iy0 + i32(ky);
            let row_ok = iy >= 0 && iy < i32(p.hv);
            var sy = u32(max(iy, 0));
            if UPSAMPLE {
                sy = sy / 2u;
            }
            var xs: array<f32, MAX_SPAN>;
            for (var s = 0u; s < span; s++) {
                let ix = ix0 + i32(s);
                var v = 0.0;
                if row_ok && ix >= 0 && ix < i32(p.wv) {
                    var sx = u32(ix);
                    if UPSAMPLE {
                        sx = sx / 2u;
                    }
                    v = x[xb + sy * p.w + sx];
                }
                xs[s] = v;
            }
            for (var kx = 0u; kx < KW; kx++) {
                let o = wc + ky * KW + kx;
                let wv = vec4<f32>(wt[w0 + o], wt[w1 + o], wt[w2 + o], wt[w3 + o]);
                acc[0] = fma(vec4<f32>(xs[kx]), wv, acc[0]);
                acc[1] = fma(vec4<f32>(xs[kx + STRIDE]), wv, acc[1]);
                acc[2] = fma(vec4<f32>(xs[kx + 2u * STRIDE]), wv, acc[2]);
                acc[3] = fma(vec4<f32>(xs[kx + 3u * STRIDE]), wv, acc[3]);
            }
        }
    }
    for (var j = 0u; j < 4u; j++) {
        let ox = ox0 + j;
        if ox >= p.wo {
            break;
        }
        for (var i = 0u; i < 4u; i++) {
            let co = co0 + i;
            if co >= p.cout {
                break;
            }
            let o = ((n * p.cout + co) * p.ho + oy) * p.wo + ox;
            var v = acc[j][i];
            if HAS_BIAS {
                v += bias[co];
            }
            if HAS_RES {
                v += res[o];
            }
            y[o] = v;
        }
    }
}
