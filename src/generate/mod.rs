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
pub mod fit;
mod losses;
pub mod models;
mod options;
pub mod output;
mod presets;
pub mod prompt;
mod start;
pub mod trace;
mod views;

pub use options::{pixel_bytes, Init, Options, MAX_CUTN, MAX_INIT_SCENES, MAX_POOL_BYTES};
pub use presets::{
    Explicit, Preset, SHAPES_PRESET_STEPS, SHAPES_SCENES_LR, SHAPES_SCENES_POOL,
    SHAPES_SCENES_STEPS,
};
pub use prompt::Prompt;
pub use trace::{TraceOptions, DEFAULT_TRACE_EVERY};

use crate::autodiff::{Tape, Var};
use crate::ops::elementwise::{self, BinaryOp};
use crate::optim::{Adam, AdamConfig, Kind};
use crate::{Error, Gpu, Result, Tensor};
use losses::{total_variation, whole_losses};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use start::{codebook_range, random_codes, resize_latent, resize_matrices, resolve_grids};
use trace::Tracer;
use views::{augmented_views, make_views, whole_view};

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
    /// The initial full-resolution latent (for `init_weight`).
    z0: Tensor,
    z_min: Tensor,
    z_max: Tensor,
    /// Adam over the optimised latent: the full latent, or a coarse grid of it.
    opt: Adam,
    adam: AdamConfig,
    /// Grid `(h, w)` of each phase of `latent_grids` (one entry, the full latent, when off).
    grids: Vec<(usize, usize)>,
    phase: usize,
    /// Upsampling matrices from the current grid to the full latent (`None`: same size).
    up: Option<(Tensor, Tensor)>,
    rng: ChaCha8Rng,
    step: usize,
    /// The codebook `[n_embed, E]` on the CPU (random starts draw from it).
    codebook: Vec<f32>,
    /// Loss of each start tried so far, and the best start's latent.
    candidate_losses: Vec<f32>,
    best_start: Option<(f32, Tensor)>,
    pool_losses: Vec<f32>,
    /// Writes the traced steps (`Options::trace`).
    tracer: Option<Tracer>,
}

