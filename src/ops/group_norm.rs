//! GroupNorm with an optional fused activation (`shaders/group_norm.wgsl`), as
//! `torch.nn.GroupNorm` (taming-transformers' `Normalize` is `GroupNorm(32, C, eps=1e-6)`,
//! usually followed by swish: pass [`Act::Silu`]).

use super::Act;
use crate::gpu::{grid_1d, Kernel, Shader};
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};

/// The `override` constants the kernels below set.
mod ov {
    use crate::gpu::Override;
    pub(super) const VEC: Override<bool> = Override::new("VEC");
    pub(super) const SQ: Override<bool> = Override::new("SQ");
    pub(super) const WG: Override<u32> = Override::new("WG");
    pub(super) const HAS_GAMMA: Override<bool> = Override::new("HAS_GAMMA");
    pub(super) const HAS_BETA: Override<bool> = Override::new("HAS_BETA");
    pub(super) const ACT: Override<u32> = Override::new("ACT");
}

pub(crate) static SHADER: Shader<Params> = crate::shader!(
    "group_norm",
    "grid",
    "act",
    overrides = [
        ov::VEC,
        ov::SQ,
        ov::WG,
        ov::HAS_GAMMA,
        ov::HAS_BETA,
        ov::ACT
    ]
);
const WG: u32 = 64;
/// Most units (vec4s, or single values) one partial-sum invocation adds up.
const UNITS_PER_PART: usize = 1024;

crate::shader_params! {
    /// Mirrors `struct Params` in `shaders/group_norm.wgsl`.
    pub(crate) struct Params {
        groups_total: u32,
        g: u32,
        cpg: u32,
        s: u32,
        m: u32,
        parts: u32,
        stats: u32,
        eps: f32,
        units: u32,
        _pad: [u32; 3],
    }
}

/// Units per group (vec4s when `S % 4 == 0`) and the number of partial sums per group.
fn plan(m: usize, s: usize) -> (usize, usize) {
    let units = if s.is_multiple_of(4) { m / 4 } else { m };
    (units, units.div_ceil(UNITS_PER_PART).max(1))
}

/// Terms in the longest chain of f32 additions behind one group's statistics: the longest
/// partial (units, 4 lanes each when vectorised, then the 4 lanes) plus the sum of the
/// partials. Tests derive their tolerance from it.
pub fn summation_depth(m: usize, s: usize) -> usize {
    let (units, parts) = plan(m, s);
    units.div_ceil(parts) + 4 + parts
}

/// The two-pass group statistics of `x` (`[N, C, ..]`, checked by the caller): a work
/// buffer holding the partial sums and then `(mean, rstd)` per group at `p.stats`, followed
/// by `extra` more values; the params of the passes and whether they run on vec4 units.
fn statistics(x: &Tensor, groups: usize, eps: f32, extra: usize) -> Result<(Tensor, Params, bool)> {
    let gpu = x.gpu();
    let (n, c) = (x.dim(0), x.dim(1));
    let s: usize = x.shape()[2..].iter().product();
    let cpg = c / groups;
    let m = cpg * s;
    let vec = s.is_multiple_of(4);
    let (_, parts) = plan(m, s);
    let ng = n * groups;
    let total_units = if vec { x.numel() / 4 } else { x.numel() };
    if ng * parts + 2 * ng + extra > u32::MAX as usize || x.numel() > u32::MAX as usize - 4 {
        return Err(Error::shape(format!(
            "group_norm input {:?} is too large",
            x.shape()
        )));
    }
    let work = Tensor::empty(gpu, &[ng * parts + 2 * ng + extra], DType::F32)?;
    let p = Params {
        groups_total: ng as u32,
        g: groups as u32,
        cpg: cpg as u32,
        s: s as u32,
        m: m as u32,
        parts: parts as u32,
        stats: (ng * parts) as u32,
        eps,
        units: total_units as u32,
        _pad: [0; 3],
    };
    let k = |entry, sq: bool| {
        Kernel::new(&SHADER, entry)
            .with(ov::VEC, vec)
            .with(ov::SQ, sq)
            .with(ov::WG, WG)
    };
    let sum_groups = grid_1d(((ng * parts) as u32).div_ceil(WG));
    let stat_groups = grid_1d((ng as u32).div_ceil(WG));
    for sq in [false, true] {
        gpu.dispatch(
            &k("gn_sum", sq),
            &p,
            &[work.binding(), x.binding_vec4()],
            sum_groups,
        );
        gpu.dispatch(&k("gn_stats", sq), &p, &[work.binding()], stat_groups);
    }
    Ok((work, p, vec))
}

