//! Implicit-GEMM convolution for GPUs (`shaders/conv2d_igemm_tiled.wgsl`): the matmul's
//! 128×128 workgroup tile (`shaders/lib/tile128.wgsl`, double-buffered K slices in
//! workgroup memory) with each B slice gathered straight from the input, so the im2col
//! column buffer, its memory and its two trips through memory are gone. Needs no subgroup
//! operations. The weight is repacked once per weight buffer as `[Cout, KH, KW, Cin8]`
//! (kept in the device's derived-tensor cache, dropped when the weight changes).
//!
//! [`super::conv2d::conv2d`] calls [`try_conv2d`] for
//! [`super::conv2d::Variant::ImplicitTiled`] and falls back to the im2col path when the shape
//! does not fit.

use super::conv2d::Conv2dOpts;
use super::conv2d_igemm::packed;
use crate::gpu::{Kernel, Shader};
use crate::tensor::{DType, Tensor};
use crate::Result;

/// The `override` constants the kernel sets: the direct kernels' (same names, same
/// meaning) and its own.
mod ov {
    pub(super) use super::super::conv2d::ov::{HAS_BIAS, HAS_RES, KH, KW, STRIDE, UPSAMPLE};
    use crate::gpu::Override;
    pub(super) const CIN_TAIL: Override<bool> = Override::new("CIN_TAIL");
    pub(super) const ACCUMULATE: Override<bool> = Override::new("ACCUMULATE");
    pub(super) const EPILOGUE: Override<bool> = Override::new("EPILOGUE");
}

pub(crate) static SHADER: Shader<Params> = crate::shader!(
    "conv2d_igemm_tiled",
    "tile128",
    overrides = [
        ov::KH,
        ov::KW,
        ov::STRIDE,
        ov::UPSAMPLE,
        ov::HAS_BIAS,
        ov::HAS_RES,
        ov::CIN_TAIL,
        ov::ACCUMULATE,
        ov::EPILOGUE
    ]
);

crate::shader_params! {
    /// Mirrors `struct Params` in `shaders/conv2d_igemm_tiled.wgsl`.
    pub(crate) struct Params {
        cin: u32,
        h: u32,
        w: u32,
        cout: u32,
        ho: u32,
        wo: u32,
        hv: u32,
        wv: u32,
        pad_top: u32,
        pad_left: u32,
        cin8: u32,
        kp: u32,
        ncols: u32,
        tile0: u32,
        k0: u32,
        k1: u32,
    }
}

/// Rows (output channels) and columns (output pixels over the batch) of one workgroup tile.
const TILE: usize = 128;
/// K per slice: channels are padded to a multiple of it so that a slice is one tap.
const BK: usize = 8;
/// Most workgroups per grid dimension.
const MAX_GROUPS: usize = 65_535;
/// K per dispatch on CPU adapters: a slice of 8 k runs about 50 loop iterations where the
/// compiler keeps the loops (tile, gather and staging loops), so 512 slices stay well under
/// llvmpipe's 65,535-iteration cap ([`super::CPU_LOOP_LIMIT`]). GPUs have no such cap and
/// sum all of K in one dispatch (a split rereads and rewrites the output).
pub(crate) const K_SPLIT_CPU: usize = 4_096;
const _: () = assert!(K_SPLIT_CPU.is_multiple_of(BK) && K_SPLIT_CPU / BK * 60 < 65_535);

/// Whether the kernel can run this convolution: every index it forms fits u32 and the
/// output channels fit one grid dimension of tiles. `x_numel` is the input's size,
/// `out_numel` the output's; `shape` is the weight's `[Cout, Cin, KH, KW]`.
pub fn applies(x_numel: usize, out_numel: usize, shape: [usize; 4], pad: [usize; 4]) -> bool {
    let [cout, cin, kh, kw] = shape;
    let limit = u32::MAX as usize;
    cin > 0
        && cout > 0
        && out_numel > 0
        && cout.div_ceil(TILE) <= MAX_GROUPS
        && [
            x_numel,
            out_numel,
            cout * kh * kw * cin.next_multiple_of(BK),
        ]
        .iter()
        .all(|&v| v <= limit)
        && pad[0].max(pad[2]) <= i32::MAX as usize / 2
}

