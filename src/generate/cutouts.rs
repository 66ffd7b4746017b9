//! Cutouts: the batch of `cutn` views of the generated image that CLIP sees each step.
//!
//! Every view here is a crop (possibly flipped) resampled to CLIP's input size, which is a
//! separable linear map: `view_c = Wy_c · image · Wx_cᵀ` per channel, with `Wy_c` `[S, H]`
//! and `Wx_c` `[S, W]` built on the CPU from the crop box. On the GPU that is two batched
//! matmuls, and their backward rules are the tape's matmul rules, so cutouts need no kernel of
//! their own. The resampling filter is a tent whose support widens with the downscale factor
//! (antialiased like Pillow's bilinear), so large crops are not aliased.

use crate::autodiff::{Tape, Var};
use crate::ops::matmul::MatmulOpts;
use crate::ops::warp::Homography;
use crate::{Error, Gpu, Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// How the views are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutMethod {
    /// Random square crops of size `rand^cut_pow · (max − min) + min`, resampled (Crowson's
    /// original notebook, nerdyrodent `--cut_method original`).
    Original,
    /// The whole image every time, with random flips and small random crops of the border,
    /// then (in `generate`) nerdyrodent's default kornia augmentations in their order:
    /// random affine and perspective warps ([`pooled_warps`]), colour jitter and erasing.
    Pooled,
    /// The whole image every time, zoomed by U(0.9, 1.2) (beyond 1 the edges are extended),
    /// shifted by up to 10% of its side on each axis, and blurred by a 5-tap binomial filter:
    /// views that barely differ from what CLIP saw in training, yet deny the optimiser the
    /// pixel-exact high-frequency textures that fool a small CLIP.
    Jitter,
}

impl std::str::FromStr for CutMethod {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "original" => Ok(CutMethod::Original),
            "pooled" => Ok(CutMethod::Pooled),
            "jitter" => Ok(CutMethod::Jitter),
            o => Err(Error::invalid(format!(
                "unknown cut method '{o}': expected original, pooled or jitter"
            ))),
        }
    }
}

/// One view: a crop box in input pixels and an optional horizontal flip.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cut {
    /// Left edge.
    pub x0: f32,
    /// Top edge.
    pub y0: f32,
    /// Width.
    pub w: f32,
    /// Height.
    pub h: f32,
    /// Mirror left-right.
    pub flip: bool,
}

/// kornia's `RandomAffine(degrees=15, translate=0.1, shear=5, p=0.7)` for a `size`-pixel
/// square view, as the map from output pixels to the input pixels they sample: with
/// probability 0.7 a rotation by U(−15°, 15°) and an x-shear by U(−5°, 5°) about the centre,
/// then a shift by U(−0.1, 0.1)·size on each axis; else the identity.
pub fn random_affine(rng: &mut ChaCha8Rng, size: usize) -> Homography {
    if !rng.random_bool(0.7) {
        return Homography::IDENTITY;
    }
    let angle = rng.random_range(-15.0f64..15.0).to_radians();
    let shear = rng.random_range(-5.0f64..5.0).to_radians().tan();
    let s = size as f64;
    let (tx, ty) = (
        rng.random_range(-0.1..0.1) * s,
        rng.random_range(-0.1..0.1) * s,
    );
    let c = (s - 1.0) / 2.0;
    let (cos, sin) = (angle.cos(), angle.sin());
    // forward (input -> output): T(c + t) · R · Sh · T(−c)
    let r_sh = [cos, cos * shear - sin, sin, sin * shear + cos];
    let fwd = Homography([
        r_sh[0],
        r_sh[1],
        c + tx - r_sh[0] * c - r_sh[1] * c,
        r_sh[2],
        r_sh[3],
        c + ty - r_sh[2] * c - r_sh[3] * c,
        0.0,
        0.0,
        1.0,
    ]);
    fwd.inverse().unwrap_or(Homography::IDENTITY)
}

