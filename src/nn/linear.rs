//! `torch.nn.Linear` on the tape.

use crate::autodiff::{Tape, Var};
use crate::ops::Act;
use crate::weights::Loader;
use crate::{Result, Tensor};

/// `nn.Linear`: `y = x @ weightᵀ + bias`.
#[derive(Clone)]
pub struct Linear {
    /// `[out, in]`, f32 or (`--precision f16`) f16.
    pub weight: Tensor,
    /// `[out]`, when the layer has one.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` `[out_dim, in_dim]` at the loader's precision
    /// ([`Loader::linear_weight`]) and `bias` `[out_dim]` (f32) if `bias` under `l`.
    pub fn load(l: &Loader, out_dim: usize, in_dim: usize, bias: bool) -> Result<Linear> {
        Ok(Linear {
            weight: l.linear_weight("weight", &[out_dim, in_dim])?,
            bias: if bias {
                Some(l.tensor("bias", &[out_dim])?)
            } else {
                None
            },
        })
    }

    /// `act(x @ Wᵀ + b)`; `x`: `[.., in]` → `[.., out]`.
    pub fn forward(&self, tape: &Tape, x: &Var, act: Act) -> Result<Var> {
        let b = self.bias.as_ref().map(|b| tape.param(b));
        tape.linear(x, &tape.param(&self.weight), b.as_ref(), act)
    }

    /// `residual + act(x @ Wᵀ + b)`; `residual`: `[.., out]`. Without gradients the sum is
    /// the matmul's epilogue ([`Tape::linear_residual`]).
    pub fn forward_residual(&self, tape: &Tape, x: &Var, act: Act, residual: &Var) -> Result<Var> {
        let b = self.bias.as_ref().map(|b| tape.param(b));
        tape.linear_residual(x, &tape.param(&self.weight), b.as_ref(), act, residual)
    }
}
