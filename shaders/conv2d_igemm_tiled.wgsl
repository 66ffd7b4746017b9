// Implicit-GEMM convolution for GPUs: the 128x128 workgroup tile of matmul_tile128
// (shaders/lib/tile128.wgsl) with the B slices gathered straight from the input, so no
// im2col column buffer is written or read. No subgroup operations. Same contract as
// shaders/conv2d.wgsl:
//   y[n, co, oy, ox] = Σ_{ky,kx,ci} w[co, ci, ky, kx] · up?(x)[n, ci, oy·S + ky − pt, ox·S + kx − pl]
//                      + bias[co] + res[n, co, oy, ox]
// with zeros outside the (virtual, x2-upsampled if UPSAMPLE) input.
//
// As one matmul over the whole batch, C = W' @ cols: M = Cout rows, N = batch·Ho·Wo columns
// (so that small images still fill whole tiles), K = KH·KW·Cin8 in (ky, kx, ci) order, W' the
// weight repacked once as [Cout, KH, KW, Cin8] (Cin8 = Cin rounded up to BK8 = 8,
// zero-filled). A K slice of 8 is then 8 channels of one tap: staging it, an invocation
// loads one vec4 of a weight row and the 4 channels of one output pixel under that tap. The
// pixel's image, window corner and input offset are worked out once, before the K loop; per
// slice only the tap's offset and its padding mask are.
//
// Loops: one slice per iteration of K, about 70 iterations each where the compiler keeps
// the loops; on llvmpipe (65,535 in all per invocation) the host splits K into dispatches
// of [k0, k1) that ACCUMULATE into y, the last one (EPILOGUE) adding bias and residual.

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
    cin8: u32,      // k per tap in a packed weight row
    kp: u32,        // KH·KW·cin8: a packed weight row
    ncols: u32,     // N·Ho·Wo
    tile0: u32,     // first column tile of this dispatch (past 65,535 tiles, dispatches split)
    k0: u32,        // this dispatch sums k in [k0, k1), multiples of 8
    k1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;          // [N, Cin, H, W]
@group(0) @binding(2) var<storage, read> w4: array<vec4<f32>>;   // [Cout, KH, KW, Cin8] as vec4
@group(0) @binding(3) var<storage, read> bias: array<f32>;       // [Cout] (read only if HAS_BIAS)
@group(0) @binding(4) var<storage, read> res: array<f32>;        // [N, Cout, Ho, Wo] (if HAS_RES)
@group(0) @binding(5) var<storage, read_write> y: array<f32>;    // [N, Cout, Ho, Wo]

override KH: u32 = 3u;
override KW: u32 = 3u;
override STRIDE: u32 = 1u;
override UPSAMPLE: bool = false;
override HAS_BIAS: bool = false;
override HAS_RES: bool = false;
// Cin % 8 != 0: channels past Cin read as zero (their packed weights are zero too, but an
// infinite input times a zero weight would not be).
override CIN_TAIL: bool = false;
// Split K: ACCUMULATE adds to the partial sum already in y; EPILOGUE (the last split) adds
// bias and residual. A single dispatch has ACCUMULATE = false, EPILOGUE = true.
override ACCUMULATE: bool = false;
override EPILOGUE: bool = true;

// The output pixel (column) an invocation gathers, fixed for the whole K loop.
struct Pixel {
    xb: u32,      // its image's first input element
    y0: i32,      // virtual-input row and column of its window's corner
    x0: i32,
    live: bool,   // a column of the output (false past N·Ho·Wo)
}

fn pixel_at(j: u32) -> Pixel {
    let live = j < p.ncols;
    let npix = p.ho * p.wo;
    let jc = min(j, p.ncols - 1u);
    let img = jc / npix;
    let pix = jc - img * npix;
    let oy = pix / p.wo;
    let ox = pix - oy * p.wo;
    return Pixel(img * p.cin * p.h * p.w, i32(oy * STRIDE) - i32(p.pad_top),
                 i32(ox * STRIDE) - i32(p.pad_left), live);
}

// Input channels c..c+3 of pixel `px` under tap (ky, kx): zero in the padding, past the
// output's columns and (CIN_TAIL) past Cin. Masked elements load from the image's first
// element, which exists, and are never used.
fn gather(px: Pixel, ky: u32, kx: u32, c: u32) -> vec4<f32> {
    let iy = px.y0 + i32(ky);
    let ix = px.x0 + i32(kx);
    let ok = px.live && iy >= 0 && iy < i32(p.hv) && ix >= 0 && ix < i32(p.wv);
    var sy = iy;
    var sx = ix;
    if UPSAMPLE {
        sy = iy >> 1u;
        sx = ix >> 1u;
    }
    let hw = p.h * p.w;
    let off = select(0u, u32(sy) * p.w + u32(sx), ok);
    var v: vec4<f32>;
    for (var l = 0u; l < 4u; l++) {
        var live = ok;
        if CIN_TAIL {
            live = ok && c + l < p.cin;
        }
        let at = px.xb + select(0u, (c + l) * hw + off, live);
        v[l] = select(0.0, x[at], live);
    }
    return v;
}

