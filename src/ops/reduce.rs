//! Sum, mean, max and min over one axis, and the sum of everything (`shaders/reduce.wgsl`).
//!
//! The tensor is viewed as `[outer, A, inner]` around the reduced axis. Long axes are cut
//! into interleaved partials that are reduced again, so every invocation loops at most
//! [`MAX_TERMS`] times and results do not depend on timing.

use crate::gpu::{grid_1d, Kernel, Shader};
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};

/// The `override` constants the kernels below set.
mod ov {
    use crate::gpu::Override;
    pub(super) const OP: Override<u32> = Override::new("OP");
    pub(super) const WG: Override<u32> = Override::new("WG");
}

pub(crate) static SHADER: Shader<Params> =
    crate::shader!("reduce", "grid", overrides = [ov::OP, ov::WG]);
const WG: u32 = 256;
/// Most values one invocation combines.
pub const MAX_TERMS: usize = 1024;

crate::shader_params! {
    /// Mirrors `struct Params` in `shaders/reduce.wgsl`.
    pub(crate) struct Params {
        outer: u32,
        a: u32,
        inner: u32,
        parts: u32,
        scale: f32,
        _pad: [u32; 3],
    }
}

/// What a reduction computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Σ.
    Sum,
    /// Σ / A.
    Mean,
    /// Largest value.
    Max,
    /// Smallest value.
    Min,
}

impl ReduceOp {
    fn code(self) -> u32 {
        match self {
            ReduceOp::Sum | ReduceOp::Mean => 0,
            ReduceOp::Max => 1,
            ReduceOp::Min => 2,
        }
    }
}

/// The partial counts of each pass for an axis of `a` values: `[P1, P2, .., 1]`.
fn passes(a: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut len = a;
    loop {
        let parts = len.div_ceil(MAX_TERMS).max(1);
        out.push(parts);
        if parts == 1 {
            return out;
        }
        len = parts;
    }
}

/// Terms in the longest chain of f32 additions behind one sum over `a` values (for error
/// bounds in tests).
pub fn summation_depth(a: usize) -> usize {
    let mut len = a;
    let mut depth = 0;
    for parts in passes(a) {
        depth += len.div_ceil(parts);
        len = parts;
    }
    depth
}

/// Reduces `axis` of `x` with `op`. The axis is removed from the shape, or kept with size 1
/// when `keepdim`. Max and min over an empty axis are an error; the sum of nothing is 0 and
/// its mean NaN, as in torch.
pub fn reduce(x: &Tensor, axis: usize, op: ReduceOp, keepdim: bool) -> Result<Tensor> {
    x.expect_f32("reduce input")?;
    if axis >= x.rank() {
        return Err(Error::shape(format!(
            "reduce over axis {axis} of a rank-{} tensor {:?}",
            x.rank(),
            x.shape()
        )));
    }
    let a = x.dim(axis as isize);
    let outer: usize = x.shape()[..axis].iter().product();
    let inner: usize = x.shape()[axis + 1..].iter().product();
    let mut out_shape = x.shape().to_vec();
    if keepdim {
        out_shape[axis] = 1;
    } else {
        out_shape.remove(axis);
    }
    if a == 0 && matches!(op, ReduceOp::Max | ReduceOp::Min) {
        return Err(Error::shape(format!(
            "{op:?} over the empty axis {axis} of {:?}",
            x.shape()
        )));
    }
    reduce_3d(x, [outer, a, inner], op, &out_shape)
}

/// Σ over `axis` (removed).
pub fn sum(x: &Tensor, axis: usize) -> Result<Tensor> {
    reduce(x, axis, ReduceOp::Sum, false)
}
/// Mean over `axis` (removed).
pub fn mean(x: &Tensor, axis: usize) -> Result<Tensor> {
    reduce(x, axis, ReduceOp::Mean, false)
}
/// Max over `axis` (removed).
pub fn max(x: &Tensor, axis: usize) -> Result<Tensor> {
    reduce(x, axis, ReduceOp::Max, false)
}
/// Sum of every value, as a `[1]` tensor.
pub fn sum_all(x: &Tensor) -> Result<Tensor> {
    x.expect_f32("sum_all input")?;
    reduce_3d(x, [1, x.numel(), 1], ReduceOp::Sum, &[1])
}