/// `act(GroupNorm(x))`. `x`: `[N, C, ..]` (e.g. `[N, C, H, W]` or `[N, C, L]`);
/// `gamma`, `beta`: `[C]`; `groups` must divide C. Returns `x`'s shape.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f32,
    act: Act,
) -> Result<Tensor> {
    x.expect_f32("group_norm input")?;
    if x.rank() < 2 {
        return Err(Error::shape(format!(
            "group_norm needs [N, C, ..], got {:?}",
            x.shape()
        )));
    }
    let c = x.dim(1);
    if groups == 0 || !c.is_multiple_of(groups) {
        return Err(Error::shape(format!(
            "group_norm: {groups} groups do not divide the {c} channels of {:?}",
            x.shape()
        )));
    }
    for (name, t) in [("gamma", gamma), ("beta", beta)] {
        if let Some(t) = t {
            t.expect_f32(name)?;
            if t.numel() != c {
                return Err(Error::shape(format!(
                    "group_norm {name} has shape {:?} but the input {:?} has C = {c}",
                    t.shape(),
                    x.shape()
                )));
            }
        }
    }
    if eps.is_nan() || eps < 0.0 {
        return Err(Error::invalid(format!(
            "group_norm eps must be >= 0, got {eps}"
        )));
    }
    let gpu = x.gpu();
    let y = Tensor::empty(gpu, x.shape(), DType::F32)?;
    if y.numel() == 0 {
        return Ok(y);
    }
    let (work, p, vec) = statistics(x, groups, eps, 0)?;
    let total_units = p.units as usize;
    let k = |entry, sq: bool| {
        Kernel::new(&SHADER, entry)
            .with(ov::VEC, vec)
            .with(ov::SQ, sq)
            .with(ov::WG, WG)
    };
    let apply = k("gn_apply", false)
        .with(ov::HAS_GAMMA, gamma.is_some())
        .with(ov::HAS_BETA, beta.is_some())
        .with(ov::ACT, act as u32);
    gpu.dispatch(
        &apply,
        &p,
        &[
            work.binding(),
            x.binding_vec4(),
            gamma.map_or(gpu.unused_binding(), Tensor::binding),
            beta.map_or(gpu.unused_binding(), Tensor::binding),
            y.binding_vec4(),
        ],
        grid_1d((total_units as u32).div_ceil(WG)),
    );
    Ok(y)
}