/// `conv2d(x, w, o)` by the tiled kernel, or `None` when [`applies`] says no. `dims` =
/// `[Ho, Wo, H', W']` (H', W': the input after the optional upsample); the shapes were
/// checked by the caller.
pub(crate) fn try_conv2d(
    x: &Tensor,
    w: &Tensor,
    o: &Conv2dOpts,
    dims: [usize; 4],
) -> Result<Option<Tensor>> {
    let shape = [w.dim(0), w.dim(1), w.dim(2), w.dim(3)];
    run(x, shape, o, dims, k_split(x), || {
        packed(w, false, BK, "conv2d_igemm_tiled_packed")
    })
}

/// The input gradient's convolution: [`try_conv2d`] with `w'[c, o, ky, kx] = w[o, c, KH−1−ky,
/// KW−1−kx]` (`w` `[O, C, KH, KW]`), whose packed form is derived from `w` directly and kept
/// alone: the flipped weight itself is not kept.
pub(crate) fn try_conv2d_flipped(
    g: &Tensor,
    w: &Tensor,
    o: &Conv2dOpts,
    dims: [usize; 4],
) -> Result<Option<Tensor>> {
    let shape = [w.dim(1), w.dim(0), w.dim(2), w.dim(3)];
    run(g, shape, o, dims, k_split(g), || {
        packed(w, true, BK, "conv2d_igemm_tiled_packed_flipped")
    })
}

/// K per dispatch on `x`'s device: [`K_SPLIT_CPU`] on CPU adapters, all of K elsewhere.
fn k_split(x: &Tensor) -> usize {
    if x.gpu().is_cpu() {
        K_SPLIT_CPU
    } else {
        usize::MAX
    }
}

/// The dispatches, for a weight of `shape` `[Cout, Cin, KH, KW]` whose packed form `packed`
/// gives (asked for only once the kernel is known to apply), summing K in dispatches of at
/// most `split` (a multiple of [`BK`]; rounded down to one).
fn run(
    x: &Tensor,
    shape: [usize; 4],
    o: &Conv2dOpts,
    dims: [usize; 4],
    split: usize,
    packed: impl FnOnce() -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    let [ho, wo, hv, wv] = dims;
    let (n, cin, h, wd) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let [cout, _, kh, kw] = shape;
    let ncols = n * ho * wo;
    if !applies(x.numel(), ncols * cout, shape, o.pad) {
        return Ok(None);
    }
    let gpu = x.gpu();
    let cin8 = cin.next_multiple_of(BK);
    let kp = kh * kw * cin8;
    let packed = packed()?;
    let y = Tensor::empty(gpu, &[n, cout, ho, wo], DType::F32)?;
    let kernel = Kernel::new(&SHADER, "conv2d_igemm_tiled")
        .with(ov::KH, kh as u32)
        .with(ov::KW, kw as u32)
        .with(ov::STRIDE, o.stride as u32)
        .with(ov::UPSAMPLE, o.upsample)
        .with(ov::HAS_BIAS, o.bias.is_some())
        .with(ov::HAS_RES, o.residual.is_some())
        .with(ov::CIN_TAIL, cin8 != cin);
    let bias_b = o.bias.map_or(gpu.unused_binding(), Tensor::binding);
    let res_b = o.residual.map_or(gpu.unused_binding(), Tensor::binding);
    let split = (split / BK).max(1) * BK;
    let col_tiles = ncols.div_ceil(TILE);
    let row_tiles = cout.div_ceil(TILE);
    let mut k0 = 0;
    while k0 < kp {
        let k1 = kp.min(k0.saturating_add(split));
        // Later splits add onto the partial sum in y (read and written by the same
        // invocation); the last adds bias and residual.
        let k = kernel
            .clone()
            .with(ov::ACCUMULATE, k0 > 0)
            .with(ov::EPILOGUE, k1 == kp);
        for tile0 in (0..col_tiles).step_by(MAX_GROUPS) {
            let p = Params {
                cin: cin as u32,
                h: h as u32,
                w: wd as u32,
                cout: cout as u32,
                ho: ho as u32,
                wo: wo as u32,
                hv: hv as u32,
                wv: wv as u32,
                pad_top: o.pad[0] as u32,
                pad_left: o.pad[2] as u32,
                cin8: cin8 as u32,
                kp: kp as u32,
                ncols: ncols as u32,
                tile0: tile0 as u32,
                k0: k0 as u32,
                k1: k1 as u32,
            };
            gpu.dispatch(
                &k,
                &p,
                &[x.binding(), packed.binding(), bias_b, res_b, y.binding()],
                [
                    (col_tiles - tile0).min(MAX_GROUPS) as u32,
                    row_tiles as u32,
                    1,
                ],
            );
        }
        k0 = k1;
    }
    Ok(Some(y))
}

