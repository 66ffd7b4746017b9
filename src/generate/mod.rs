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
    /// The image of a pool (each `[1, 3, H, W]` in [0, 1], at the output size) that CLIP
    /// finds closest to the prompts (the weighted loss of the whole image, as
    /// [`Generation::clean_loss`]), encoded: CLIP re-ranking of samples from a prior, as
    /// DALL·E re-ranks its samples, before the optimisation refines the chosen one.
    Pool(Vec<Vec<f32>>),
    /// [`Init::Pool`] of this many scenes of the shapes world, the world the shipped models
    /// were trained on, standing in for the token prior (taming's transformer) that real
    /// VQGAN checkpoints come with: [`crate::data::shapes::Scene::covering`] (every
    /// one-shape colour, kind and background combination once, then random scenes), drawn
    /// from the generation's seed.
    Scenes(usize),
}

/// Images CLIP scores at once when it ranks an [`Init::Pool`].
const POOL_BATCH: usize = 64;

/// A named set of defaults for the optimisation (steps, learning rate, cutouts, latent
/// schedule, random starts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// The reference notebook's settings, for full-size CLIP and VQGAN models: 100 steps,
    /// lr 0.1, 32 original cutouts, the full latent from the first step, one start.
    Reference,
    /// Settings for the small shipped models of the shapes world: start from the best of
    /// [`SHAPES_PRESET_SCENES`] shapes-world scenes as CLIP ranks them ([`Init::Scenes`]),
    /// then [`SHAPES_PRESET_STEPS`] steps at lr [`SHAPES_PRESET_LR`] with 6 jitter views on
    /// the full latent. Measured in
    /// `docs/generation_recipe.md`.
    Shapes,
    /// The earlier shapes preset, from random codes alone: 28 steps, lr 0.3, 6 jitter
    /// views, latent grids 2, 4, 8, 16, and 3 random starts of 2 steps each. The small CLIP
    /// accepts blobs in the prompt's colours, so this draws blobs rather than shapes.
    ShapesCodes,
}

/// Most scenes [`Init::Scenes`] may ask for. Each scene is rendered at the output size and
/// ranked by CLIP before the first step (about a second per 64 scenes at 64x64 on lavapipe),
/// so the start costs time in proportion; 4096 is eight times the shapes preset's 512 and
/// eighteen times the 224 one-shape combinations a pool covers first, well past where a larger
/// pool stops finding better starts.
pub const MAX_INIT_SCENES: usize = 4096;
/// Most cutouts per step: each is a CLIP forward and backward pass, and the reference
/// notebooks use 32 to 64.
pub const MAX_CUTN: usize = 4096;
/// Most bytes of pixels an [`Init::Pool`] or [`Init::Scenes`] pool may hold on the CPU (the
/// whole pool is rendered before it is ranked).
pub const MAX_POOL_BYTES: u64 = 4 << 30;

/// Scenes the [`Preset::Shapes`] start is chosen from.
pub const SHAPES_PRESET_SCENES: usize = 512;
/// Steps of [`Preset::Shapes`].
pub const SHAPES_PRESET_STEPS: usize = 10;
/// Learning rate of [`Preset::Shapes`].
pub const SHAPES_PRESET_LR: f32 = 0.01;

impl std::str::FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "reference" => Ok(Preset::Reference),
            "shapes" => Ok(Preset::Shapes),
            "shapes-codes" => Ok(Preset::ShapesCodes),
            o => Err(Error::invalid(format!(
                "unknown preset '{o}': expected reference, shapes or shapes-codes"
            ))),
        }
    }
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
    /// Coarse-to-fine latent schedule (empty: off). The steps are split evenly over these
    /// grid sizes; in each phase the optimised latent has `G` cells along the latent's
    /// shorter side (the other side in proportion) and is bilinearly upsampled to the full
    /// latent before quantisation, so early steps can only lay out large regions and later
    /// ones refine them. Moving to the next phase upsamples the latent and restarts Adam.
    pub latent_grids: Vec<usize>,
    /// Random starts tried before one is kept (1: off). Each of the `candidates` starts is
    /// optimised for `candidate_steps` steps; the one whose image is closest to the prompts
    /// (the weighted loss of the whole image, without cutouts or noise) goes on. Its steps
    /// count toward `steps`; the others' steps are extra, also counted in `steps`, so the
    /// kept start has `steps − (candidates − 1) · candidate_steps` steps in all.
    pub candidates: usize,
    /// Steps each start gets before the choice.
    pub candidate_steps: usize,
}

