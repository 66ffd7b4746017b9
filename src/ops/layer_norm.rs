//! LayerNorm over the last axis (`shaders/layer_norm.wgsl`), as `torch.nn.LayerNorm`:
//! biased variance, two-pass statistics, optional affine `gamma`/`beta`.

use super::{Strategy, CPU_LOOP_LIMIT};
use crate::gpu::{grid_1d, Kernel, Shader};
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};

static SHADER: Shader = crate::shader!("layer_norm");
/// Rows per workgroup of the one-invocation-per-row variant.
const ROWS_WG: u32 = 16;

/// Mirrors `struct Params` in `shaders/layer_norm.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    c: u32,
    eps: f32,
    _pad: u32,
}

/// `(x - mean) / sqrt(var + eps) * gamma + beta` over the last axis.
///
/// `x`: `[.., C]`; `gamma`, `beta`: `[C]` (or any shape of `C` elements). Returns `x`'s shape.
pub fn layer_norm(
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f32,
) -> Result<Tensor> {
    let iters = 3 * x.shape().last().map_or(0, |c| c / 4 + 3);
    layer_norm_strategy(x, gamma, beta, eps, Strategy::for_rows(x.gpu(), iters))
}

/// [`layer_norm`] with an explicit kernel strategy (tests and benches).
pub fn layer_norm_strategy(
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f32,
    s: Strategy,
) -> Result<Tensor> {
    x.expect_f32("layer_norm input")?;
    if x.rank() == 0 {
        return Err(Error::shape("layer_norm needs a tensor of rank >= 1"));
    }
    let c = x.dim(-1);
    for (name, t) in [("gamma", gamma), ("beta", beta)] {
        if let Some(t) = t {
            t.expect_f32(name)?;
            if t.numel() != c {
                return Err(Error::shape(format!(
                    "layer_norm {name} has shape {:?} but the input {:?} has C = {c}",
                    t.shape(),
                    x.shape()
                )));
            }
        }
    }
    if eps.is_nan() || eps < 0.0 {
        return Err(Error::invalid(format!(
            "layer_norm eps must be >= 0, got {eps}"
        )));
    }
    let gpu = x.gpu();
    // ln_rows runs three loops of C/4 + 3 iterations.
    if s == Strategy::Invocation && gpu.is_cpu() && 3 * (c / 4 + 3) > CPU_LOOP_LIMIT {
        return Err(Error::invalid(format!(
            "layer_norm rows of {c} values are too long for the per-invocation kernel on a \
             CPU adapter; use Strategy::Workgroup"
        )));
    }
    let y = Tensor::empty(gpu, x.shape(), DType::F32)?;
    let rows = x.numel() / c.max(1);
    if y.numel() == 0 {
        return Ok(y);
    }
    let p = Params {
        rows: rows as u32,
        c: c as u32,
        eps,
        _pad: 0,
    };
    let (entry, groups) = match s {
        Strategy::Invocation => ("ln_rows", (rows as u32).div_ceil(ROWS_WG)),
        Strategy::Workgroup => ("ln_wg", rows as u32),
    };
    let k = Kernel::new(&SHADER, entry)
        .with("HAS_GAMMA", gamma.is_some())
        .with("HAS_BETA", beta.is_some())
        .with("WG", ROWS_WG);
    gpu.dispatch(
        &k,
        &p,
        &[
            x.binding(),
            gamma.map_or(gpu.unused_binding(), Tensor::binding),
            beta.map_or(gpu.unused_binding(), Tensor::binding),
            y.binding(),
        ],
        grid_1d(groups),
    );
    Ok(y)
}

