//! Elementwise unary and broadcasting binary ops (`shaders/elementwise.wgsl`).

use super::Act;
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
    crate::shader!("elementwise", "grid", "act", overrides = [ov::OP, ov::WG]);
const WG: u32 = 256;
/// Most dims a broadcasting binary op handles.
pub const MAX_RANK: usize = 8;

crate::shader_params! {
    /// Mirrors `struct Params` in `shaders/elementwise.wgsl`.
    pub(crate) struct Params {
        n: u32,
        rank: u32,
        alpha: f32,
        beta: f32,
        out_dims: [u32; MAX_RANK],
        a_strides: [u32; MAX_RANK],
        b_strides: [u32; MAX_RANK],
    }
}

/// A one-input elementwise function.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnaryOp {
    /// An activation function.
    Act(Act),
    /// `x * scale + shift`.
    Affine {
        /// Multiplier.
        scale: f32,
        /// Added after scaling.
        shift: f32,
    },
    /// `clamp(x, lo, hi)`.
    Clamp {
        /// Lower bound.
        lo: f32,
        /// Upper bound.
        hi: f32,
    },
    /// `e^x`.
    Exp,
    /// Natural log.
    Log,
    /// Square root.
    Sqrt,
    /// `1/sqrt(x)`.
    Rsqrt,
    /// `x²`.
    Square,
    /// `|x|`.
    Abs,
    /// `1/x`.
    Recip,
    /// `tanh x`.
    Tanh,
    /// `x^e` (x ≥ 0).
    Pow(f32),
    /// `θ²/2` with `θ = acos(clamp(x, −1, 1))`: for `x` the cosine between unit vectors this
    /// is the spherical distance loss of VQGAN+CLIP (`2·asin(‖a−b‖/2)²`).
    HalfSquaredAngle,
}

impl UnaryOp {
    fn code(self) -> (u32, f32, f32) {
        match self {
            UnaryOp::Act(a) => (a as u32, 0.0, 0.0),
            UnaryOp::Affine { scale, shift } => (16, scale, shift),
            UnaryOp::Clamp { lo, hi } => (17, lo, hi),
            UnaryOp::Exp => (18, 0.0, 0.0),
            UnaryOp::Log => (19, 0.0, 0.0),
            UnaryOp::Sqrt => (20, 0.0, 0.0),
            UnaryOp::Rsqrt => (21, 0.0, 0.0),
            UnaryOp::Square => (22, 0.0, 0.0),
            UnaryOp::Abs => (23, 0.0, 0.0),
            UnaryOp::Recip => (24, 0.0, 0.0),
            UnaryOp::Tanh => (25, 0.0, 0.0),
            UnaryOp::Pow(e) => (26, e, 0.0),
            UnaryOp::HalfSquaredAngle => (27, 0.0, 0.0),
        }
    }

    /// CPU reference.
    pub fn reference(self, x: f64) -> f64 {
        match self {
            UnaryOp::Act(a) => a.reference(x),
            UnaryOp::Affine { scale, shift } => x * scale as f64 + shift as f64,
            UnaryOp::Clamp { lo, hi } => x.clamp(lo as f64, hi as f64),
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Rsqrt => 1.0 / x.sqrt(),
            UnaryOp::Square => x * x,
            UnaryOp::Abs => x.abs(),
            UnaryOp::Recip => 1.0 / x,
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Pow(e) => x.powf(e as f64),
            UnaryOp::HalfSquaredAngle => 0.5 * x.clamp(-1.0, 1.0).acos().powi(2),
        }
    }
}

/// A two-input elementwise function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    /// `a + b`
    Add = 0,
    /// `a - b`
    Sub = 1,
    /// `a * b`
    Mul = 2,
    /// `a / b`
    Div = 3,
    /// `max(a, b)`
    Max = 4,
    /// `min(a, b)`
    Min = 5,
    /// `(a - b)²`
    SquaredDiff = 6,
}

