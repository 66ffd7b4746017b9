//! What the shipped models (weights/, trained by vqclip on its shapes world) draw, judged
//! without CLIP, by pixel statistics (tests/support/shipped_judge.rs): the border is the
//! prompt's background colour, the prompt's shape colour covers a visible part of the
//! interior, and its largest connected region fits the named shape's ideal mask clearly
//! better than the other kinds'. The default (`shapes`, from random codes) is measured over
//! seeds by the ignored `the_default_preset_passes_the_readme_rate`; CI checks that its
//! optimisation moves the image towards the prompt and that the `shapes-scenes` preset
//! retrieves the prompted scene.

#[path = "support/shipped_judge.rs"]
mod judge;

use judge::*;
use vqclip::data::shapes::{Colour, Position, Scene, Shape, ShapeKind};
use vqclip::generate::{Generation, Init, Options, Preset, Prompt};
use vqclip::{DeviceOptions, Gpu};

/// Seeds of the README's pass rate of the default preset.
const README_SEEDS: u64 = 4;
/// Runs (of 5 prompts × [`README_SEEDS`]) the README says pass the strict judge.
const README_STRICT_PASSES: usize = 1;
/// Runs the README says have the right colours (border and interior, shape not judged).
const README_COLOUR_PASSES: usize = 9;

/// Every kind, both sizes, in the centre and a corner, as rendered and softened (two passes of
/// a 3x3 box blur: edges and corners as blurred as the VQGAN's reconstructions).
fn rendered_shapes() -> Vec<(ShapeKind, String, Vec<u8>)> {
    let mut out = Vec::new();
    for kind in ShapeKind::ALL {
        for large in [false, true] {
            for position in [Position::Centre, Position::BottomRight] {
                let scene = Scene {
                    background: Colour::Blue,
                    shapes: vec![Shape {
                        kind,
                        colour: Colour::Yellow,
                        large,
                        position,
                    }],
                };
                let rgb = scene.render(64);
                let what = format!("{kind:?} large {large} at {position:?}");
                out.push((
                    kind,
                    format!("{what} (blurred)"),
                    box_blur(&box_blur(&rgb, 64), 64),
                ));
                out.push((kind, what, rgb));
            }
        }
    }
    out
}

#[test]
fn the_shape_judge_names_every_rendered_shape() {
    for (kind, what, img) in rendered_shapes() {
        let lab = labels(&img);
        let got = judge_shape(&largest_region(&lab, 64, Colour::Yellow), 64);
        assert_eq!(
            got.map(|g| g.0),
            Some(kind),
            "{what}: (kind, fill, corner fill, widest at) {got:?}"
        );
    }
    assert_eq!(judge_shape(&[false; 16], 4), None);
}

#[test]
fn the_strict_judge_names_every_rendered_shape_by_a_clear_margin() {
    for (kind, what, img) in rendered_shapes() {
        let region = largest_region(&labels(&img), 64, Colour::Yellow);
        let fits = shape_fits(&region, 64);
        assert_eq!(
            strict_shape(&region, 64),
            Some(kind),
            "{what}: fits {fits:?}"
        );
    }
    assert_eq!(strict_shape(&[false; 16], 4), None);
}

/// A mask of the pixels (x, y) of a 64×64 image for which `inside` holds.
fn mask(inside: impl Fn(f32, f32) -> bool) -> Vec<bool> {
    (0..64 * 64)
        .map(|p| inside((p % 64) as f32 + 0.5, (p / 64) as f32 + 0.5))
        .collect()
}

#[test]
fn the_strict_judge_names_no_shape_in_a_blob() {
    let disc = |cx: f32, cy: f32, r: f32| {
        move |x: f32, y: f32| (x - cx).powi(2) + (y - cy).powi(2) <= r * r
    };
    let blobs: [(&str, Vec<bool>); 5] = [
        // an ellipse twice as wide as it is tall
        (
            "ellipse",
            mask(|x, y| ((x - 32.0) / 20.0).powi(2) + ((y - 32.0) / 10.0).powi(2) <= 1.0),
        ),
        // two overlapping discs
        (
            "two discs",
            mask(|x, y| disc(24.0, 30.0, 10.0)(x, y) || disc(38.0, 36.0, 9.0)(x, y)),
        ),
        // a disc with a bite out of it
        (
            "bitten disc",
            mask(|x, y| disc(32.0, 32.0, 14.0)(x, y) && !disc(41.0, 25.0, 10.0)(x, y)),
        ),
        // a lumpy region: a disc whose radius wobbles with the angle
        (
            "lumpy",
            mask(|x, y| {
                let (dx, dy) = (x - 32.0, y - 32.0);
                let r = 13.0 + 5.0 * (3.0 * dy.atan2(dx)).sin();
                dx * dx + dy * dy <= r * r
            }),
        ),
        // an L of two bars
        (
            "L",
            mask(|x, y| {
                (16.0..24.0).contains(&x) && (12.0..48.0).contains(&y)
                    || (16.0..44.0).contains(&x) && (40.0..48.0).contains(&y)
            }),
        ),
    ];
    for (what, m) in blobs {
        let region = largest_region(
            &m.iter()
                .map(|&b| if b { Colour::Red } else { Colour::Blue })
                .collect::<Vec<_>>(),
            64,
            Colour::Red,
        );
        assert_eq!(
            strict_shape(&region, 64),
            None,
            "{what}: fits {:?}",
            shape_fits(&region, 64)
        );
    }
}