impl<'a> Generation<'a> {
    /// Embeds the prompts and initialises the latent.
    pub fn new(
        gpu: &Gpu,
        clip: &'a dyn Perceptor,
        vqgan: &'a dyn Generator,
        opts: Options,
    ) -> Result<Self> {
        opts.validate()?;
        let f = vqgan.factor();
        check_size_and_aims(&opts, f)?;
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        let targets = embed_targets(gpu, clip, &opts, &mut rng)?;
        let codebook = vqgan.codebook().to_vec()?;
        let e = vqgan.codebook().dim(1);
        let (h, w) = (opts.height / f, opts.width / f);
        let grids = resolve_grids(&opts.latent_grids, h, w)?;
        // Checked before the start is made: a pool is ranked by CLIP, which takes a while.
        check_candidates(&opts)?;
        // Before the start: a pool start ranks many images, and a bad folder should fail first.
        let tracer = match &opts.trace {
            Some(t) => Some(Tracer::create(t, &opts)?),
            None => None,
        };
        let (z, pool_losses) = start::start_latent(
            gpu, clip, vqgan, &opts, &targets, &codebook, grids[0], &mut rng,
        )?;
        let (z_min, z_max) = codebook_range(gpu, &codebook, e)?;
        let adam = match opts.optimizer {
            Kind::Adam => AdamConfig::adam(opts.lr),
            Kind::AdamW => AdamConfig::adamw(opts.lr),
        };
        // a copy at full size: z itself is updated in place
        let z0 = resize_latent(gpu, &z, (h, w))?;
        let up = if grids[0] == (h, w) {
            None
        } else {
            Some(resize_matrices(gpu, grids[0], (h, w))?)
        };
        let opt = Adam::new(vec![z], adam)?;
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
            adam,
            grids,
            phase: 0,
            up,
            rng,
            step: 0,
            codebook,
            candidate_losses: Vec::new(),
            best_start: None,
            pool_losses,
            tracer,
        })
    }

    /// With [`Init::Pool`] or [`Init::Scenes`]: CLIP's loss of every pool image (lower is
    /// closer to the prompts); the start is the lowest. Empty otherwise.
    pub fn pool_losses(&self) -> &[f32] {
        &self.pool_losses
    }

    /// Loss of each random start tried so far (see [`Options::candidates`]).
    pub fn candidate_losses(&self) -> &[f32] {
        &self.candidate_losses
    }

    /// The weighted prompt loss of the whole current image, as CLIP sees it without cutouts
    /// or noise (prompt stops ignored).
    pub fn clean_loss(&self) -> Result<f32> {
        let tape = Tape::new();
        let z = tape.leaf(self.opt.params()[0].clone(), false);
        let img = self.synth(&tape, &self.full_latent(&tape, &z)?)?;
        let (h, w) = (img.shape()[2], img.shape()[3]);
        let (wy, wx) = whole_view(&self.gpu, w, h, self.clip.image_size())?;
        let view = cutouts::cutouts(&tape, &img, &wy, &wx)?;
        Ok(whole_losses(&self.gpu, self.clip, &self.targets, &tape, &view)?[0])
    }

    /// Ends the current random start: keeps it if it is the best so far, then begins the
    /// next one, or, after the last, goes on from the best.
    fn next_candidate(&mut self) -> Result<()> {
        let loss = self.clean_loss()?;
        self.candidate_losses.push(loss);
        if self.best_start.as_ref().is_none_or(|(b, _)| loss < *b) {
            let z = elementwise::scale(&self.opt.params()[0], 1.0)?;
            self.best_start = Some((loss, z));
        }
        let z = if self.candidate_losses.len() < self.opts.candidates {
            let e = self.vqgan.codebook().dim(1);
            random_codes(&self.gpu, &mut self.rng, &self.codebook, e, self.grids[0])?
        } else {
            let (_, z) = self
                .best_start
                .take()
                .ok_or_else(|| Error::invalid("no start"))?;
            z
        };
        self.opt = Adam::new(vec![z], self.adam)?;
        Ok(())
    }

    /// The phase of the coarse-to-fine schedule that step `step` of the run belongs to.
    /// Phases split the kept start's steps evenly; every candidate start is in phase 0.
    fn phase_at(&self, step: usize) -> usize {
        let (k, ks) = (self.opts.candidates, self.opts.candidate_steps);
        let (t, total) = if k > 1 {
            let extra = (k - 1) * ks;
            let total = self.opts.steps - extra;
            if step < k * ks {
                (step % ks, total)
            } else {
                (step - extra, total)
            }
        } else {
            (step, self.opts.steps)
        };
        let n = self.grids.len();
        (0..n).rev().find(|&p| p * total / n <= t).unwrap_or(0)
    }

    /// Moves the optimised latent to the grid of `phase`: upsampled, with a fresh Adam.
    fn enter_phase(&mut self, phase: usize) -> Result<()> {
        let full = (self.z0.dim(2), self.z0.dim(3));
        let to = self.grids[phase];
        let z = resize_latent(&self.gpu, &self.opt.params()[0], to)?;
        self.opt = Adam::new(vec![z], self.adam)?;
        self.up = if to == full {
            None
        } else {
            Some(resize_matrices(&self.gpu, to, full)?)
        };
        self.phase = phase;
        Ok(())
    }

    /// The optimised latent on the tape, upsampled to the full latent grid.
    fn full_latent(&self, tape: &Tape, z: &Var) -> Result<Var> {
        match &self.up {
            Some((my, mx)) => cutouts::cutouts(tape, z, my, mx),
            None => Ok(z.clone()),
        }
    }

    /// Steps taken so far.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// The current latent `[1, E, h, w]` at the full latent size (upsampled from the
    /// coarse grid while a coarse phase of `latent_grids` runs).
    pub fn latent(&self) -> Result<Tensor> {
        let tape = Tape::new();
        let z = tape.leaf(self.opt.params()[0].clone(), false);
        Ok(self.full_latent(&tape, &z)?.value().clone())
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
        let zq = tape.leaf(self.vqgan.quantize(&self.latent()?)?, false);
        let x = self.vqgan.decode(&tape, &zq)?.value().to_vec()?;
        Ok(crate::models::vqgan::output_to_rgb8(
            &x,
            self.opts.width,
            self.opts.height,
        ))
    }

    /// One optimisation step; returns its losses.
    pub fn step(&mut self) -> Result<StepLog> {
        let phase = self.phase_at(self.step);
        if phase != self.phase {
            self.enter_phase(phase)?;
        }
        let tape = Tape::new();
        let z = tape.leaf(self.opt.params()[0].clone(), true);
        let zf = self.full_latent(&tape, &z)?;
        let img = self.synth(&tape, &zf)?;
        let traced = self.tracer.as_ref().is_some_and(|t| t.due(self.step));
        let (views, cutouts) = {
            let v = augmented_views(&self.gpu, self.clip, &tape, &img, &self.opts, &mut self.rng)?;
            // Kept past the backward pass only on traced steps.
            let cutouts = traced.then(|| v.value().clone());
            (clip_normalise(&self.gpu, self.clip, &tape, &v)?, cutouts)
        };
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
            let d = tape.square(&tape.sub(&zf, &z0)?)?;
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
        // Read before the optimiser updates z in place.
        let trace_data = match (&self.tracer, &cutouts) {
            (Some(t), Some(c)) => Some(t.read(z.value(), &gz, img.value(), c)?),
            _ => None,
        };
        self.opt.step(&[Some(&gz)])?;
        // z ← clamp(z, codebook min, codebook max) per channel
        let param = &self.opt.params()[0];
        let zc = elementwise::binary(param, &self.z_min, BinaryOp::Max)?;
        let zc = elementwise::binary(&zc, &self.z_max, BinaryOp::Min)?;
        param.assign(&zc)?;
        // The step's one wait for the device: the total and each prompt's loss, read together.
        let losses = {
            let scalars = std::iter::once(&total)
                .chain(&terms)
                .map(|t| t.value().reshape(&[1]))
                .collect::<Result<Vec<_>>>()?;
            let refs: Vec<&Tensor> = scalars.iter().collect();
            crate::ops::concat::concat(&refs, 0)?.to_vec()?
        };
        let log = StepLog {
            step: self.step,
            loss: losses[0],
            prompt_losses: losses[1..].to_vec(),
        };
        if let (Some(t), Some(data)) = (self.tracer.as_mut(), trace_data) {
            t.write(&log, data)?;
        }
        self.step += 1;
        let (k, ks) = (self.opts.candidates, self.opts.candidate_steps);
        if k > 1 && self.step <= k * ks && self.step.is_multiple_of(ks) {
            self.next_candidate()?;
        }
        Ok(log)
    }
}