/// `grad * act'(x)`: the backward of an activation at its input `x` (same shapes).
pub fn act_backward(x: &Tensor, grad: &Tensor, act: Act) -> Result<Tensor> {
    if x.shape() != grad.shape() {
        return Err(Error::shape(format!(
            "act_backward: input {:?} and gradient {:?} differ",
            x.shape(),
            grad.shape()
        )));
    }
    binary_code(x, grad, 32 + act as u32)
}

impl BinaryOp {
    /// CPU reference.
    pub fn reference(self, x: f64, z: f64) -> f64 {
        match self {
            BinaryOp::Add => x + z,
            BinaryOp::Sub => x - z,
            BinaryOp::Mul => x * z,
            BinaryOp::Div => x / z,
            BinaryOp::Max => x.max(z),
            BinaryOp::Min => x.min(z),
            BinaryOp::SquaredDiff => (x - z) * (x - z),
        }
    }
}

/// Applies `op` to every element of `x`.
pub fn unary(x: &Tensor, op: UnaryOp) -> Result<Tensor> {
    x.expect_f32("unary op input")?;
    let y = Tensor::empty(x.gpu(), x.shape(), DType::F32)?;
    let n = x.numel();
    if n == 0 {
        return Ok(y);
    }
    let (code, alpha, beta) = op.code();
    let p = Params {
        n: n as u32,
        rank: 0,
        alpha,
        beta,
        out_dims: [0; MAX_RANK],
        a_strides: [0; MAX_RANK],
        b_strides: [0; MAX_RANK],
    };
    let k = Kernel::new(&SHADER, "unary")
        .with(ov::OP, code)
        .with(ov::WG, WG);
    x.gpu().dispatch(
        &k,
        &p,
        &[x.binding(), x.binding(), y.binding()],
        grid_1d((n as u32).div_ceil(WG)),
    );
    Ok(y)
}

/// The broadcast shape of two shapes (NumPy rules), or an error naming both.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => {
                return Err(Error::shape(format!(
                    "shapes {a:?} and {b:?} do not broadcast"
                )))
            }
        };
    }
    Ok(out)
}

/// Element strides of `shape` seen through the broadcast `out` shape (0 where broadcast).
fn bcast_strides(shape: &[usize], out: &[usize]) -> Vec<u32> {
    let r = out.len();
    let mut strides = vec![0u32; r];
    let mut s = 1usize;
    for i in (0..shape.len()).rev() {
        let o = i + r - shape.len();
        strides[o] = if shape[i] == 1 && out[o] != 1 {
            0
        } else {
            s as u32
        };
        s *= shape[i];
    }
    strides
}