/// Input gradient of [`group_norm`] with its activation, `y = act(x̂·γ + β)`, `x̂ = (x − μ)·r`,
/// in five passes over the groups and none through broadcast temporaries
/// (`shaders/group_norm.wgsl`, `gnb_*`): the statistics again, then with
/// `t = g·act'(x̂·γ + β)·γ` per group `a = mean(t)`, `b = mean(t·x̂)` and
/// `dx = r·(t − a − x̂·b)` (the derivative of the normalisation, as in
/// [`group_norm_backward`], after the activation's chain rule). For frozen `γ` and `β`
/// (VQGAN+CLIP's latent optimisation): no parameter gradients. `x` and `g` are `[N, C, ..]`;
/// `gamma`, `beta` `[C]`.
pub fn group_norm_act_backward(
    x: &Tensor,
    groups: usize,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f32,
    act: Act,
    g: &Tensor,
) -> Result<Tensor> {
    if g.shape() != x.shape() {
        return Err(Error::shape(format!(
            "group_norm backward: gradient {:?} does not match the input {:?}",
            g.shape(),
            x.shape()
        )));
    }
    g.expect_f32("group_norm gradient")?;
    // The forward's checks: shape, groups, gamma/beta sizes, eps.
    let (n, c) = (x.dim(0), x.dim(1));
    if x.rank() < 2 || groups == 0 || !c.is_multiple_of(groups) {
        return Err(Error::shape(format!(
            "group_norm backward: {groups} groups for input {:?}",
            x.shape()
        )));
    }
    for t in [gamma, beta].into_iter().flatten() {
        if t.numel() != c {
            return Err(Error::shape(format!(
                "group_norm backward: parameter {:?} for C = {c}",
                t.shape()
            )));
        }
    }
    let gpu = x.gpu();
    let dx = Tensor::empty(gpu, x.shape(), DType::F32)?;
    if dx.numel() == 0 {
        return Ok(dx);
    }
    let ng = n * groups;
    let (_, parts) = plan(x.numel() / ng, x.numel() / (n * c));
    let (work, p, _) = statistics(x, groups, eps, 2 * ng * parts + 2 * ng)?;
    let k = |entry| {
        Kernel::new(&SHADER, entry)
            .with(ov::WG, WG)
            .with(ov::HAS_GAMMA, gamma.is_some())
            .with(ov::HAS_BETA, beta.is_some())
            .with(ov::ACT, act as u32)
    };
    let (gb, bb) = (
        gamma.map_or(gpu.unused_binding(), Tensor::binding),
        beta.map_or(gpu.unused_binding(), Tensor::binding),
    );
    gpu.dispatch(
        &k("gnb_sum"),
        &p,
        &[work.binding(), x.binding_vec4(), gb, bb, g.binding_vec4()],
        grid_1d(((ng * parts) as u32).div_ceil(WG)),
    );
    gpu.dispatch(
        &k("gnb_stats"),
        &p,
        &[work.binding()],
        grid_1d((ng as u32).div_ceil(WG)),
    );
    let (gb, bb) = (
        gamma.map_or(gpu.unused_binding(), Tensor::binding),
        beta.map_or(gpu.unused_binding(), Tensor::binding),
    );
    gpu.dispatch(
        &k("gnb_apply"),
        &p,
        &[
            work.binding(),
            x.binding_vec4(),
            gb,
            bb,
            g.binding_vec4(),
            dx.binding_vec4(),
        ],
        grid_1d((x.numel() as u32).div_ceil(WG)),
    );
    Ok(dx)
}

