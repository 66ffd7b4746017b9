//! `torch.nn.Conv2d` (with bias) on the tape.

use crate::autodiff::{Tape, Var};
use crate::ops::conv2d::Conv2dOpts;
use crate::ops::Act;
use crate::weights::Loader;
use crate::{Error, Result, Tensor};

/// `nn.Conv2d` weights; stride and padding are given per call (taming reuses the same
/// module type for same-size, stride-2 and upsampling convolutions).
#[derive(Clone)]
pub struct Conv2d {
    /// `[Cout, Cin, K, K]`.
    pub weight: Tensor,
    /// `[Cout]`.
    pub bias: Tensor,
}

impl Conv2d {
    /// Loads `weight` `[cout, cin, k, k]` and `bias` `[cout]` under `l`.
    pub fn load(l: &Loader, cin: usize, cout: usize, k: usize) -> Result<Conv2d> {
        Ok(Conv2d {
            weight: l.tensor("weight", &[cout, cin, k, k])?,
            bias: l.tensor("bias", &[cout])?,
        })
    }

    /// Output channels.
    pub fn cout(&self) -> usize {
        self.weight.dim(0)
    }

    /// Same-size convolution (padding K/2) of `x` `[N, Cin, H, W]`, plus `residual`
    /// `[N, Cout, H, W]` (fused into the epilogue when nothing needs a gradient).
    pub fn forward(&self, tape: &Tape, x: &Var, residual: Option<&Var>) -> Result<Var> {
        let opts = Conv2dOpts {
            pad: [self.weight.dim(2) / 2; 4],
            ..Default::default()
        };
        self.forward_opts(tape, x, &opts, residual)
    }

    /// The convolution with `opts`' stride, padding and fused nearest ×2 upsample (its
    /// `bias` and `residual` must be empty: the layer adds its own bias, `residual` here).
    pub fn forward_opts(
        &self,
        tape: &Tape,
        x: &Var,
        opts: &Conv2dOpts,
        residual: Option<&Var>,
    ) -> Result<Var> {
        let (w, b) = (tape.param(&self.weight), tape.param(&self.bias));
        match residual {
            Some(r) => tape.conv2d_residual(x, &w, Some(&b), opts, r),
            None => tape.conv2d(x, &w, Some(&b), opts),
        }
    }

    /// A 1×1 convolution applied to positions-major tokens `x` `[N, T, Cin]` as a linear
    /// layer → `[N, T, Cout]` (taming's attention projections).
    pub fn forward_tokens(&self, tape: &Tape, x: &Var) -> Result<Var> {
        let (o, c) = (self.weight.dim(0), self.weight.dim(1));
        if self.weight.dim(2) != 1 || self.weight.dim(3) != 1 {
            return Err(Error::shape(format!(
                "forward_tokens needs a 1x1 convolution, got a kernel {:?}",
                self.weight.shape()
            )));
        }
        let w = tape.reshape(&tape.param(&self.weight), &[o, c])?;
        tape.linear(x, &w, Some(&tape.param(&self.bias)), Act::None)
    }
}
