//! Named sets of defaults ([`Preset`]) and the shapes world's part in generation: the
//! [`Init::Scenes`] start pool rendered from [`crate::data::shapes`], which the shapes-scenes
//! preset names. The loop itself only knows a pool of start images ([`Init::Pool`]).

use super::cutouts::CutMethod;
use super::{Init, Options};
use crate::{Error, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A named set of defaults for the optimisation (steps, learning rate, cutouts, latent
/// schedule, random starts, start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// The reference notebook's settings, for full-size CLIP and VQGAN models: 100 steps,
    /// lr 0.1, 32 original cutouts, the full latent from the first step, one start.
    Reference,
    /// Settings for the small shipped models of the shapes world, from random codes:
    /// [`SHAPES_PRESET_STEPS`] steps at lr 0.3 with 6 jitter views, latent grids 2, 4, 8,
    /// 16, and 3 random starts of 2 steps each. The default with the shipped models
    /// (`docs/generation_recipe.md` has its measured pass rate).
    Shapes,
    /// Retrieval rather than drawing, for the shipped models: start from the best of
    /// [`SHAPES_SCENES_POOL`] shapes-world scenes as CLIP ranks them ([`Init::Scenes`]),
    /// then [`SHAPES_SCENES_STEPS`] steps at lr [`SHAPES_SCENES_LR`] with 6 jitter views,
    /// which leave the chosen scene almost as it was. Only when asked for.
    ShapesScenes,
}

/// Steps of [`Preset::Shapes`].
pub const SHAPES_PRESET_STEPS: usize = 28;
/// Scenes the [`Preset::ShapesScenes`] start is chosen from.
pub const SHAPES_SCENES_POOL: usize = 512;
/// Steps of [`Preset::ShapesScenes`].
pub const SHAPES_SCENES_STEPS: usize = 10;
/// Learning rate of [`Preset::ShapesScenes`].
pub const SHAPES_SCENES_LR: f32 = 0.01;

impl std::str::FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "reference" => Ok(Preset::Reference),
            // shapes-codes: the name of the random-codes preset until it became `shapes`
            "shapes" | "shapes-codes" => Ok(Preset::Shapes),
            "shapes-scenes" => Ok(Preset::ShapesScenes),
            o => Err(Error::invalid(format!(
                "unknown preset '{o}': expected reference, shapes or shapes-scenes"
            ))),
        }
    }
}

impl Options {
    /// These options with `preset`'s steps, learning rate, cutouts, latent grids, random
    /// starts and start.
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
                0.3,
                6,
                CutMethod::Jitter,
                vec![2, 4, 8, 16],
                3,
                2,
                Init::RandomCodes,
            ),
            Preset::ShapesScenes => (
                SHAPES_SCENES_STEPS,
                SHAPES_SCENES_LR,
                6,
                CutMethod::Jitter,
                vec![],
                1,
                base.candidate_steps,
                Init::Scenes(SHAPES_SCENES_POOL),
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

impl Preset {
    /// The preset a run gets when it names none: [`Preset::Shapes`] (random codes) for the
    /// shipped models (`shipped` true when neither CLIP nor VQGAN is given), else
    /// [`Preset::Reference`].
    pub fn default_for(shipped: bool) -> Preset {
        if shipped {
            Preset::Shapes
        } else {
            Preset::Reference
        }
    }

    /// The name it is chosen by (`--preset`).
    pub fn name(self) -> &'static str {
        match self {
            Preset::Reference => "reference",
            Preset::Shapes => "shapes",
            Preset::ShapesScenes => "shapes-scenes",
        }
    }
}

impl Init {
    /// Where the start comes from, in words ("random codes", "the init image", ...).
    pub fn describe(&self) -> String {
        match self {
            Init::Scenes(n) => format!("the best of {n} shapes-world scenes"),
            Init::Image(_) => "the init image".into(),
            Init::Pixels => "random pixels".into(),
            Init::Gradient => "a random gradient".into(),
            _ => "random codes".into(),
        }
    }
}

/// Which of a preset's values a caller set explicitly (explicit values are kept as given and
/// checked by [`super::Generation::new`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Explicit {
    /// The latent grids were given.
    pub latent_grids: bool,
    /// The number of random starts was given.
    pub candidates: bool,
    /// The steps of each random start were given.
    pub candidate_steps: bool,
}

impl Options {
    /// Adapts a preset's latent grids and random starts to this generation: grids larger
    /// than the latent's short side `short` are dropped, and the starts fall back to one
    /// when they do not fit in the steps or the start is an image or a scene pool. Values
    /// in `explicit` are left alone.
    pub fn adapt_preset(&mut self, short: usize, explicit: Explicit) {
        if !explicit.latent_grids {
            self.latent_grids.retain(|&g| g <= short);
        }
        if !explicit.candidates && !explicit.candidate_steps && !self.candidates_fit() {
            self.candidates = 1;
        }
        if matches!(self.init, Init::Image(_) | Init::Scenes(_)) && !explicit.candidates {
            self.candidates = 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preset_adapts_to_a_small_latent_but_explicit_values_stay() {
        let shapes_codes = || Options::new(Vec::new(), 64, 64).with_preset(Preset::Shapes);
        // A 4x4 latent: the grids above 4 go; 3 starts of 2 steps still fit in 28 steps.
        let mut o = shapes_codes();
        o.adapt_preset(4, Explicit::default());
        assert_eq!(o.latent_grids, vec![2, 4]);
        assert_eq!(o.candidates, 3);
        // Too few steps for the starts: one start, unless the caller asked for them.
        let mut o = shapes_codes();
        o.steps = 4;
        o.adapt_preset(16, Explicit::default());
        assert_eq!(o.candidates, 1);
        let mut o = shapes_codes();
        o.steps = 4;
        let given = Explicit {
            candidates: true,
            ..Explicit::default()
        };
        o.adapt_preset(2, given);
        assert_eq!(o.candidates, 3);
        assert_eq!(o.latent_grids, vec![2]);
        // A scene pool is one start; explicit grids are kept as given.
        let mut o = Options::new(Vec::new(), 64, 64).with_preset(Preset::ShapesScenes);
        o.candidates = 3;
        o.latent_grids = vec![32];
        let grids = Explicit {
            latent_grids: true,
            ..Explicit::default()
        };
        o.adapt_preset(4, grids);
        assert_eq!((o.candidates, o.latent_grids.clone()), (1, vec![32]));
    }

    #[test]
    fn presets_have_their_names_and_defaults() {
        for p in [Preset::Reference, Preset::Shapes, Preset::ShapesScenes] {
            assert_eq!(p.name().parse::<Preset>().unwrap(), p);
        }
        // the earlier name of the random-codes preset still works
        assert_eq!("shapes-codes".parse::<Preset>().unwrap(), Preset::Shapes);
        assert_eq!(Preset::default_for(true), Preset::Shapes);
        assert_eq!(Preset::default_for(false), Preset::Reference);
        assert_eq!(
            Init::Scenes(7).describe(),
            "the best of 7 shapes-world scenes"
        );
    }
}
