//! Named sets of defaults ([`Preset`]) and the shapes world's part in generation: the
//! [`Init::Scenes`] start pool rendered from [`crate::data::shapes`], which the shapes preset
//! names. The loop itself only knows a pool of start images ([`Init::Pool`]).

use super::cutouts::CutMethod;
use super::{Init, Options};
use crate::{Error, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

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

impl Options {
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
}

/// The start pool an [`Init::Scenes`] of `n` scenes stands for: [`Init::Pool`] of
/// [`crate::data::shapes::Scene::covering`] rendered at `width`×`height`, from a seed drawn
/// from the generation's `rng`.
pub(super) fn scene_pool(
    n: usize,
    rng: &mut ChaCha8Rng,
    width: usize,
    height: usize,
) -> Result<Init> {
    if n == 0 {
        return Err(Error::invalid("--init scenes:N needs N of at least 1"));
    }
    let seed = rng.random::<u64>();
    Ok(Init::Pool(
        crate::data::shapes::Scene::covering(seed, n)
            .iter()
            .map(|s| s.render_chw(width, height))
            .collect(),
    ))
}
