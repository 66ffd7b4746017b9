//! Convolution on the tape. The backward rules reuse the forward kernels:
//!
//! - input gradient: a stride-1 convolution of the (zero-dilated, for stride 2) output
//!   gradient with the kernel flipped in space and transposed in channels, padded so that it
//!   lands on the input grid; a fused nearest ×2 upsample adds a 2×2 sum pool;
//! - weight gradient: `dW [O, C·KH·KW] = Σ_n g_n [O, Ho·Wo] @ cols_n [Ho·Wo, C·KH·KW]`, with the
//!   columns from the im2col kernel (`ops::conv2d::im2col`);
//! - bias gradient: the sum of `g` over batch and positions.

use super::{Tape, Var};
use crate::ops::concat::{concat, slice};
use crate::ops::conv2d::{conv2d, im2col, Conv2dOpts, IM2COL_BUDGET};
use crate::ops::elementwise::add;
use crate::ops::matmul::{matmul, MatmulOpts};
use crate::ops::permute::permute;
use crate::ops::reduce;
use crate::{Error, Result, Tensor};

/// `w'[c, o, ky, kx] = w[o, c, KH−1−ky, KW−1−kx]`: flipped in space (a product with a
/// reversal permutation, exact in floating point), channels swapped.
fn flip_transpose(w: &Tensor) -> Result<Tensor> {
    let (o, c, kh, kw) = (w.dim(0), w.dim(1), w.dim(2), w.dim(3));
    let k = kh * kw;
    let mut rev = vec![0.0f32; k * k];
    for i in 0..k {
        rev[i * k + (k - 1 - i)] = 1.0;
    }
    let rev = Tensor::from_slice(w.gpu(), &rev, &[k, k])?;
    let flipped = matmul(&w.reshape(&[o * c, k])?, &rev, &MatmulOpts::default())?;
    permute(&flipped.reshape(&[o, c, kh, kw])?, &[1, 0, 2, 3])
}

