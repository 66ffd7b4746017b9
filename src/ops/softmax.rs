//! Softmax over the last axis, numerically stable (`shaders/softmax.wgsl`):
//! `y = exp(s·x − max(s·x)) / Σ exp(s·x − max(s·x))` with an optional scale `s`.

use super::{Strategy, CPU_LOOP_LIMIT};
use crate::gpu::{grid_1d, Kernel, Shader};
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};

/// The `override` constants the kernels below set.
mod ov {
    use crate::gpu::Override;
    pub(super) const WG: Override<u32> = Override::new("WG");
}

pub(crate) static SHADER: Shader<Params> = crate::shader!("softmax", "grid", overrides = [ov::WG]);
/// Rows per workgroup of the one-invocation-per-row variant.
const ROWS_WG: u32 = 16;

crate::shader_params! {
    /// Mirrors `struct Params` in `shaders/softmax.wgsl`.
    pub(crate) struct Params {
        rows: u32,
        len: u32,
        scale: f32,
        _pad: u32,
    }
}

/// Loop iterations of the per-invocation kernel for rows of `len` values.
fn row_iters(len: usize) -> usize {
    2 * (len / 4 + 3)
}

/// `softmax(x)` over the last axis. `x`: `[.., L]`; returns the same shape.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    softmax_scaled(x, 1.0)
}

/// `softmax(scale · x)` over the last axis (attention scores use `scale = 1/√d`).
pub fn softmax_scaled(x: &Tensor, scale: f32) -> Result<Tensor> {
    let len = x.shape().last().copied().unwrap_or(0);
    softmax_strategy(x, scale, Strategy::for_rows(x.gpu(), row_iters(len)))
}

/// [`softmax_scaled`] with an explicit kernel strategy (tests and benches).
pub fn softmax_strategy(x: &Tensor, scale: f32, s: Strategy) -> Result<Tensor> {
    x.expect_f32("softmax input")?;
    if x.rank() == 0 {
        return Err(Error::shape("softmax needs a tensor of rank >= 1"));
    }
    if !scale.is_finite() {
        return Err(Error::invalid(format!(
            "softmax scale must be finite, got {scale}"
        )));
    }
    let len = x.dim(-1);
    let gpu = x.gpu();
    if s == Strategy::Invocation && gpu.is_cpu() && row_iters(len) > CPU_LOOP_LIMIT {
        return Err(Error::invalid(format!(
            "softmax rows of {len} values are too long for the per-invocation kernel on a \
             CPU adapter; use Strategy::Workgroup"
        )));
    }
    let y = Tensor::empty(gpu, x.shape(), DType::F32)?;
    if y.numel() == 0 {
        return Ok(y);
    }
    let rows = x.numel() / len;
    let p = Params {
        rows: rows as u32,
        len: len as u32,
        scale,
        _pad: 0,
    };
    let (entry, groups) = match s {
        Strategy::Invocation => ("softmax_rows", (rows as u32).div_ceil(ROWS_WG)),
        Strategy::Workgroup => ("softmax_wg", rows as u32),
    };
    let k = Kernel::new(&SHADER, entry).with(ov::WG, ROWS_WG);
    gpu.dispatch(&k, &p, &[x.binding(), y.binding()], grid_1d(groups));
    Ok(y)
}

/// Backward of [`softmax_scaled`]'s `y = softmax(scale · x)` over the last axis:
/// `dx = scale · y ⊙ (g − Σ_j g_j y_j)`, the row sums by [`super::reduce::row_sum`].
/// `y` (the forward's output) and `g` are `[.., L]`; returns `[.., L]`.
pub fn softmax_backward(y: &Tensor, g: &Tensor, scale: f32) -> Result<Tensor> {
    use super::elementwise::{self, BinaryOp};
    let l = y.dim(-1);
    let rows = y.numel() / l.max(1);
    let dot = super::reduce::row_sum(&elementwise::mul(g, y)?)?;
    let centred = elementwise::binary(&g.reshape(&[rows, l])?, &dot, BinaryOp::Sub)?;
    let dx = elementwise::mul(&centred, &y.reshape(&[rows, l])?)?;
    elementwise::scale(&dx, scale)?.reshape(y.shape())
}

