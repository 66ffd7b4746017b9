//! Training batches: scenes of the shapes dataset, augmented (crops, noise, hard-negative
//! pairs, a recolouring curriculum) and normalised, the same for a step on any machine.

use super::{MEAN, STD};
use crate::data::shapes::{Colour, Scene, ShapeKind, ShapesDataset, Split};
use crate::{Gpu, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// Augmentation of training images.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augment {
    /// Smallest side of a random square crop, as a fraction of the image side (1 = none).
    pub min_crop: f32,
    /// Crops smaller than this fraction drop position words from the caption.
    pub position_crop: f32,
    /// Largest standard deviation of added Gaussian noise (pixel values in [0, 1]).
    pub noise: f32,
    /// Make every second pair of a batch a hard negative of the one before (one word of
    /// the caption, the shape kind (p = 3/4) or colour, changed in both scene and caption).
    pub hard_negatives: bool,
    /// Probability that a pair (with its hard negative) is recoloured to white shapes on a
    /// black background, caption included: a shape curriculum, since the image tower learns
    /// shape quickly without colour variation and slowly with it (docs/clip_shape_diagnosis.md).
    /// Its hard negative then always changes the shape kind.
    pub mask: f32,
}

impl Default for Augment {
    fn default() -> Self {
        Augment {
            min_crop: 0.6,
            position_crop: 0.85,
            noise: 0.04,
            hard_negatives: true,
            mask: 0.0,
        }
    }
}

impl Augment {
    /// No augmentation.
    pub fn none() -> Self {
        Augment {
            min_crop: 1.0,
            position_crop: 0.0,
            noise: 0.0,
            hard_negatives: false,
            mask: 0.0,
        }
    }
}

