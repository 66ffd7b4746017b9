//! VQGAN+CLIP text-to-image: prompts, cutouts, losses and the optimisation loop.
//!
//! The loop follows Katherine Crowson's notebook and nerdyrodent's `generate.py`
//! (../shared/docs/MODEL_FACTS.md, part C): a latent `z [1, E, h, w]` is the only trainable
//! tensor; each step quantises it to the nearest codebook entries with a straight-through
//! gradient, decodes it to an image, clamps it with `ClampWithGrad`, takes `cutn` cutouts,
//! embeds them with CLIP and sums the prompts' spherical-distance losses; Adam updates `z`,
//! which is then clamped to the codebook's per-channel range.
//!
//! The loop talks to the models through two small traits, [`Perceptor`] (CLIP) and
//! [`Generator`] (VQGAN), so that any CLIP combines with any VQGAN.

pub mod cutouts;
pub mod models;
pub mod output;
pub mod prompt;

use crate::autodiff::{Tape, Var};
use crate::ops::elementwise::{self, BinaryOp};
use crate::optim::{Adam, AdamConfig, Kind};
use crate::{Error, Gpu, Result, Tensor};
use cutouts::{cut_matrices, sample_cuts, CutMethod};
pub use prompt::Prompt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// The CLIP side of generation.
pub trait Perceptor {
    /// Side of the square images the image tower takes (224 for ViT-B/32).
    fn image_size(&self) -> usize;
    /// Width of the projected embeddings.
    fn embed_dim(&self) -> usize;
    /// Per-channel mean and std the image tower's inputs are normalised with.
    fn mean_std(&self) -> ([f32; 3], [f32; 3]);
    /// Projected text embeddings `[N, P]`.
    fn encode_text(&self, texts: &[String]) -> Result<Tensor>;
    /// Projected image embeddings `[N, P]` of normalised pixels `[N, 3, S, S]`, on the tape.
    fn encode_image(&self, tape: &Tape, pixels: &Var) -> Result<Var>;
    /// [`Perceptor::encode_image`] with each transformer block recomputed in the backward
    /// pass instead of holding its activations ([`Tape::checkpoint`]): less memory, one
    /// more forward pass.
    fn encode_image_recomputed(&self, tape: &Tape, pixels: &Var) -> Result<Var> {
        self.encode_image(tape, pixels)
    }
}

/// The VQGAN side of generation.
pub trait Generator {
    /// Downsampling factor between image and latent (16 for the f16 models).
    fn factor(&self) -> usize;
    /// The codebook `[n_embed, embed_dim]`.
    fn codebook(&self) -> &Tensor;
    /// Nearest codebook entries of `z` `[1, E, h, w]`, same shape.
    fn quantize(&self, z: &Tensor) -> Result<Tensor>;
    /// The image `[1, 3, H, W]` (about [-1, 1]) decoded from quantised latents, on the tape.
    fn decode(&self, tape: &Tape, z_q: &Var) -> Result<Var>;
    /// [`Generator::decode`] with its blocks recomputed in the backward pass instead of
    /// holding their activations ([`Tape::checkpoint`]).
    fn decode_recomputed(&self, tape: &Tape, z_q: &Var) -> Result<Var> {
        self.decode(tape, z_q)
    }
    /// The latent `[1, E, h, w]` (before quantisation) of an image `[1, 3, H, W]` in [-1, 1].
    fn encode(&self, image: &Tensor) -> Result<Tensor>;
}

/// How the latent starts.
#[derive(Debug, Clone, PartialEq)]
pub enum Init {
    /// Uniformly random codebook entries (the reference default).
    RandomCodes,
    /// An image `[1, 3, H, W]` in [0, 1] (already resized to the output size), encoded.
    Image(Vec<f32>),
    /// Uniform random pixels, encoded.
    Pixels,
    /// A random two-colour gradient, encoded.
    Gradient,
}