/// kornia's `RandomPerspective(distortion_scale=0.7, p=0.7)` for a `size`-pixel square view,
/// as the map from output pixels to input pixels: with probability 0.7 each corner moves
/// inward by U(0, 0.7·size/2) on each axis and the image follows the corners; else the
/// identity.
pub fn random_perspective(rng: &mut ChaCha8Rng, size: usize) -> Homography {
    if !rng.random_bool(0.7) {
        return Homography::IDENTITY;
    }
    let e = size as f64 - 1.0;
    let f = 0.7 * size as f64 / 2.0;
    let start = [(0.0, 0.0), (e, 0.0), (e, e), (0.0, e)];
    let inward = [(1.0, 1.0), (-1.0, 1.0), (-1.0, -1.0), (1.0, -1.0)];
    let mut end = start;
    for (p, d) in end.iter_mut().zip(inward) {
        p.0 += d.0 * f * rng.random_range(0.0..1.0);
        p.1 += d.1 * f * rng.random_range(0.0..1.0);
    }
    // Output pixels at `end` sample the input at `start`.
    Homography::from_points(end, start).unwrap_or(Homography::IDENTITY)
}

/// The pooled method's geometric augmentations for `cutn` views of side `size`: per view a
/// [`random_affine`] then a [`random_perspective`] warp (kornia's order), composed into one
/// output-to-input map.
pub fn pooled_warps(rng: &mut ChaCha8Rng, cutn: usize, size: usize) -> Vec<Homography> {
    (0..cutn)
        .map(|_| {
            let affine = random_affine(rng, size);
            let perspective = random_perspective(rng, size);
            // output -> (perspective) -> affine output -> (affine) -> input
            affine.then_after(&perspective)
        })
        .collect()
}

/// Draws `cutn` crop boxes for an image of `width`×`height` and views of side `size`.
pub fn sample_cuts(
    rng: &mut ChaCha8Rng,
    method: CutMethod,
    cutn: usize,
    cut_pow: f32,
    width: usize,
    height: usize,
    size: usize,
) -> Vec<Cut> {
    let max_size = width.min(height);
    let min_size = width.min(height).min(size);
    (0..cutn)
        .map(|_| match method {
            CutMethod::Original => {
                let r: f32 = rng.random();
                let s = (r.powf(cut_pow) * (max_size - min_size) as f32 + min_size as f32) as usize;
                let s = s.clamp(1, max_size);
                let x0 = rng.random_range(0..=width - s);
                let y0 = rng.random_range(0..=height - s);
                Cut {
                    x0: x0 as f32,
                    y0: y0 as f32,
                    w: s as f32,
                    h: s as f32,
                    flip: false,
                }
            }
            CutMethod::Pooled => {
                // Trim up to 5% off each border, and flip half of the views.
                let (w, h) = (width as f32, height as f32);
                let l = rng.random_range(0.0..0.05) * w;
                let r = rng.random_range(0.0..0.05) * w;
                let t = rng.random_range(0.0..0.05) * h;
                let b = rng.random_range(0.0..0.05) * h;
                Cut {
                    x0: l,
                    y0: t,
                    w: w - l - r,
                    h: h - t - b,
                    flip: rng.random_bool(0.5),
                }
            }
            CutMethod::Jitter => {
                let (w, h) = (width as f32, height as f32);
                let zoom = rng.random_range(0.9..1.2f32);
                let (tx, ty) = (
                    rng.random_range(-0.1..0.1f32),
                    rng.random_range(-0.1..0.1f32),
                );
                Cut {
                    x0: 0.5 * w * (1.0 - zoom) + tx * w,
                    y0: 0.5 * h * (1.0 - zoom) + ty * h,
                    w: zoom * w,
                    h: zoom * h,
                    flip: false,
                }
            }
        })
        .collect()
}

