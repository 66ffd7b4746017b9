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
// A subgroup of 8 lanes computes SG_ROWS (8, 16 or 32) rows x 32 columns: each lane owns 4
// output pixels and loads, per 4 channels, the 16 input values under them at the current
// tap (16 scalar loads, as many load instructions on lavapipe as the 4 vec4 loads of B in
// the matmul), the weight rows go lane to lane by subgroupBroadcast as in the matmul. Per
// tap the 4 pixels' source offsets and their padding masks are worked out once and reused
// for every channel.
//
// With ROW_REUSE (see below) a kernel row's three taps share their input loads.
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
// Subgroups stacked along Cout in a workgroup (1, 2, 4 or 8); the others sit side by side
// along the pixels, so that few output channels do not leave whole subgroups idle.
override SG_STACK: u32 = 8u;
// 3-wide kernels at stride 1 with Wo % 4 == 0 (the host checks): a lane's 4 pixels sit in
// one row, so the three kx taps of a kernel row read 6 neighbouring inputs per channel
// instead of 12; the three taps' weight vectors are loaded together.
override ROW_REUSE: bool = false;

// The 4 pixels' values of one channel plane starting at `base`: zero where `ok` is false.
fn pixels(base: u32, off: vec4<u32>, ok: vec4<bool>) -> vec4<f32> {
    let v = vec4<f32>(x[base + off.x], x[base + off.y], x[base + off.z], x[base + off.w]);
    return select(vec4<f32>(0.0), v, ok);
}