#[cfg(test)]
mod tests {
    use super::super::conv2d::tests::{check_with, shape};
    use super::super::conv2d::{conv2d_input_grad, out_size, RefShape, Variant};
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};

    /// `[Ho, Wo, H', W']` of `s`.
    fn dims(s: &RefShape) -> [usize; 4] {
        let up = if s.upsample { 2 } else { 1 };
        let (hv, wv) = (s.h * up, s.w * up);
        let ho = out_size(hv, s.kh, s.stride, s.pad[0], s.pad[1]).unwrap();
        let wo = out_size(wv, s.kw, s.stride, s.pad[2], s.pad[3]).unwrap();
        [ho, wo, hv, wv]
    }

    /// Runs the tiled kernel itself (not through the fallback), summing K in dispatches of
    /// `split`, against the f64 reference.
    fn check(s: RefShape, bias: bool, res: bool, seed: u64, split: usize) {
        let what = format!("implicit-tiled, K split {split}");
        check_with(s, bias, res, seed, &what, &|x, w, o| {
            let shape = [w.dim(0), w.dim(1), w.dim(2), w.dim(3)];
            run(x, shape, o, dims(&s), split, || {
                super::super::conv2d_igemm::pack(w, BK)
            })
            .unwrap()
            .expect("the tiled kernel applies")
        });
    }

    #[test]
    fn matches_the_reference_over_tiles_tails_and_options() {
        // Partial tiles in M (Cout 130: a full and a 2-row tile; 3; 64), in N (2 images of
        // 9x7 = 126 columns; 3 images of 11x9 = 297, tiles straddling images) and in K
        // (Cin 5, 12: channel tails; 16: none), bias and residual on and off.
        check(shape(2, 5, (9, 7), 130, 3), true, true, 1, usize::MAX);
        check(shape(3, 12, (11, 9), 3, 3), true, false, 2, usize::MAX);
        check(shape(1, 16, (5, 5), 64, 3), false, true, 3, usize::MAX);
        check(shape(1, 1, (1, 1), 1, 3), true, true, 4, usize::MAX);
        // 1x1 kernels.
        check(shape(2, 20, (6, 11), 9, 1), true, false, 5, usize::MAX);
        check(shape(1, 3, (16, 17), 140, 1), false, true, 6, usize::MAX);
        // taming's downsample: stride 2, pad right and bottom.
        let mut s = shape(2, 6, (9, 12), 20, 3);
        s.stride = 2;
        s.pad = [0, 1, 0, 1];
        check(s, true, false, 7, usize::MAX);
        // fused x2 upsample, and odd kernels with asymmetric padding and strides.
        let mut s = shape(2, 7, (5, 3), 17, 3);
        s.upsample = true;
        check(s, true, true, 8, usize::MAX);
        let mut s = shape(2, 4, (13, 11), 6, 1);
        (s.kh, s.kw, s.stride, s.pad) = (2, 5, 1, [0, 1, 2, 2]);
        check(s, false, false, 9, usize::MAX);
        let mut s = shape(1, 9, (13, 11), 5, 1);
        (s.kh, s.kw, s.stride, s.pad) = (3, 3, 3, [2, 0, 1, 3]);
        check(s, true, true, 10, usize::MAX);
    }

    #[test]
    fn k_split_across_dispatches_accumulates_once_then_adds_the_epilogue() {
        // Splits of one slice, of two, of a slice and a half (rounded down to one) and of
        // part of a tap (Cin8 = 24, 3 slices per tap, split of 16): the partial sums add in
        // y and bias and residual are added once, by the last split. Also the CPU default.
        let s = shape(2, 21, (6, 5), 70, 3);
        for (i, split) in [8, 16, 12, 40, K_SPLIT_CPU].into_iter().enumerate() {
            check(s, true, true, 20 + i as u64, split);
        }
        let mut s = shape(1, 5, (4, 7), 9, 3);
        s.upsample = true;
        s.stride = 2;
        s.pad = [0, 1, 0, 1];
        check(s, true, true, 30, 8);
    }

    #[test]
    fn padding_and_channels_past_cin_contribute_exactly_zero_beside_infinities() {
        // Every input is +inf and every weight positive: an output whose window reaches the
        // input is +inf; one whose window lies wholly in the padding must be exactly 0. A
        // padded position or a channel past Cin (Cin = 5 packs to 8, zero weights) that read
        // an input instead of zero would make inf or inf · 0 = NaN.
        let g = gpu();
        for (k, stride, pad, upsample) in [
            (1, 1, [1, 2, 2, 1], false),
            (1, 2, [1, 0, 3, 2], true),
            (3, 1, [2, 2, 2, 2], false),
        ] {
            let (cin, cout, h, w) = (5, 3, 4, 6);
            let x = Tensor::full(&g, &[2, cin, h, w], f32::INFINITY).unwrap();
            let wv: Vec<f32> = rand_vec(cout * cin * k * k, 12)
                .iter()
                .map(|v| v.abs() + 0.1)
                .collect();
            let wt = Tensor::from_slice(&g, &wv, &[cout, cin, k, k]).unwrap();
            let o = Conv2dOpts {
                stride,
                pad,
                upsample,
                ..Default::default()
            };
            let s = RefShape {
                n: 2,
                cin,
                h,
                w,
                cout,
                kh: k,
                kw: k,
                stride,
                pad,
                upsample,
            };
            let [ho, wo, hv, wv] = dims(&s);
            let y = try_conv2d(&x, &wt, &o, [ho, wo, hv, wv])
                .unwrap()
                .expect("applies")
                .to_vec()
                .unwrap();
            let mut zeros = 0;
            for (i, v) in y.iter().enumerate() {
                let (oy, ox) = ((i / wo) % ho, i % wo);
                let rows =
                    (oy * stride..oy * stride + k).any(|r| (pad[0]..pad[0] + hv).contains(&r));
                let cols =
                    (ox * stride..ox * stride + k).any(|c| (pad[2]..pad[2] + wv).contains(&c));
                let want = if rows && cols { f32::INFINITY } else { 0.0 };
                zeros += (want == 0.0) as usize;
                assert_eq!(*v, want, "k{k} s{stride} {pad:?} up{upsample}: y[{i}]");
            }
            assert!(k == 3 || zeros > 0, "the probe reaches the padding");
        }
    }

    /// The f64 adjoint of the reference convolution: `dx [N, Cin, H, W]` for output gradient
    /// `g`, and per element `Σ|g·w|` (the tolerance bound).
    fn input_grad_reference(g: &[f32], w: &[f32], s: &RefShape) -> (Vec<f64>, Vec<f64>) {
        let [ho, wo, hv, wv] = dims(s);
        let mut dx = vec![0.0; s.n * s.cin * s.h * s.w];
        let mut mag = dx.clone();
        for n in 0..s.n {
            for co in 0..s.cout {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let gv = g[((n * s.cout + co) * ho + oy) * wo + ox] as f64;
                        for ci in 0..s.cin {
                            for ky in 0..s.kh {
                                for kx in 0..s.kw {
                                    let iy = (oy * s.stride + ky) as isize - s.pad[0] as isize;
                                    let ix = (ox * s.stride + kx) as isize - s.pad[2] as isize;
                                    if iy < 0 || ix < 0 || iy >= hv as isize || ix >= wv as isize {
                                        continue;
                                    }
                                    let up = if s.upsample { 2 } else { 1 };
                                    let (sy, sx) = (iy as usize / up, ix as usize / up);
                                    let i = ((n * s.cin + ci) * s.h + sy) * s.w + sx;
                                    let wv = w[((co * s.cin + ci) * s.kh + ky) * s.kw + kx] as f64;
                                    dx[i] += gv * wv;
                                    mag[i] += (gv * wv).abs();
                                }
                            }
                        }
                    }
                }
            }
        }
        (dx, mag)
    }

    #[test]
    fn input_gradient_matches_the_adjoint_reference() {
        // Through conv2d_backward's input-gradient path with the tiled variant: a flipped
        // packed weight, the output gradient zero-dilated for stride 2, the 2x2 sum for a
        // fused upsample.
        let g = gpu();
        let mut cases = vec![shape(2, 5, (7, 9), 130, 3), shape(1, 12, (6, 6), 3, 1)];
        let mut s = shape(2, 6, (9, 12), 20, 3);
        s.stride = 2;
        s.pad = [0, 1, 0, 1];
        cases.push(s);
        let mut s = shape(1, 7, (5, 3), 9, 3);
        s.upsample = true;
        cases.push(s);
        for (i, s) in cases.into_iter().enumerate() {
            let seed = 60 + 10 * i as u64;
            let [ho, wo, ..] = dims(&s);
            let wv = rand_vec(s.cout * s.cin * s.kh * s.kw, seed);
            let gv = rand_vec(s.n * s.cout * ho * wo, seed + 1);
            let w = Tensor::from_slice(&g, &wv, &[s.cout, s.cin, s.kh, s.kw]).unwrap();
            let gy = Tensor::from_slice(&g, &gv, &[s.n, s.cout, ho, wo]).unwrap();
            let o = Conv2dOpts {
                stride: s.stride,
                pad: s.pad,
                upsample: s.upsample,
                ..Default::default()
            };
            let x_shape = [s.n, s.cin, s.h, s.w];
            let dx = conv2d_input_grad(&x_shape, &w, &gy, &o, Variant::ImplicitTiled).unwrap();
            assert_eq!(dx.shape(), &x_shape);
            let got = dx.to_vec().unwrap();
            let (want, mag) = input_grad_reference(&gv, &wv, &s);
            let k = s.cout * s.kh * s.kw;
            for j in 0..got.len() {
                let tol = 1.2 * (k as f64 + 3.0) * f32::EPSILON as f64 * mag[j]
                    + 1e-6 * (1.0 + want[j].abs());
                let err = (got[j] as f64 - want[j]).abs();
                assert!(err <= tol, "{s:?}: dx[{j}] got {} want {}", got[j], want[j]);
            }
        }
    }

    #[test]
    fn shapes_past_the_index_range_are_declined() {
        assert!(applies(1 << 20, 1 << 20, [512, 512, 3, 3], [1; 4]));
        assert!(!applies(1 << 20, 0, [4, 4, 3, 3], [1; 4]));
        assert!(!applies(1 << 20, 1 << 20, [4, 0, 3, 3], [1; 4]));
        assert!(!applies(1 << 33, 1 << 20, [4, 4, 3, 3], [1; 4]));
        assert!(!applies(1 << 20, 1 << 20, [1 << 24, 4, 3, 3], [1; 4]));
    }
}