/// Backward of [`sum_all`]'s `y = Σ x`: `dx = g` broadcast to `x_shape` (as `ones ⊙ g`).
/// `g` is `[1]`.
pub fn sum_all_backward(g: &Tensor, x_shape: &[usize]) -> Result<Tensor> {
    let ones = Tensor::full(g.gpu(), x_shape, 1.0)?;
    super::elementwise::mul(&ones, g)
}

/// Row sums of `x` viewed as `[rows, L]` (L = last dim), as `[rows, 1]`.
pub fn row_sum(x: &Tensor) -> Result<Tensor> {
    let l = x.dim(-1);
    let rows = x.numel() / l.max(1);
    reduce(&x.reshape(&[rows, l])?, 1, ReduceOp::Sum, true)
}

/// Sums a gradient of shape `[.., rows.., N]` down to a broadcast operand's `shape`, where
/// the operand's dims are trailing dims of the gradient with the leading ones summed away
/// (a reduction over the flattened leading dims): the backward of a leading-dims broadcast.
pub fn sum_leading(g: &Tensor, shape: &[usize]) -> Result<Tensor> {
    if g.shape() == shape {
        return Ok(g.clone());
    }
    let n: usize = shape.iter().product();
    let r = g.numel() / n.max(1);
    if n == 0 || r * n != g.numel() || g.shape()[g.rank() - shape.len()..] != *shape {
        return Err(Error::shape(format!(
            "autodiff: cannot reduce a gradient {:?} to {:?} (only leading broadcast dims)",
            g.shape(),
            shape
        )));
    }
    sum(&g.reshape(&[r, n])?, 0)?.reshape(shape)
}

fn reduce_3d(
    x: &Tensor,
    [outer, a, inner]: [usize; 3],
    op: ReduceOp,
    out_shape: &[usize],
) -> Result<Tensor> {
    let gpu = x.gpu();
    if x.numel() > u32::MAX as usize || outer * inner * a.max(1) > u32::MAX as usize {
        return Err(Error::shape(format!(
            "reduce input {:?} has more than 2^32 elements",
            x.shape()
        )));
    }
    let k = Kernel::new(&SHADER, "reduce")
        .with(ov::OP, op.code())
        .with(ov::WG, WG);
    let mut cur = x.clone();
    let mut len = a;
    let plan = passes(a);
    let last = plan.len() - 1;
    for (pi, &parts) in plan.iter().enumerate() {
        let shape = if pi == last {
            out_shape.to_vec()
        } else {
            vec![outer, parts, inner]
        };
        let y = Tensor::empty(gpu, &shape, DType::F32)?;
        let n = outer * parts * inner;
        if n == 0 {
            return Ok(y);
        }
        let scale = if pi == last && op == ReduceOp::Mean {
            1.0 / a as f32
        } else {
            1.0
        };
        let p = Params {
            outer: outer as u32,
            a: len as u32,
            inner: inner as u32,
            parts: parts as u32,
            scale,
            _pad: [0; 3],
        };
        gpu.dispatch(
            &k,
            &p,
            &[cur.binding(), y.binding()],
            grid_1d((n as u32).div_ceil(WG)),
        );
        cur = y;
        len = parts;
    }
    Ok(cur)
}

