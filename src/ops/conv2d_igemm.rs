//! Implicit-GEMM convolution for CPU adapters with 8-wide subgroups
//! (`shaders/conv2d_igemm.wgsl`): the subgroup matmul's register tile reading the im2col
//! columns straight from the input, so no column buffer is written, read or chunked. The
//! weight is repacked once per weight buffer as `[Cout, KH, KW, Cin4]` (kept in the
//! device's derived-tensor cache, dropped when the weight changes).
//!
//! [`super::conv2d::conv2d`] calls [`try_conv2d`] for [`super::conv2d::Variant::Implicit`]
//! and falls back to the im2col path when the device or the shape does not fit.

use super::conv2d::Conv2dOpts;
use super::matmul::subgroup_supported;
use super::CPU_LOOP_LIMIT;
use crate::gpu::{Gpu, Kernel, Shader};
use crate::tensor::{DType, Tensor};
use crate::Result;

/// The `override` constants the kernel sets: the direct kernels' (same names, same
/// meaning) and its own.
mod ov {
    pub(super) use super::super::conv2d::ov::{HAS_BIAS, HAS_RES, KH, KW, STRIDE, UPSAMPLE};
    use crate::gpu::Override;
    pub(super) const CIN_TAIL: Override<bool> = Override::new("CIN_TAIL");
    pub(super) const SG_ROWS: Override<u32> = Override::new("SG_ROWS");
    pub(super) const ROW_REUSE: Override<bool> = Override::new("ROW_REUSE");
    pub(super) const SG_STACK: Override<u32> = Override::new("SG_STACK");
}

pub(crate) static SHADER: Shader<Params> = crate::shader!(
    "conv2d_igemm",
    "subgroup_tile",
    overrides = [
        ov::KH,
        ov::KW,
        ov::STRIDE,
        ov::UPSAMPLE,
        ov::HAS_BIAS,
        ov::HAS_RES,
        ov::CIN_TAIL,
        ov::SG_ROWS,
        ov::ROW_REUSE,
        ov::SG_STACK
    ]
);

crate::shader_params! {
    /// Mirrors `struct Params` in `shaders/conv2d_igemm.wgsl`.
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
        cq: u32,
        batch: u32,
        batch0: u32,
        _pad: [u32; 3],
    }
}

/// Output pixels one subgroup covers (8 lanes x 4 pixels).
const COLS_PER_SG: usize = 32;
/// Most workgroups per grid dimension.
const MAX_GROUPS: usize = 65_535;

/// Whether the kernel can run this convolution on `gpu`: 8-wide subgroups, an output
/// whose pixels fit one grid row, and taps x channel steps under llvmpipe's loop cap.
pub fn applies(gpu: &Gpu, cin: usize, kernel: [usize; 2], out_pixels: usize) -> bool {
    let taps = kernel[0] * kernel[1];
    let steps = cin.div_ceil(4);
    subgroup_supported(gpu)
        && cin > 0
        && out_pixels > 0
        && out_pixels.div_ceil(COLS_PER_SG) <= MAX_GROUPS
        && taps * (steps + 1) + 64 <= CPU_LOOP_LIMIT
}

/// Whether a kernel row's taps share their input loads (`ROW_REUSE` in the shader): 3-wide
/// kernels at stride 1 whose output rows split into whole blocks of 4 pixels.
fn row_reuse(kw: usize, stride: usize, wo: usize) -> bool {
    kw == 3 && stride == 1 && wo.is_multiple_of(4)
}

