// Implicit-GEMM convolution for CPU Vulkan adapters (lavapipe): the register tile of
// shaders/matmul_subgroup.wgsl with the im2col columns read straight from the input, so no
// column buffer is written or read. Same contract as shaders/conv2d.wgsl:
//   y[n, co, oy, ox] = Σ_{ky,kx,ci} w[co, ci, ky, kx] · up?(x)[n, ci, oy·S + ky − pt, ox·S + kx − pl]
//                      + bias[co] + res[n, co, oy, ox]
// with zeros outside the (virtual, x2-upsampled if UPSAMPLE) input.
//
// As a matmul, C = W' @ cols per image: M = Cout rows, N = Ho·Wo columns, K = KH·KW·Cin4 in
// (ky, kx, ci) order, where W' is the weight repacked once as [Cout, KH, KW, Cin4] (Cin4 =
// Cin rounded up to 4, zero-filled) so that each step of 4 k is one vec4 of a weight row.
// A subgroup of 8 lanes computes SG_ROWS (8 or 16) rows x 32 columns: each lane owns 4
// output pixels and loads, per 4 channels, the 16 input values under them at the current
// tap (16 scalar loads, as many load instructions on lavapipe as the 4 vec4 loads of B in
// the matmul), the weight rows go lane to lane by subgroupBroadcast as in the matmul. Per
// tap the 4 pixels' source offsets and their padding masks are worked out once and reused
// for every channel.
//
// Requires subgroups of exactly 8 invocations (the host checks). Loops: KH·KW taps of Cin4/4
// steps, kept under llvmpipe's loop cap by the host.

