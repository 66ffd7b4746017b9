//! The judge of the shipped-models test (tests/shipped_models.rs), shared with the pass-rate
//! measurement (examples/shipped_pass_rate.rs): generation with the shipped models and pixel
//! statistics that tell whether the image shows the prompt.

// Each includer uses a different part of this file.
#![allow(dead_code)]

use vqclip::data::shapes::{Colour, ShapeKind};
use vqclip::generate::{Generation, Options, Preset, Prompt};
use vqclip::models::clip::ClipModel;
use vqclip::models::vqgan::VqGan;
use vqclip::Gpu;

/// The named colour nearest to each pixel (row-major).
pub fn labels(rgb: &[u8]) -> Vec<Colour> {
    rgb.chunks_exact(3)
        .map(|p| Colour::nearest([p[0] as f32, p[1] as f32, p[2] as f32]))
        .collect()
}

/// Fractions of the pixels of colour `c` in the border ring (`ring` pixels wide) and in the
/// interior.
pub fn shares(lab: &[Colour], size: usize, ring: usize, c: Colour) -> (f32, f32) {
    let (mut b, mut nb, mut i, mut ni) = (0f32, 0f32, 0f32, 0f32);
    for y in 0..size {
        for x in 0..size {
            let hit = (lab[y * size + x] == c) as u32 as f32;
            if x < ring || y < ring || x >= size - ring || y >= size - ring {
                b += hit;
                nb += 1.0;
            } else {
                i += hit;
                ni += 1.0;
            }
        }
    }
    (b / nb, i / ni)
}

/// The largest 4-connected region of pixels labelled `c`, as a mask.
pub fn largest_region(lab: &[Colour], size: usize, c: Colour) -> Vec<bool> {
    let mut comp = vec![usize::MAX; lab.len()];
    let (mut best, mut best_n, mut next) = (usize::MAX, 0, 0);
    for start in 0..lab.len() {
        if lab[start] != c || comp[start] != usize::MAX {
            continue;
        }
        let mut stack = vec![start];
        comp[start] = next;
        let mut n = 0;
        while let Some(p) = stack.pop() {
            n += 1;
            let (x, y) = (p % size, p / size);
            let mut push = |q: usize| {
                if lab[q] == c && comp[q] == usize::MAX {
                    comp[q] = next;
                    stack.push(q);
                }
            };
            if x > 0 {
                push(p - 1);
            }
            if x + 1 < size {
                push(p + 1);
            }
            if y > 0 {
                push(p - size);
            }
            if y + 1 < size {
                push(p + size);
            }
        }
        if n > best_n {
            (best, best_n) = (next, n);
        }
        next += 1;
    }
    comp.iter()
        .map(|&k| k == best && best != usize::MAX)
        .collect()
}

/// The shape a region looks like: a triangle and a diamond fill half of their bounding box,
/// a circle π/4 and a square all of it; a square also fills the corners of its box (the four
/// corner cells of a 5×5 split, where a circle covers under a third); a triangle (apex up)
/// is widest at its base, a diamond in its middle. Returns the kind, the fill, the corner
/// fill and where the widest rows are (0 top, 1 bottom); `None` for an empty region.
pub fn judge_shape(mask: &[bool], size: usize) -> Option<(ShapeKind, f32, f32, f32)> {
    let pts: Vec<(usize, usize)> = (0..mask.len())
        .filter(|&p| mask[p])
        .map(|p| (p % size, p / size))
        .collect();
    if pts.is_empty() {
        return None;
    }
    let (x0, x1) = (
        pts.iter().map(|p| p.0).min()?,
        pts.iter().map(|p| p.0).max()?,
    );
    let (y0, y1) = (
        pts.iter().map(|p| p.1).min()?,
        pts.iter().map(|p| p.1).max()?,
    );
    let (w, h) = (x1 - x0 + 1, y1 - y0 + 1);
    let fill = pts.len() as f32 / (w * h) as f32;
    let mut widths = vec![0usize; h];
    for &(_, y) in &pts {
        widths[y - y0] += 1;
    }
    let widest = widths.iter().copied().max()?;
    // mean position (0 = top, 1 = bottom) of the rows at least 90% as wide as the widest
    let rows: Vec<usize> = (0..h).filter(|&r| widths[r] * 10 >= widest * 9).collect();
    let at = rows.iter().sum::<usize>() as f32 / rows.len() as f32 / (h - 1).max(1) as f32;
    let (cw, ch) = (w.div_ceil(5), h.div_ceil(5));
    let in_corner = |x: usize, y: usize| {
        let (dx, dy) = (x - x0, y - y0);
        (dx < cw || dx >= w - cw) && (dy < ch || dy >= h - ch)
    };
    let corner =
        pts.iter().filter(|&&(x, y)| in_corner(x, y)).count() as f32 / (4 * cw * ch) as f32;
    let kind = if fill < 0.66 {
        if at >= 0.7 {
            ShapeKind::Triangle
        } else {
            ShapeKind::Diamond
        }
    } else if corner >= 0.6 {
        ShapeKind::Square
    } else {
        ShapeKind::Circle
    };
    Some((kind, fill, corner, at))
}