/// Refuses a size that is not a positive multiple of the VQGAN factor `f`, options with
/// nothing to aim for, and no cutouts.
fn check_size_and_aims(opts: &Options, f: usize) -> Result<()> {
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
    if opts.prompts.is_empty() && opts.image_prompts.is_empty() && opts.noise_prompts.is_empty() {
        return Err(Error::invalid(
            "nothing to aim for: give at least one prompt",
        ));
    }
    if opts.cutn == 0 {
        return Err(Error::invalid("--cutn must be at least 1"));
    }
    Ok(())
}

/// The embeddings the loss aims for, in the order text, image, noise prompts. Image prompts
/// are seen through one step's views, drawn from `rng`.
fn embed_targets(
    gpu: &Gpu,
    clip: &dyn Perceptor,
    opts: &Options,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Target>> {
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
        let views = make_views(gpu, clip, &tape, &x, opts, rng)?;
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
    Ok(targets)
}

/// Refuses random starts (`--candidates` above 1) that cannot work: with a given start
/// image or pool, or more than the steps hold.
fn check_candidates(opts: &Options) -> Result<()> {
    let (k, ks) = (opts.candidates, opts.candidate_steps);
    if k == 0 {
        return Err(Error::invalid("--candidates must be at least 1"));
    }
    if k > 1 {
        if matches!(opts.init, Init::Image(_) | Init::Pool(_) | Init::Scenes(_)) {
            return Err(Error::invalid(
                "--candidates needs random starts: it cannot be used with --init-image or \
                 --init scenes:N",
            ));
        }
        if !opts.candidates_fit() {
            return Err(Error::invalid(format!(
                "{k} candidates of {ks} steps do not fit in {} steps: each needs at least \
                 one step, all of them together fewer than --steps, and one candidate's steps \
                 at most the first latent-grid phase",
                opts.steps
            )));
        }
    }
    Ok(())
}

/// `(views − mean) / std` with CLIP's per-channel statistics.
fn clip_normalise(gpu: &Gpu, clip: &dyn Perceptor, tape: &Tape, views: &Var) -> Result<Var> {
    let (mean, std) = clip.mean_std();
    let scale: Vec<f32> = std.iter().map(|s| 1.0 / s).collect();
    let shift: Vec<f32> = mean.iter().zip(&std).map(|(m, s)| -m / s).collect();
    let scale = tape.leaf(Tensor::from_slice(gpu, &scale, &[3, 1, 1])?, false);
    let shift = tape.leaf(Tensor::from_slice(gpu, &shift, &[3, 1, 1])?, false);
    tape.add(&tape.mul(views, &scale)?, &shift)
}

#[cfg(test)]
mod tests;