/// Merges adjacent output dims where both operands stay contiguous, so that any rank that
/// reduces to [`MAX_RANK`] dims or fewer works.
fn collapse(out: &[usize], sa: &[u32], sb: &[u32]) -> (Vec<usize>, Vec<u32>, Vec<u32>) {
    let (mut d, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..out.len() {
        if out[i] == 1 {
            continue;
        }
        if let (Some(&ld), Some(&la), Some(&lb)) = (d.last(), a.last(), b.last()) {
            let ld: usize = ld;
            // previous dim (outer) can merge with this one if its stride = this stride * this dim
            let ok_a = la == sa[i] * out[i] as u32;
            let ok_b = lb == sb[i] * out[i] as u32;
            if ok_a && ok_b {
                let n = d.len();
                d[n - 1] = ld * out[i];
                a[n - 1] = sa[i];
                b[n - 1] = sb[i];
                continue;
            }
        }
        d.push(out[i]);
        a.push(sa[i]);
        b.push(sb[i]);
    }
    if d.is_empty() {
        d.push(1);
        a.push(0);
        b.push(0);
    }
    (d, a, b)
}

/// `grad` where `x > threshold`, else 0 (same shapes): the backward of `max(x, threshold)`.
pub fn grad_where_above(x: &Tensor, grad: &Tensor, threshold: f32) -> Result<Tensor> {
    if x.shape() != grad.shape() {
        return Err(Error::shape(format!(
            "grad_where_above: {:?} vs {:?}",
            x.shape(),
            grad.shape()
        )));
    }
    binary_code_with(x, grad, 7, threshold)
}

/// The backward of VQGAN+CLIP's `ClampWithGrad` (forward `clamp(x, lo, hi)`): `grad` passes
/// where `x` is inside the range, and outside it only where `grad · (x − clamp(x)) ≥ 0`,
/// i.e. where a descent step moves `x` back toward the range.
pub fn clamp_with_grad_backward(x: &Tensor, grad: &Tensor, lo: f32, hi: f32) -> Result<Tensor> {
    if x.shape() != grad.shape() {
        return Err(Error::shape(format!(
            "clamp_with_grad_backward: {:?} vs {:?}",
            x.shape(),
            grad.shape()
        )));
    }
    binary_code_full(x, grad, 9, lo, hi)
}

/// `grad · d(θ²/2)/dx` for `x = cos θ` (same shapes): the backward of
/// [`UnaryOp::HalfSquaredAngle`], `−grad · θ / sin θ`, which tends to `−grad` as `θ → 0`.
pub fn half_squared_angle_backward(x: &Tensor, grad: &Tensor) -> Result<Tensor> {
    if x.shape() != grad.shape() {
        return Err(Error::shape(format!(
            "half_squared_angle_backward: {:?} vs {:?}",
            x.shape(),
            grad.shape()
        )));
    }
    binary_code(x, grad, 8)
}

/// `op(a, b)` with NumPy broadcasting.
pub fn binary(a: &Tensor, b: &Tensor, op: BinaryOp) -> Result<Tensor> {
    binary_code(a, b, op as u32)
}

fn binary_code(a: &Tensor, b: &Tensor, code: u32) -> Result<Tensor> {
    binary_code_with(a, b, code, 0.0)
}

fn binary_code_with(a: &Tensor, b: &Tensor, code: u32, alpha: f32) -> Result<Tensor> {
    binary_code_full(a, b, code, alpha, 0.0)
}

fn binary_code_full(a: &Tensor, b: &Tensor, code: u32, alpha: f32, beta: f32) -> Result<Tensor> {
    a.expect_f32("binary op input")?;
    b.expect_f32("binary op input")?;
    let out = broadcast_shape(a.shape(), b.shape())?;
    let y = Tensor::empty(a.gpu(), &out, DType::F32)?;
    let n = y.numel();
    if n == 0 {
        return Ok(y);
    }
    let (dims, sa, sb) = collapse(
        &out,
        &bcast_strides(a.shape(), &out),
        &bcast_strides(b.shape(), &out),
    );
    if dims.len() > MAX_RANK {
        return Err(Error::shape(format!(
            "broadcast of {:?} and {:?} needs more than {MAX_RANK} dims",
            a.shape(),
            b.shape()
        )));
    }
    let mut p = Params {
        n: n as u32,
        rank: dims.len() as u32,
        alpha,
        beta,
        out_dims: [1; MAX_RANK],
        a_strides: [0; MAX_RANK],
        b_strides: [0; MAX_RANK],
    };
    for i in 0..dims.len() {
        p.out_dims[i] = dims[i] as u32;
        p.a_strides[i] = sa[i];
        p.b_strides[i] = sb[i];
    }
    let k = Kernel::new(&SHADER, "binary")
        .with(ov::OP, code)
        .with(ov::WG, WG);
    a.gpu().dispatch(
        &k,
        &p,
        &[a.binding(), b.binding(), y.binding()],
        grid_1d((n as u32).div_ceil(WG)),
    );
    Ok(y)
}

/// `a + b` (broadcasting).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Add)
}
/// `a * b` (broadcasting).
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(a, b, BinaryOp::Mul)
}
/// `x * s`.
pub fn scale(x: &Tensor, s: f32) -> Result<Tensor> {
    unary(
        x,
        UnaryOp::Affine {
            scale: s,
            shift: 0.0,
        },
    )
}