/// `rgb` (`size`×`size` HWC bytes) normalised with [`MEAN`] / [`STD`] into CHW floats.
pub fn normalise(rgb: &[u8], size: usize) -> Vec<f32> {
    let mut out = vec![0.0; 3 * size * size];
    for p in 0..size * size {
        for c in 0..3 {
            out[c * size * size + p] = (rgb[p * 3 + c] as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    out
}

/// One training pair: the scene rendered at `size` px, randomly cropped (keeping every
/// shape's centre well inside; crops tighter than `aug.position_crop` use a caption
/// without position words) and resampled back to `size` bilinearly, with Gaussian noise;
/// returns normalised CHW pixels and the caption.
pub fn augmented_pair(
    scene: &Scene,
    variant: usize,
    size: usize,
    aug: &Augment,
    rng: &mut ChaCha8Rng,
) -> (Vec<f32>, String) {
    let img = scene.render(size);
    let mut s = if aug.min_crop < 1.0 {
        rng.random_range(aug.min_crop..=1.0f32)
    } else {
        1.0
    };
    // Offsets that keep each shape's centre at least half its half-size inside the crop.
    let range = |s: f32, axis: usize| -> (f32, f32) {
        let mut lo = 0.0f32;
        let mut hi = 1.0 - s;
        for sh in &scene.shapes {
            let c = if axis == 0 {
                sh.position.centre().0
            } else {
                sh.position.centre().1
            };
            let m = 0.5 * sh.half_size();
            lo = lo.max(c + m - s);
            hi = hi.min(c - m);
        }
        (lo, hi)
    };
    let (mut rx, mut ry) = (range(s, 0), range(s, 1));
    if rx.0 > rx.1 || ry.0 > ry.1 {
        s = 1.0;
        rx = (0.0, 0.0);
        ry = (0.0, 0.0);
    }
    let pick = |rng: &mut ChaCha8Rng, r: (f32, f32)| {
        if r.1 > r.0 {
            rng.random_range(r.0..=r.1)
        } else {
            r.0.max(0.0)
        }
    };
    let (x0, y0) = (pick(rng, rx), pick(rng, ry));
    let sigma = if aug.noise > 0.0 {
        rng.random_range(0.0..=aug.noise)
    } else {
        0.0
    };
    let noise = Normal::new(0.0f32, sigma.max(1e-12)).ok();
    let mut out = vec![0.0f32; 3 * size * size];
    let sz = size as f32;
    let at = |x: usize, y: usize, c: usize| img[(y * size + x) * 3 + c] as f32 / 255.0;
    for oy in 0..size {
        let fy = (y0 + (oy as f32 + 0.5) / sz * s) * sz - 0.5;
        let (yl, wy) = (fy.floor(), fy - fy.floor());
        let ya = (yl.max(0.0) as usize).min(size - 1);
        let yb = ((yl + 1.0).max(0.0) as usize).min(size - 1);
        for ox in 0..size {
            let fx = (x0 + (ox as f32 + 0.5) / sz * s) * sz - 0.5;
            let (xl, wx) = (fx.floor(), fx - fx.floor());
            let xa = (xl.max(0.0) as usize).min(size - 1);
            let xb = ((xl + 1.0).max(0.0) as usize).min(size - 1);
            for c in 0..3 {
                let top = at(xa, ya, c) * (1.0 - wx) + at(xb, ya, c) * wx;
                let bot = at(xa, yb, c) * (1.0 - wx) + at(xb, yb, c) * wx;
                let mut v = top * (1.0 - wy) + bot * wy;
                if sigma > 0.0 {
                    if let Some(n) = &noise {
                        v += n.sample(rng);
                    }
                }
                let v = v.clamp(0.0, 1.0);
                out[c * size * size + oy * size + ox] = (v - MEAN[c]) / STD[c];
            }
        }
    }
    let variant = if s < aug.position_crop {
        // Phrasings without positions: 0 and 1 for one shape, 0 for two.
        if scene.shapes.len() == 1 {
            variant % 2
        } else {
            0
        }
    } else {
        variant
    };
    (out, scene.caption(variant))
}

/// Training batch `step`: samples `step·batch ..` of the train split of dataset `data_seed`,
/// augmented with a generator seeded by `(seed, step)`, so a batch depends only on its step
/// (a resumed run sees the same data). With `aug.hard_negatives` every second pair is a
/// variation of the one before. Returns `[B, 3, S, S]` pixels and the captions.
pub fn batch(
    gpu: &Gpu,
    data_seed: u64,
    seed: u64,
    step: usize,
    batch: usize,
    size: usize,
    aug: &Augment,
) -> Result<(Tensor, Vec<String>)> {
    let ds = ShapesDataset::new(data_seed, Split::Train);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(step as u64 + 1);
    let mut jobs = Vec::with_capacity(batch);
    let mut prev: Option<(Scene, usize, bool)> = None;
    for i in 0..batch {
        let (scene, variant) = match prev.take() {
            // Every second pair is a hard negative of the one before: the same scene and
            // phrasing with the first shape's kind (3 times in 4, always for a recoloured
            // pair: colour is the easy part) or colour changed.
            Some((mut scene, variant, masked)) if aug.hard_negatives => {
                let sh = &mut scene.shapes[0];
                if masked || rng.random_range(0..4) != 0 {
                    let others: Vec<ShapeKind> = ShapeKind::ALL
                        .into_iter()
                        .filter(|&k| k != sh.kind)
                        .collect();
                    sh.kind = others[rng.random_range(0..others.len())];
                } else {
                    let bg = scene.background;
                    let others: Vec<Colour> = Colour::ALL
                        .into_iter()
                        .filter(|&c| c != sh.colour && c != bg)
                        .collect();
                    sh.colour = others[rng.random_range(0..others.len())];
                }
                (scene, variant)
            }
            _ => {
                let (mut scene, _) = ds.sample((step * batch + i) as u64);
                let variant = rng.random_range(0..4usize);
                // No draw when the curriculum is off: earlier runs keep their data.
                let masked = aug.mask > 0.0 && rng.random_bool(aug.mask.min(1.0) as f64);
                if masked {
                    scene.background = Colour::Black;
                    for sh in &mut scene.shapes {
                        sh.colour = Colour::White;
                    }
                }
                prev = Some((scene.clone(), variant, masked));
                (scene, variant)
            }
        };
        // Each pair's augmentation gets its own generator, so the pairs can be rendered on
        // several threads and the batch is the same for any thread count.
        jobs.push((scene, variant, rng.random::<u64>()));
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (pixels, captions) = render_pairs(&jobs, size, aug, threads);
    Ok((
        Tensor::from_slice(gpu, &pixels, &[batch, 3, size, size])?,
        captions,
    ))
}

/// Renders `(scene, variant, seed)` pairs with [`augmented_pair`] on up to `threads`
/// threads: `[N, 3, S, S]` normalised pixels and the captions, independent of `threads`.
pub(super) fn render_pairs(
    jobs: &[(Scene, usize, u64)],
    size: usize,
    aug: &Augment,
    threads: usize,
) -> (Vec<f32>, Vec<String>) {
    let per = 3 * size * size;
    let mut pixels = vec![0.0f32; jobs.len() * per];
    let mut captions = vec![String::new(); jobs.len()];
    let chunk = jobs.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|sc| {
        for ((js, px), caps) in jobs
            .chunks(chunk)
            .zip(pixels.chunks_mut(chunk * per))
            .zip(captions.chunks_mut(chunk))
        {
            sc.spawn(move || {
                for ((scene, variant, seed), (out, cap)) in
                    js.iter().zip(px.chunks_mut(per).zip(caps.iter_mut()))
                {
                    let mut rng = ChaCha8Rng::seed_from_u64(*seed);
                    let (p, c) = augmented_pair(scene, *variant, size, aug, &mut rng);
                    out.copy_from_slice(&p);
                    *cap = c;
                }
            });
        }
    });
    (pixels, captions)
}