/// Backward of [`group_norm`]'s `y = (x − μ)·r·γ + β` with `Act::None` (an activation is
/// its own tape node), composed from elementwise ops and row sums. Per group of
/// `L = C/G·S` values: `x̂ = (x − μ)·r`, and with `t = g·γ`:
/// `dx = r·(t − mean(t) − x̂·mean(t·x̂))`, `dγ = Σ_{n,s} g·x̂`, `dβ = Σ_{n,s} g`.
/// `x` and `g` are `[N, C, ..]`, `gamma` is `[C]`. Returns `(dx, dγ, dβ)`; `dγ` and `dβ`
/// only when `params` is true (latent optimisation needs `dx` alone, and the parameter sums
/// are a fifth of the work).
pub fn group_norm_backward(
    x: &Tensor,
    groups: usize,
    gamma: &Tensor,
    g: &Tensor,
    eps: f32,
    params: bool,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    use super::elementwise::{self, BinaryOp, UnaryOp};
    use super::reduce::{row_sum, sum_leading};
    let (n, c) = (x.dim(0), x.dim(1));
    let s = x.numel() / (n * c).max(1);
    let l = c / groups * s;
    let rows = n * groups;
    let inv_l = 1.0 / l as f32;
    let xg = x.reshape(&[rows, l])?;
    let mean = elementwise::scale(&row_sum(&xg)?, inv_l)?;
    let xc = elementwise::binary(&xg, &mean, BinaryOp::Sub)?;
    let var = elementwise::scale(&row_sum(&elementwise::unary(&xc, UnaryOp::Square)?)?, inv_l)?;
    let r = elementwise::unary(
        &elementwise::unary(
            &var,
            UnaryOp::Affine {
                scale: 1.0,
                shift: eps,
            },
        )?,
        UnaryOp::Rsqrt,
    )?;
    let xhat = elementwise::mul(&xc, &r)?; // [rows, L]
    let t =
        elementwise::mul(&g.reshape(&[n, c, s])?, &gamma.reshape(&[c, 1])?)?.reshape(&[rows, l])?;
    let a = elementwise::scale(&row_sum(&t)?, inv_l)?;
    let b = elementwise::scale(&row_sum(&elementwise::mul(&t, &xhat)?)?, inv_l)?;
    let inner = elementwise::binary(
        &elementwise::binary(&t, &a, BinaryOp::Sub)?,
        &elementwise::mul(&xhat, &b)?,
        BinaryOp::Sub,
    )?;
    let dx = elementwise::mul(&inner, &r)?.reshape(x.shape())?;
    if !params {
        return Ok((dx, None, None));
    }
    // Per-channel sums over the batch and spatial positions.
    let per_channel = |m: &Tensor| -> Result<Tensor> {
        let rs = row_sum(&m.reshape(&[n * c, s])?)?; // [N·C, 1]
        sum_leading(&rs.reshape(&[n, c])?, &[c])
    };
    let gx = elementwise::mul(&g.reshape(&[rows, l])?, &xhat)?;
    Ok((dx, Some(per_channel(&gx)?), Some(per_channel(g)?)))
}

