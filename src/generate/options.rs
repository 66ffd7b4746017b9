//! What shapes one generation ([`Options`]), how its latent starts ([`Init`]), and the
//! checks and caps on both that need no model.

use super::cutouts::CutMethod;
use super::trace::TraceOptions;
use super::{prompt, Prompt};
use crate::optim::Kind;
use crate::{Error, Result};

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
    /// [`super::Generation::clean_loss`]), encoded: CLIP re-ranking of samples from a prior, as
    /// DALL·E re-ranks its samples, before the optimisation refines the chosen one.
    Pool(Vec<Vec<f32>>),
    /// [`Init::Pool`] of this many scenes of the shapes world, the world the shipped models
    /// were trained on, standing in for the token prior (taming's transformer) that real
    /// VQGAN checkpoints come with: [`crate::data::shapes::Scene::covering`] (every
    /// one-shape colour, kind and background combination once, then random scenes), drawn
    /// from the generation's seed.
    Scenes(usize),
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
    /// Cutout size exponent (original method), 0 or more: larger favours small cutouts, 0
    /// makes every cutout the largest square (the whole image when it is square).
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
    /// Write the loop's tensors every few steps into a folder (`None`: off); see
    /// [`super::trace`].
    pub trace: Option<TraceOptions>,
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
    /// whose products fit, counts within their caps. [`super::Generation::new`] calls it first, so
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
        finite("cut_pow", self.cut_pow, false)?;
        finite("noise", self.noise, false)?;
        finite("init_weight", self.init_weight, false)?;
        finite("tv_weight", self.tv_weight, false)?;
        for p in &self.prompts {
            p.check()?;
        }
        if let Some(t) = &self.trace {
            t.check()?;
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
            trace: None,
        }
    }
}

#[cfg(test)]
mod validate_tests {
    use super::*;

    /// A library caller who fills `Options` by hand gets the CLI's refusals.
    #[test]
    fn options_refuse_non_finite_values_and_oversized_counts() {
        let ok = Options::new(vec![Prompt::parse("a cat").unwrap()], 64, 64);
        ok.validate().unwrap();
        // cut_pow 0: every cutout the largest square (the trace parity runs use it)
        let whole = Options {
            cut_pow: 0.0,
            ..ok.clone()
        };
        whole.validate().unwrap();
        type Edit = Box<dyn Fn(&mut Options)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|o| o.lr = f32::NAN), "lr"),
            (Box::new(|o| o.lr = 0.0), "lr"),
            (Box::new(|o| o.noise = f32::NAN), "noise"),
            (Box::new(|o| o.tv_weight = f32::NAN), "tv_weight"),
            (Box::new(|o| o.init_weight = f32::INFINITY), "init_weight"),
            (Box::new(|o| o.cut_pow = -1.0), "cut_pow"),
            (
                Box::new(|o| {
                    o.trace = Some(TraceOptions {
                        dir: "t".into(),
                        every: 0,
                    })
                }),
                "--trace-every",
            ),
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
