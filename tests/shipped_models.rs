//! The shipped models (weights/, trained by vqclip on its shapes world) make images a person
//! recognises as the prompt. Judged without CLIP, by pixel statistics: the border is the
//! prompt's background colour, the prompt's shape colour covers a visible part of the
//! interior, and its largest connected region has the named shape (told apart by how much of
//! its bounding box it fills and where its widest row is).

#[path = "support/shipped_judge.rs"]
mod judge;

use judge::*;
use vqclip::data::shapes::{Colour, Position, Scene, Shape, ShapeKind};
use vqclip::{DeviceOptions, Gpu};

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

/// Seed 1 of each case, as the README's command runs it.
#[test]
fn generated_images_show_the_prompted_shape_inside_a_border_of_the_prompted_background() {
    let gpu = Gpu::new(&DeviceOptions::default()).unwrap();
    let (clip, vq) = shipped(&gpu);
    let mut failures = Vec::new();
    for case in CASES {
        match generate_and_judge(&gpu, &clip, &vq, case, 1) {
            Ok(s) => eprintln!("ok: {s}"),
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
