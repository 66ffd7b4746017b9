//! `torch.nn.GroupNorm` on the tape, with an optional fused activation (taming's
//! `Normalize` followed by `nonlinearity`).

use crate::autodiff::{Tape, Var};
use crate::ops::Act;
use crate::weights::Loader;
use crate::{Result, Tensor};

/// `nn.GroupNorm(groups, C, eps, affine=True)`.
#[derive(Clone)]
pub struct GroupNorm {
    /// Gamma `[C]`.
    pub weight: Tensor,
    /// Beta `[C]`.
    pub bias: Tensor,
    /// Channel groups normalised together.
    pub groups: usize,
    /// Added to the variance.
    pub eps: f32,
}

impl GroupNorm {
    /// Loads gamma and beta `[c]` under `l`.
    pub fn load(l: &Loader, c: usize, groups: usize, eps: f32) -> Result<GroupNorm> {
        Ok(GroupNorm {
            weight: l.tensor("weight", &[c])?,
            bias: l.tensor("bias", &[c])?,
            groups,
            eps,
        })
    }

    /// `act(group_norm(x))`; `x`: `[N, C, ..]`. Without gradients the activation runs in
    /// the normalisation kernel.
    pub fn forward(&self, tape: &Tape, x: &Var, act: Act) -> Result<Var> {
        tape.group_norm(
            x,
            self.groups,
            &tape.param(&self.weight),
            &tape.param(&self.bias),
            self.eps,
            act,
        )
    }
}