// Stages the slice at k (tap t, channels c..c+7) into buffer `buf`. Invocation li puts
// half li % 2 of packed weight row li / 2 (rows past Cout read as zero) and channels
// c + 4·(li / 128) + 0..3 of column li % 128.
struct Slice {
    a: vec4<f32>,
    b: vec4<f32>,
}

fn load_slice(row_base: u32, li: u32, px: Pixel, k: u32, t: u32, c: u32) -> Slice {
    let row = row_base + li / 2u;
    let a = w4[(min(row, p.cout - 1u) * p.kp + k) / 4u + li % 2u];
    let ky = t / KW;
    let kx = t - ky * KW;
    let b = gather(px, ky, kx, c + 4u * (li / 128u));
    return Slice(select(vec4<f32>(0.0), a, row < p.cout), b);
}

fn put_slice(buf: u32, li: u32, s: Slice) {
    for (var l = 0u; l < 4u; l++) {
        tile_put_a(buf, li / 2u, 4u * (li % 2u) + l, s.a[l]);
        tile_put_b(buf, li % 128u, 4u * (li / 128u) + l, s.b[l]);
    }
}

// The output element of row `row` (a channel) and column `j` (an image's pixel), if any:
// y's index. Columns are the 4 of `base`/`live` (see cols_at).
struct Cols {
    base: vec4<u32>,   // index of row 0 of each column in y
    live: vec4<bool>,
}

fn cols_at(col: u32) -> Cols {
    let j = vec4<u32>(col) + vec4<u32>(0u, 1u, 2u, 3u);
    let npix = p.ho * p.wo;
    let jc = min(j, vec4<u32>(p.ncols - 1u));
    let img = jc / vec4<u32>(npix);
    return Cols(img * (p.cout * npix) + (jc - img * npix), j < vec4<u32>(p.ncols));
}

fn store_row(row: u32, cols: Cols, v: vec4<f32>) {
    if row >= p.cout {
        return;
    }
    let npix = p.ho * p.wo;
    for (var j = 0u; j < 4u; j++) {
        if cols.live[j] {
            let o = cols.base[j] + row * npix;
            var s = v[j];
            if ACCUMULATE {
                s += y[o];
            }
            if EPILOGUE {
                if HAS_BIAS {
                    s += bias[row];
                }
                if HAS_RES {
                    s += res[o];
                }
            }
            y[o] = s;
        }
    }
}

@compute @workgroup_size(16, 16, 1)
fn conv2d_igemm_tiled(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row_base = wid.y * T128;
    let col_base = (wid.x + p.tile0) * T128;
    let px = pixel_at(col_base + li % 128u);
    var acc: array<vec4<f32>, 16>;
    // The tap t and first channel c of the slice at k, walked forward slice by slice.
    var t = p.k0 / p.cin8;
    var c = p.k0 - t * p.cin8;
    put_slice(0u, li, load_slice(row_base, li, px, p.k0, t, c));
    workgroupBarrier();
    var cur = 0u;
    for (var k = p.k0; k < p.k1; k += BK8) {
        // Fetch the next slice while this one is multiplied.
        let more = k + BK8 < p.k1;
        var next: Slice;
        if more {
            c += BK8;
            if c == p.cin8 {
                c = 0u;
                t += 1u;
            }
            next = load_slice(row_base, li, px, k + BK8, t, c);
        }
        tile_fma(cur, lid.xy, &acc);
        if more {
            // The other buffer was last read before the previous barrier: safe to fill.
            put_slice(1u - cur, li, next);
        }
        workgroupBarrier();
        cur = 1u - cur;
    }
    let r0 = row_base + lid.y * 4u;
    let lo = cols_at(col_base + lid.x * 4u);
    let hi = cols_at(col_base + 64u + lid.x * 4u);
    for (var r = 0u; r < 4u; r++) {
        store_row(r0 + r, lo, acc[2u * r]);
        store_row(r0 + r, hi, acc[2u * r + 1u]);
        store_row(r0 + 64u + r, lo, acc[8u + 2u * r]);
        store_row(r0 + 64u + r, hi, acc[9u + 2u * r]);
    }
}