/// A 3×3 box blur of RGB bytes (edges repeated).
pub fn box_blur(rgb: &[u8], size: usize) -> Vec<u8> {
    let mut out = vec![0u8; rgb.len()];
    for y in 0..size {
        for x in 0..size {
            for c in 0..3 {
                let mut acc = 0u32;
                for dy in -1i32..=1 {
                    for dx in -1i32..=1 {
                        let yy = (y as i32 + dy).clamp(0, size as i32 - 1) as usize;
                        let xx = (x as i32 + dx).clamp(0, size as i32 - 1) as usize;
                        acc += rgb[(yy * size + xx) * 3 + c] as u32;
                    }
                }
                out[(y * size + x) * 3 + c] = ((acc + 4) / 9) as u8;
            }
        }
    }
    out
}

/// What `vqclip generate PROMPT --seed SEED` makes with the shipped models (the shapes
/// preset), judged: `Err` lists what is wrong.
pub fn generate_and_judge(
    gpu: &Gpu,
    clip: &ClipModel,
    vq: &VqGan,
    (prompt, kind, shape, background): (&str, ShapeKind, Colour, Colour),
    seed: u64,
) -> Result<String, String> {
    let size = vq.config.dd.resolution;
    let mut o =
        Options::new(Prompt::parse_list(prompt).unwrap(), size, size).with_preset(Preset::Shapes);
    o.seed = seed;
    let steps = o.steps;
    let mut g = Generation::new(gpu, clip, vq, o).unwrap();
    for _ in 0..steps {
        g.step().unwrap();
    }
    let rgb = g.image_rgb8().unwrap();
    if let Some(dir) = std::env::var_os("VQCLIP_SWEEP_DIR") {
        let name = format!("{}_seed{seed}.png", prompt.replace(' ', "_"));
        image::RgbImage::from_raw(size as u32, size as u32, rgb.clone())
            .unwrap()
            .save(std::path::Path::new(&dir).join(name))
            .unwrap();
    }
    let lab = labels(&rgb);
    let (bg_edge, _) = shares(&lab, size, size / 8, background);
    let (shape_edge, shape_in) = shares(&lab, size, size / 8, shape);
    let judged = judge_shape(&largest_region(&lab, size, shape), size);
    let summary = format!(
        "{prompt} (seed {seed}): border {bg_edge:.2} {background:?}, interior {shape_in:.2} \
         {shape:?}, shape (kind, fill, corner fill, widest at) {judged:?}"
    );
    let mut wrong = Vec::new();
    if bg_edge < 0.5 {
        wrong.push(format!("only {bg_edge:.2} of the border is {background:?}"));
    }
    if shape_in < 0.08 {
        wrong.push(format!("only {shape_in:.2} of the interior is {shape:?}"));
    }
    if shape_edge >= 0.5 {
        wrong.push("the shape colour fills the border".into());
    }
    if judged.map(|j| j.0) != Some(kind) {
        wrong.push(format!("the {shape:?} region is not a {kind:?}"));
    }
    if wrong.is_empty() {
        Ok(summary)
    } else {
        Err(format!("{summary}: {}", wrong.join("; ")))
    }
}

pub const CASES: [(&str, ShapeKind, Colour, Colour); 5] = [
    (
        "a red circle on a blue background",
        ShapeKind::Circle,
        Colour::Red,
        Colour::Blue,
    ),
    (
        "a yellow square on a black background",
        ShapeKind::Square,
        Colour::Yellow,
        Colour::Black,
    ),
    (
        "a white triangle on a green background",
        ShapeKind::Triangle,
        Colour::White,
        Colour::Green,
    ),
    (
        "a green diamond on a purple background",
        ShapeKind::Diamond,
        Colour::Green,
        Colour::Purple,
    ),
    (
        "a blue circle on a yellow background",
        ShapeKind::Circle,
        Colour::Blue,
        Colour::Yellow,
    ),
];

pub fn shipped(gpu: &Gpu) -> (ClipModel, VqGan) {
    // The shipped models, found as every command finds them (VQCLIP_WEIGHTS first).
    let clip_dir = vqclip::weights::shipped::clip_dir().expect("shipped CLIP");
    let vq_file = vqclip::weights::shipped::vqgan_file().expect("shipped VQGAN");
    eprintln!("CLIP {}, VQGAN {}", clip_dir.display(), vq_file.display());
    let clip = ClipModel::load(&clip_dir, gpu).expect("shipped CLIP loads");
    let vq =
        VqGan::load(&vq_file, vq_file.with_extension("yaml"), gpu).expect("shipped VQGAN loads");
    (clip, vq)
}
