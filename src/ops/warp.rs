//! Projective warps (affine and perspective) of NCHW images with bilinear sampling and zero
//! padding (`shaders/warp.wgsl`), one 3×3 homography per image, as kornia's
//! `warp_perspective` / `warp_affine` do for the pooled cutouts' `RandomAffine` and
//! `RandomPerspective`.
//!
//! Coordinates are in pixels with pixel centres at integers. A [`Homography`] maps output
//! pixels to the input pixels they sample. The backward pass ([`warp_backward`]) gathers for
//! every input pixel the outputs that sampled it, so it needs no atomics and gives the same
//! bits on every run.

use crate::gpu::{grid_1d, Kernel, Shader};
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};

pub(crate) static SHADER: Shader<Params> = crate::shader!("warp", "grid");

crate::shader_params! {
    /// Mirrors `struct Params` in `shaders/warp.wgsl`.
    pub(crate) struct Params {
        total: u32,
        ih: u32,
        iw: u32,
        oh: u32,
        ow: u32,
        c: u32,
        _pad: [u32; 2],
    }
}

/// A 3×3 projective map of pixel coordinates, row-major: `(x, y) ↦ (h0·x + h1·y + h2,
/// h3·x + h4·y + h5) / (h6·x + h7·y + h8)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Homography(pub [f64; 9]);

impl Homography {
    /// The identity map.
    pub const IDENTITY: Homography = Homography([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]);

    /// `self ∘ other`: first `other`, then `self`.
    pub fn then_after(&self, other: &Homography) -> Homography {
        let (a, b) = (&self.0, &other.0);
        let mut r = [0.0; 9];
        for i in 0..3 {
            for j in 0..3 {
                r[i * 3 + j] = (0..3).map(|k| a[i * 3 + k] * b[k * 3 + j]).sum();
            }
        }
        Homography(r).normalized()
    }

    /// The same map scaled so that `h8 = 1` (the projective scale at the origin, a corner
    /// pixel, is positive: [`Homography::apply`] and the kernels treat `w ≤ 0` as behind the
    /// horizon). Left as is when `h8` is (nearly) zero.
    pub fn normalized(&self) -> Homography {
        let s = self.0[8];
        if s.abs() > 1e-12 {
            Homography(self.0.map(|v| v / s))
        } else {
            *self
        }
    }

    /// The inverse map, or `None` when the matrix is (nearly) singular.
    pub fn inverse(&self) -> Option<Homography> {
        let m = &self.0;
        let c = |r0: usize, c0: usize, r1: usize, c1: usize| {
            m[r0 * 3 + c0] * m[r1 * 3 + c1] - m[r0 * 3 + c1] * m[r1 * 3 + c0]
        };
        let cof = [
            c(1, 1, 2, 2),
            -c(0, 1, 2, 2),
            c(0, 1, 1, 2),
            -c(1, 0, 2, 2),
            c(0, 0, 2, 2),
            -c(0, 0, 1, 2),
            c(1, 0, 2, 1),
            -c(0, 0, 2, 1),
            c(0, 0, 1, 1),
        ];
        let det = m[0] * cof[0] + m[1] * cof[3] + m[2] * cof[6];
        let scale = m.iter().fold(0.0f64, |s, v| s.max(v.abs())).max(1e-300);
        if det.abs() <= 1e-12 * scale.powi(3) {
            return None;
        }
        Some(Homography(cof.map(|v| v / det)).normalized())
    }

    /// Where the map sends `(x, y)`, or `None` at or behind the horizon.
    pub fn apply(&self, x: f64, y: f64) -> Option<(f64, f64)> {
        let m = &self.0;
        let w = m[6] * x + m[7] * y + m[8];
        (w > 1e-12).then(|| {
            (
                (m[0] * x + m[1] * y + m[2]) / w,
                (m[3] * x + m[4] * y + m[5]) / w,
            )
        })
    }