/// `conv2d(x, w, o)` by the implicit-GEMM kernel, or `None` when [`applies`] says no.
/// `dims` = `[Ho, Wo, H', W']` (H', W': the input after the optional upsample); the shapes
/// were checked by the caller.
pub(crate) fn try_conv2d(
    x: &Tensor,
    w: &Tensor,
    o: &Conv2dOpts,
    dims: [usize; 4],
) -> Result<Option<Tensor>> {
    let shape = [w.dim(0), w.dim(1), w.dim(2), w.dim(3)];
    run(x, shape, o, dims, || {
        packed(w, false, 4, "conv2d_igemm_packed")
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
    run(g, shape, o, dims, || {
        packed(w, true, 4, "conv2d_igemm_packed_flipped")
    })
}

/// `w` `[Cout, Cin, KH, KW]` as `[Cout, KH, KW, Cin']`, Cin' = Cin rounded up to `multiple`
/// and zero-filled past Cin: the weight layout of both implicit-GEMM kernels (4 here, 8 for
/// [`super::conv2d_igemm_tiled`]).
pub(super) fn pack(w: &Tensor, multiple: usize) -> Result<Tensor> {
    let (cout, cin, kh, kw) = (w.dim(0), w.dim(1), w.dim(2), w.dim(3));
    let padded = cin.next_multiple_of(multiple);
    let t = super::permute::permute(w, &[0, 2, 3, 1])?;
    if padded == cin {
        return Ok(t);
    }
    let zeros = Tensor::zeros(w.gpu(), &[cout, kh, kw, padded - cin])?;
    super::concat::concat(&[&t, &zeros], 3)
}

/// [`pack`] of `w`, or (`flipped`) of the input gradient's weight `w'[c, o, ky, kx] = w[o, c,
/// KH−1−ky, KW−1−kx]`, made once per weight and kept in the derived cache under `kind` (the
/// flipped weight itself is not kept).
pub(super) fn packed(
    w: &Tensor,
    flipped: bool,
    multiple: usize,
    kind: &'static str,
) -> Result<Tensor> {
    w.gpu().derived(kind, &[w], || match flipped {
        true => pack(&super::conv2d::flip_transpose(w)?, multiple),
        false => pack(w, multiple),
    })
}

/// The dispatch, for a weight of `shape` `[Cout, Cin, KH, KW]` whose packed form `packed`
/// gives (asked for only once the kernel is known to apply).
fn run(
    x: &Tensor,
    shape: [usize; 4],
    o: &Conv2dOpts,
    dims: [usize; 4],
    packed: impl FnOnce() -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    let [ho, wo, hv, wv] = dims;
    let (n, cin, h, wd) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let [cout, _, kh, kw] = shape;
    let gpu = x.gpu();
    let limit = u32::MAX as usize;
    if !applies(gpu, cin, [kh, kw], ho * wo)
        || [x.numel(), n * cout * ho * wo, cout * kh * kw * (cin + 3)]
            .iter()
            .any(|&v| v > limit)
        || o.pad[0].max(o.pad[2]) > i32::MAX as usize / 2
    {
        return Ok(None);
    }
    let cin4 = cin.next_multiple_of(4);
    let packed = packed()?;
    let y = Tensor::empty(gpu, &[n, cout, ho, wo], DType::F32)?;
    // 32 rows per subgroup (fewest loads per FMA) unless Cout would leave most of them
    // idle; subgroups stacked along Cout only as far as Cout reaches.
    let sg_rows = match cout {
        0..=8 => 8,
        9..=23 => 16,
        _ => 32,
    };
    let stack = cout.div_ceil(sg_rows).next_power_of_two().min(8);
    let kernel = Kernel::new(&SHADER, "conv2d_igemm")
        .with(ov::KH, kh as u32)
        .with(ov::KW, kw as u32)
        .with(ov::STRIDE, o.stride as u32)
        .with(ov::UPSAMPLE, o.upsample)
        .with(ov::HAS_BIAS, o.bias.is_some())
        .with(ov::HAS_RES, o.residual.is_some())
        .with(ov::CIN_TAIL, cin4 != cin)
        .with(ov::SG_ROWS, sg_rows as u32)
        .with(ov::SG_STACK, stack as u32)
        .with(ov::ROW_REUSE, row_reuse(kw, o.stride, wo));
    let bias_b = o.bias.map_or(gpu.unused_binding(), Tensor::binding);
    let res_b = o.residual.map_or(gpu.unused_binding(), Tensor::binding);
    let wg_x = (ho * wo).div_ceil(COLS_PER_SG * (8 / stack));
    let wg_y = cout.div_ceil(stack * sg_rows);
    if wg_y > MAX_GROUPS || wg_x > MAX_GROUPS {
        return Ok(None);
    }
    for batch0 in (0..n).step_by(MAX_GROUPS) {
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
            cq: (cin4 / 4) as u32,
            batch: n as u32,
            batch0: batch0 as u32,
            _pad: [0; 3],
        };
        gpu.dispatch(
            &kernel,
            &p,
            &[x.binding(), packed.binding(), bias_b, res_b, y.binding()],
            [
                wg_x as u32,
                wg_y as u32,
                (n - batch0).min(MAX_GROUPS) as u32,
            ],
        );
    }
    Ok(Some(y))
}

#[cfg(test)]
mod tests {
    use super::super::conv2d::tests::{check_with, shape};
    use super::super::conv2d::{out_size, RefShape};
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};

    /// Runs [`try_conv2d`] itself (not through the fallback) against the f64 reference.
    fn check(s: RefShape, bias: bool, res: bool, seed: u64) {
        assert!(
            subgroup_supported(&gpu()),
            "the test adapter has 8-wide subgroups"
        );
        let up = if s.upsample { 2 } else { 1 };
        let (hv, wv) = (s.h * up, s.w * up);
        let ho = out_size(hv, s.kh, s.stride, s.pad[0], s.pad[1]).unwrap();
        let wo = out_size(wv, s.kw, s.stride, s.pad[2], s.pad[3]).unwrap();
        check_with(s, bias, res, seed, "implicit", &|x, w, o| {
            try_conv2d(x, w, o, [ho, wo, hv, wv])
                .unwrap()
                .expect("the implicit kernel applies")
        });
    }

    #[test]
    fn matches_the_reference_over_tiles_tails_and_options() {
        // 32-row subgroups over partly idle tiles (Cout 130, 64), 16- and 8-row ones (Cout
        // 9, 20, 3), Cin not a multiple of 4, ragged pixel blocks, several images.
        check(shape(2, 8, (9, 7), 130, 3), true, true, 1);
        check(shape(1, 5, (6, 11), 3, 3), true, false, 2);
        check(shape(3, 3, (5, 5), 64, 1), false, true, 3);
        check(shape(1, 12, (1, 1), 9, 3), true, false, 4);
        // taming's downsample: stride 2, pad right and bottom.
        let mut s = shape(2, 6, (9, 12), 20, 3);
        s.stride = 2;
        s.pad = [0, 1, 0, 1];
        check(s, true, false, 5);
        // fused x2 upsample, and an odd kernel with asymmetric padding.
        let mut s = shape(1, 7, (5, 3), 17, 3);
        s.upsample = true;
        check(s, true, true, 6);
        let mut s = shape(2, 4, (13, 11), 6, 1);
        (s.kh, s.kw, s.stride, s.pad) = (2, 5, 1, [0, 1, 2, 2]);
        check(s, false, false, 7);
    }

    #[test]
    fn kernel_rows_sharing_their_loads_match_the_reference() {
        // ROW_REUSE: 3-wide, stride 1, Wo % 4 == 0: edges on both sides of a 4-pixel
        // block, Cin tails, 32- and 16-row subgroups stacked 8, 4, 2 and 1 high,
        // upsampling, asymmetric padding.
        let cases = [
            (shape(2, 6, (5, 8), 130, 3), true, true),
            (shape(1, 5, (4, 4), 20, 3), true, false),
            (shape(1, 8, (7, 12), 64, 3), false, true),
            (shape(1, 4, (5, 8), 100, 3), true, false),
        ];
        for (i, (s, bias, res)) in cases.into_iter().enumerate() {
            assert!(row_reuse(s.kw, s.stride, s.w));
            check(s, bias, res, 40 + i as u64);
        }
        let mut s = shape(1, 7, (3, 4), 17, 3);
        s.upsample = true;
        check(s, true, true, 50);
        let mut s = shape(2, 4, (6, 8), 9, 3);
        s.pad = [0, 2, 2, 0];
        assert!(row_reuse(s.kw, s.stride, 8 + 2 - 3 + 1));
        check(s, true, false, 51);
        // Longer rows of whole 4-pixel blocks with edges, Cin tails and a second image, and
        // upsampling into 32-row subgroups.
        let mut s = shape(2, 5, (3, 16), 33, 3);
        s.pad = [1, 0, 0, 2];
        check(s, true, true, 52);
        let mut s = shape(1, 6, (4, 4), 40, 3);
        s.upsample = true;
        check(s, true, false, 53);
        // (3, 1) kernels keep the per-tap path.
        assert!(!row_reuse(1, 1, 8) && !row_reuse(3, 2, 8) && !row_reuse(3, 1, 6));
    }

    #[test]
    fn channels_past_cin_read_as_zero_even_beside_infinities() {
        // Cin = 5 packs to 8 with zero weights in channels 5..7. Channel 4 is +inf under a
        // positive weight, so every output is +inf; a padded channel that read channel 4's
        // plane instead of zero would add inf · 0 = NaN.
        let g = gpu();
        let mut xv = rand_vec(5 * 4 * 4, 11);
        xv[4 * 16..].fill(f32::INFINITY);
        let mut wv = rand_vec(2 * 5, 12);
        wv[4] = 0.5;
        wv[9] = 0.5;
        let x = Tensor::from_slice(&g, &xv, &[1, 5, 4, 4]).unwrap();
        let w = Tensor::from_slice(&g, &wv, &[2, 5, 1, 1]).unwrap();
        let y = try_conv2d(&x, &w, &Conv2dOpts::default(), [4, 4, 4, 4])
            .unwrap()
            .expect("applies");
        for v in y.to_vec().unwrap() {
            assert_eq!(v, f32::INFINITY);
        }
    }

    #[test]
    fn shapes_past_the_loop_cap_are_declined() {
        let g = gpu();
        assert!(applies(&g, 512, [3, 3], 64));
        assert!(!applies(&g, 40_000, [3, 3], 64));
        assert!(!applies(&g, 4, [3, 3], 0));
    }
}