/// Row-stochastic resampling matrix `[out, len_in]` mapping the interval
/// `[start, start + len)` of a signal of `len_in` samples onto `out` samples.
pub fn resample_matrix(out: usize, len_in: usize, start: f32, len: f32, flip: bool) -> Vec<f32> {
    let mut m = vec![0.0f32; out * len_in];
    let scale = len / out as f32;
    let radius = scale.max(1.0);
    for i in 0..out {
        let oi = if flip { out - 1 - i } else { i };
        let centre = start + (oi as f32 + 0.5) * scale;
        let lo = ((centre - radius).floor().max(0.0)) as usize;
        let hi = ((centre + radius).ceil() as usize).min(len_in);
        let mut total = 0.0;
        for j in lo..hi {
            let w = (1.0 - ((j as f32 + 0.5) - centre).abs() / radius).max(0.0);
            m[i * len_in + j] = w;
            total += w;
        }
        if total > 0.0 {
            for j in lo..hi {
                m[i * len_in + j] /= total;
            }
        } else {
            // The centre fell outside the image: take the nearest edge sample.
            let j = (centre.max(0.0) as usize).min(len_in - 1);
            m[i * len_in + j] = 1.0;
        }
    }
    m
}

/// `B · m` for a resampling matrix `m` `[out, len_in]`: each output sample becomes the
/// binomial `[1, 4, 6, 4, 1] / 16` average of its neighbours, with the edge samples repeated.
pub fn blur_rows(m: &[f32], out: usize, len_in: usize) -> Vec<f32> {
    const TAPS: [f32; 5] = [1.0 / 16.0, 4.0 / 16.0, 6.0 / 16.0, 4.0 / 16.0, 1.0 / 16.0];
    let mut b = vec![0.0f32; out * len_in];
    for i in 0..out {
        for (k, t) in TAPS.iter().enumerate() {
            let src = (i as isize + k as isize - 2).clamp(0, out as isize - 1) as usize;
            for j in 0..len_in {
                b[i * len_in + j] += t * m[src * len_in + j];
            }
        }
    }
    b
}

/// Uploads the per-view matrices: `wy` `[cutn, S, H]`, `wx` `[cutn, S, W]`; with `blur`
/// each view is also blurred ([`blur_rows`] on both axes).
pub fn cut_matrices(
    gpu: &Gpu,
    cuts: &[Cut],
    width: usize,
    height: usize,
    size: usize,
    blur: bool,
) -> Result<(Tensor, Tensor)> {
    if cuts.is_empty() || width == 0 || height == 0 || size == 0 {
        return Err(Error::invalid(
            "cutouts need at least one cut of a non-empty image",
        ));
    }
    let mut wy = Vec::with_capacity(cuts.len() * size * height);
    let mut wx = Vec::with_capacity(cuts.len() * size * width);
    for c in cuts {
        let my = resample_matrix(size, height, c.y0, c.h, false);
        let mx = resample_matrix(size, width, c.x0, c.w, c.flip);
        if blur {
            wy.extend(blur_rows(&my, size, height));
            wx.extend(blur_rows(&mx, size, width));
        } else {
            wy.extend(my);
            wx.extend(mx);
        }
    }
    Ok((
        Tensor::from_slice(gpu, &wy, &[cuts.len(), size, height])?,
        Tensor::from_slice(gpu, &wx, &[cuts.len(), size, width])?,
    ))
}

/// The views of `image` `[1, C, H, W]` as `[n, C, Sy, Sx]`, on the tape: `Wy · image · Wxᵀ`
/// per view and channel, with `wy` `[n, Sy, H]` and `wx` `[n, Sx, W]` (square cutouts have
/// `Sy = Sx`; the coarse-latent upsampling of `generate` uses the same map with `n = 1`).
pub fn cutouts(tape: &Tape, image: &Var, wy: &Tensor, wx: &Tensor) -> Result<Var> {
    let (c, h, w) = match image.shape() {
        [1, c, h, w] => (*c, *h, *w),
        s => {
            return Err(Error::shape(format!(
                "cutouts need an image [1, C, H, W], got {s:?}"
            )))
        }
    };
    let (n, sy) = (wy.dim(0), wy.dim(1));
    let sx = wx.dim(1);
    if wy.shape() != [n, sy, h] || wx.shape() != [n, sx, w] {
        return Err(Error::shape(format!(
            "cut matrices {:?} / {:?} do not fit an image of {h}x{w}",
            wy.shape(),
            wx.shape()
        )));
    }
    // rows: [H, C·W] ← image [C, H, W]
    let x = tape.reshape(image, &[c, h, w])?;
    let x = tape.permute(&x, &[1, 0, 2])?;
    let x = tape.reshape(&x, &[h, c * w])?;
    let wy = tape.leaf(wy.clone(), false);
    let wx = tape.leaf(wx.clone(), false);
    // [n, Sy, C·W] = Wy [n, Sy, H] @ x [H, C·W]
    let rows = tape.matmul(&wy, &x, None, &MatmulOpts::default())?;
    // [n, Sy·C, Sx] = rows [n, Sy·C, W] @ Wxᵀ [n, W, Sx]
    let rows = tape.reshape(&rows, &[n, sy * c, w])?;
    let both = tape.matmul(
        &rows,
        &wx,
        None,
        &MatmulOpts {
            trans_b: true,
            ..Default::default()
        },
    )?;
    let both = tape.reshape(&both, &[n, sy, c, sx])?;
    tape.permute(&both, &[0, 2, 1, 3])
}

