//! What CLIP sees of the image each step: cutouts ([`super::cutouts`]) with the pooled
//! method's colour and erasing augmentations, normalised for CLIP.

use super::cutouts::{self, cut_matrices, sample_cuts, CutMethod};
use super::{clip_normalise, Options, Perceptor};
use crate::autodiff::{Tape, Var};
use crate::{Gpu, Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// The pooled method's colour and erasing augmentations, each applied with probability 0.7
/// per cutout (kornia's defaults in nerdyrodent's `generate.py`): a per-cutout linear colour
/// map `M·x + b` (brightness ±0.1, contrast ±0.1 about mid-grey, saturation ±0.1 toward
/// luma, hue rotation ±0.1·π about the grey axis), then one random rectangle (10–40% of the
/// area, aspect 0.3–3.3, same for every cutout) set to 0. Both are linear in the pixels, so
/// their backward rules are the tape's matmul and multiply.
pub(super) fn colour_jitter_and_erase(
    gpu: &Gpu,
    tape: &Tape,
    views: &Var,
    rng: &mut ChaCha8Rng,
) -> Result<Var> {
    let (n, s) = (views.shape()[0], views.shape()[2]);
    let mut mats = Vec::with_capacity(n * 9);
    let mut shifts = Vec::with_capacity(n * 3);
    for _ in 0..n {
        let mut m = [[1.0f32, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        let mut shift = 0.0f32;
        if rng.random_bool(0.7) {
            let bright = 1.0 + rng.random_range(-0.1f32..0.1);
            let contrast = 1.0 + rng.random_range(-0.1f32..0.1);
            let sat = 1.0 + rng.random_range(-0.1f32..0.1);
            let hue = rng.random_range(-0.1f32..0.1) * std::f32::consts::PI;
            // saturation: lerp toward luma (Rec. 601 weights)
            let luma = [0.299f32, 0.587, 0.114];
            let mut sm = [[0.0f32; 3]; 3];
            for (i, row) in sm.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = (1.0 - sat) * luma[j] + if i == j { sat } else { 0.0 };
                }
            }
            // hue: rotation by `hue` about the (1,1,1) axis (Rodrigues)
            let (c, si) = (hue.cos(), hue.sin());
            let k = 1.0 / 3.0f32;
            let r = (1.0 / 3.0f32).sqrt() * si;
            let hm = [
                [c + (1.0 - c) * k, (1.0 - c) * k - r, (1.0 - c) * k + r],
                [(1.0 - c) * k + r, c + (1.0 - c) * k, (1.0 - c) * k - r],
                [(1.0 - c) * k - r, (1.0 - c) * k + r, c + (1.0 - c) * k],
            ];
            for (i, row) in m.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = bright * contrast * (0..3).map(|t| hm[i][t] * sm[t][j]).sum::<f32>();
                }
            }
            shift = (1.0 - contrast) * 0.5;
        }
        mats.extend(m.iter().flatten());
        shifts.extend([shift; 3]);
    }
    let m = tape.leaf(Tensor::from_slice(gpu, &mats, &[n, 3, 3])?, false);
    let b = tape.leaf(Tensor::from_slice(gpu, &shifts, &[n, 3, 1])?, false);
    let flat = tape.reshape(views, &[n, 3, s * s])?;
    let out = tape.add(&tape.matmul(&m, &flat, None, &Default::default())?, &b)?;
    let mut out = tape.reshape(&out, &[n, 3, s, s])?;
    if rng.random_bool(0.7) {
        let area = rng.random_range(0.1f32..0.4) * (s * s) as f32;
        let ratio = rng.random_range(0.3f32.ln()..(1.0f32 / 0.3).ln()).exp();
        let eh = ((area * ratio).sqrt() as usize).clamp(1, s);
        let ew = ((area / ratio).sqrt() as usize).clamp(1, s);
        let (y0, x0) = (rng.random_range(0..=s - eh), rng.random_range(0..=s - ew));
        let mut mask = vec![1.0f32; s * s];
        for y in y0..y0 + eh {
            for x in x0..x0 + ew {
                mask[y * s + x] = 0.0;
            }
        }
        let mask = tape.leaf(Tensor::from_slice(gpu, &mask, &[s, s])?, false);
        out = tape.mul(&out, &mask)?;
    }
    Ok(out)
}

/// Cutouts of `img` `[1, 3, H, W]` in [0, 1], augmented and normalised for CLIP.
pub(super) fn make_views(
    gpu: &Gpu,
    clip: &dyn Perceptor,
    tape: &Tape,
    img: &Var,
    opts: &Options,
    rng: &mut ChaCha8Rng,
) -> Result<Var> {
    let views = augmented_views(gpu, clip, tape, img, opts, rng)?;
    clip_normalise(gpu, clip, tape, &views)
}

/// [`make_views`] before CLIP's normalisation: the cutouts `[cutn, 3, S, S]` with their
/// augmentations and noise, in pixel units (what `generate --trace` records).
pub(super) fn augmented_views(
    gpu: &Gpu,
    clip: &dyn Perceptor,
    tape: &Tape,
    img: &Var,
    opts: &Options,
    rng: &mut ChaCha8Rng,
) -> Result<Var> {
    let (h, w) = (img.shape()[2], img.shape()[3]);
    let s = clip.image_size();
    let cuts = sample_cuts(rng, opts.cut_method, opts.cutn, opts.cut_pow, w, h, s);
    let blur = opts.cut_method == CutMethod::Jitter;
    let (wy, wx) = cut_matrices(gpu, &cuts, w, h, s, blur)?;
    let mut views = cutouts::cutouts(tape, img, &wy, &wx)?;
    if opts.cut_method == CutMethod::Pooled {
        let maps = cutouts::pooled_warps(rng, opts.cutn, s);
        let maps = crate::ops::warp::homographies(gpu, &maps)?;
        views = tape.warp(&views, &maps, [s, s])?;
        views = colour_jitter_and_erase(gpu, tape, &views, rng)?;
    }
    if opts.noise > 0.0 {
        let n = opts.cutn;
        let per = 3 * s * s;
        let mut noise = vec![0.0f32; n * per];
        for cut in noise.chunks_mut(per) {
            let fac: f32 = rng.random_range(0.0..opts.noise);
            for v in cut.iter_mut() {
                let z: f32 = StandardNormal.sample(rng);
                *v = fac * z;
            }
        }
        let noise = tape.leaf(Tensor::from_slice(gpu, &noise, &[n, 3, s, s])?, false);
        views = tape.add(&views, &noise)?;
    }
    Ok(views)
}

/// The resampling matrices of one view: the whole `w`×`h` image at CLIP's size `s`.
pub(super) fn whole_view(gpu: &Gpu, w: usize, h: usize, s: usize) -> Result<(Tensor, Tensor)> {
    let whole = cutouts::Cut {
        x0: 0.0,
        y0: 0.0,
        w: w as f32,
        h: h as f32,
        flip: false,
    };
    cut_matrices(gpu, &[whole], w, h, s, false)
}