/// Bytes of `count` images of `3 × width × height` f32 pixels, or `None` when the product
/// overflows.
pub fn pixel_bytes(count: usize, width: usize, height: usize) -> Option<u64> {
    (count as u64)
        .checked_mul(3)?
        .checked_mul(width as u64)?
        .checked_mul(height as u64)?
        .checked_mul(4)
}

impl Options {
    /// Checks every value that does not need the models: numbers finite and in range, sizes
    /// whose products fit, counts within their caps. [`Generation::new`] calls it first, so
    /// a library caller that fills `Options` by hand gets the same refusals as the CLI.
    pub fn validate(&self) -> Result<()> {
        let finite = |name: &str, v: f32, positive: bool| -> Result<()> {
            let ok = v.is_finite() && if positive { v > 0.0 } else { v >= 0.0 };
            if ok {
                return Ok(());
            }
            let range = if positive {
                "greater than 0"
            } else {
                "0 or more"
            };
            Err(Error::invalid(format!(
                "{name} must be a finite number {range}, got {v}"
            )))
        };
        finite("lr", self.lr, true)?;
        finite("cut_pow", self.cut_pow, true)?;
        finite("noise", self.noise, false)?;
        finite("init_weight", self.init_weight, false)?;
        finite("tv_weight", self.tv_weight, false)?;
        for p in &self.prompts {
            p.check()?;
        }
        for (px, w, h, p) in &self.image_prompts {
            p.check()?;
            if pixel_bytes(1, *w, *h) != Some(px.len() as u64 * 4) || *w == 0 || *h == 0 {
                return Err(Error::shape(format!(
                    "image prompt '{}' has {} values, expected 3x{h}x{w}",
                    p.text,
                    px.len()
                )));
            }
        }
        for &(seed, weight) in &self.noise_prompts {
            if let Some(e) = prompt::weight_problem(weight) {
                return Err(Error::invalid(format!("noise prompt {seed}: {e}")));
            }
        }
        if pixel_bytes(1, self.width, self.height).is_none_or(|b| b > isize::MAX as u64) {
            return Err(Error::invalid(format!(
                "size {}x{} is too large: its pixel count overflows",
                self.width, self.height
            )));
        }
        if self.cutn > MAX_CUTN {
            return Err(Error::invalid(format!(
                "{} cutouts per step is more than the {MAX_CUTN} allowed",
                self.cutn
            )));
        }
        let pool = match &self.init {
            Init::Scenes(n) if *n > MAX_INIT_SCENES => {
                return Err(Error::invalid(format!(
                    "--init scenes:{n}: at most {MAX_INIT_SCENES} scenes (each is rendered \
                     and ranked by CLIP before the first step)"
                )));
            }
            Init::Scenes(n) => *n,
            Init::Pool(p) => p.len(),
            _ => 0,
        };
        let bytes = pixel_bytes(pool, self.width, self.height).unwrap_or(u64::MAX);
        if bytes > MAX_POOL_BYTES {
            let fit = MAX_POOL_BYTES / pixel_bytes(1, self.width, self.height).unwrap_or(1);
            return Err(Error::invalid(format!(
                "a start pool of {pool} images at {}x{} holds {:.1} GiB of pixels on the CPU, \
                 more than the {} GiB allowed; at most {fit} fit at this size",
                self.width,
                self.height,
                bytes as f64 / (1u64 << 30) as f64,
                MAX_POOL_BYTES >> 30
            )));
        }
        Ok(())
    }

    /// Whether the random starts fit the run: each start has at least one step, all of them
    /// together fewer than `steps` (so that one is kept and goes on), and one start's steps
    /// at most the first phase of `latent_grids` (the kept start's steps split evenly over
    /// the grids). Always true with a single start.
    pub fn candidates_fit(&self) -> bool {
        let (k, ks) = (self.candidates, self.candidate_steps);
        k <= 1
            || (ks > 0
                && k * ks < self.steps
                && ks <= (self.steps - (k - 1) * ks) / self.latent_grids.len().max(1))
    }