/// Bilinear upsampling matrix `[out, len_in]` with half-pixel centres (PyTorch's
/// `interpolate(mode="bilinear", align_corners=False)`): output sample `i` reads the input
/// at `(i + 0.5) · len_in / out − 0.5`, clamped to the edge samples.
pub fn bilinear_matrix(out: usize, len_in: usize) -> Vec<f32> {
    let mut m = vec![0.0f32; out * len_in];
    let scale = len_in as f32 / out as f32;
    for i in 0..out {
        let src = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(len_in - 1);
        let i1 = (i0 + 1).min(len_in - 1);
        let t = src - i0 as f32;
        m[i * len_in + i0] += 1.0 - t;
        m[i * len_in + i1] += t;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};
    use rand::SeedableRng;

    #[test]
    fn pooled_warps_follow_kornias_ranges() {
        let s = 64usize;
        let c = (s as f64 - 1.0) / 2.0;
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (mut affine, mut persp) = (0, 0);
        let draws = 2000;
        for _ in 0..draws {
            let a = random_affine(&mut rng, s);
            if a != Homography::IDENTITY {
                affine += 1;
                // rotation and shear keep area; the centre moves by at most 0.1·size per axis
                let det = a.0[0] * a.0[4] - a.0[1] * a.0[3];
                assert!((det - 1.0).abs() < 1e-9, "det {det}");
                let fwd = a.inverse().unwrap();
                let (x, y) = fwd.apply(c, c).unwrap();
                assert!((x - c).abs() <= 0.1 * s as f64 && (y - c).abs() <= 0.1 * s as f64);
            }
            let p = random_perspective(&mut rng, s);
            if p != Homography::IDENTITY {
                persp += 1;
                // the input's corners appear inside the output, each within 0.35·size of
                // its own corner on each axis
                let fwd = p.inverse().unwrap();
                let e = s as f64 - 1.0;
                for (x, y) in [(0.0, 0.0), (e, 0.0), (e, e), (0.0, e)] {
                    let (u, v) = fwd.apply(x, y).unwrap();
                    assert!((-1e-9..=e + 1e-9).contains(&u) && (-1e-9..=e + 1e-9).contains(&v));
                    assert!((u - x).abs() <= 0.35 * s as f64 + 1e-9);
                    assert!((v - y).abs() <= 0.35 * s as f64 + 1e-9);
                }
            }
        }
        // each applies with probability 0.7: 2000 draws give 0.7 ± 0.01 (1 sd)
        for k in [affine, persp] {
            let f = k as f64 / draws as f64;
            assert!((0.65..0.75).contains(&f), "applied to {f} of the views");
        }
        // seeded, and composed in kornia's order (perspective output -> affine output -> input)
        let a = pooled_warps(&mut ChaCha8Rng::seed_from_u64(9), 4, s);
        let b = pooled_warps(&mut ChaCha8Rng::seed_from_u64(9), 4, s);
        assert_eq!(a, b);
        let mut r = ChaCha8Rng::seed_from_u64(9);
        let (af, pe) = (random_affine(&mut r, s), random_perspective(&mut r, s));
        let (x, y) = pe.apply(3.0, 7.0).unwrap();
        let want = af.apply(x, y).unwrap();
        let got = a[0].apply(3.0, 7.0).unwrap();
        assert!((want.0 - got.0).abs() < 1e-9 && (want.1 - got.1).abs() < 1e-9);
    }

    #[test]
    fn resample_rows_sum_to_one_and_identity_passes_through() {
        let m = resample_matrix(7, 7, 0.0, 7.0, false);
        for i in 0..7 {
            for j in 0..7 {
                assert_eq!(m[i * 7 + j], if i == j { 1.0 } else { 0.0 });
            }
        }
        for (out, len_in, start, len) in [
            (224, 512, 10.0, 400.0),
            (224, 100, 0.0, 100.0),
            (5, 64, 3.5, 50.0),
        ] {
            let m = resample_matrix(out, len_in, start, len, true);
            for i in 0..out {
                let s: f32 = m[i * len_in..(i + 1) * len_in].iter().sum();
                assert!((s - 1.0).abs() < 1e-5, "row {i} sums to {s}");
            }
        }
    }

    #[test]
    fn cuts_stay_inside_the_image_and_are_seeded() {
        for method in [CutMethod::Original, CutMethod::Pooled] {
            let mut r1 = ChaCha8Rng::seed_from_u64(5);
            let mut r2 = ChaCha8Rng::seed_from_u64(5);
            let a = sample_cuts(&mut r1, method, 32, 1.0, 96, 64, 32);
            assert_eq!(a, sample_cuts(&mut r2, method, 32, 1.0, 96, 64, 32));
            for c in &a {
                assert!(
                    c.x0 >= 0.0 && c.y0 >= 0.0 && c.x0 + c.w <= 96.0 && c.y0 + c.h <= 64.0,
                    "{c:?}"
                );
                assert!(c.w >= 32.0f32.min(64.0) * 0.9);
            }
        }
    }

    #[test]
    fn bilinear_matrix_has_half_pixel_centres() {
        // 2 -> 4 as torch.nn.functional.interpolate(mode="bilinear", align_corners=False)
        let m = bilinear_matrix(4, 2);
        assert_eq!(m, vec![1.0, 0.0, 0.75, 0.25, 0.25, 0.75, 0.0, 1.0]);
        assert_eq!(
            bilinear_matrix(3, 3),
            resample_matrix(3, 3, 0.0, 3.0, false)
        );
        assert_eq!(bilinear_matrix(5, 1), vec![1.0; 5]);
    }

    #[test]
    fn jitter_views_zoom_shift_and_blur_the_whole_image() {
        let (w, h, s) = (96usize, 64usize, 32usize);
        let mut r = ChaCha8Rng::seed_from_u64(3);
        let cuts = sample_cuts(&mut r, CutMethod::Jitter, 200, 1.0, w, h, s);
        let mut r2 = ChaCha8Rng::seed_from_u64(3);
        assert_eq!(
            cuts,
            sample_cuts(&mut r2, CutMethod::Jitter, 200, 1.0, w, h, s)
        );
        let (mut zoomed_out, mut zoomed_in) = (0, 0);
        for c in &cuts {
            let zoom = c.w / w as f32;
            assert!((0.9..1.2).contains(&zoom), "{c:?}");
            assert!((c.h / h as f32 - zoom).abs() < 1e-5, "{c:?}");
            let (cx, cy) = (c.x0 + c.w / 2.0, c.y0 + c.h / 2.0);
            assert!(
                (cx - 48.0).abs() <= 9.6 + 1e-3 && (cy - 32.0).abs() <= 6.4 + 1e-3,
                "{c:?}"
            );
            assert!(!c.flip);
            if zoom > 1.0 {
                zoomed_out += 1
            } else {
                zoomed_in += 1
            }
        }
        assert!(
            zoomed_out > 50 && zoomed_in > 30,
            "{zoomed_out} {zoomed_in}"
        );
        // Blurred matrices still average: every row sums to 1, so a flat image stays flat,
        // even where the view reaches past the image's edge.
        let g = gpu();
        let (wy, wx) = cut_matrices(&g, &cuts[..8], w, h, s, true).unwrap();
        for (m, len) in [(wy.to_vec().unwrap(), h), (wx.to_vec().unwrap(), w)] {
            for row in m.chunks(len) {
                let sum: f32 = row.iter().sum();
                assert!((sum - 1.0).abs() < 1e-5, "row sums to {sum}");
                assert!(row.iter().all(|&v| v >= 0.0));
            }
        }
        // The blur is the 5-tap binomial with repeated edges: an impulse spreads as 1 4 6 4 1.
        let eye: Vec<f32> = (0..81)
            .map(|i| if i % 10 == 0 { 1.0 } else { 0.0 })
            .collect();
        let b = blur_rows(&eye, 9, 9);
        let col4: Vec<f32> = (0..9).map(|i| b[i * 9 + 4] * 16.0).collect();
        assert_eq!(col4, vec![0.0, 0.0, 1.0, 4.0, 6.0, 4.0, 1.0, 0.0, 0.0]);
        let row0: Vec<f32> = b[..9].iter().map(|v| v * 16.0).collect();
        assert_eq!(row0, vec![11.0, 4.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn cutouts_match_a_cpu_resampling_and_gradients_flow() {
        let g = gpu();
        let (c, h, w, s) = (3, 20, 28, 8);
        let img = rand_vec(c * h * w, 3);
        let cuts = [
            Cut {
                x0: 2.0,
                y0: 1.0,
                w: 16.0,
                h: 16.0,
                flip: false,
            },
            Cut {
                x0: 0.0,
                y0: 0.0,
                w: 28.0,
                h: 20.0,
                flip: true,
            },
            Cut {
                x0: 10.0,
                y0: 12.0,
                w: 5.0,
                h: 5.0,
                flip: false,
            },
        ];
        let (wy, wx) = cut_matrices(&g, &cuts, w, h, s, false).unwrap();
        let tape = Tape::new();
        let x = tape.leaf(Tensor::from_slice(&g, &img, &[1, c, h, w]).unwrap(), true);
        let v = cutouts(&tape, &x, &wy, &wx).unwrap();
        assert_eq!(v.shape(), &[3, c, s, s]);
        let got = v.value().to_vec().unwrap();
        let (wyv, wxv) = (wy.to_vec().unwrap(), wx.to_vec().unwrap());
        for n in 0..3 {
            for ch in 0..c {
                for i in 0..s {
                    for j in 0..s {
                        let mut acc = 0.0f64;
                        for y in 0..h {
                            for xx in 0..w {
                                acc += wyv[(n * s + i) * h + y] as f64
                                    * img[(ch * h + y) * w + xx] as f64
                                    * wxv[(n * s + j) * w + xx] as f64;
                            }
                        }
                        let gv = got[((n * c + ch) * s + i) * s + j] as f64;
                        assert!(
                            (gv - acc).abs() < 1e-5,
                            "view {n} ch {ch} ({i},{j}): {gv} vs {acc}"
                        );
                    }
                }
            }
        }
        // d Σ views / d image = Σ_n (Wy_nᵀ 1)(Wx_nᵀ 1)ᵀ per channel
        let loss = tape.sum(&v).unwrap();
        let grads = tape.backward(&loss).unwrap();
        let gx = grads.get(&x).unwrap().to_vec().unwrap();
        for ch in 0..c {
            for y in 0..h {
                for xx in 0..w {
                    let mut want = 0.0f64;
                    for n in 0..3 {
                        let cy: f64 = (0..s).map(|i| wyv[(n * s + i) * h + y] as f64).sum();
                        let cx: f64 = (0..s).map(|j| wxv[(n * s + j) * w + xx] as f64).sum();
                        want += cy * cx;
                    }
                    let gv = gx[(ch * h + y) * w + xx] as f64;
                    assert!(
                        (gv - want).abs() < 1e-4,
                        "grad ({ch},{y},{xx}): {gv} vs {want}"
                    );
                }
            }
        }
    }
}