    /// The map that sends the four points `from` to `to` (kornia's
    /// `get_perspective_transform`), or `None` when they are degenerate.
    pub fn from_points(from: [(f64, f64); 4], to: [(f64, f64); 4]) -> Option<Homography> {
        // Eight equations in h0..h7 with h8 = 1, solved by Gaussian elimination with
        // partial pivoting.
        let mut a = [[0.0f64; 9]; 8];
        for (k, (&(x, y), &(u, v))) in from.iter().zip(&to).enumerate() {
            a[2 * k] = [x, y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y, u];
            a[2 * k + 1] = [0.0, 0.0, 0.0, x, y, 1.0, -v * x, -v * y, v];
        }
        for col in 0..8 {
            let piv = (col..8).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
            if a[piv][col].abs() < 1e-12 {
                return None;
            }
            a.swap(col, piv);
            let pivot_row = a[col];
            for (r, row) in a.iter_mut().enumerate() {
                if r != col {
                    let f = row[col] / pivot_row[col];
                    for (v, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                        *v -= f * p;
                    }
                }
            }
        }
        let mut h = [1.0f64; 9];
        for (i, row) in a.iter().enumerate() {
            h[i] = row[8] / row[i];
        }
        Some(Homography(h))
    }

    /// The 18 floats the kernels read for one image: this map (output → input) and its
    /// inverse.
    fn packed(&self) -> Result<[f32; 18]> {
        let inv = self
            .inverse()
            .ok_or_else(|| Error::invalid("warp: a homography is singular"))?;
        let mut out = [0.0f32; 18];
        for k in 0..9 {
            out[k] = self.0[k] as f32;
            out[9 + k] = inv.0[k] as f32;
        }
        Ok(out)
    }
}

/// The per-image maps as the `[N, 18]` tensor that [`warp`] and [`warp_backward`] take.
pub fn homographies(gpu: &crate::Gpu, maps: &[Homography]) -> Result<Tensor> {
    let mut data = Vec::with_capacity(maps.len() * 18);
    for h in maps {
        data.extend(h.packed()?);
    }
    Tensor::from_slice(gpu, &data, &[maps.len(), 18])
}

/// Which pass [`launch`] runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Reads the input image, writes the warped output.
    Forward,
    /// Reads the output's gradient, writes the input's.
    Backward,
}

impl Pass {
    fn entry(self) -> &'static str {
        match self {
            Pass::Forward => "warp_forward",
            Pass::Backward => "warp_backward",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Pass::Forward => "warp",
            Pass::Backward => "warp backward",
        }
    }
}

/// Runs `pass` over `src` `[N, C, ...]`: the forward pass reads the input and writes the
/// output, the backward pass the other way round; `dst_hw` is the side it writes.
fn launch(pass: Pass, src: &Tensor, maps: &Tensor, dst_hw: [usize; 2]) -> Result<Tensor> {
    let what = pass.name();
    src.expect_f32(what)?;
    let &[n, c, h, w] = src.shape() else {
        return Err(Error::shape(format!(
            "{what} needs [N, C, H, W], got {:?}",
            src.shape()
        )));
    };
    if maps.shape() != [n, 18] {
        return Err(Error::shape(format!(
            "{what}: homographies {:?} do not fit {n} images (want [{n}, 18])",
            maps.shape()
        )));
    }
    let total = n * c * dst_hw[0] * dst_hw[1];
    if src.numel().max(total) > u32::MAX as usize {
        return Err(Error::shape(format!("{what}: more than 2^32 elements")));
    }
    let ([ih, iw], [oh, ow]) = match pass {
        Pass::Forward => ([h, w], dst_hw),
        Pass::Backward => (dst_hw, [h, w]),
    };
    let p = Params {
        total: total as u32,
        ih: ih as u32,
        iw: iw as u32,
        oh: oh as u32,
        ow: ow as u32,
        c: c as u32,
        _pad: [0; 2],
    };
    let dst = Tensor::empty(src.gpu(), &[n, c, dst_hw[0], dst_hw[1]], DType::F32)?;
    if total > 0 {
        src.gpu().dispatch(
            &Kernel::new(&SHADER, pass.entry()),
            &p,
            &[src.binding(), maps.binding(), dst.binding()],
            grid_1d(p.total.div_ceil(256)),
        );
    }
    Ok(dst)
}

