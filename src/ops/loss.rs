//! Softmax cross-entropy against integer targets (PyTorch's `F.cross_entropy`), composed
//! from the reduce, elementwise and softmax kernels, with its backward rule.

use super::elementwise::{self, BinaryOp, UnaryOp};
use super::reduce::{reduce, row_sum, sum_all, ReduceOp};
use crate::{Error, Result, Tensor};

/// Mean softmax cross-entropy of `logits` `[N, C]` against class `targets[i] < C` of each
/// row, as a `[1]` tensor: `mean_i(logsumexp(logits_i) − logits_i[targets_i])`. The
/// log-sum-exp subtracts each row's maximum, so any finite logits work. Returns the loss
/// and the one-hot targets `[N, C]` that [`cross_entropy_backward`] needs.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<(Tensor, Tensor)> {
    let (n, c) = match logits.shape() {
        &[n, c] => (n, c),
        s => {
            return Err(Error::shape(format!(
                "cross_entropy takes logits [N, C], got {s:?}"
            )))
        }
    };
    if targets.len() != n || n == 0 {
        return Err(Error::shape(format!(
            "cross_entropy: {} targets for {n} rows of logits",
            targets.len()
        )));
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= c) {
        return Err(Error::invalid(format!(
            "cross_entropy: target {t} is not one of the {c} classes"
        )));
    }
    let mut oh = vec![0.0f32; n * c];
    for (i, &t) in targets.iter().enumerate() {
        oh[i * c + t as usize] = 1.0;
    }
    let onehot = Tensor::from_slice(logits.gpu(), &oh, &[n, c])?;
    let x = logits;
    let m = reduce(x, 1, ReduceOp::Max, true)?; // [N, 1]
    let xc = elementwise::binary(x, &m, BinaryOp::Sub)?;
    let lse = elementwise::unary(
        &row_sum(&elementwise::unary(&xc, UnaryOp::Exp)?)?,
        UnaryOp::Log,
    )?; // [N, 1]
    let picked = row_sum(&elementwise::mul(&xc, &onehot)?)?; // [N, 1]
    let per_row = elementwise::binary(&lse, &picked, BinaryOp::Sub)?;
    let loss = elementwise::scale(&sum_all(&per_row)?, 1.0 / n as f32)?;
    Ok((loss, onehot))
}

/// Backward of [`cross_entropy`]'s `mean_i(logsumexp(x_i) − x_i[t_i])`:
/// `dx = g · (softmax(x) − onehot(t)) / N`. `logits` and `onehot` are `[N, C]`, `g` is the
/// loss's `[1]` gradient.
pub fn cross_entropy_backward(logits: &Tensor, onehot: &Tensor, g: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0);
    let p = super::softmax::softmax_scaled(logits, 1.0)?;
    let d = elementwise::binary(&p, onehot, BinaryOp::Sub)?;
    let gs = elementwise::scale(g, 1.0 / n as f32)?;
    elementwise::mul(&d, &gs.reshape(&[1])?)
}