struct Params {
    cin: u32,
    h: u32,
    w: u32,
    cout: u32,
    ho: u32,
    wo: u32,
    hv: u32,        // virtual input height (2h if UPSAMPLE)
    wv: u32,
    pad_top: u32,
    pad_left: u32,
    cq: u32,        // Cin4 / 4: vec4s of one tap in a packed weight row
    batch: u32,
    batch0: u32,    // first image of this dispatch (batches over 65,535 are split)
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;          // [N, Cin, H, W]
@group(0) @binding(2) var<storage, read> w4: array<vec4<f32>>;   // [Cout, KH, KW, Cin4] as vec4
@group(0) @binding(3) var<storage, read> bias: array<f32>;       // [Cout] (read only if HAS_BIAS)
@group(0) @binding(4) var<storage, read> res: array<f32>;        // [N, Cout, Ho, Wo] (if HAS_RES)
@group(0) @binding(5) var<storage, read_write> y: array<f32>;    // [N, Cout, Ho, Wo]

override KH: u32 = 3u;
override KW: u32 = 3u;
override STRIDE: u32 = 1u;
override UPSAMPLE: bool = false;
override HAS_BIAS: bool = false;
override HAS_RES: bool = false;
// Cin % 4 != 0: channels past Cin read as zero (their packed weights are zero too, but an
// infinite input times a zero weight would not be).
override CIN_TAIL: bool = false;
override SG_ROWS: u32 = 16u;

fn fma_row(a: vec4<f32>, bk: mat4x4<f32>, acc: vec4<f32>) -> vec4<f32> {
    return fma(vec4<f32>(a.x), bk[0], fma(vec4<f32>(a.y), bk[1],
           fma(vec4<f32>(a.z), bk[2], fma(vec4<f32>(a.w), bk[3], acc))));
}

// The 4 pixels' values of one channel plane starting at `base`: zero where `ok` is false.
fn pixels(base: u32, off: vec4<u32>, ok: vec4<bool>) -> vec4<f32> {
    let v = vec4<f32>(x[base + off.x], x[base + off.y], x[base + off.z], x[base + off.w]);
    return select(vec4<f32>(0.0), v, ok);
}

fn store_row(bi: u32, co: u32, col: u32, live: vec4<bool>, v: vec4<f32>) {
    if co >= p.cout {
        return;
    }
    let npix = p.ho * p.wo;
    let o = (bi * p.cout + co) * npix + col;
    var b = 0.0;
    if HAS_BIAS {
        b = bias[co];
    }
    for (var j = 0u; j < 4u; j++) {
        if live[j] {
            var s = v[j] + b;
            if HAS_RES {
                s += res[o + j];
            }
            y[o + j] = s;
        }
    }
}

@compute @workgroup_size(64)
fn conv2d_igemm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_id) sid: u32,
                @builtin(subgroup_invocation_id) lane: u32) {
    // No early exit: every lane takes part in the broadcasts. Out-of-range lanes read
    // clamped addresses and store nothing.
    let bi = min(wid.z + p.batch0, p.batch - 1u);
    let row = (wid.y * 8u + sid) * SG_ROWS;
    let col = (wid.x * 8u + lane) * 4u;
    let tall = SG_ROWS == 16u;
    let npix = p.ho * p.wo;
    let hw = p.h * p.w;
    let kq = KH * KW * p.cq;
    let a_row = min(row + lane, p.cout - 1u) * kq;
    let a_row2 = min(row + 8u + lane, p.cout - 1u) * kq;
    // This lane's 4 output pixels and the virtual-input corner of each one's window.
    let pix = vec4<u32>(col, col + 1u, col + 2u, col + 3u);
    let live = pix < vec4<u32>(npix);
    let pc = min(pix, vec4<u32>(npix - 1u));
    let oy = pc / p.wo;
    let ox = pc - oy * p.wo;
    let y0 = vec4<i32>(oy * STRIDE) - i32(p.pad_top);
    let x0 = vec4<i32>(ox * STRIDE) - i32(p.pad_left);
    let xb = bi * p.cin * hw;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var acc4 = vec4<f32>(0.0);
    var acc5 = vec4<f32>(0.0);
    var acc6 = vec4<f32>(0.0);
    var acc7 = vec4<f32>(0.0);
    var acc8 = vec4<f32>(0.0);
    var acc9 = vec4<f32>(0.0);
    var acc10 = vec4<f32>(0.0);
    var acc11 = vec4<f32>(0.0);
    var acc12 = vec4<f32>(0.0);
    var acc13 = vec4<f32>(0.0);
    var acc14 = vec4<f32>(0.0);
    var acc15 = vec4<f32>(0.0);
    for (var t = 0u; t < KH * KW; t++) {
        let ky = t / KW;
        let kx = t - ky * KW;
        let iy = y0 + i32(ky);
        let ix = x0 + i32(kx);
        let ok = live & (iy >= vec4<i32>(0)) & (iy < vec4<i32>(i32(p.hv)))
            & (ix >= vec4<i32>(0)) & (ix < vec4<i32>(i32(p.wv)));
        var sy = iy;
        var sx = ix;
        if UPSAMPLE {
            sy = iy >> vec4<u32>(1u);
            sx = ix >> vec4<u32>(1u);
        }
        let off = select(vec4<u32>(0u), vec4<u32>(sy) * p.w + vec4<u32>(sx), ok);
        let ab = t * p.cq;
        for (var q = 0u; q < p.cq; q++) {
            let mine = w4[a_row + ab + q];
            var mine2 = vec4<f32>(0.0);
            if tall {
                mine2 = w4[a_row2 + ab + q];
            }
            let c0 = 4u * q;
            let base = xb + c0 * hw;
            var ok1 = ok;
            var ok2 = ok;
            var ok3 = ok;
            var b1 = base + hw;
            var b2 = base + 2u * hw;
            var b3 = base + 3u * hw;
            if CIN_TAIL {
                // Channel planes past Cin are never read: masked, at a clamped address
                // inside x.
                ok1 = ok & vec4<bool>(c0 + 1u < p.cin);
                ok2 = ok & vec4<bool>(c0 + 2u < p.cin);
                ok3 = ok & vec4<bool>(c0 + 3u < p.cin);
                b1 = select(base, b1, c0 + 1u < p.cin);
                b2 = select(base, b2, c0 + 2u < p.cin);
                b3 = select(base, b3, c0 + 3u < p.cin);
            }
            let bk = mat4x4<f32>(pixels(base, off, ok), pixels(b1, off, ok1),
                                 pixels(b2, off, ok2), pixels(b3, off, ok3));
            let lo = mat4x4<f32>(subgroupBroadcast(mine, 0u), subgroupBroadcast(mine, 1u),
                                 subgroupBroadcast(mine, 2u), subgroupBroadcast(mine, 3u));
            let hi = mat4x4<f32>(subgroupBroadcast(mine, 4u), subgroupBroadcast(mine, 5u),
                                 subgroupBroadcast(mine, 6u), subgroupBroadcast(mine, 7u));
            acc0 = fma_row(lo[0], bk, acc0);
            acc1 = fma_row(lo[1], bk, acc1);
            acc2 = fma_row(lo[2], bk, acc2);
            acc3 = fma_row(lo[3], bk, acc3);
            acc4 = fma_row(hi[0], bk, acc4);
            acc5 = fma_row(hi[1], bk, acc5);
            acc6 = fma_row(hi[2], bk, acc6);
            acc7 = fma_row(hi[3], bk, acc7);
            if tall {
                let lo2 = mat4x4<f32>(subgroupBroadcast(mine2, 0u), subgroupBroadcast(mine2, 1u),
                                      subgroupBroadcast(mine2, 2u), subgroupBroadcast(mine2, 3u));
                let hi2 = mat4x4<f32>(subgroupBroadcast(mine2, 4u), subgroupBroadcast(mine2, 5u),
                                      subgroupBroadcast(mine2, 6u), subgroupBroadcast(mine2, 7u));
                acc8 = fma_row(lo2[0], bk, acc8);
                acc9 = fma_row(lo2[1], bk, acc9);
                acc10 = fma_row(lo2[2], bk, acc10);
                acc11 = fma_row(lo2[3], bk, acc11);
                acc12 = fma_row(hi2[0], bk, acc12);
                acc13 = fma_row(hi2[1], bk, acc13);
                acc14 = fma_row(hi2[2], bk, acc14);
                acc15 = fma_row(hi2[3], bk, acc15);
            }
        }
    }
    if wid.z + p.batch0 < p.batch && col < npix {
        store_row(bi, row, col, live, acc0);
        store_row(bi, row + 1u, col, live, acc1);
        store_row(bi, row + 2u, col, live, acc2);
        store_row(bi, row + 3u, col, live, acc3);
        store_row(bi, row + 4u, col, live, acc4);
        store_row(bi, row + 5u, col, live, acc5);
        store_row(bi, row + 6u, col, live, acc6);
        store_row(bi, row + 7u, col, live, acc7);
        if tall {
            store_row(bi, row + 8u, col, live, acc8);
            store_row(bi, row + 9u, col, live, acc9);
            store_row(bi, row + 10u, col, live, acc10);
            store_row(bi, row + 11u, col, live, acc11);
            store_row(bi, row + 12u, col, live, acc12);
            store_row(bi, row + 13u, col, live, acc13);
            store_row(bi, row + 14u, col, live, acc14);
            store_row(bi, row + 15u, col, live, acc15);
        }
    }
}
