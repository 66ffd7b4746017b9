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

#[test]
fn the_shape_judge_names_every_rendered_shape() {
    // Clean renders of every kind, both sizes, in the centre and a corner, on two colours.
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
                // as rendered, and softened (two passes of a 3x3 box blur: edges and
                // corners as blurred as the VQGAN's reconstructions)
                let rgb = scene.render(64);
                for img in [rgb.clone(), box_blur(&box_blur(&rgb, 64), 64)] {
                    let lab = labels(&img);
                    let got = judge_shape(&largest_region(&lab, 64, Colour::Yellow), 64);
                    assert_eq!(
                        got.map(|g| g.0),
                        Some(kind),
                        "{kind:?} large {large} at {position:?}: (kind, fill, corner fill, \
                         widest at) {got:?}"
                    );
                }
            }
        }
    }
    assert_eq!(judge_shape(&[false; 16], 4), None);
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
