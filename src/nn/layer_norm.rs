//! `torch.nn.LayerNorm` on the tape.

use crate::autodiff::{Tape, Var};
use crate::weights::Loader;
use crate::{Result, Tensor};

/// `nn.LayerNorm` over the last axis, with affine parameters.
#[derive(Clone)]
pub struct LayerNorm {
    /// Gain `[C]`.
    pub weight: Tensor,
    /// Shift `[C]`.
    pub bias: Tensor,
    /// Added to the variance.
    pub eps: f32,
}

impl LayerNorm {
    /// Loads `weight` and `bias` `[dim]` under `l`.
    pub fn load(l: &Loader, dim: usize, eps: f32) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: l.tensor("weight", &[dim])?,
            bias: l.tensor("bias", &[dim])?,
            eps,
        })
    }

    /// `x`: `[.., C]` → the same shape.
    pub fn forward(&self, tape: &Tape, x: &Var) -> Result<Var> {
        tape.layer_norm(
            x,
            &tape.param(&self.weight),
            &tape.param(&self.bias),
            self.eps,
        )
    }
}