/// Backward of [`add`]'s `y = a + b`: `da = g`, `db = g`, each summed over the leading dims
/// it was broadcast along ([`super::reduce::sum_leading`]). `g` has `y`'s shape; `a_shape`
/// and `b_shape` are the operands'. `need` says which of `(da, db)` to compute.
pub fn add_backward(
    g: &Tensor,
    a_shape: &[usize],
    b_shape: &[usize],
    need: [bool; 2],
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    use super::reduce::sum_leading;
    Ok((
        need[0].then(|| sum_leading(g, a_shape)).transpose()?,
        need[1].then(|| sum_leading(g, b_shape)).transpose()?,
    ))
}

/// Backward of `y = a − b` ([`binary`] with [`BinaryOp::Sub`]): `da = g`, `db = −g`, summed
/// over broadcast dims as in [`add_backward`].
pub fn sub_backward(
    g: &Tensor,
    a_shape: &[usize],
    b_shape: &[usize],
    need: [bool; 2],
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    use super::reduce::sum_leading;
    let db = need[1]
        .then(|| scale(&sum_leading(g, b_shape)?, -1.0))
        .transpose()?;
    Ok((need[0].then(|| sum_leading(g, a_shape)).transpose()?, db))
}

/// Backward of [`mul`]'s `y = a ⊙ b`: `da = g ⊙ b`, `db = g ⊙ a`, summed over broadcast
/// dims as in [`add_backward`]. `a`, `b` are the forward's operands, `g` has `y`'s shape.
pub fn mul_backward(
    a: &Tensor,
    b: &Tensor,
    g: &Tensor,
    need: [bool; 2],
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    use super::reduce::sum_leading;
    let da = need[0]
        .then(|| sum_leading(&mul(g, b)?, a.shape()))
        .transpose()?;
    let db = need[1]
        .then(|| sum_leading(&mul(g, a)?, b.shape()))
        .transpose()?;
    Ok((da, db))
}

/// Backward of `y = x·scale + shift` ([`UnaryOp::Affine`]): `dx = scale · g` (any shape).
pub fn affine_backward(g: &Tensor, s: f32) -> Result<Tensor> {
    scale(g, s)
}

/// Backward of `y = x²` ([`UnaryOp::Square`]): `dx = 2 · x ⊙ g`; `x` and `g` share a shape.
pub fn square_backward(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    scale(&mul(g, x)?, 2.0)
}

/// Backward of `y = eˣ` ([`UnaryOp::Exp`]): `dx = g ⊙ y`, from the forward's output `y`.
pub fn exp_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    mul(g, y)
}