/// CPU reference in f64 on `[n, c, s]` row-major data.
/// Inputs are f32 (the kernel tests) or f64 (the autodiff tests' finite differences).
#[allow(clippy::too_many_arguments)]
pub fn reference<T: Copy + Into<f64>>(
    x: &[T],
    n: usize,
    c: usize,
    s: usize,
    groups: usize,
    gamma: Option<&[T]>,
    beta: Option<&[T]>,
    eps: f32,
    act: Act,
) -> Vec<f64> {
    let m = c / groups * s;
    let mut out = Vec::with_capacity(x.len());
    for (gi, grp) in x.chunks(m).enumerate().take(n * groups) {
        let mean = grp.iter().map(|&v| v.into()).sum::<f64>() / m as f64;
        let var = grp.iter().map(|&v| (v.into() - mean).powi(2)).sum::<f64>() / m as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for (i, &v) in grp.iter().enumerate() {
            let ch = (gi % groups) * (c / groups) + i / s;
            let g = gamma.map_or(1.0, |g| g[ch].into());
            let b = beta.map_or(0.0, |b| b[ch].into());
            out.push(act.reference((v.into() - mean) * rstd * g + b));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};

    /// As for layer_norm: the statistics come from chains of at most L =
    /// [`summation_depth`] f32 additions, so x̂ is off by about L·ε·κ·(|x̂| + 1) with
    /// κ = max|x| / σ of the group; the affine step and the activation (1.13-Lipschitz at
    /// most, its own error ~2e-6 relative for erf-based GELU, ~1e-7 otherwise) follow. Bound:
    /// 1.2·(4·L·ε·κ·(|x̂·γ| + |γ|) + 2ε|β|) + 2e-6·(1 + |y|).
    #[allow(clippy::too_many_arguments)]
    fn check(shape: &[usize], groups: usize, affine: bool, act: Act, offset: f32, seed: u64) {
        let g = gpu();
        let (n, c) = (shape[0], shape[1]);
        let s: usize = shape[2..].iter().product();
        let numel = n * c * s;
        let xv: Vec<f32> = rand_vec(numel, seed)
            .iter()
            .map(|v| v * 2.0 + offset)
            .collect();
        let gv = rand_vec(c, seed + 1);
        let bv = rand_vec(c, seed + 2);
        let x = Tensor::from_slice(&g, &xv, shape).unwrap();
        let gt = Tensor::from_slice(&g, &gv, &[c]).unwrap();
        let bt = Tensor::from_slice(&g, &bv, &[c]).unwrap();
        let y = group_norm(
            &x,
            groups,
            affine.then_some(&gt),
            affine.then_some(&bt),
            1e-6,
            act,
        )
        .unwrap();
        assert_eq!(y.shape(), shape);
        let got = y.to_vec().unwrap();
        let (gs, bs) = (affine.then_some(&gv[..]), affine.then_some(&bv[..]));
        let want = reference(&xv, n, c, s, groups, gs, bs, 1e-6, act);
        let plain = reference(&xv, n, c, s, groups, None, None, 1e-6, Act::None);
        let m = c / groups * s;
        let depth = summation_depth(m, s) as f64;
        let e = f32::EPSILON as f64;
        let kappa: Vec<f64> = xv
            .chunks(m)
            .map(|grp| {
                let mu = grp.iter().map(|&v| v as f64).sum::<f64>() / m as f64;
                let var = grp.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / m as f64;
                let amax = grp.iter().fold(0.0f64, |a, &v| a.max((v as f64).abs()));
                (amax / (var + 1e-6).sqrt()).max(1.0)
            })
            .collect();
        for i in 0..numel {
            let ch = (i / s) % c;
            let gi = if affine { gv[ch].abs() as f64 } else { 1.0 };
            let bi = if affine { bv[ch].abs() as f64 } else { 0.0 };
            let tol = 1.2
                * (4.0 * depth * e * kappa[i / m] * (plain[i].abs() * gi + gi) + 2.0 * e * bi)
                + 2e-6 * (1.0 + want[i].abs());
            let err = (got[i] as f64 - want[i]).abs();
            assert!(
                err <= tol,
                "{shape:?} groups {groups} affine {affine} {act:?}: element {i} got {} want {} \
                 (err {err:e} > tol {tol:e})",
                got[i],
                want[i]
            );
        }
    }

    #[test]
    fn matches_reference_over_shapes() {
        let cases: &[(&[usize], usize)] = &[
            (&[1, 1], 1),
            (&[1, 3, 1], 3),
            (&[2, 4, 3, 5], 2),
            (&[1, 32, 4, 4], 32),
            (&[2, 64, 8, 8], 32),
            (&[1, 6, 17], 3),
            (&[3, 12, 65], 4),
            (&[1, 128, 16, 16], 32),
            (&[1, 4, 1031], 1),
            (&[2, 8, 1000], 2),
        ];
        let mut seed = 0;
        for &(shape, groups) in cases {
            for (affine, act) in [(true, Act::Silu), (true, Act::None), (false, Act::None)] {
                seed += 10;
                check(shape, groups, affine, act, 0.0, seed);
            }
        }
        check(&[1, 8, 9, 9], 4, true, Act::Gelu, 0.0, 500);
        check(&[1, 8, 12, 12], 2, true, Act::None, 50.0, 510);
        check(&[1, 8, 7, 7], 2, true, Act::None, 50.0, 520);
    }

    #[test]
    fn large_groups() {
        // 16 channels of 256×256 per group: 1M values per group, 256 partials of 1,024 vec4s.
        check(&[1, 64, 256, 256], 4, true, Act::Silu, 0.5, 600);
        // No vec4 path: S = 65,537, one group of 131k values.
        check(&[1, 2, 65_537], 1, true, Act::None, 0.0, 610);
    }

    #[test]
    fn more_than_65535_workgroups() {
        // 140,000 small groups; then 4.5M values in the scalar path, whose apply pass needs
        // 70,313 workgroups of 64.
        check(&[70_000, 2, 2], 2, true, Act::None, 0.0, 700);
        check(&[1, 2, 2_250_001], 2, true, Act::None, 0.0, 710);
    }

    /// dx of `Σ w ⊙ act(GroupNorm(x)·γ + β)` from [`group_norm_act_backward`] against
    /// central differences of the f64 reference.
    fn check_act_backward(shape: &[usize], groups: usize, affine: bool, act: Act, seed: u64) {
        let g = gpu();
        let (n, c) = (shape[0], shape[1]);
        let s: usize = shape[2..].iter().product();
        let numel = n * c * s;
        let xv: Vec<f32> = rand_vec(numel, seed)
            .iter()
            .map(|v| v * 2.0 + 0.3)
            .collect();
        let gv: Vec<f32> = rand_vec(c, seed + 1).iter().map(|v| v + 1.0).collect();
        let bv = rand_vec(c, seed + 2);
        let wv = rand_vec(numel, seed + 3);
        let x = Tensor::from_slice(&g, &xv, shape).unwrap();
        let gt = Tensor::from_slice(&g, &gv, &[c]).unwrap();
        let bt = Tensor::from_slice(&g, &bv, &[c]).unwrap();
        let dy = Tensor::from_slice(&g, &wv, shape).unwrap();
        let (ga, ba) = (affine.then_some(&gt), affine.then_some(&bt));
        let got = group_norm_act_backward(&x, groups, ga, ba, 1e-6, act, &dy)
            .unwrap()
            .to_vec()
            .unwrap();
        let g64: Vec<f64> = gv.iter().map(|&v| v as f64).collect();
        let b64: Vec<f64> = bv.iter().map(|&v| v as f64).collect();
        let f = |xs: &[f64]| -> f64 {
            let (gs, bs) = (affine.then_some(&g64[..]), affine.then_some(&b64[..]));
            reference(xs, n, c, s, groups, gs, bs, 1e-6, act)
                .iter()
                .zip(&wv)
                .map(|(y, &w)| y * w as f64)
                .sum()
        };
        let mut xs: Vec<f64> = xv.iter().map(|&v| v as f64).collect();
        let h = 1e-5;
        for i in 0..numel {
            let x0 = xs[i];
            xs[i] = x0 + h;
            let up = f(&xs);
            xs[i] = x0 - h;
            let down = f(&xs);
            xs[i] = x0;
            let want = (up - down) / (2.0 * h);
            let err = (got[i] as f64 - want).abs();
            assert!(
                err <= 1e-4 + 1e-3 * want.abs(),
                "{shape:?} groups {groups} affine {affine} {act:?}: dx[{i}] {} vs {want}",
                got[i]
            );
        }
    }

    #[test]
    fn fused_backward_matches_finite_differences() {
        let mut seed = 800;
        for &(shape, groups) in &[
            (&[2usize, 4, 3, 2][..], 2),
            (&[1, 6, 5][..], 3),
            (&[1, 8, 4, 4][..], 4),
            (&[2, 3, 1, 1][..], 1),
        ] {
            for (affine, act) in [(true, Act::Silu), (true, Act::None), (false, Act::Gelu)] {
                seed += 10;
                check_act_backward(shape, groups, affine, act, seed);
            }
        }
        // A group of 8,192 values: two interleaved partial sums (1,024 vec4 units each).
        check_act_backward(&[1, 2, 64, 64], 1, true, Act::Silu, 900);
    }

    #[test]
    fn bad_arguments_are_reported() {
        let g = gpu();
        let x = Tensor::zeros(&g, &[1, 6, 4]).unwrap();
        let e = group_norm(&x, 4, None, None, 1e-6, Act::None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("do not divide"), "{e}");
        let gm = Tensor::zeros(&g, &[5]).unwrap();
        let e = group_norm(&x, 3, Some(&gm), None, 1e-6, Act::None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gamma") && e.contains("C = 6"), "{e}");
        let e = group_norm(&x, 3, None, None, -1.0, Act::None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("eps"), "{e}");
        let v = Tensor::zeros(&g, &[6]).unwrap();
        let e = group_norm(&v, 3, None, None, 1e-6, Act::None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[N, C, ..]"), "{e}");
    }
}