/// Warps `x` `[N, C, IH, IW]` to `[N, C, OH, OW]`: output pixel `(xo, yo)` of image `n` is
/// `x` sampled bilinearly at `H_n(xo, yo)`, zero outside. `maps` from [`homographies`].
pub fn warp(x: &Tensor, maps: &Tensor, out_hw: [usize; 2]) -> Result<Tensor> {
    launch(Pass::Forward, x, maps, out_hw)
}

/// The gradient of [`warp`] with respect to its input: `g` `[N, C, OH, OW]` →
/// `[N, C, IH, IW]` (the forward pass's adjoint, gathered per input pixel).
pub fn warp_backward(g: &Tensor, maps: &Tensor, in_hw: [usize; 2]) -> Result<Tensor> {
    launch(Pass::Backward, g, maps, in_hw)
}

/// CPU reference of [`warp`] in f64 on `[N, C, IH, IW]` data: returns the output and, for
/// the adjoint, the list of `(output index, input index, weight)` taps.
pub fn reference(
    x: &[f64],
    maps: &[Homography],
    c: usize,
    in_hw: [usize; 2],
    out_hw: [usize; 2],
) -> (Vec<f64>, Vec<(usize, usize, f64)>) {
    let ([ih, iw], [oh, ow]) = (in_hw, out_hw);
    let mut y = vec![0.0; maps.len() * c * oh * ow];
    let mut taps = Vec::new();
    for (n, h) in maps.iter().enumerate() {
        for yo in 0..oh {
            for xo in 0..ow {
                let Some((px, py)) = h.apply(xo as f64, yo as f64) else {
                    continue;
                };
                let (x0, y0) = (px.floor(), py.floor());
                let (fx, fy) = (px - x0, py - y0);
                for (dy, wy) in [(0, 1.0 - fy), (1, fy)] {
                    for (dx, wx) in [(0, 1.0 - fx), (1, fx)] {
                        let (xi, yi) = (x0 as i64 + dx, y0 as i64 + dy);
                        if xi < 0 || yi < 0 || xi >= iw as i64 || yi >= ih as i64 {
                            continue;
                        }
                        for ch in 0..c {
                            let o = ((n * c + ch) * oh + yo) * ow + xo;
                            let i = ((n * c + ch) * ih + yi as usize) * iw + xi as usize;
                            y[o] += wx * wy * x[i];
                            taps.push((o, i, wx * wy));
                        }
                    }
                }
            }
        }
    }
    (y, taps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};

    /// A mild random projective map about the centre of a `s`-pixel image.
    fn random_map(seed: u64, s: usize) -> Homography {
        let r = rand_vec(8, seed);
        let c = (s as f64 - 1.0) / 2.0;
        let from = [
            (0.0, 0.0),
            (s as f64 - 1.0, 0.0),
            (0.0, s as f64 - 1.0),
            (c * 2.0, c * 2.0),
        ];
        let to = [
            (r[0] as f64 * 0.3 * c, r[1] as f64 * 0.3 * c),
            (2.0 * c + r[2] as f64 * 0.3 * c, r[3] as f64 * 0.3 * c),
            (r[4] as f64 * 0.3 * c, 2.0 * c + r[5] as f64 * 0.3 * c),
            (
                2.0 * c + r[6] as f64 * 0.3 * c,
                2.0 * c + r[7] as f64 * 0.3 * c,
            ),
        ];
        Homography::from_points(from, to).unwrap()
    }

    #[test]
    fn homography_algebra() {
        let h = random_map(1, 20);
        let inv = h.inverse().unwrap();
        let id = h.then_after(&inv);
        for (a, b) in id.0.iter().zip(Homography::IDENTITY.0.iter()) {
            assert!((a / id.0[8] - b).abs() < 1e-9, "{id:?}");
        }
        let from = [(0.0, 0.0), (9.0, 0.0), (0.0, 9.0), (9.0, 9.0)];
        let to = [(1.0, 2.0), (8.5, 0.5), (0.0, 9.5), (10.0, 7.0)];
        let m = Homography::from_points(from, to).unwrap();
        for (f, t) in from.iter().zip(&to) {
            let (u, v) = m.apply(f.0, f.1).unwrap();
            assert!((u - t.0).abs() < 1e-9 && (v - t.1).abs() < 1e-9);
        }
        assert!(Homography([0.0; 9]).inverse().is_none());
        assert!(Homography::from_points(from, [(0.0, 0.0); 4]).is_none());
    }

    #[test]
    fn forward_and_backward_match_the_f64_reference() {
        let g = gpu();
        // (n, c, in side, out side): same size, shrinking, enlarging, odd sizes.
        for (case, &(n, c, s_in, s_out)) in
            [(2, 3, 16, 16), (3, 1, 17, 9), (1, 2, 7, 23), (4, 3, 32, 32)]
                .iter()
                .enumerate()
        {
            let maps: Vec<Homography> = (0..n)
                .map(|k| {
                    // Output pixels -> input pixels: scale the output grid onto the input's.
                    let sc = (s_in as f64 - 1.0) / (s_out as f64 - 1.0);
                    let scale = Homography([sc, 0.0, 0.0, 0.0, sc, 0.0, 0.0, 0.0, 1.0]);
                    random_map(10 * case as u64 + k as u64, s_in).then_after(&scale)
                })
                .collect();
            let m = homographies(&g, &maps).unwrap();
            let xv = rand_vec(n * c * s_in * s_in, 3 + case as u64);
            let x = Tensor::from_slice(&g, &xv, &[n, c, s_in, s_in]).unwrap();
            let y = warp(&x, &m, [s_out, s_out]).unwrap().to_vec().unwrap();
            let xd: Vec<f64> = xv.iter().map(|&v| v as f64).collect();
            let (yr, taps) = reference(&xd, &maps, c, [s_in, s_in], [s_out, s_out]);
            // f32 sample points: a coordinate off by ~1e-6 px moves a weight by ~1e-6, on
            // values in [-1, 1]: 1e-4 is a loose bound.
            for (i, (a, b)) in y.iter().zip(&yr).enumerate() {
                assert!(
                    (*a as f64 - b).abs() < 1e-4,
                    "case {case} y[{i}]: {a} vs {b}"
                );
            }
            let gv = rand_vec(n * c * s_out * s_out, 7 + case as u64);
            let gt = Tensor::from_slice(&g, &gv, &[n, c, s_out, s_out]).unwrap();
            let dx = warp_backward(&gt, &m, [s_in, s_in])
                .unwrap()
                .to_vec()
                .unwrap();
            let mut dr = vec![0.0f64; xd.len()];
            for &(o, i, w) in &taps {
                dr[i] += w * gv[o] as f64;
            }
            for (i, (a, b)) in dx.iter().zip(&dr).enumerate() {
                assert!(
                    (*a as f64 - b).abs() < 1e-4,
                    "case {case} dx[{i}]: {a} vs {b}"
                );
            }
            // Deterministic: the same bits again.
            let again = warp_backward(&gt, &m, [s_in, s_in])
                .unwrap()
                .to_vec()
                .unwrap();
            assert_eq!(dx, again);
        }
    }

    #[test]
    fn identity_copies_and_bad_shapes_are_refused() {
        let g = gpu();
        let xv = rand_vec(2 * 3 * 5 * 6, 9);
        let x = Tensor::from_slice(&g, &xv, &[2, 3, 5, 6]).unwrap();
        let m = homographies(&g, &[Homography::IDENTITY; 2]).unwrap();
        assert_eq!(warp(&x, &m, [5, 6]).unwrap().to_vec().unwrap(), xv);
        assert_eq!(warp_backward(&x, &m, [5, 6]).unwrap().to_vec().unwrap(), xv);
        let one = homographies(&g, &[Homography::IDENTITY]).unwrap();
        assert!(warp(&x, &one, [5, 6]).is_err());
        assert!(warp(&x.reshape(&[6, 5, 6]).unwrap(), &m, [5, 6]).is_err());
        assert!(homographies(&g, &[Homography([0.0; 9])]).is_err());
    }
}