/// Inserts `s − 1` zeros between neighbours along H and W: `[N, C, H, W]` →
/// `[N, C, s(H−1)+1, s(W−1)+1]`.
fn dilate(x: &Tensor, s: usize) -> Result<Tensor> {
    if s == 1 {
        return Ok(x.clone());
    }
    let (n, c, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let z = Tensor::zeros(x.gpu(), &[n, c, h, s - 1, w])?;
    let rows = concat(&[&x.reshape(&[n, c, h, 1, w])?, &z], 3)?.reshape(&[n, c, h * s, w])?;
    let rows = slice(&rows, 2, 0, s * (h - 1) + 1)?;
    let hh = rows.dim(2);
    let z = Tensor::zeros(x.gpu(), &[n, c, hh, w, s - 1])?;
    let both = concat(&[&rows.reshape(&[n, c, hh, w, 1])?, &z], 4)?.reshape(&[n, c, hh, w * s])?;
    slice(&both, 3, 0, s * (w - 1) + 1)
}

/// Sum over 2×2 blocks: `[N, C, 2H, 2W]` → `[N, C, H, W]` (the backward of nearest ×2).
fn sum_pool2(g: &Tensor) -> Result<Tensor> {
    let (n, c, h2, w2) = (g.dim(0), g.dim(1), g.dim(2), g.dim(3));
    let (h, w) = (h2 / 2, w2 / 2);
    let t = permute(&g.reshape(&[n, c, h, 2, w, 2])?, &[0, 1, 2, 4, 3, 5])?;
    reduce::sum(&t.reshape(&[n * c * h * w, 4])?, 1)?.reshape(&[n, c, h, w])
}

/// The input gradient of `y = conv(up?(x), w)` for output gradient `g`.
fn input_grad(
    x_shape: &[usize],
    w: &Tensor,
    g: &Tensor,
    stride: usize,
    p: [usize; 4],
    upsample: bool,
) -> Result<Tensor> {
    let (kh, kw) = (w.dim(2), w.dim(3));
    let (h, wd) = if upsample {
        (2 * x_shape[2], 2 * x_shape[3])
    } else {
        (x_shape[2], x_shape[3])
    };
    if p[0] >= kh || p[2] >= kw {
        return Err(Error::shape(
            "conv2d backward: padding must be smaller than the kernel",
        ));
    }
    let gd = dilate(g, stride)?;
    let (ld, lw) = (gd.dim(2), gd.dim(3));
    let top = kh - 1 - p[0];
    let left = kw - 1 - p[2];
    // rows out = ld + top + bottom − kh + 1 = h
    let bottom = (h + kh - 1).checked_sub(ld + top);
    let right = (wd + kw - 1).checked_sub(lw + left);
    let (Some(bottom), Some(right)) = (bottom, right) else {
        return Err(Error::shape(
            "conv2d backward: output gradient larger than the input",
        ));
    };
    let dx = conv2d(
        &gd,
        &flip_transpose(w)?,
        &Conv2dOpts {
            pad: [top, bottom, left, right],
            ..Default::default()
        },
    )?;
    if upsample {
        sum_pool2(&dx)
    } else {
        Ok(dx)
    }
}

/// The weight gradient `[O, C, KH, KW]` of `y = conv(x', w)` (`x'` the possibly upsampled
/// input) for output gradient `g` `[N, O, Ho, Wo]`.
fn weight_grad(
    x: &Tensor,
    w_shape: &[usize],
    g: &Tensor,
    stride: usize,
    p: [usize; 4],
    upsample: bool,
) -> Result<Tensor> {
    // cols [m, C·KH·KW, Ho·Wo] for a group of m images in one im2col pass (the fused upsample
    // included), then dW = Σ_n g_n [O, P] @ cols_nᵀ [P, C·K] as one batched product and a
    // sum over n. Groups keep the columns under IM2COL_BUDGET (and one storage binding).
    let cap = IM2COL_BUDGET.min(x.gpu().limits().max_storage_buffer_binding_size);
    weight_grad_in_groups(x, w_shape, g, stride, p, upsample, cap)
}

/// [`weight_grad`] with the im2col columns of at most `cap` bytes at once.
fn weight_grad_in_groups(
    x: &Tensor,
    w_shape: &[usize],
    g: &Tensor,
    stride: usize,
    p: [usize; 4],
    upsample: bool,
    cap: u64,
) -> Result<Tensor> {
    let (o, c, kh, kw) = (w_shape[0], w_shape[1], w_shape[2], w_shape[3]);
    let (n, ho, wo) = (g.dim(0), g.dim(2), g.dim(3));
    let per_image = (c * kh * kw * ho * wo * 4) as u64;
    let group = ((cap / per_image.max(1)) as usize).clamp(1, n);
    let mut dw: Option<Tensor> = None;
    for n0 in (0..n).step_by(group) {
        let m = group.min(n - n0);
        let (xs, gs) = if m == n {
            (x.clone(), g.clone())
        } else {
            (slice(x, 0, n0, m)?, slice(g, 0, n0, m)?)
        };
        let cols = im2col(&xs, [kh, kw], stride, p, upsample)?;
        let per = matmul(
            &gs.reshape(&[m, o, ho * wo])?,
            &cols,
            &MatmulOpts {
                trans_b: true,
                ..Default::default()
            },
        )?;
        let part = if m == 1 {
            per.reshape(&[o * c * kh * kw])?
        } else {
            reduce::sum(&per.reshape(&[m, o * c * kh * kw])?, 0)?
        };
        dw = Some(match dw {
            None => part,
            Some(acc) => add(&acc, &part)?,
        });
    }
    let dw = dw.ok_or_else(|| Error::shape("conv2d weight gradient of an empty batch"))?;
    dw.reshape(w_shape)
}

impl Tape {
    /// `conv(up?(x), weight) + bias` with PyTorch layouts: `x` `[N, C, H, W]`, `weight`
    /// `[O, C, KH, KW]`, `bias` `[O]`; `opts` gives stride, padding and the fused upsample
    /// (its bias and residual fields must be empty: pass the bias here, add residuals with
    /// [`Tape::add`]).
    pub fn conv2d(
        &self,
        x: &Var,
        weight: &Var,
        bias: Option<&Var>,
        opts: &Conv2dOpts,
    ) -> Result<Var> {
        if opts.bias.is_some() || opts.residual.is_some() {
            return Err(Error::invalid(
                "Tape::conv2d takes its bias as a Var and no residual",
            ));
        }
        let fwd = Conv2dOpts {
            bias: bias.map(|b| &b.value),
            ..*opts
        };
        let y = conv2d(&x.value, &weight.value, &fwd)?;
        let (xv, wv) = (x.value.clone(), weight.value.clone());
        let (stride, p, up) = (opts.stride, opts.pad, opts.upsample);
        let mut parents = vec![x, weight];
        if let Some(b) = bias {
            parents.push(b);
        }
        let has_bias = bias.is_some();
        Ok(self.push(
            y,
            &parents,
            Box::new(move |g, need| {
                let dx = need[0]
                    .then(|| input_grad(xv.shape(), &wv, g, stride, p, up))
                    .transpose()?;
                let dw = if need[1] {
                    Some(weight_grad(&xv, wv.shape(), g, stride, p, up)?)
                } else {
                    None
                };
                let mut out = vec![dx, dw];
                if has_bias && need[2] {
                    let (n, o) = (g.dim(0), g.dim(1));
                    let per = reduce::sum(&g.reshape(&[n, o, g.numel() / (n * o).max(1)])?, 2)?;
                    out.push(Some(reduce::sum(&per, 0)?));
                }
                Ok(out)
            }),
        ))
    }

    /// [`Tape::conv2d`] plus `residual` (the output's shape). When nothing needs a
    /// gradient the bias and the residual are added in the convolution's epilogue, as the
    /// inference kernels do; otherwise the sum is its own node.
    pub fn conv2d_residual(
        &self,
        x: &Var,
        weight: &Var,
        bias: Option<&Var>,
        opts: &Conv2dOpts,
        residual: &Var,
    ) -> Result<Var> {
        let grad = x.needs_grad
            || weight.needs_grad
            || residual.needs_grad
            || bias.is_some_and(|b| b.needs_grad);
        if !grad && opts.bias.is_none() && opts.residual.is_none() {
            let fused = Conv2dOpts {
                bias: bias.map(|b| &b.value),
                residual: Some(&residual.value),
                ..*opts
            };
            return Ok(self.leaf(conv2d(&x.value, &weight.value, &fused)?, false));
        }
        let y = self.conv2d(x, weight, bias, opts)?;
        self.add(&y, residual)
    }

    /// Nearest-neighbour ×2 upsample of `[N, C, H, W]`.
    pub fn upsample_nearest2(&self, x: &Var) -> Result<Var> {
        let y = crate::ops::upsample::upsample_nearest2(&x.value)?;
        Ok(self.push(
            y,
            &[x],
            Box::new(move |g, _need| Ok(vec![Some(sum_pool2(g)?)])),
        ))
    }

    /// Projective warp of `[N, C, H, W]` to `[N, C, OH, OW]` with bilinear sampling and zero
    /// padding, one homography per image (`maps` from [`crate::ops::warp::homographies`];
    /// constants, no gradient). Backward: [`crate::ops::warp::warp_backward`].
    pub fn warp(&self, x: &Var, maps: &Tensor, out_hw: [usize; 2]) -> Result<Var> {
        let y = crate::ops::warp::warp(&x.value, maps, out_hw)?;
        let maps = maps.clone();
        let in_hw = [x.shape()[2], x.shape()[3]];
        Ok(self.push(
            y,
            &[x],
            Box::new(move |g, _need| {
                Ok(vec![Some(crate::ops::warp::warp_backward(
                    g, &maps, in_hw,
                )?)])
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};

    #[test]
    fn weight_grad_in_groups_of_images_matches_one_product() {
        // 5 images of 3x6x6 columns (3·9·36·4 = 3888 bytes each) in groups of 2, 2 and 1.
        let g = gpu();
        let (n, c, o, h) = (5, 3, 4, 6);
        let x = Tensor::from_slice(&g, &rand_vec(n * c * h * h, 1), &[n, c, h, h]).unwrap();
        let gy = Tensor::from_slice(&g, &rand_vec(n * o * h * h, 2), &[n, o, h, h]).unwrap();
        let w = [o, c, 3, 3];
        let one = weight_grad_in_groups(&x, &w, &gy, 1, [1; 4], false, u64::MAX).unwrap();
        let grouped = weight_grad_in_groups(&x, &w, &gy, 1, [1; 4], false, 2 * 3888).unwrap();
        let (a, b) = (one.to_vec().unwrap(), grouped.to_vec().unwrap());
        assert_eq!(grouped.shape(), &w);
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                "dw[{i}]: {a} vs {b}"
            );
        }
    }

    /// f64 forward of conv(up?(x), w) + b for finite differences.
    #[allow(clippy::too_many_arguments)]
    fn conv_ref(
        x: &[f64],
        w: &[f64],
        b: &[f64],
        n: usize,
        c: usize,
        h: usize,
        wd: usize,
        o: usize,
        k: usize,
        s: usize,
        p: [usize; 4],
        up: bool,
    ) -> Vec<f64> {
        let (hv, wv) = if up { (2 * h, 2 * wd) } else { (h, wd) };
        let ho = (hv + p[0] + p[1] - k) / s + 1;
        let wo = (wv + p[2] + p[3] - k) / s + 1;
        let mut y = vec![0.0; n * o * ho * wo];
        for ni in 0..n {
            for oi in 0..o {
                for i in 0..ho {
                    for j in 0..wo {
                        let mut acc = b[oi];
                        for ci in 0..c {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let (yy, xx) = (
                                        (i * s + ky) as isize - p[0] as isize,
                                        (j * s + kx) as isize - p[2] as isize,
                                    );
                                    if yy < 0 || xx < 0 || yy >= hv as isize || xx >= wv as isize {
                                        continue;
                                    }
                                    let (sy, sx) = if up {
                                        (yy as usize / 2, xx as usize / 2)
                                    } else {
                                        (yy as usize, xx as usize)
                                    };
                                    acc += w[((oi * c + ci) * k + ky) * k + kx]
                                        * x[((ni * c + ci) * h + sy) * wd + sx];
                                }
                            }
                        }
                        y[((ni * o + oi) * ho + i) * wo + j] = acc;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn conv2d_gradients_for_taming_shapes() {
        let g = gpu();
        // (k, stride, pad, upsample): 3x3 same, 1x1, taming's downsample, upsample + 3x3
        let cases = [
            (3, 1, [1, 1, 1, 1], false),
            (1, 1, [0; 4], false),
            (3, 2, [0, 1, 0, 1], false),
            (3, 1, [1, 1, 1, 1], true),
        ];
        for (ci, &(k, s, p, up)) in cases.iter().enumerate() {
            let (n, c, h, wd, o) = (2, 3, 6, 4, 2);
            let xv = rand_vec(n * c * h * wd, 100 + ci as u64);
            let wv = rand_vec(o * c * k * k, 110 + ci as u64);
            let bv = rand_vec(o, 120 + ci as u64);
            let tape = Tape::new();
            let x = tape.leaf(Tensor::from_slice(&g, &xv, &[n, c, h, wd]).unwrap(), true);
            let w = tape.leaf(Tensor::from_slice(&g, &wv, &[o, c, k, k]).unwrap(), true);
            let b = tape.leaf(Tensor::from_slice(&g, &bv, &[o]).unwrap(), true);
            let opts = Conv2dOpts {
                stride: s,
                pad: p,
                upsample: up,
                ..Default::default()
            };
            let y = tape.conv2d(&x, &w, Some(&b), &opts).unwrap();
            let mv = rand_vec(y.value().numel(), 130 + ci as u64);
            let m = tape.leaf(Tensor::from_slice(&g, &mv, y.shape()).unwrap(), false);
            let loss = tape.sum(&tape.mul(&y, &m).unwrap()).unwrap();
            let grads = tape.backward(&loss).unwrap();
            let f = |xs: &[f64], ws: &[f64], bs: &[f64]| -> f64 {
                conv_ref(xs, ws, bs, n, c, h, wd, o, k, s, p, up)
                    .iter()
                    .zip(&mv)
                    .map(|(a, b)| a * *b as f64)
                    .sum()
            };
            let d64 = |v: &[f32]| v.iter().map(|&q| q as f64).collect::<Vec<_>>();
            let (x64, w64, b64) = (d64(&xv), d64(&wv), d64(&bv));
            let what = format!("k{k} s{s} p{p:?} up{up}");
            super::super::tests::check(
                grads.get(&x).unwrap(),
                &super::super::tests::fd(&|q| f(q, &w64, &b64), &xv),
                &format!("{what} dx"),
            );
            super::super::tests::check(
                grads.get(&w).unwrap(),
                &super::super::tests::fd(&|q| f(&x64, q, &b64), &wv),
                &format!("{what} dw"),
            );
            super::super::tests::check(
                grads.get(&b).unwrap(),
                &super::super::tests::fd(&|q| f(&x64, &w64, q), &bv),
                &format!("{what} db"),
            );
        }
    }

    #[test]
    fn upsample_gradient_is_a_sum_pool() {
        let g = gpu();
        let xv = rand_vec(2 * 3 * 4, 140);
        let tape = Tape::new();
        let x = tape.leaf(Tensor::from_slice(&g, &xv, &[1, 2, 3, 4]).unwrap(), true);
        let y = tape.upsample_nearest2(&x).unwrap();
        let mv: Vec<f32> = (0..96).map(|i| i as f32).collect();
        let m = tape.leaf(Tensor::from_slice(&g, &mv, &[1, 2, 6, 8]).unwrap(), false);
        let loss = tape.sum(&tape.mul(&y, &m).unwrap()).unwrap();
        let gx = tape
            .backward(&loss)
            .unwrap()
            .get(&x)
            .unwrap()
            .to_vec()
            .unwrap();
        for c in 0..2 {
            for i in 0..3 {
                for j in 0..4 {
                    let want: f32 = [(0, 0), (0, 1), (1, 0), (1, 1)]
                        .iter()
                        .map(|(a, b)| mv[(c * 6 + 2 * i + a) * 8 + 2 * j + b])
                        .sum();
                    assert_eq!(gx[(c * 3 + i) * 4 + j], want);
                }
            }
        }
    }
}
