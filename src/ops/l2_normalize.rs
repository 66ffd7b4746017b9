//! Each row (last axis) divided by its L2 norm, composed from the elementwise and reduce
//! kernels, with its backward rule.

use super::elementwise::{self, BinaryOp, UnaryOp};
use super::reduce::row_sum;
use crate::{Result, Tensor};

/// `y = x / ‖x‖` over the last axis. `x` is `[.., L]`; returns `y` (`x`'s shape) and the
/// norms `[rows, 1]` (rows = the product of the leading dims), which the backward needs.
pub fn l2_normalize(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let l = x.dim(-1);
    let rows = x.numel() / l.max(1);
    let x2 = x.reshape(&[rows, l])?;
    let norm = elementwise::unary(
        &row_sum(&elementwise::unary(&x2, UnaryOp::Square)?)?,
        UnaryOp::Sqrt,
    )?;
    let y = elementwise::binary(&x2, &norm, BinaryOp::Div)?.reshape(x.shape())?;
    Ok((y, norm))
}

/// Backward of [`l2_normalize`]'s `y = x / ‖x‖`: `dx = (g − y (g·y)) / ‖x‖`. `y` (the
/// forward's output) and `g` are `[.., L]`, `norm` is the forward's `[rows, 1]`; returns
/// `[.., L]`.
pub fn l2_normalize_backward(y: &Tensor, norm: &Tensor, g: &Tensor) -> Result<Tensor> {
    let l = y.dim(-1);
    let rows = y.numel() / l.max(1);
    let g2 = g.reshape(&[rows, l])?;
    let y2 = y.reshape(&[rows, l])?;
    let dot = row_sum(&elementwise::mul(&g2, &y2)?)?;
    let t = elementwise::binary(&g2, &elementwise::mul(&y2, &dot)?, BinaryOp::Sub)?;
    elementwise::binary(&t, norm, BinaryOp::Div)?.reshape(y.shape())
}
