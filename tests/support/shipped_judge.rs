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

/// The `(x, y)` cells of a region of a `size`-wide mask.
fn cells(mask: &[bool], size: usize) -> Vec<(usize, usize)> {
    (0..mask.len())
        .filter(|&p| mask[p])
        .map(|p| (p % size, p / size))
        .collect()
}

/// The bounding box `[x0, x1, y0, y1]` (inclusive) of cells; `None` for none.
fn bounding_box(pts: &[(usize, usize)]) -> Option<[usize; 4]> {
    Some([
        pts.iter().map(|p| p.0).min()?,
        pts.iter().map(|p| p.0).max()?,
        pts.iter().map(|p| p.1).min()?,
        pts.iter().map(|p| p.1).max()?,
    ])
}

/// The shape a region looks like: a triangle and a diamond fill half of their bounding box,
/// a circle π/4 and a square all of it; a square also fills the corners of its box (the four
/// corner cells of a 5×5 split, where a circle covers under a third); a triangle (apex up)
/// is widest at its base, a diamond in its middle. Returns the kind, the fill, the corner
/// fill and where the widest rows are (0 top, 1 bottom); `None` for an empty region.
pub fn judge_shape(mask: &[bool], size: usize) -> Option<(ShapeKind, f32, f32, f32)> {
    let pts = cells(mask, size);
    let [x0, x1, y0, y1] = bounding_box(&pts)?;
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

/// The least intersection-over-union the named shape's ideal mask must reach
/// ([`strict_shape`]). Clean and softened renders of every kind and size fit their own kind
/// at 0.83 or more (the small triangles are the lowest); a disc with a bite out of it at 0.70.
pub const MIN_FIT: f32 = 0.75;
/// How much better than each other kind's mask the named shape's mask must fit
/// ([`strict_shape`]): "clearly better". A perfect circle fits the square's mask at
/// π/4 ≈ 0.79 (and a square the circle's), a triangle the diamond's at about 0.5, so clean
/// renders clear the margin by 0.12 or more; the VQGAN's reconstruction of a rendered blue
/// circle (the `shapes-scenes` preset, seed 1) fits circle 0.92 and square 0.82, which is
/// why the margin is not 0.1. A blob that is neither fits two kinds about equally.
pub const FIT_MARGIN: f32 = 0.08;

/// The shapes world's geometry (`Scene::render`): whether (dx, dy), relative to the shape's
/// centre in units of its half-size, is inside a shape of `kind`, and the kind's extent
/// `(x0, x1, y0, y1)` in those units. Kept here, not taken from the crate, so that the judge
/// does not share code with what it judges.
fn ideal(kind: ShapeKind) -> (fn(f32, f32) -> bool, [f32; 4]) {
    match kind {
        ShapeKind::Circle => (|x, y| x * x + y * y <= 1.0, [-1.0, 1.0, -1.0, 1.0]),
        ShapeKind::Square => (
            |x, y| x.abs() <= 0.85 && y.abs() <= 0.85,
            [-0.85, 0.85, -0.85, 0.85],
        ),
        ShapeKind::Triangle => (
            |x, y| (-1.0..=0.8).contains(&y) && x.abs() <= (y + 1.0) / 1.8,
            [-1.0, 1.0, -1.0, 0.8],
        ),
        ShapeKind::Diamond => (|x, y| x.abs() + y.abs() <= 1.0, [-1.0, 1.0, -1.0, 1.0]),
    }
}

/// How well a region fits each kind (in [`ShapeKind::ALL`] order): the intersection over
/// union of the region and the kind's ideal mask, the shape as the world draws it (with its
/// own aspect ratio) scaled to cover the region's bounding box and centred on it. An
/// elongated blob fits no kind well, because every kind is about as tall as it is wide.
/// `None` for an empty region.
pub fn shape_fits(mask: &[bool], size: usize) -> Option<[f32; 4]> {
    let [x0, x1, y0, y1] = bounding_box(&cells(mask, size))?;
    let (w, h) = ((x1 - x0 + 1) as f32, (y1 - y0 + 1) as f32);
    let (cx, cy) = ((x0 + x1 + 1) as f32 / 2.0, (y0 + y1 + 1) as f32 / 2.0);
    let mut fits = [0f32; 4];
    for (k, kind) in ShapeKind::ALL.into_iter().enumerate() {
        let (inside, [ex0, ex1, ey0, ey1]) = ideal(kind);
        // pixels per shape unit, so that the mask covers the box in both directions
        let s = (w / (ex1 - ex0)).max(h / (ey1 - ey0));
        let (mx, my) = ((ex0 + ex1) / 2.0, (ey0 + ey1) / 2.0);
        let (mut both, mut either) = (0usize, 0usize);
        for (p, &m) in mask.iter().enumerate() {
            let (x, y) = ((p % size) as f32 + 0.5, (p / size) as f32 + 0.5);
            let ideal = inside((x - cx) / s + mx, (y - cy) / s + my);
            both += usize::from(m && ideal);
            either += usize::from(m || ideal);
        }
        fits[k] = both as f32 / either.max(1) as f32;
    }
    Some(fits)
}

/// The stricter shape judge: the kind whose ideal mask fits the region best ([`shape_fits`]),
/// if it fits at least [`MIN_FIT`] and by at least [`FIT_MARGIN`] better than every other
/// kind; `None` when no kind fits clearly (a blob) or the region is empty.
pub fn strict_shape(mask: &[bool], size: usize) -> Option<ShapeKind> {
    let fits = shape_fits(mask, size)?;
    let best = (0..4).max_by(|&a, &b| fits[a].total_cmp(&fits[b]))?;
    let clear = (0..4)
        .filter(|&k| k != best)
        .all(|k| fits[best] >= fits[k] + FIT_MARGIN);
    (fits[best] >= MIN_FIT && clear).then_some(ShapeKind::ALL[best])
}

/// One prompt of the judge: the prompt, the shape it names, the shape's colour and the
/// background colour.
pub type Case = (&'static str, ShapeKind, Colour, Colour);

/// Whether `rgb` (`size`×`size`) shows `case`: the border ring (an eighth of the side) is
/// at least half the background colour and under half the shape colour, at least 0.08 of
/// the interior is the shape colour, and the largest region of the shape colour is the named
/// shape by [`strict_shape`]. `Ok` and `Err` both carry the figures; `Err` also what failed.
pub fn judge_image(rgb: &[u8], size: usize, case: Case) -> Result<String, String> {
    let (prompt, kind, shape, background) = case;
    let lab = labels(rgb);
    let (bg_edge, _) = shares(&lab, size, size / 8, background);
    let (shape_edge, shape_in) = shares(&lab, size, size / 8, shape);
    let region = largest_region(&lab, size, shape);
    let judged = strict_shape(&region, size);
    let fits = shape_fits(&region, size).unwrap_or_default();
    let summary = format!(
        "{prompt}: border {bg_edge:.2} {background:?}, interior {shape_in:.2} {shape:?}, \
         shape {judged:?} (fits circle/square/triangle/diamond {:.2}/{:.2}/{:.2}/{:.2})",
        fits[0], fits[1], fits[2], fits[3]
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
    if judged != Some(kind) {
        wrong.push(format!("the {shape:?} region is not clearly a {kind:?}"));
    }
    if wrong.is_empty() {
        Ok(summary)
    } else {
        Err(format!("{summary}: {}", wrong.join("; ")))
    }
}

/// The colour half of [`judge_image`]: the border is at least half the background colour and
/// under half the shape colour, and at least 0.08 of the interior is the shape colour; the
/// shape is not judged. (The judge of the earlier pass rates, before the shape test.)
pub fn colours_pass(rgb: &[u8], size: usize, case: Case) -> bool {
    let (_, _, shape, background) = case;
    let lab = labels(rgb);
    let (bg_edge, _) = shares(&lab, size, size / 8, background);
    let (shape_edge, shape_in) = shares(&lab, size, size / 8, shape);
    bg_edge >= 0.5 && shape_in >= 0.08 && shape_edge < 0.5
}

/// What generation with the shipped models makes for `prompt` and `seed` with `preset`
/// (the default preset when `None`), `steps` overriding the preset's when given: the RGB
/// bytes and their side. With `VQCLIP_SWEEP_DIR` set the image is also written there.
pub fn generate(
    gpu: &Gpu,
    clip: &ClipModel,
    vq: &VqGan,
    prompt: &str,
    seed: u64,
    preset: Option<Preset>,
    steps: Option<usize>,
) -> (Vec<u8>, usize) {
    let size = vq.config.dd.resolution;
    let preset = preset.unwrap_or(Preset::default_for(true));
    let mut o = Options::new(Prompt::parse_list(prompt).unwrap(), size, size).with_preset(preset);
    o.seed = seed;
    if let Some(s) = steps {
        o.steps = s;
    }
    o.adapt_preset(size / vq.downsampling_factor(), Default::default());
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
    (rgb, size)
}

/// What `vqclip generate PROMPT --seed SEED` makes with the shipped models (the default
/// preset), judged by [`judge_image`].
pub fn generate_and_judge(
    gpu: &Gpu,
    clip: &ClipModel,
    vq: &VqGan,
    case: Case,
    seed: u64,
) -> Result<String, String> {
    let (rgb, size) = generate(gpu, clip, vq, case.0, seed, None, None);
    judge_image(&rgb, size, case).map_err(|e| format!("seed {seed}: {e}"))
}

pub const CASES: [Case; 5] = [
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