/// CPU reference in f64 over `[outer, a, inner]` data.
pub fn reference(x: &[f32], outer: usize, a: usize, inner: usize, op: ReduceOp) -> Vec<f64> {
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let vals = (0..a).map(|k| x[(o * a + k) * inner + i] as f64);
            out.push(match op {
                ReduceOp::Sum => vals.sum(),
                ReduceOp::Mean => vals.sum::<f64>() / a as f64,
                ReduceOp::Max => vals.fold(f64::NEG_INFINITY, f64::max),
                ReduceOp::Min => vals.fold(f64::INFINITY, f64::min),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};

    /// Sums: |err| ≤ depth·ε·Σ|x| for a chain of `depth` = [`summation_depth`] additions
    /// (divided by A for the mean, plus one rounding of the scale). Max/min are exact.
    fn check(shape: &[usize], axis: usize, op: ReduceOp, seed: u64) {
        let g = gpu();
        let n: usize = shape.iter().product();
        let xv = rand_vec(n, seed);
        let x = Tensor::from_slice(&g, &xv, shape).unwrap();
        let y = reduce(&x, axis, op, false).unwrap();
        let mut want_shape = shape.to_vec();
        want_shape.remove(axis);
        assert_eq!(y.shape(), want_shape.as_slice());
        let got = y.to_vec().unwrap();
        let outer: usize = shape[..axis].iter().product();
        let inner: usize = shape[axis + 1..].iter().product();
        let a = shape[axis];
        let want = reference(&xv, outer, a, inner, op);
        let mags = reference(
            &xv.iter().map(|v| v.abs()).collect::<Vec<_>>(),
            outer,
            a,
            inner,
            ReduceOp::Sum,
        );
        let e = f32::EPSILON as f64;
        for i in 0..got.len() {
            let tol = match op {
                ReduceOp::Sum => summation_depth(a) as f64 * e * mags[i],
                ReduceOp::Mean => (summation_depth(a) as f64 + 2.0) * e * mags[i] / a as f64,
                ReduceOp::Max | ReduceOp::Min => 0.0,
            };
            let err = (got[i] as f64 - want[i]).abs();
            assert!(
                err <= tol,
                "{op:?} {shape:?} axis {axis}: element {i} got {} want {} (err {err:e} > \
                 tol {tol:e})",
                got[i],
                want[i]
            );
        }
    }

    #[test]
    fn matches_reference_over_shapes_and_axes() {
        let cases: &[(&[usize], usize)] = &[
            (&[1], 0),
            (&[3], 0),
            (&[17, 65], 0),
            (&[17, 65], 1),
            (&[2, 3, 1000], 1),
            (&[2, 1031, 3], 1),
            (&[5, 4099], 1),
            (&[3, 5000, 7], 1),
            (&[2, 3, 4, 5], 3),
            (&[1, 1_500_000], 1),
        ];
        let mut seed = 0;
        for &(shape, axis) in cases {
            for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min] {
                seed += 1;
                check(shape, axis, op, seed);
            }
        }
    }

    #[test]
    fn full_sum_and_keepdim() {
        let g = gpu();
        for n in [1usize, 3, 1000, 1025, 2_000_001] {
            let xv = rand_vec(n, n as u64);
            let x = Tensor::from_slice(&g, &xv, &[n]).unwrap();
            let got = sum_all(&x).unwrap();
            assert_eq!(got.shape(), &[1]);
            let want: f64 = xv.iter().map(|&v| v as f64).sum();
            let mag: f64 = xv.iter().map(|&v| (v as f64).abs()).sum();
            let tol = summation_depth(n) as f64 * f32::EPSILON as f64 * mag;
            let g0 = got.to_vec().unwrap()[0] as f64;
            assert!((g0 - want).abs() <= tol, "n {n}: {g0} vs {want}");
        }
        let x = Tensor::from_slice(&g, &rand_vec(24, 1), &[2, 3, 4]).unwrap();
        assert_eq!(
            reduce(&x, 1, ReduceOp::Max, true).unwrap().shape(),
            &[2, 1, 4]
        );
        assert_eq!(mean(&x, 2).unwrap().shape(), &[2, 3]);
        assert_eq!(sum(&x, 0).unwrap().shape(), &[3, 4]);
        assert_eq!(max(&x, 0).unwrap().shape(), &[3, 4]);
    }

    #[test]
    fn more_than_65535_workgroups() {
        // 17M outputs (the axis has 1 value): 66,407 workgroups of 256.
        check(&[17_000_000, 1], 1, ReduceOp::Max, 9);
    }

    #[test]
    fn empty_axes_and_bad_axes() {
        let g = gpu();
        let x = Tensor::zeros(&g, &[3, 0, 2]).unwrap();
        assert_eq!(sum(&x, 1).unwrap().to_vec().unwrap(), vec![0.0; 6]);
        assert!(mean(&x, 1).unwrap().to_vec().unwrap()[0].is_nan());
        let e = max(&x, 1).unwrap_err().to_string();
        assert!(e.contains("empty axis"), "{e}");
        let e = sum(&x, 3).unwrap_err().to_string();
        assert!(e.contains("axis 3"), "{e}");
        assert_eq!(sum(&x, 0).unwrap().shape(), &[0, 2]);
        let ninf = Tensor::full(&g, &[2, 3], f32::NEG_INFINITY).unwrap();
        assert_eq!(
            max(&ninf, 1).unwrap().to_vec().unwrap(),
            vec![f32::NEG_INFINITY; 2]
        );
    }
}
