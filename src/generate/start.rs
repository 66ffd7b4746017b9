//! The latent a generation starts from: random codes, or an image (given, random, a
//! gradient, or the best of a pool as CLIP ranks it) encoded by the VQGAN, at the first
//! latent-grid size; and the resizing between latent grids.

use super::cutouts;
use super::losses::rank_pool;
use super::{presets, Generator, Init, Options, Perceptor, Target};
use crate::autodiff::Tape;
use crate::ops::elementwise;
use crate::{Error, Gpu, Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// The latent `[1, E, h, w]` (`grid` = `(h, w)`) a generation starts from, as `opts.init`
/// says, and with a pool CLIP's loss of each pool image against `targets` (else empty).
#[allow(clippy::too_many_arguments)]
pub(super) fn start_latent(
    gpu: &Gpu,
    clip: &dyn Perceptor,
    vqgan: &dyn Generator,
    opts: &Options,
    targets: &[Target],
    codebook: &[f32],
    grid: (usize, usize),
    rng: &mut ChaCha8Rng,
) -> Result<(Tensor, Vec<f32>)> {
    let e = vqgan.codebook().dim(1);
    let mut pool_losses = Vec::new();
    let scenes;
    let init = match &opts.init {
        Init::Scenes(n) => {
            scenes = presets::scene_pool(*n, rng, opts.width, opts.height)?;
            &scenes
        }
        other => other,
    };
    let z = match init {
        Init::RandomCodes => random_codes(gpu, rng, codebook, e, grid)?,
        init => {
            let (ww, hh) = (opts.width, opts.height);
            let pixels: Vec<f32> = match init {
                Init::Image(p) => p.clone(),
                Init::Pool(pool) => {
                    pool_losses = rank_pool(gpu, clip, targets, pool, ww, hh)?;
                    let best = (0..pool_losses.len())
                        .min_by(|&i, &j| pool_losses[i].total_cmp(&pool_losses[j]))
                        .ok_or_else(|| Error::invalid("the init pool is empty"))?;
                    pool[best].clone()
                }
                Init::Pixels => (0..3 * ww * hh).map(|_| rng.random::<f32>()).collect(),
                _ => gradient(rng, ww, hh),
            };
            if pixels.len() != 3 * ww * hh {
                return Err(Error::shape(format!(
                    "init image has {} values, expected 3x{hh}x{ww}",
                    pixels.len()
                )));
            }
            let img = Tensor::from_slice(gpu, &pixels, &[1, 3, hh, ww])?;
            let img = elementwise::unary(
                &img,
                elementwise::UnaryOp::Affine {
                    scale: 2.0,
                    shift: -1.0,
                },
            )?;
            resize_latent(gpu, &vqgan.quantize(&vqgan.encode(&img)?)?, grid)?
        }
    };
    Ok((z, pool_losses))
}

/// A `[3, hh, ww]` vertical gradient between two random colours.
fn gradient(rng: &mut ChaCha8Rng, ww: usize, hh: usize) -> Vec<f32> {
    let (a, b): ([f32; 3], [f32; 3]) = (rng.random(), rng.random());
    let mut p = vec![0.0; 3 * ww * hh];
    for c in 0..3 {
        for y in 0..hh {
            let t = y as f32 / (hh.max(2) - 1) as f32;
            for x in 0..ww {
                p[(c * hh + y) * ww + x] = a[c] * (1.0 - t) + b[c] * t;
            }
        }
    }
    p
}

/// A latent `[1, E, h, w]` of uniformly random codebook entries.
pub(super) fn random_codes(
    gpu: &Gpu,
    rng: &mut ChaCha8Rng,
    codebook: &[f32],
    e: usize,
    (h, w): (usize, usize),
) -> Result<Tensor> {
    let n_embed = codebook.len() / e;
    // z[0, c, y, x] = codebook[idx[y, x], c]
    let mut z = vec![0.0f32; e * h * w];
    for pos in 0..h * w {
        let idx = rng.random_range(0..n_embed);
        for c in 0..e {
            z[c * h * w + pos] = codebook[idx * e + c];
        }
    }
    Tensor::from_slice(gpu, &z, &[1, e, h, w])
}

/// The grid `(h, w)` of each entry of `grids` for a latent of `h`×`w`: `G` cells along the
/// shorter side, the longer side in proportion.
pub(super) fn resolve_grids(grids: &[usize], h: usize, w: usize) -> Result<Vec<(usize, usize)>> {
    if grids.is_empty() {
        return Ok(vec![(h, w)]);
    }
    let short = h.min(w);
    grids
        .iter()
        .map(|&g| {
            if g == 0 || g > short {
                return Err(Error::invalid(format!(
                    "latent grid {g} must be between 1 and {short} (the shorter side of the \
                     {h}x{w} latent)"
                )));
            }
            let side = |n: usize| ((g * n) as f32 / short as f32).round().clamp(1.0, n as f32);
            Ok((side(h) as usize, side(w) as usize))
        })
        .collect()
}

/// Matrices `[1, to.0, from.0]` and `[1, to.1, from.1]` that resize a latent grid: bilinear
/// when enlarging, an area-weighted tent when shrinking.
pub(super) fn resize_matrices(
    gpu: &Gpu,
    from: (usize, usize),
    to: (usize, usize),
) -> Result<(Tensor, Tensor)> {
    let m = |o: usize, i: usize| {
        if o >= i {
            cutouts::bilinear_matrix(o, i)
        } else {
            cutouts::resample_matrix(o, i, 0.0, i as f32, false)
        }
    };
    Ok((
        Tensor::from_slice(gpu, &m(to.0, from.0), &[1, to.0, from.0])?,
        Tensor::from_slice(gpu, &m(to.1, from.1), &[1, to.1, from.1])?,
    ))
}

/// `x` `[1, C, h, w]` resized with [`resize_matrices`] (no gradient).
pub(super) fn resize_latent(gpu: &Gpu, x: &Tensor, to: (usize, usize)) -> Result<Tensor> {
    let from = (x.dim(2), x.dim(3));
    if from == to {
        return elementwise::scale(x, 1.0);
    }
    let (my, mx) = resize_matrices(gpu, from, to)?;
    let tape = Tape::new();
    let v = cutouts::cutouts(&tape, &tape.leaf(x.clone(), false), &my, &mx)?;
    Ok(v.value().clone())
}

/// Codebook per-channel minimum and maximum, each `[1, E, 1, 1]`.
pub(super) fn codebook_range(gpu: &Gpu, codebook: &[f32], e: usize) -> Result<(Tensor, Tensor)> {
    let mut lo = vec![f32::INFINITY; e];
    let mut hi = vec![f32::NEG_INFINITY; e];
    for row in codebook.chunks(e) {
        for c in 0..e {
            lo[c] = lo[c].min(row[c]);
            hi[c] = hi[c].max(row[c]);
        }
    }
    Ok((
        Tensor::from_slice(gpu, &lo, &[1, e, 1, 1])?,
        Tensor::from_slice(gpu, &hi, &[1, e, 1, 1])?,
    ))
}