/// Backward of `y = x · s` for a one-element `s` (`[1]` or `[]`, a learned temperature),
/// forward `mul(x, s.reshape([1]))`: `dx = g · s`, `ds = Σ g ⊙ x` in `s`'s shape. `x` and
/// `g` share a shape. `need` says which of `(dx, ds)` to compute.
pub fn mul_scalar_backward(
    x: &Tensor,
    s: &Tensor,
    g: &Tensor,
    need: [bool; 2],
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let dx = need[0].then(|| mul(g, &s.reshape(&[1])?)).transpose()?;
    let ds = need[1]
        .then(|| super::reduce::sum_all(&mul(g, x)?)?.reshape(s.shape()))
        .transpose()?;
    Ok((dx, ds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{assert_close, gpu, rand_vec};

    #[test]
    fn unary_ops_match_reference() {
        let g = gpu();
        let ops = [
            UnaryOp::Act(Act::None),
            UnaryOp::Act(Act::Gelu),
            UnaryOp::Act(Act::QuickGelu),
            UnaryOp::Act(Act::Silu),
            UnaryOp::Act(Act::Sigmoid),
            UnaryOp::Act(Act::Relu),
            UnaryOp::Act(Act::GeluTanh),
            UnaryOp::Affine {
                scale: -2.5,
                shift: 0.25,
            },
            UnaryOp::Clamp { lo: -0.3, hi: 0.7 },
            UnaryOp::Exp,
            UnaryOp::Square,
            UnaryOp::Abs,
            UnaryOp::Tanh,
        ];
        // cos θ lives in [-1, 1]; acos' error near ±1 is amplified, so test away from the ends
        // and at them separately.
        let xs: Vec<f32> = rand_vec(999, 77)
            .iter()
            .map(|v| v * 0.999)
            .chain([1.0, -1.0, 1.5])
            .collect();
        let x = Tensor::from_slice(&g, &xs, &[xs.len()]).unwrap();
        let got = unary(&x, UnaryOp::HalfSquaredAngle)
            .unwrap()
            .to_vec()
            .unwrap();
        let want: Vec<f64> = xs
            .iter()
            .map(|&v| UnaryOp::HalfSquaredAngle.reference(v as f64))
            .collect();
        assert_close(&got, &want, 1e-4, 1e-4, "HalfSquaredAngle");
        for (i, &op) in ops.iter().enumerate() {
            for n in [1usize, 3, 17, 65, 1000, 4099] {
                let mut xv = rand_vec(n, (i * 100 + n) as u64);
                for v in xv.iter_mut() {
                    *v *= 6.0;
                }
                let x = Tensor::from_slice(&g, &xv, &[n]).unwrap();
                let got = unary(&x, op).unwrap().to_vec().unwrap();
                let want: Vec<f64> = xv.iter().map(|&v| op.reference(v as f64)).collect();
                assert_close(&got, &want, 2e-6, 2e-6, &format!("{op:?} n={n}"));
            }
        }
        // Positive-domain ops.
        for op in [
            UnaryOp::Log,
            UnaryOp::Sqrt,
            UnaryOp::Rsqrt,
            UnaryOp::Recip,
            UnaryOp::Pow(1.7),
        ] {
            let xv: Vec<f32> = rand_vec(333, 9)
                .iter()
                .map(|v| v.abs() * 4.0 + 0.05)
                .collect();
            let x = Tensor::from_slice(&g, &xv, &[333]).unwrap();
            let got = unary(&x, op).unwrap().to_vec().unwrap();
            let want: Vec<f64> = xv.iter().map(|&v| op.reference(v as f64)).collect();
            assert_close(&got, &want, 1e-6, 4e-6, &format!("{op:?}"));
        }
    }

    fn cpu_binary(av: &[f32], ash: &[usize], bv: &[f32], bsh: &[usize], op: BinaryOp) -> Vec<f64> {
        let out = broadcast_shape(ash, bsh).unwrap();
        let (sa, sb) = (bcast_strides(ash, &out), bcast_strides(bsh, &out));
        let n: usize = out.iter().product();
        (0..n)
            .map(|i| {
                let (mut rem, mut ia, mut ib) = (i, 0usize, 0usize);
                for d in (0..out.len()).rev() {
                    let c = rem % out[d];
                    rem /= out[d];
                    ia += c * sa[d] as usize;
                    ib += c * sb[d] as usize;
                }
                op.reference(av[ia] as f64, bv[ib] as f64)
            })
            .collect()
    }

    #[test]
    fn binary_broadcasting_matches_reference() {
        let g = gpu();
        let cases: &[(&[usize], &[usize])] = &[
            (&[7], &[7]),
            (&[1], &[1000]),
            (&[3, 17], &[17]),
            (&[3, 17], &[3, 1]),
            (&[2, 1, 5], &[1, 4, 1]),
            (&[2, 3, 4, 5, 6, 7], &[1, 3, 1, 5, 1, 7]),
            (&[2, 3, 1, 1, 1, 1, 1, 4, 5], &[1, 3, 1, 1, 1, 1, 1, 4, 1]),
            (&[65, 1, 3], &[65, 17, 1]),
        ];
        let ops = [
            BinaryOp::Add,
            BinaryOp::Sub,
            BinaryOp::Mul,
            BinaryOp::Max,
            BinaryOp::Min,
            BinaryOp::SquaredDiff,
        ];
        for (ci, (ash, bsh)) in cases.iter().enumerate() {
            for &op in &ops {
                let av = rand_vec(ash.iter().product(), ci as u64);
                let bv = rand_vec(bsh.iter().product(), ci as u64 + 50);
                let a = Tensor::from_slice(&g, &av, ash).unwrap();
                let b = Tensor::from_slice(&g, &bv, bsh).unwrap();
                let y = binary(&a, &b, op).unwrap();
                assert_eq!(y.shape(), broadcast_shape(ash, bsh).unwrap().as_slice());
                let want = cpu_binary(&av, ash, &bv, bsh, op);
                assert_close(
                    &y.to_vec().unwrap(),
                    &want,
                    1e-6,
                    1e-6,
                    &format!("{op:?} {ash:?} {bsh:?}"),
                );
            }
        }
        // Division away from zero.
        let av = rand_vec(100, 1);
        let bv: Vec<f32> = rand_vec(10, 2)
            .iter()
            .map(|v| v.signum() * (v.abs() + 0.5))
            .collect();
        let a = Tensor::from_slice(&g, &av, &[10, 10]).unwrap();
        let b = Tensor::from_slice(&g, &bv, &[10]).unwrap();
        let want = cpu_binary(&av, &[10, 10], &bv, &[10], BinaryOp::Div);
        assert_close(
            &binary(&a, &b, BinaryOp::Div).unwrap().to_vec().unwrap(),
            &want,
            1e-6,
            1e-6,
            "div",
        );
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let g = gpu();
        let a = Tensor::zeros(&g, &[3, 4]).unwrap();
        let b = Tensor::zeros(&g, &[5]).unwrap();
        let e = add(&a, &b).unwrap_err().to_string();
        assert!(e.contains("do not broadcast"), "{e}");
        // Nine dims that alternate broadcast sides cannot be merged into eight.
        let a = Tensor::zeros(&g, &[2, 1, 2, 1, 2, 1, 2, 1, 2]).unwrap();
        let b = Tensor::zeros(&g, &[1, 2, 1, 2, 1, 2, 1, 2, 1]).unwrap();
        let e = add(&a, &b).unwrap_err().to_string();
        assert!(e.contains("more than 8 dims"), "{e}");
    }

    #[test]
    fn more_than_65535_workgroups() {
        // 17M elements = 66,407 workgroups of 256: folded into a 2-D grid.
        let g = gpu();
        let n = 17_000_000usize;
        let xv: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
        let x = Tensor::from_slice(&g, &xv, &[n]).unwrap();
        let y = unary(
            &x,
            UnaryOp::Affine {
                scale: 2.0,
                shift: 1.0,
            },
        )
        .unwrap()
        .to_vec()
        .unwrap();
        for i in (0..n).step_by(997).chain([n - 1]) {
            assert_eq!(y[i], xv[i] * 2.0 + 1.0, "element {i}");
        }
        let z = add(&x, &x).unwrap().to_vec().unwrap();
        assert_eq!(z[n - 1], 2.0 * xv[n - 1]);
    }

    #[test]
    fn empty_tensors_pass_through() {
        let g = gpu();
        let x = Tensor::zeros(&g, &[0, 5]).unwrap();
        assert_eq!(unary(&x, UnaryOp::Exp).unwrap().shape(), &[0, 5]);
        let b = Tensor::zeros(&g, &[5]).unwrap();
        assert_eq!(add(&x, &b).unwrap().shape(), &[0, 5]);
    }
}