    /// These options with `preset`'s steps, learning rate, cutouts, latent grids, starts and
    /// initialisation.
    pub fn with_preset(mut self, preset: Preset) -> Self {
        let base = Options::new(Vec::new(), 1, 1);
        let (steps, lr, cutn, method, grids, cands, cand_steps, init) = match preset {
            Preset::Reference => (
                base.steps,
                base.lr,
                base.cutn,
                base.cut_method,
                base.latent_grids,
                base.candidates,
                base.candidate_steps,
                base.init,
            ),
            Preset::Shapes => (
                SHAPES_PRESET_STEPS,
                SHAPES_PRESET_LR,
                6,
                CutMethod::Jitter,
                vec![],
                1,
                base.candidate_steps,
                Init::Scenes(SHAPES_PRESET_SCENES),
            ),
            Preset::ShapesCodes => (
                28,
                0.3,
                6,
                CutMethod::Jitter,
                vec![2, 4, 8, 16],
                3,
                2,
                Init::RandomCodes,
            ),
        };
        self.init = init;
        self.steps = steps;
        self.lr = lr;
        self.cutn = cutn;
        self.cut_method = method;
        self.latent_grids = grids;
        self.candidates = cands;
        self.candidate_steps = cand_steps;
        self
    }

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
            latent_grids: Vec::new(),
            candidates: 1,
            candidate_steps: 4,
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
}