/// CPU reference in f64: `x` is `[rows, c]` row-major.
pub fn reference(
    x: &[f32],
    c: usize,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f32,
) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(c) {
        let n = c as f64;
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for (i, &v) in row.iter().enumerate() {
            let g = gamma.map_or(1.0, |g| g[i] as f64);
            let b = beta.map_or(0.0, |b| b[i] as f64);
            out.push((v as f64 - mean) * rstd * g + b);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};

    /// Checks one case. The f32 kernel sums C values, so the mean and the variance carry a
    /// relative error of about C·ε measured against max|x| (the row's scale), and x − mean
    /// loses the bits that max|x| has over the row's spread σ. With κ = max|x| / σ the
    /// normalised value is off by at most about C·ε·κ·(|x̂| + 1); the bound below is
    /// 4(C + 8)·ε·κ·(|x̂·γ| + |γ|) + 2ε|β|.
    fn check(shape: &[usize], affine: (bool, bool), offset: f32, s: Option<Strategy>, seed: u64) {
        let g = gpu();
        let c = *shape.last().unwrap();
        let n: usize = shape.iter().product();
        let xv: Vec<f32> = rand_vec(n, seed).iter().map(|v| v * 3.0 + offset).collect();
        let gv = rand_vec(c, seed + 1);
        let bv = rand_vec(c, seed + 2);
        let x = Tensor::from_slice(&g, &xv, shape).unwrap();
        let gt = Tensor::from_slice(&g, &gv, &[c]).unwrap();
        let bt = Tensor::from_slice(&g, &bv, &[c]).unwrap();
        let eps = 1e-5;
        let (gm, bt) = (affine.0.then_some(&gt), affine.1.then_some(&bt));
        let y = match s {
            Some(s) => layer_norm_strategy(&x, gm, bt, eps, s),
            None => layer_norm(&x, gm, bt, eps),
        }
        .unwrap();
        assert_eq!(y.shape(), shape);
        let got = y.to_vec().unwrap();
        let want = reference(
            &xv,
            c,
            affine.0.then_some(&gv),
            affine.1.then_some(&bv),
            eps,
        );
        let plain = reference(&xv, c, None, None, eps);
        let kappa: Vec<f64> = xv
            .chunks(c)
            .map(|row| {
                let m = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
                let var = row.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / c as f64;
                let amax = row.iter().fold(0.0f64, |a, &v| a.max((v as f64).abs()));
                (amax / (var + eps as f64).sqrt()).max(1.0)
            })
            .collect();
        let e = f32::EPSILON as f64;
        for i in 0..n {
            let gi = if affine.0 {
                gv[i % c].abs() as f64
            } else {
                1.0
            };
            let bi = if affine.1 {
                bv[i % c].abs() as f64
            } else {
                0.0
            };
            let cond = kappa[i / c];
            let tol = 4.0 * (c as f64 + 8.0) * e * cond * (plain[i].abs() * gi + gi) + 2.0 * e * bi;
            let err = (got[i] as f64 - want[i]).abs();
            assert!(
                err <= tol,
                "{s:?} {shape:?} affine {affine:?} offset {offset}: element {i} got {} want {} \
                 (err {err:e} > tol {tol:e})",
                got[i],
                want[i]
            );
        }
    }

    #[test]
    fn matches_reference_over_shapes() {
        let shapes: &[&[usize]] = &[
            &[1],
            &[3, 1],
            &[1, 3],
            &[17, 65],
            &[5, 768],
            &[1000, 17],
            &[3, 1031],
            &[2, 3, 5, 7],
            &[2, 50_000],
        ];
        let mut seed = 0;
        for s in Strategy::ALL {
            for shape in shapes {
                for affine in [(true, true), (false, false), (true, false)] {
                    seed += 10;
                    check(shape, affine, 0.0, Some(s), seed);
                }
            }
            // A large common offset: two-pass statistics keep the variance accurate.
            check(&[7, 300], (true, true), 100.0, Some(s), 999);
        }
    }

    #[test]
    fn more_than_65535_workgroups() {
        // Workgroup strategy: one workgroup per row, 70,000 rows. Invocation strategy: 16
        // rows per workgroup, 1.1M rows.
        check(
            &[70_000, 3],
            (true, true),
            0.0,
            Some(Strategy::Workgroup),
            5,
        );
        check(
            &[1_100_000, 2],
            (true, true),
            0.0,
            Some(Strategy::Invocation),
            6,
        );
    }

    #[test]
    fn long_rows_stay_within_the_cpu_loop_limit() {
        // 200k values per row: the default picks the workgroup kernel on CPU adapters, and
        // asking for the per-invocation one there is an error, not a wrong answer.
        check(
            &[2, 200_000],
            (true, true),
            0.0,
            Some(Strategy::Workgroup),
            8,
        );
        check(&[1, 200_000], (true, false), 0.0, None, 9);
        let g = gpu();
        let x = Tensor::zeros(&g, &[1, 200_000]).unwrap();
        if g.is_cpu() {
            let e = layer_norm_strategy(&x, None, None, 1e-5, Strategy::Invocation)
                .unwrap_err()
                .to_string();
            assert!(e.contains("too long"), "{e}");
        }
    }

    #[test]
    fn constant_rows_give_beta() {
        let g = gpu();
        let x = Tensor::full(&g, &[4, 9], 2.5).unwrap();
        let bv = rand_vec(9, 1);
        let b = Tensor::from_slice(&g, &bv, &[9]).unwrap();
        for s in Strategy::ALL {
            let got = layer_norm_strategy(&x, None, Some(&b), 1e-5, s)
                .unwrap()
                .to_vec()
                .unwrap();
            for (i, v) in got.iter().enumerate() {
                assert_eq!(*v, bv[i % 9], "{s:?} element {i}");
            }
        }
    }

    #[test]
    fn shape_errors_are_reported() {
        let g = gpu();
        let x = Tensor::zeros(&g, &[2, 8]).unwrap();
        let gm = Tensor::zeros(&g, &[7]).unwrap();
        let e = layer_norm(&x, Some(&gm), None, 1e-5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gamma") && e.contains("C = 8"), "{e}");
        let e = layer_norm(&x, None, Some(&gm), 1e-5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("beta"), "{e}");
        let e = layer_norm(&x, None, None, -1.0).unwrap_err().to_string();
        assert!(e.contains("eps"), "{e}");
        let z = Tensor::zeros(&g, &[0, 8]).unwrap();
        assert_eq!(layer_norm(&z, None, None, 1e-5).unwrap().shape(), &[0, 8]);
    }
}