// The same for 2 pixels.
fn pair(base: u32, off: vec2<u32>, ok: vec2<bool>) -> vec2<f32> {
    return select(vec2<f32>(0.0), vec2<f32>(x[base + off.x], x[base + off.y]), ok);
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

// acc[8g + r] += (row 8g + r's 4 k) · bk for the 8 rows of group g, from the lanes' loads.
fn group_fma(mine: vec4<f32>, bk: mat4x4<f32>, g: u32, acc: ptr<function, array<vec4<f32>, 64>>) {
    rows_fma(rows_lo(mine), rows_hi(mine), bk, 8u * g, acc);
}

// One step of 4 k at packed weight vec4 `at`: each group of 8 rows loads its weights (lane
// r: row 8g + r, starting at a_rows[g]) and multiplies them into bk. Group numbers are
// constants: a dynamic index would keep acc in memory.
fn step(a_rows: vec4<u32>, at: u32, bk: mat4x4<f32>, acc: ptr<function, array<vec4<f32>, 64>>) {
    group_fma(w4[a_rows.x + at], bk, 0u, acc);
    if SG_ROWS >= 16u {
        group_fma(w4[a_rows.y + at], bk, 1u, acc);
    }
    if SG_ROWS == 32u {
        group_fma(w4[a_rows.z + at], bk, 2u, acc);
        group_fma(w4[a_rows.w + at], bk, 3u, acc);
    }
}

// Channel planes 1..3 after `base` and their masks; with CIN_TAIL, planes past Cin are
// masked and read at `base` (inside x).
struct Planes {
    b: vec3<u32>,
    live: vec3<bool>,
}

fn planes(base: u32, hw: u32, c0: u32) -> Planes {
    var b = vec3<u32>(base + hw, base + 2u * hw, base + 3u * hw);
    var live = vec3<bool>(true);
    if CIN_TAIL {
        live = vec3<u32>(c0 + 1u, c0 + 2u, c0 + 3u) < vec3<u32>(p.cin);
        b = select(vec3<u32>(base), b, live);
    }
    return Planes(b, live);
}

fn store_group(bi: u32, row: u32, col: u32, live: vec4<bool>, g: u32,
               acc: ptr<function, array<vec4<f32>, 64>>) {
    let o = 8u * g;
    store_row(bi, row + o, col, live, (*acc)[o]);
    store_row(bi, row + o + 1u, col, live, (*acc)[o + 1u]);
    store_row(bi, row + o + 2u, col, live, (*acc)[o + 2u]);
    store_row(bi, row + o + 3u, col, live, (*acc)[o + 3u]);
    store_row(bi, row + o + 4u, col, live, (*acc)[o + 4u]);
    store_row(bi, row + o + 5u, col, live, (*acc)[o + 5u]);
    store_row(bi, row + o + 6u, col, live, (*acc)[o + 6u]);
    store_row(bi, row + o + 7u, col, live, (*acc)[o + 7u]);
}

@compute @workgroup_size(64)
fn conv2d_igemm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_id) sid: u32,
                @builtin(subgroup_invocation_id) lane: u32) {
    // No early exit: every lane takes part in the broadcasts. Out-of-range lanes read
    // clamped addresses and store nothing.
    let bi = min(wid.z + p.batch0, p.batch - 1u);
    let row = (wid.y * SG_STACK + sid % SG_STACK) * SG_ROWS;
    let col = ((wid.x * (8u / SG_STACK) + sid / SG_STACK) * 8u + lane) * 4u;
    let npix = p.ho * p.wo;
    let hw = p.h * p.w;
    let kq = KH * KW * p.cq;
    let a_rows = min(vec4<u32>(row + lane) + vec4<u32>(0u, 8u, 16u, 24u),
                     vec4<u32>(p.cout - 1u)) * kq;
    // This lane's 4 output pixels and the virtual-input corner of each one's window.
    let pix = vec4<u32>(col, col + 1u, col + 2u, col + 3u);
    let live = pix < vec4<u32>(npix);
    let pc = min(pix, vec4<u32>(npix - 1u));
    let oy = pc / p.wo;
    let ox = pc - oy * p.wo;
    let y0 = vec4<i32>(oy * STRIDE) - i32(p.pad_top);
    let x0 = vec4<i32>(ox * STRIDE) - i32(p.pad_left);
    let xb = bi * p.cin * hw;
    var acc: array<vec4<f32>, 64>;
    if ROW_REUSE {
        // The 4 pixels share oy; inputs x0.x + 0..5 of each kernel row feed its 3 taps.
        let xa = x0.x + vec4<i32>(0, 1, 2, 3);
        let xe = x0.x + vec2<i32>(4, 5);
        for (var ky = 0u; ky < KH; ky++) {
            let iy = y0.x + i32(ky);
            let row_ok = live.x && iy >= 0 && iy < i32(p.hv);
            let oka = vec4<bool>(row_ok) & (xa >= vec4<i32>(0)) & (xa < vec4<i32>(i32(p.wv)));
            let oke = vec2<bool>(row_ok) & (xe >= vec2<i32>(0)) & (xe < vec2<i32>(i32(p.wv)));
            var sy = iy;
            var sxa = xa;
            var sxe = xe;
            if UPSAMPLE {
                sy = iy >> 1u;
                sxa = xa >> vec4<u32>(1u);
                sxe = xe >> vec2<u32>(1u);
            }
            let offa = select(vec4<u32>(0u), vec4<u32>(u32(sy) * p.w) + vec4<u32>(sxa), oka);
            let offe = select(vec2<u32>(0u), vec2<u32>(u32(sy) * p.w) + vec2<u32>(sxe), oke);
            let ab = ky * 3u * p.cq;
            for (var q = 0u; q < p.cq; q++) {
                let base = xb + 4u * q * hw;
                let pl = planes(base, hw, 4u * q);
                // Rows over kk (channels) of the 6 inputs: a = positions 0..3, e = 4..5.
                let a0 = pixels(base, offa, oka);
                let a1 = pixels(pl.b.x, offa, oka & vec4<bool>(pl.live.x));
                let a2 = pixels(pl.b.y, offa, oka & vec4<bool>(pl.live.y));
                let a3 = pixels(pl.b.z, offa, oka & vec4<bool>(pl.live.z));
                let e0 = pair(base, offe, oke);
                let e1 = pair(pl.b.x, offe, oke & vec2<bool>(pl.live.x));
                let e2 = pair(pl.b.y, offe, oke & vec2<bool>(pl.live.y));
                let e3 = pair(pl.b.z, offe, oke & vec2<bool>(pl.live.z));
                step(a_rows, ab + q, mat4x4<f32>(a0, a1, a2, a3), &acc);
                step(a_rows, ab + p.cq + q, mat4x4<f32>(vec4<f32>(a0.yzw, e0.x), vec4<f32>(a1.yzw, e1.x),
                                               vec4<f32>(a2.yzw, e2.x), vec4<f32>(a3.yzw, e3.x)), &acc);
                step(a_rows, ab + 2u * p.cq + q, mat4x4<f32>(vec4<f32>(a0.zw, e0), vec4<f32>(a1.zw, e1),
                                               vec4<f32>(a2.zw, e2), vec4<f32>(a3.zw, e3)), &acc);
            }
        }
    } else {
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
                let base = xb + 4u * q * hw;
                let pl = planes(base, hw, 4u * q);
                let bk = mat4x4<f32>(pixels(base, off, ok),
                                     pixels(pl.b.x, off, ok & vec4<bool>(pl.live.x)),
                                     pixels(pl.b.y, off, ok & vec4<bool>(pl.live.y)),
                                     pixels(pl.b.z, off, ok & vec4<bool>(pl.live.z)));
                step(a_rows, ab + q, bk, &acc);
            }
        }
    }
    if wid.z + p.batch0 < p.batch && col < npix {
        store_group(bi, row, col, live, 0u, &acc);
        if SG_ROWS >= 16u {
            store_group(bi, row, col, live, 1u, &acc);
        }
        if SG_ROWS == 32u {
            store_group(bi, row, col, live, 2u, &acc);
            store_group(bi, row, col, live, 3u, &acc);
        }
    }
}