/// A latent `[1, E, h, w]` of uniformly random codebook entries.
fn random_codes(
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
fn resolve_grids(grids: &[usize], h: usize, w: usize) -> Result<Vec<(usize, usize)>> {
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
fn resize_matrices(
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
fn resize_latent(gpu: &Gpu, x: &Tensor, to: (usize, usize)) -> Result<Tensor> {
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
        opts.validate()?;
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
        let e = vqgan.codebook().dim(1);
        let (h, w) = (opts.height / f, opts.width / f);
        let grids = resolve_grids(&opts.latent_grids, h, w)?;
        // Checked before the start is made: a pool is ranked by CLIP, which takes a while.
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
        let mut pool_losses = Vec::new();
        let scenes;
        let init = match &opts.init {
            Init::Scenes(n) => {
                if *n == 0 {
                    return Err(Error::invalid("--init scenes:N needs N of at least 1"));
                }
                let seed = rng.random::<u64>();
                scenes = Init::Pool(
                    crate::data::shapes::Scene::covering(seed, *n)
                        .iter()
                        .map(|s| s.render_chw(opts.width, opts.height))
                        .collect(),
                );
                &scenes
            }
            other => other,
        };
        let z = match init {
            Init::RandomCodes => random_codes(gpu, &mut rng, &codebook, e, grids[0])?,
            init => {
                let (ww, hh) = (opts.width, opts.height);
                let pixels: Vec<f32> = match init {
                    Init::Image(p) => p.clone(),
                    Init::Pool(pool) => {
                        pool_losses = rank_pool(gpu, clip, &targets, pool, ww, hh)?;
                        let best = (0..pool_losses.len())
                            .min_by(|&i, &j| pool_losses[i].total_cmp(&pool_losses[j]))
                            .ok_or_else(|| Error::invalid("the init pool is empty"))?;
                        pool[best].clone()
                    }
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
                resize_latent(gpu, &vqgan.quantize(&vqgan.encode(&img)?)?, grids[0])?
            }
        };
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
        self.opt.step(&[Some(&gz)])?;
        // z ← clamp(z, codebook min, codebook max) per channel
        let param = &self.opt.params()[0];
        let zc = elementwise::binary(param, &self.z_min, BinaryOp::Max)?;
        let zc = elementwise::binary(&zc, &self.z_max, BinaryOp::Min)?;
        param.assign(&zc)?;
        let log = StepLog {
            step: self.step,
            loss: total.value().to_vec()?[0],
            prompt_losses: terms
                .iter()
                .map(|t| t.value().to_vec().map(|v| v[0]))
                .collect::<Result<_>>()?,
        };
        self.step += 1;
        let (k, ks) = (self.opts.candidates, self.opts.candidate_steps);
        if k > 1 && self.step <= k * ks && self.step.is_multiple_of(ks) {
            self.next_candidate()?;
        }
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
    clip_normalise(gpu, clip, tape, &views)
}

/// The resampling matrices of one view: the whole `w`×`h` image at CLIP's size `s`.
fn whole_view(gpu: &Gpu, w: usize, h: usize, s: usize) -> Result<(Tensor, Tensor)> {
    let whole = cutouts::Cut {
        x0: 0.0,
        y0: 0.0,
        w: w as f32,
        h: h as f32,
        flip: false,
    };
    cut_matrices(gpu, &[whole], w, h, s, false)
}

/// CLIP's weighted loss against `targets` of each image of `pool` (`[3, h, w]` in [0, 1]),
/// seen whole as [`Generation::clean_loss`] sees the current image, in batches of
/// [`POOL_BATCH`].
fn rank_pool(
    gpu: &Gpu,
    clip: &dyn Perceptor,
    targets: &[Target],
    pool: &[Vec<f32>],
    w: usize,
    h: usize,
) -> Result<Vec<f32>> {
    let s = clip.image_size();
    let (wy, wx) = whole_view(gpu, w, h, s)?;
    // The whole-image view of an image of CLIP's size is the image itself (the resampling
    // matrices are the identity), so such pools go to CLIP as they are.
    let same_size = w == s && h == s;
    let mut losses = Vec::with_capacity(pool.len());
    for chunk in pool.chunks(POOL_BATCH) {
        if let Some(px) = chunk.iter().find(|px| px.len() != 3 * w * h) {
            return Err(Error::shape(format!(
                "init pool image has {} values, expected 3x{h}x{w}",
                px.len()
            )));
        }
        let tape = Tape::new();
        let batch = if same_size {
            let all: Vec<f32> = chunk.concat();
            tape.leaf(
                Tensor::from_slice(gpu, &all, &[chunk.len(), 3, h, w])?,
                false,
            )
        } else {
            let mut views = Vec::with_capacity(chunk.len());
            for px in chunk {
                let img = tape.leaf(Tensor::from_slice(gpu, px, &[1, 3, h, w])?, false);
                views.push(cutouts::cutouts(&tape, &img, &wy, &wx)?);
            }
            let refs: Vec<&Var> = views.iter().collect();
            tape.concat(&refs, 0)?
        };
        losses.extend(whole_losses(gpu, clip, targets, &tape, &batch)?);
    }
    Ok(losses)
}

/// The weighted loss against `targets` (prompt stops ignored) of each of `views`
/// `[N, 3, S, S]` (pixels in [0, 1], at CLIP's size), one value per view.
fn whole_losses(
    gpu: &Gpu,
    clip: &dyn Perceptor,
    targets: &[Target],
    tape: &Tape,
    views: &Var,
) -> Result<Vec<f32>> {
    let emb = clip.encode_image(tape, &clip_normalise(gpu, clip, tape, views)?)?;
    let mut total = vec![0.0f32; views.shape()[0]];
    for t in targets {
        let d = tape.spherical_distance(&emb, &tape.leaf(t.embed.clone(), false))?;
        for (acc, v) in total.iter_mut().zip(d.value().to_vec()?) {
            *acc += t.weight * v;
        }
    }
    Ok(total)
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

#[cfg(test)]
mod validate_tests {
    use super::*;

    /// A library caller who fills `Options` by hand gets the CLI's refusals.
    #[test]
    fn options_refuse_non_finite_values_and_oversized_counts() {
        let ok = Options::new(vec![Prompt::parse("a cat").unwrap()], 64, 64);
        ok.validate().unwrap();
        type Edit = Box<dyn Fn(&mut Options)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|o| o.lr = f32::NAN), "lr"),
            (Box::new(|o| o.lr = 0.0), "lr"),
            (Box::new(|o| o.noise = f32::NAN), "noise"),
            (Box::new(|o| o.tv_weight = f32::NAN), "tv_weight"),
            (Box::new(|o| o.init_weight = f32::INFINITY), "init_weight"),
            (Box::new(|o| o.cut_pow = -1.0), "cut_pow"),
            (Box::new(|o| o.prompts[0].weight = f32::NAN), "weight"),
            (Box::new(|o| o.prompts[0].stop = f32::NAN), "stop"),
            (
                Box::new(|o| o.noise_prompts.push((3, f32::INFINITY))),
                "noise prompt 3",
            ),
            (Box::new(|o| o.cutn = MAX_CUTN + 1), "cutouts per step"),
            (
                Box::new(|o| o.init = Init::Scenes(99_999_999)),
                "at most 4096",
            ),
            (
                Box::new(|o| (o.width, o.height) = (usize::MAX, usize::MAX)),
                "overflows",
            ),
            (
                Box::new(|o| {
                    (o.width, o.height) = (4096, 4096);
                    o.init = Init::Scenes(4096)
                }),
                "at most 21 fit",
            ),
        ];
        for (edit, want) in cases {
            let mut o = ok.clone();
            edit(&mut o);
            let e = o.validate().unwrap_err().to_string();
            assert!(e.contains(want), "expected {want:?} in {e}");
        }
    }
}