/// Seed 1 of each case with `--preset shapes-scenes` (CLIP re-ranking of rendered
/// shapes-world scenes, then a light refinement): retrieval, not drawing.
#[test]
fn the_scenes_preset_retrieves_the_prompted_shape_inside_a_border_of_the_prompted_background() {
    let gpu = Gpu::new(&DeviceOptions::default()).unwrap();
    let (clip, vq) = shipped(&gpu);
    let mut failures = Vec::new();
    for case in CASES {
        let (rgb, size) = generate(
            &gpu,
            &clip,
            &vq,
            case.0,
            1,
            Some(Preset::ShapesScenes),
            None,
        );
        match judge_image(&rgb, size, case) {
            Ok(s) => eprintln!("ok: {s}"),
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The default preset starts from random codes and its steps draw towards the prompt: the
/// codes change and CLIP's loss of the whole image falls. A short run (one start, 8 steps
/// over the preset's latent grids) so that CI runs it in seconds.
#[test]
fn the_default_optimisation_changes_the_codes_and_lowers_the_whole_image_loss() {
    let gpu = Gpu::new(&DeviceOptions::default()).unwrap();
    let (clip, vq) = shipped(&gpu);
    let size = vq.config.dd.resolution;
    let mut o = Options::new(Prompt::parse_list(CASES[0].0).unwrap(), size, size)
        .with_preset(Preset::default_for(true));
    assert_eq!(
        o.init,
        Init::RandomCodes,
        "the default starts from random codes"
    );
    o.seed = 1;
    o.steps = 8;
    o.candidates = 1;
    let mut g = Generation::new(&gpu, &clip, &vq, o).unwrap();
    let codes = |g: &Generation| {
        vq.quantize(&g.latent().unwrap())
            .unwrap()
            .1
            .to_vec_u32()
            .unwrap()
    };
    let (codes0, loss0, img0) = (codes(&g), g.clean_loss().unwrap(), g.image_rgb8().unwrap());
    for _ in 0..8 {
        g.step().unwrap();
    }
    let (codes1, loss1, img1) = (codes(&g), g.clean_loss().unwrap(), g.image_rgb8().unwrap());
    let changed = codes0.iter().zip(&codes1).filter(|(a, b)| a != b).count();
    eprintln!(
        "{changed} of {} codes changed; whole-image loss {loss0:.3} -> {loss1:.3}",
        codes0.len()
    );
    assert!(
        changed * 10 >= codes0.len(),
        "only {changed} of {} codes changed",
        codes0.len()
    );
    assert!(loss1 < loss0 - 0.05, "whole-image loss {loss0} -> {loss1}");
    assert_ne!(img0, img1);
}

/// The pass rate the README gives for the default (`vqclip generate PROMPT --seed S`, seeds
/// 1-4 of the five prompts): the strict judge and the colours alone (border and interior),
/// and the `--steps 0` image (the random start), which must not pass. 5 minutes (292 s, with
/// the implicit-GEMM convolution; 795 s before it, the same figures) on the 2-core lavapipe
/// machine, so run on request:
/// `cargo test --release --test shipped_models -- --ignored`.
#[test]
#[ignore]
fn the_default_preset_passes_the_readme_rate() {
    let gpu = Gpu::new(&DeviceOptions::default()).unwrap();
    let (clip, vq) = shipped(&gpu);
    let (mut strict, mut colours, mut start) = (0, 0, 0);
    for case in CASES {
        for seed in 1..=README_SEEDS {
            let (rgb, size) = generate(&gpu, &clip, &vq, case.0, seed, None, Some(0));
            start += usize::from(judge_image(&rgb, size, case).is_ok());
            let (rgb, size) = generate(&gpu, &clip, &vq, case.0, seed, None, None);
            let verdict = judge_image(&rgb, size, case);
            eprintln!("seed {seed}: {verdict:?}");
            strict += usize::from(verdict.is_ok());
            colours += usize::from(colours_pass(&rgb, size, case));
        }
    }
    let runs = CASES.len() * README_SEEDS as usize;
    eprintln!("strict {strict}/{runs}, colours {colours}/{runs}, --steps 0 {start}/{runs}");
    assert_eq!(start, 0, "{start} random starts passed the strict judge");
    // Generation is deterministic for a seed, options and adapter: on lavapipe, where the
    // README's figures were measured, these are exact. A change either way means the README
    // must say the new figures.
    assert_eq!(
        (strict, colours),
        (README_STRICT_PASSES, README_COLOUR_PASSES),
        "(strict, colours) passes of {runs}: the README says \
         ({README_STRICT_PASSES}, {README_COLOUR_PASSES})"
    );
}