/// Everything that shapes one generation.
#[derive(Debug, Clone)]
pub struct Options {
    /// Text prompts.
    pub prompts: Vec<Prompt>,
    /// Image prompts: `[1, 3, h, w]` pixels in [0, 1] with their weight and stop.
    pub image_prompts: Vec<(Vec<f32>, usize, usize, Prompt)>,
    /// Noise prompts: (seed, weight).
    pub noise_prompts: Vec<(u64, f32)>,
    /// Output width (a multiple of the generator's factor).
    pub width: usize,
    /// Output height (a multiple of the generator's factor).
    pub height: usize,
    /// Optimisation steps.
    pub steps: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// Learning rate.
    pub lr: f32,
    /// Adam or AdamW.
    pub optimizer: Kind,
    /// Cutouts per step.
    pub cutn: usize,
    /// Cutout size exponent (original method).
    pub cut_pow: f32,
    /// How cutouts are made.
    pub cut_method: CutMethod,
    /// Latent initialisation.
    pub init: Init,
    /// Weight of the pull back toward the initial latent (`mse(z, z0) · w / 2`).
    pub init_weight: f32,
    /// Weight of a total-variation loss on the image (0: off).
    pub tv_weight: f32,
    /// Noise added to cutouts: each cutout gets `U(0, noise) · N(0, 1)` per pixel.
    pub noise: f32,
    /// Recompute decoder and CLIP blocks in the backward pass instead of holding their
    /// activations (less GPU memory for large images, about one more forward pass per step).
    pub recompute: bool,
}

impl Options {
    /// The reference defaults for a prompt list and size.
    pub fn new(prompts: Vec<Prompt>, width: usize, height: usize) -> Self {
        Options {
            prompts,
            image_prompts: vec![],
            noise_prompts: vec![],
            width,
            height,
            steps: 100,
            seed: 0,
            lr: 0.1,
            optimizer: Kind::Adam,
            cutn: 32,
            cut_pow: 1.0,
            cut_method: CutMethod::Original,
            init: Init::RandomCodes,
            init_weight: 0.0,
            tv_weight: 0.0,
            noise: 0.1,
            recompute: false,
        }
    }
}

/// Losses of one step.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepLog {
    /// Step index (0-based).
    pub step: usize,
    /// Total loss.
    pub loss: f32,
    /// Each prompt's weighted loss, in the order text, image, noise prompts.
    pub prompt_losses: Vec<f32>,
}

struct Target {
    embed: Tensor,
    weight: f32,
    stop: f32,
}

/// A generation in progress.
pub struct Generation<'a> {
    gpu: Gpu,
    clip: &'a dyn Perceptor,
    vqgan: &'a dyn Generator,
    opts: Options,
    targets: Vec<Target>,
    z0: Tensor,
    z_min: Tensor,
    z_max: Tensor,
    opt: Adam,
    rng: ChaCha8Rng,
    step: usize,
}

