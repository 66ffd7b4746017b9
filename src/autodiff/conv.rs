//! Convolution, upsampling and warping on the tape: wiring only. The backward rules are
//! [`crate::ops::conv2d::conv2d_backward`], [`crate::ops::upsample::upsample_nearest2_backward`]
//! and [`crate::ops::warp::warp_backward`], next to their forwards.

use super::{Tape, Var};
use crate::ops::conv2d::{conv2d, conv2d_backward, Conv2dOpts};
use crate::{Error, Result, Tensor};

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
        let (stride, pad, upsample) = (opts.stride, opts.pad, opts.upsample);
        let mut parents = vec![x, weight];
        if let Some(b) = bias {
            parents.push(b);
        }
        let has_bias = bias.is_some();
        Ok(self.push(
            y,
            &parents,
            Box::new(move |g, need| {
                let o = Conv2dOpts {
                    stride,
                    pad,
                    upsample,
                    ..Default::default()
                };
                let r = conv2d_backward(&xv, &wv, g, &o, [need[0], need[1], has_bias && need[2]])?;
                let mut out = vec![r.dx, r.dw];
                if has_bias {
                    out.push(r.db);
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
        let grad = super::any_needs_grad(&[x, weight, residual], bias);
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
            Box::new(move |g, _need| {
                Ok(vec![Some(
                    crate::ops::upsample::upsample_nearest2_backward(g)?,
                )])
            }),
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