/// CPU reference in f64 of `softmax(scale · x)` over rows of `len` values.
/// Inputs are f32 (the kernel tests) or f64 (the autodiff tests' finite differences).
pub fn reference<T: Copy + Into<f64>>(x: &[T], len: usize, scale: f32) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(len) {
        let v: Vec<f64> = row.iter().map(|&a| a.into() * scale as f64).collect();
        let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = v.iter().map(|&a| (a - m).exp()).collect();
        let s: f64 = e.iter().sum();
        out.extend(e.iter().map(|a| a / s));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};

    /// f32 error sources: the sum of L positive terms (relative error ≤ (L − 1)·ε in any
    /// order), and WGSL's `exp`, accurate to 3 + 2|a| ULP at argument a, once in the numerator
    /// and (at worst) once per term of the denominator. Bound per element, relative to y:
    /// 2·ε·(L + 8 + 2·(3 + 2·|Δ|max)), Δ = s·x − max; plus 1e-30 absolute for underflow.
    fn check(x: &[f32], shape: &[usize], scale: f32, s: Option<Strategy>, what: &str) {
        let g = gpu();
        let len = *shape.last().unwrap();
        let t = Tensor::from_slice(&g, x, shape).unwrap();
        let y = match s {
            Some(s) => softmax_strategy(&t, scale, s),
            None => softmax_scaled(&t, scale),
        }
        .unwrap();
        assert_eq!(y.shape(), shape);
        let got = y.to_vec().unwrap();
        let want = reference(x, len, scale);
        let e = f32::EPSILON as f64;
        for (r, row) in x.chunks(len).enumerate() {
            let v: Vec<f64> = row.iter().map(|&a| a as f64 * scale as f64).collect();
            let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let dmax = v
                .iter()
                .filter(|a| a.is_finite())
                .fold(0.0f64, |d, &a| d.max(m - a));
            let rel = 2.0 * e * (len as f64 + 8.0 + 2.0 * (3.0 + 2.0 * dmax));
            for i in r * len..(r + 1) * len {
                let err = (got[i] as f64 - want[i]).abs();
                assert!(
                    err <= rel * want[i] + 1e-30,
                    "{what} {s:?} {shape:?} scale {scale}: element {i} got {} want {} \
                     (err {err:e} > {:e})",
                    got[i],
                    want[i],
                    rel * want[i]
                );
            }
        }
    }

    #[test]
    fn matches_reference_over_shapes() {
        let shapes: &[&[usize]] = &[
            &[1],
            &[3, 1],
            &[1, 3],
            &[17, 65],
            &[2, 12, 50, 50],
            &[7, 77],
            &[1000, 17],
            &[3, 1031],
            &[2, 100_000],
        ];
        let mut seed = 0;
        for s in Strategy::ALL {
            for shape in shapes {
                for scale in [1.0f32, 0.125, -2.0] {
                    seed += 1;
                    let n: usize = shape.iter().product();
                    let x: Vec<f32> = rand_vec(n, seed).iter().map(|v| v * 8.0).collect();
                    check(&x, shape, scale, Some(s), "random");
                }
            }
        }
        // The default choice, including rows too long for one invocation on CPU adapters.
        for shape in [&[5, 768][..], &[1, 100_000], &[1, 300_000]] {
            let n: usize = shape.iter().product();
            check(&rand_vec(n, 77), shape, 1.0, None, "default");
        }
    }

    #[test]
    fn large_values_do_not_overflow_and_minus_inf_gives_zero() {
        for s in Strategy::ALL {
            // exp(1000) overflows f32; the max subtraction keeps it finite.
            let x: Vec<f32> = (0..37).map(|i| 1000.0 + i as f32 * 0.5).collect();
            check(&x, &[37], 1.0, Some(s), "large");
            // A causal-mask style row: -inf entries contribute exactly 0.
            let mut x = rand_vec(4 * 9, 4);
            for r in 0..4 {
                for c in r + 1..9 {
                    x[r * 9 + c] = f32::NEG_INFINITY;
                }
            }
            let g = gpu();
            let t = Tensor::from_slice(&g, &x, &[4, 9]).unwrap();
            let got = softmax_strategy(&t, 1.0, s).unwrap().to_vec().unwrap();
            let want = reference(&x, 9, 1.0);
            for i in 0..36 {
                if x[i] == f32::NEG_INFINITY {
                    assert_eq!(got[i], 0.0, "{s:?} masked element {i}");
                } else {
                    assert!((got[i] as f64 - want[i]).abs() < 1e-6, "{s:?} element {i}");
                }
            }
        }
    }

    #[test]
    fn more_than_65535_workgroups() {
        let x = rand_vec(70_000 * 3, 5);
        check(
            &x,
            &[70_000, 3],
            1.0,
            Some(Strategy::Workgroup),
            "many rows",
        );
        let x = rand_vec(1_100_000 * 2, 6);
        check(
            &x,
            &[1_100_000, 2],
            1.0,
            Some(Strategy::Invocation),
            "many rows",
        );
    }

    #[test]
    fn bad_arguments_are_reported() {
        let g = gpu();
        let x = Tensor::zeros(&g, &[2, 8]).unwrap();
        let e = softmax_scaled(&x, f32::NAN).unwrap_err().to_string();
        assert!(e.contains("scale"), "{e}");
        let z = Tensor::zeros(&g, &[3, 0]).unwrap();
        assert_eq!(softmax(&z).unwrap().shape(), &[3, 0]);
        if g.is_cpu() {
            let x = Tensor::zeros(&g, &[1, 200_000]).unwrap();
            let e = softmax_strategy(&x, 1.0, Strategy::Invocation)
                .unwrap_err()
                .to_string();
            assert!(e.contains("too long"), "{e}");
        }
    }
}