/// Codebook per-channel minimum and maximum, each `[1, E, 1, 1]`.
fn codebook_range(gpu: &Gpu, codebook: &[f32], e: usize) -> Result<(Tensor, Tensor)> {
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

impl<'a> Generation<'a> {
    /// Embeds the prompts and initialises the latent.
    pub fn new(
        gpu: &Gpu,
        clip: &'a dyn Perceptor,
        vqgan: &'a dyn Generator,
        opts: Options,
    ) -> Result<Self> {
        let f = vqgan.factor();
        if opts.width == 0
            || opts.height == 0
            || !opts.width.is_multiple_of(f)
            || !opts.height.is_multiple_of(f)
        {
            return Err(Error::invalid(format!(
                "size {}x{} must be positive multiples of the VQGAN factor {f}",
                opts.width, opts.height
            )));
        }
        if opts.prompts.is_empty() && opts.image_prompts.is_empty() && opts.noise_prompts.is_empty()
        {
            return Err(Error::invalid(
                "nothing to aim for: give at least one prompt",
            ));
        }
        if opts.cutn == 0 {
            return Err(Error::invalid("--cutn must be at least 1"));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        let mut targets = Vec::new();
        if !opts.prompts.is_empty() {
            let texts: Vec<String> = opts.prompts.iter().map(|p| p.text.clone()).collect();
            let emb = clip.encode_text(&texts)?;
            let p = emb.dim(-1);
            let all = emb.to_vec()?; // once per generation: a few prompts
            for (i, pr) in opts.prompts.iter().enumerate() {
                targets.push(Target {
                    embed: Tensor::from_slice(gpu, &all[i * p..(i + 1) * p], &[1, p])?,
                    weight: pr.weight,
                    stop: pr.stop,
                });
            }
        }
        for (pixels, w, h, pr) in &opts.image_prompts {
            let img = Tensor::from_slice(gpu, pixels, &[1, 3, *h, *w])?;
            let tape = Tape::new();
            let x = tape.leaf(img, false);
            let views = make_views(gpu, clip, &tape, &x, &opts, &mut rng)?;
            targets.push(Target {
                embed: clip.encode_image(&tape, &views)?.value().clone(),
                weight: pr.weight,
                stop: pr.stop,
            });
        }
        if !opts.noise_prompts.is_empty() {
            let p = clip.embed_dim();
            for &(seed, weight) in &opts.noise_prompts {
                let mut r = ChaCha8Rng::seed_from_u64(seed);
                let v: Vec<f32> = (0..p).map(|_| StandardNormal.sample(&mut r)).collect();
                targets.push(Target {
                    embed: Tensor::from_slice(gpu, &v, &[1, p])?,
                    weight,
                    stop: f32::NEG_INFINITY,
                });
            }
        }
        let codebook = vqgan.codebook().to_vec()?;
        let (n_embed, e) = (vqgan.codebook().dim(0), vqgan.codebook().dim(1));
        let (h, w) = (opts.height / f, opts.width / f);
        let z = match &opts.init {
            Init::RandomCodes => {
                // z[0, c, y, x] = codebook[idx[y, x], c]
                let mut z = vec![0.0f32; e * h * w];
                for pos in 0..h * w {
                    let idx = rng.random_range(0..n_embed);
                    for c in 0..e {
                        z[c * h * w + pos] = codebook[idx * e + c];
                    }
                }
                Tensor::from_slice(gpu, &z, &[1, e, h, w])?
            }
            init => {
                let (ww, hh) = (opts.width, opts.height);
                let pixels: Vec<f32> = match init {
                    Init::Image(p) => p.clone(),
                    Init::Pixels => (0..3 * ww * hh).map(|_| rng.random::<f32>()).collect(),
                    _ => {
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
                vqgan.quantize(&vqgan.encode(&img)?)?
            }
        };
        let (z_min, z_max) = codebook_range(gpu, &codebook, e)?;
        let config = match opts.optimizer {
            Kind::Adam => AdamConfig::adam(opts.lr),
            Kind::AdamW => AdamConfig::adamw(opts.lr),
        };
        let z0 = elementwise::scale(&z, 1.0)?; // a copy: z itself is updated in place
        let opt = Adam::new(vec![z], config)?;
        Ok(Generation {
            gpu: gpu.clone(),
            clip,
            vqgan,
            opts,
            targets,
            z0,
            z_min,
            z_max,
            opt,
            rng,
            step: 0,
        })
    }

    /// Steps taken so far.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// The current latent `[1, E, h, w]`.
    pub fn latent(&self) -> &Tensor {
        &self.opt.params()[0]
    }

    /// `synth(z)`: the current image `[1, 3, H, W]` in [0, 1] on the tape.
    fn synth(&self, tape: &Tape, z: &Var) -> Result<Var> {
        let zq = self.vqgan.quantize(z.value())?;
        let zq = tape.straight_through(zq, z)?;
        let out = if self.opts.recompute {
            self.vqgan.decode_recomputed(tape, &zq)?
        } else {
            self.vqgan.decode(tape, &zq)?
        };
        let img = tape.affine(&out, 0.5, 0.5)?;
        tape.clamp_with_grad(&img, 0.0, 1.0)
    }

    /// The current image as RGB bytes (row-major HWC): `round(clamp((x+1)/2) · 255)` of the
    /// decoded quantised latent, the same conversion as `vqclip reconstruct`.
    pub fn image_rgb8(&self) -> Result<Vec<u8>> {
        let tape = Tape::new();
        let zq = tape.leaf(self.vqgan.quantize(self.latent())?, false);
        let x = self.vqgan.decode(&tape, &zq)?.value().to_vec()?;
        Ok(crate::models::vqgan::output_to_rgb8(
            &x,
            self.opts.width,
            self.opts.height,
        ))
    }

    /// One optimisation step; returns its losses.
    pub fn step(&mut self) -> Result<StepLog> {
        let tape = Tape::new();
        let z = tape.leaf(self.latent().clone(), true);
        let img = self.synth(&tape, &z)?;
        let views = make_views(&self.gpu, self.clip, &tape, &img, &self.opts, &mut self.rng)?;
        let emb = if self.opts.recompute {
            self.clip.encode_image_recomputed(&tape, &views)?
        } else {
            self.clip.encode_image(&tape, &views)?
        };
        let mut terms = Vec::new();
        for t in &self.targets {
            let target = tape.leaf(t.embed.clone(), false);
            let d = tape.spherical_distance(&emb, &target)?;
            let d = if t.stop.is_finite() {
                tape.stop_below(&d, t.stop)?
            } else {
                d
            };
            let l = tape.mean(&d)?;
            terms.push(tape.affine(&l, t.weight, 0.0)?);
        }
        let mut total = terms[0].clone();
        for t in &terms[1..] {
            total = tape.add(&total, t)?;
        }
        if self.opts.init_weight != 0.0 {
            let z0 = tape.leaf(self.z0.clone(), false);
            let d = tape.square(&tape.sub(&z, &z0)?)?;
            let l = tape.affine(&tape.mean(&d)?, self.opts.init_weight / 2.0, 0.0)?;
            total = tape.add(&total, &l)?;
        }
        if self.opts.tv_weight != 0.0 {
            let l = total_variation(&tape, &img)?;
            total = tape.add(&total, &tape.affine(&l, self.opts.tv_weight, 0.0)?)?;
        }
        let mut grads = tape.backward(&total)?;
        let gz = grads
            .take(&z)
            .ok_or_else(|| Error::invalid("the loss does not depend on the latent"))?;
        self.opt.step(&[Some(&gz)])?;
        // z ← clamp(z, codebook min, codebook max) per channel
        let zc = elementwise::binary(self.latent(), &self.z_min, BinaryOp::Max)?;
        let zc = elementwise::binary(&zc, &self.z_max, BinaryOp::Min)?;
        self.latent().assign(&zc)?;
        let log = StepLog {
            step: self.step,
            loss: total.value().to_vec()?[0],
            prompt_losses: terms
                .iter()
                .map(|t| t.value().to_vec().map(|v| v[0]))
                .collect::<Result<_>>()?,
        };
        self.step += 1;
        Ok(log)
    }
}

/// Total variation: mean squared difference of vertically and horizontally adjacent pixels,
/// as differences of rows/columns taken by matmul with a difference matrix.
fn total_variation(tape: &Tape, img: &Var) -> Result<Var> {
    let (c, h, w) = (img.shape()[1], img.shape()[2], img.shape()[3]);
    let gpu = img.value().gpu();
    let diff = |n: usize| -> Result<Tensor> {
        // [n-1, n]: row i is e_{i+1} − e_i
        let mut d = vec![0.0f32; (n - 1) * n];
        for i in 0..n - 1 {
            d[i * n + i] = -1.0;
            d[i * n + i + 1] = 1.0;
        }
        Tensor::from_slice(gpu, &d, &[n - 1, n])
    };
    if h < 2 || w < 2 {
        return Err(Error::invalid(
            "total variation needs an image of at least 2x2",
        ));
    }
    let x = tape.reshape(img, &[c, h, w])?;
    let dy = tape.leaf(diff(h)?, false);
    let dx = tape.leaf(diff(w)?, false);
    // vertical: Dy [h-1, h] @ x_c [h, w]; horizontal: x_c [h, w] @ Dxᵀ [w, w-1]
    let v = tape.matmul(&dy, &x, None, &Default::default())?;
    let hz = tape.matmul(
        &x,
        &dx,
        None,
        &crate::ops::matmul::MatmulOpts {
            trans_b: true,
            ..Default::default()
        },
    )?;
    let lv = tape.mean(&tape.square(&v)?)?;
    let lh = tape.mean(&tape.square(&hz)?)?;
    tape.add(&lv, &lh)
}

/// The pooled method's colour and erasing augmentations, each applied with probability 0.7
/// per cutout (kornia's defaults in nerdyrodent's `generate.py`): a per-cutout linear colour
/// map `M·x + b` (brightness ±0.1, contrast ±0.1 about mid-grey, saturation ±0.1 toward
/// luma, hue rotation ±0.1·π about the grey axis), then one random rectangle (10–40% of the
/// area, aspect 0.3–3.3, same for every cutout) set to 0. Both are linear in the pixels, so
/// their backward rules are the tape's matmul and multiply.
fn colour_jitter_and_erase(
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
fn make_views(
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
    let (wy, wx) = cut_matrices(gpu, &cuts, w, h, s)?;
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
    let (mean, std) = clip.mean_std();
    let scale: Vec<f32> = std.iter().map(|s| 1.0 / s).collect();
    let shift: Vec<f32> = mean.iter().zip(&std).map(|(m, s)| -m / s).collect();
    let scale = tape.leaf(Tensor::from_slice(gpu, &scale, &[3, 1, 1])?, false);
    let shift = tape.leaf(Tensor::from_slice(gpu, &shift, &[3, 1, 1])?, false);
    tape.add(&tape.mul(&views, &scale)?, &shift)
}

#[cfg(test)]
mod tests;
