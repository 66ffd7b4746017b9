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
    ci0: u32,        // input channels [ci0, ci1) of this dispatch (long reductions are split
    ci1: u32,        // and chained through `res`: llvmpipe caps the loop iterations per invocation)
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
    let blk = grid_index(wid, nwg, WG, li);
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
    for (var ci = p.ci0; ci < p.ci1; ci++) {
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
                xs[s] = ld(xb, sy, ix0 + i32(s), row_ok);
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

// 3x3 specialisation (stride 1 or 2): the input row segment lives in named registers and the
// 4-pixel vectors for each kx are built from them, and the 8 channels' accumulators are named
// variables, so nothing is a dynamically indexed private array (llvmpipe turns those into
// per-lane memory accesses). Each invocation computes 8 output channels x 4 pixels.

// Branch-free padded load: the index is clamped into the row and the value masked, so the
// load itself is unconditional (llvmpipe handles loads outside control flow better).
fn ld(xb: u32, sy: u32, ix: i32, row_ok: bool) -> f32 {
    let ok = row_ok && ix >= 0 && ix < i32(p.wv);
    var sx = u32(clamp(ix, 0, i32(p.wv) - 1));
    if UPSAMPLE {
        sx = sx / 2u;
    }
    return select(0.0, x[xb + min(sy, p.h - 1u) * p.w + sx], ok);
}

// v0 * w[wb] + v1 * w[wb + 1] + v2 * w[wb + 2] + acc
fn tap3(acc: vec4<f32>, v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, wb: u32) -> vec4<f32> {
    return fma(v2, vec4<f32>(wt[wb + 2u]), fma(v1, vec4<f32>(wt[wb + 1u]), fma(v0, vec4<f32>(wt[wb]), acc)));
}

fn store4(n: u32, co: u32, oy: u32, ox0: u32, v: vec4<f32>) {
    if co >= p.cout {
        return;
    }
    let ob = ((n * p.cout + co) * p.ho + oy) * p.wo + ox0;
    for (var j = 0u; j < 4u; j++) {
        if ox0 + j >= p.wo {
            break;
        }
        var r = v[j];
        if HAS_BIAS {
            r += bias[co];
        }
        if HAS_RES {
            r += res[ob + j];
        }
        y[ob + j] = r;
    }
}

@compute @workgroup_size(64, 1, 1)
fn conv3x3(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) li: u32) {
    let blk = grid_index(wid, nwg, WG, li);
    if blk >= p.blocks {
        return;
    }
    let co0 = p.co_base + wid.z * 8u;
    let ox0 = (blk % p.wblocks) * 4u;
    let t = blk / p.wblocks;
    let oy = t % p.ho;
    let n = t / p.ho;
    let iy0 = i32(oy * STRIDE) - i32(p.pad_top);
    let ix0 = i32(ox0 * STRIDE) - i32(p.pad_left);
    let ksz = p.cin * 9u;
    let last = p.cout - 1u;
    let w0 = co0 * ksz;
    let w1 = min(co0 + 1u, last) * ksz;
    let w2 = min(co0 + 2u, last) * ksz;
    let w3 = min(co0 + 3u, last) * ksz;
    let w4 = min(co0 + 4u, last) * ksz;
    let w5 = min(co0 + 5u, last) * ksz;
    let w6 = min(co0 + 6u, last) * ksz;
    let w7 = min(co0 + 7u, last) * ksz;
    var c0: vec4<f32>;
    var c1: vec4<f32>;
    var c2: vec4<f32>;
    var c3: vec4<f32>;
    var c4: vec4<f32>;
    var c5: vec4<f32>;
    var c6: vec4<f32>;
    var c7: vec4<f32>;
    for (var ci = p.ci0; ci < p.ci1; ci++) {
        let xb = (n * p.cin + ci) * p.h * p.w;
        for (var ky = 0u; ky < 3u; ky++) {
            let iy = iy0 + i32(ky);
            let row_ok = iy >= 0 && iy < i32(p.hv);
            var sy = u32(max(iy, 0));
            if UPSAMPLE {
                sy = sy / 2u;
            }
            var v0: vec4<f32>;
            var v1: vec4<f32>;
            var v2: vec4<f32>;
            let a0 = ld(xb, sy, ix0, row_ok);
            let a1 = ld(xb, sy, ix0 + 1, row_ok);
            let a2 = ld(xb, sy, ix0 + 2, row_ok);
            let a3 = ld(xb, sy, ix0 + 3, row_ok);
            let a4 = ld(xb, sy, ix0 + 4, row_ok);
            let a5 = ld(xb, sy, ix0 + 5, row_ok);
            if STRIDE == 1u {
                v0 = vec4<f32>(a0, a1, a2, a3);
                v1 = vec4<f32>(a1, a2, a3, a4);
                v2 = vec4<f32>(a2, a3, a4, a5);
            } else {
                let a6 = ld(xb, sy, ix0 + 6, row_ok);
                let a7 = ld(xb, sy, ix0 + 7, row_ok);
                let a8 = ld(xb, sy, ix0 + 8, row_ok);
                v0 = vec4<f32>(a0, a2, a4, a6);
                v1 = vec4<f32>(a1, a3, a5, a7);
                v2 = vec4<f32>(a2, a4, a6, a8);
            }
            let o = ci * 9u + ky * 3u;
            c0 = tap3(c0, v0, v1, v2, w0 + o);
            c1 = tap3(c1, v0, v1, v2, w1 + o);
            c2 = tap3(c2, v0, v1, v2, w2 + o);
            c3 = tap3(c3, v0, v1, v2, w3 + o);
            c4 = tap3(c4, v0, v1, v2, w4 + o);
            c5 = tap3(c5, v0, v1, v2, w5 + o);
            c6 = tap3(c6, v0, v1, v2, w6 + o);
            c7 = tap3(c7, v0, v1, v2, w7 + o);
        }
    }
    store4(n, co0, oy, ox0, c0);
    store4(n, co0 + 1u, oy, ox0, c1);
    store4(n, co0 + 2u, oy, ox0, c2);
    store4(n, co0 + 3u, oy, ox0, c3);
    store4(n, co0 + 4u, oy, ox0, c4);
    store4(n, co0 + 5u, oy, ox0, c5);
    store4(n, co0 + 6u, oy, ox0, c6);
    store4(n, co0 + 7u, oy, ox0, c7);
}
