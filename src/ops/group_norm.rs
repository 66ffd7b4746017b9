//! GroupNorm with an optional fused activation (`shaders/group_norm.wgsl`), as
//! `torch.nn.GroupNorm` (taming-transformers' `Normalize` is `GroupNorm(32, C, eps=1e-6)`,
//! usually followed by swish: pass [`Act::Silu`]).

use super::{Act, CPU_LOOP_LIMIT};
use crate::gpu::{grid_1d, Kernel, Shader};
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};

/// The `override` constants the kernels below set.
mod ov {
    use crate::gpu::Override;
    pub(super) const VEC: Override<bool> = Override::new("VEC");
    pub(super) const BWD: Override<bool> = Override::new("BWD");
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
        ov::BWD,
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
        n: u32,
        c: u32,
        _pad: u32,
    }
}

/// Units per group (vec4s when `S % 4 == 0`) and the number of partial sums per group.
fn plan(m: usize, s: usize) -> (usize, usize) {
    let units = if s.is_multiple_of(4) { m / 4 } else { m };
    (units, units.div_ceil(UNITS_PER_PART).max(1))
}

/// Terms in the longest chain of f32 additions behind one group's statistics: the longest
/// partial (units, 4 lanes each when vectorised, then the 4 lanes) plus the merge of the
/// partials. Tests derive their tolerance from it.
pub fn summation_depth(m: usize, s: usize) -> usize {
    let (units, parts) = plan(m, s);
    units.div_ceil(parts) + 4 + parts
}

/// A group norm's per-group `(mean, rstd)` from the forward pass, kept by the tape so that
/// the backward pass does not compute them again.
#[derive(Clone)]
pub struct GroupStats {
    /// The partial pairs, then `(mean, rstd)` per group from `p.stats` on.
    work: Tensor,
    p: Params,
    vec: bool,
    shape: Vec<usize>,
}

/// The checks shared by the forward and backward entry points: `x` `[N, C, ..]`, `groups`
/// dividing C, `gamma`/`beta` `[C]`, `eps >= 0`.
fn check_args(
    what: &str,
    x: &Tensor,
    groups: usize,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f32,
) -> Result<()> {
    x.expect_f32(&format!("{what} input"))?;
    if x.rank() < 2 {
        return Err(Error::shape(format!(
            "{what} needs [N, C, ..], got {:?}",
            x.shape()
        )));
    }
    let c = x.dim(1);
    if groups == 0 || !c.is_multiple_of(groups) {
        return Err(Error::shape(format!(
            "{what}: {groups} groups do not divide the {c} channels of {:?}",
            x.shape()
        )));
    }
    super::check_affine(what, x.shape(), c, gamma, beta, eps)
}

/// Invocations of the one-dispatch kernels' workgroups (`GN_WG` in the shader).
const ONE_WG: usize = 256;

/// Whether groups of `m` values (`S = s`) can run in one workgroup each (`gn_fused`,
/// `gnb_fused`): each invocation's loops over `units / 256` stay under llvmpipe's cap.
fn one_dispatch_fits(m: usize, s: usize) -> bool {
    plan(m, s).0.div_ceil(ONE_WG) + 16 <= CPU_LOOP_LIMIT
}

/// Whether `gpu` takes the one-dispatch kernels where they fit: `VQCLIP_GROUP_NORM=one` or
/// `passes` if set, else GPUs yes (one launch per direction instead of three; not yet
/// measured on a GPU) and CPU adapters no (on lavapipe the one-dispatch kernel ran group
/// norm with swish on 128×256×256 in 60-62 ms against 44-45 ms for the three passes, whose
/// many barrier-free invocations suit it better than 32 workgroups with barriers).
fn one_dispatch_on(gpu: &crate::Gpu) -> bool {
    match super::env::GROUP_NORM.get().as_deref() {
        Some("one") => true,
        Some("passes") => false,
        _ => !gpu.is_cpu(),
    }
}

/// The params and the (empty) statistics buffer of `x` (`[N, C, ..]` with at least one
/// value, checked by the caller): with `one` the one-dispatch layout, `(mean, rstd)` pairs
/// alone; else the Welford partials first.
fn layout(x: &Tensor, groups: usize, eps: f32, one: bool) -> Result<GroupStats> {
    let (n, c) = (x.dim(0), x.dim(1));
    let s: usize = x.shape()[2..].iter().product();
    let cpg = c / groups;
    let m = cpg * s;
    let vec = s.is_multiple_of(4);
    let (_, parts) = plan(m, s);
    let ng = n * groups;
    let total_units = if vec { x.numel() / 4 } else { x.numel() };
    if 2 * ng * (parts + 1) > u32::MAX as usize || x.numel() > u32::MAX as usize - 4 {
        return Err(Error::shape(format!(
            "group_norm input {:?} is too large",
            x.shape()
        )));
    }
    let pairs_before = if one { 0 } else { ng * parts };
    let work = Tensor::empty(x.gpu(), &[2 * (pairs_before + ng)], DType::F32)?;
    let p = Params {
        groups_total: ng as u32,
        g: groups as u32,
        cpg: cpg as u32,
        s: s as u32,
        m: m as u32,
        parts: parts as u32,
        stats: (2 * pairs_before) as u32,
        eps,
        units: total_units as u32,
        n: n as u32,
        c: c as u32,
        _pad: 0,
    };
    Ok(GroupStats {
        work,
        p,
        vec,
        shape: x.shape().to_vec(),
    })
}

/// The group statistics of `x` (as [`layout`]) by the multi-dispatch path, in one read of
/// `x`: Welford partials (`gn_partial`) merged per group (`gn_stats`).
fn statistics(x: &Tensor, groups: usize, eps: f32) -> Result<GroupStats> {
    let st = layout(x, groups, eps, false)?;
    let (gpu, p) = (x.gpu(), &st.p);
    let k = |entry| {
        Kernel::new(&SHADER, entry)
            .with(ov::VEC, st.vec)
            .with(ov::WG, WG)
    };
    gpu.dispatch(
        &k("gn_partial"),
        p,
        &[st.work.binding(), x.binding_vec4()],
        grid_1d((p.groups_total * p.parts).div_ceil(WG)),
    );
    gpu.dispatch(
        &k("gn_stats"),
        p,
        &[st.work.binding()],
        grid_1d(p.groups_total.div_ceil(WG)),
    );
    Ok(st)
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
    Ok(group_norm_saving(x, groups, gamma, beta, eps, act)?.0)
}

/// [`group_norm`], also returning the statistics for [`group_norm_act_backward_with`]
/// (`None` for an empty input). One dispatch (`gn_fused`: a workgroup per group computes
/// the statistics and applies them) where [`one_dispatch_on`] the device and a group fits
/// one workgroup's loops, else three (partials, statistics, apply).
pub fn group_norm_saving(
    x: &Tensor,
    groups: usize,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f32,
    act: Act,
) -> Result<(Tensor, Option<GroupStats>)> {
    group_norm_path(x, groups, gamma, beta, eps, act, one_dispatch_on(x.gpu()))
}

/// [`group_norm_saving`], on the one-dispatch kernel only if `one` allows it (tests take
/// both paths).
fn group_norm_path(
    x: &Tensor,
    groups: usize,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f32,
    act: Act,
    one: bool,
) -> Result<(Tensor, Option<GroupStats>)> {
    check_args("group_norm", x, groups, gamma, beta, eps)?;
    let gpu = x.gpu();
    let y = Tensor::empty(gpu, x.shape(), DType::F32)?;
    if y.numel() == 0 {
        return Ok((y, None));
    }
    let s: usize = x.shape()[2..].iter().product();
    let one = one && one_dispatch_fits(x.dim(1) / groups * s, s);
    let st = if one {
        layout(x, groups, eps, true)?
    } else {
        statistics(x, groups, eps)?
    };
    let (entry, grid) = if one {
        ("gn_fused", grid_1d(st.p.groups_total))
    } else {
        ("gn_apply", grid_1d(st.p.units.div_ceil(WG)))
    };
    let kernel = Kernel::new(&SHADER, entry)
        .with(ov::VEC, st.vec)
        .with(ov::WG, WG)
        .with(ov::HAS_GAMMA, gamma.is_some())
        .with(ov::HAS_BETA, beta.is_some())
        .with(ov::ACT, act as u32);
    gpu.dispatch(
        &kernel,
        &st.p,
        &[
            st.work.binding(),
            x.binding_vec4(),
            gamma.map_or(gpu.unused_binding(), Tensor::binding),
            beta.map_or(gpu.unused_binding(), Tensor::binding),
            y.binding_vec4(),
        ],
        grid,
    );
    Ok((y, Some(st)))
}

/// Input gradient of [`group_norm`] with its activation, `y = act(x̂·γ + β)`, `x̂ = (x − μ)·r`,
/// computing the statistics again: [`group_norm_act_backward_with`] after them. For frozen
/// `γ` and `β`; `x` and `g` are `[N, C, ..]`, `gamma`, `beta` `[C]`.
pub fn group_norm_act_backward(
    x: &Tensor,
    groups: usize,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f32,
    act: Act,
    g: &Tensor,
) -> Result<Tensor> {
    check_args("group_norm backward", x, groups, gamma, beta, eps)?;
    if x.numel() == 0 {
        check_grad(x, g)?;
        return Tensor::empty(x.gpu(), x.shape(), DType::F32);
    }
    let st = statistics(x, groups, eps)?;
    Ok(group_norm_act_backward_with(x, &st, gamma, beta, act, g, false)?.0)
}

fn check_grad(x: &Tensor, g: &Tensor) -> Result<()> {
    g.expect_f32("group_norm gradient")?;
    if g.shape() != x.shape() {
        return Err(Error::shape(format!(
            "group_norm backward: gradient {:?} does not match the input {:?}",
            g.shape(),
            x.shape()
        )));
    }
    Ok(())
}

/// The backward of `y = act(x̂·γ + β)`, `x̂ = (x − μ)·r`, from the forward's statistics
/// `st`, in fused passes and no broadcast temporaries (`shaders/group_norm.wgsl`, `gnb_*`):
/// with `gy = g·act'(x̂·γ + β)` and `t = gy·γ`, per group `a = mean(t)`, `b = mean(t·x̂)`,
/// and `dx = r·(t − a − x̂·b)` (`gnb_sum`, `gn_stats` merging its partials, `gnb_apply`).
/// With `params`, also `dγ = Σ_{n,s} gy·x̂` and `dβ = Σ_{n,s} gy` per channel
/// (`gnb_params`). `x` and `g` are the forward's input shape; `gamma`, `beta` `[C]`.
pub fn group_norm_act_backward_with(
    x: &Tensor,
    st: &GroupStats,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    act: Act,
    g: &Tensor,
    params: bool,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    backward_path(x, st, gamma, beta, act, g, params, one_dispatch_on(x.gpu()))
}

/// [`group_norm_act_backward_with`]; dx in one dispatch (`gnb_fused`) where a group fits one
/// workgroup and `one` allows it (tests take both paths), else in three. Statistics in the
/// one-dispatch layout (no partials before them) always take the one-dispatch kernel.
#[allow(clippy::too_many_arguments)]
fn backward_path(
    x: &Tensor,
    st: &GroupStats,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    act: Act,
    g: &Tensor,
    params: bool,
    one: bool,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    check_grad(x, g)?;
    if x.shape() != st.shape.as_slice() {
        return Err(Error::shape(format!(
            "group_norm backward: input {:?} is not the one the statistics are of ({:?})",
            x.shape(),
            st.shape
        )));
    }
    let c = st.p.c as usize;
    for t in [gamma, beta].into_iter().flatten() {
        if t.numel() != c {
            return Err(Error::shape(format!(
                "group_norm backward: parameter {:?} for C = {c}",
                t.shape()
            )));
        }
    }
    let gpu = x.gpu();
    let p = &st.p;
    let dx = Tensor::empty(gpu, x.shape(), DType::F32)?;
    let k = |entry| {
        Kernel::new(&SHADER, entry)
            .with(ov::VEC, st.vec)
            .with(ov::WG, WG)
            .with(ov::HAS_GAMMA, gamma.is_some())
            .with(ov::HAS_BETA, beta.is_some())
            .with(ov::ACT, act as u32)
    };
    let inputs = || {
        [
            st.work.binding(),
            x.binding_vec4(),
            gamma.map_or(gpu.unused_binding(), Tensor::binding),
            beta.map_or(gpu.unused_binding(), Tensor::binding),
            g.binding_vec4(),
        ]
    };
    let one = (one && one_dispatch_fits(p.m as usize, p.s as usize)) || p.stats == 0;
    if one {
        let [w, xb, gb, bb, dyb] = inputs();
        gpu.dispatch(
            &k("gnb_fused"),
            p,
            &[w, xb, gb, bb, dyb, dx.binding_vec4()],
            grid_1d(p.groups_total),
        );
    } else {
        multi_pass_dx(st, k, inputs, &dx)?;
    }
    if !params {
        return Ok((dx, None, None));
    }
    let pg = Tensor::empty(gpu, &[2 * c], DType::F32)?;
    let [w, xb, gb, bb, dyb] = inputs();
    gpu.dispatch(
        &k("gnb_params"),
        p,
        &[w, xb, gb, bb, dyb, pg.binding()],
        grid_1d((c as u32).div_ceil(WG)),
    );
    use super::concat::slice;
    Ok((dx, Some(slice(&pg, 0, 0, c)?), Some(slice(&pg, 0, c, c)?)))
}

/// dx by the three-dispatch path: `gnb_sum` partials, `gn_stats` merging them into `(a, b)`,
/// `gnb_apply`. `kernel` makes the backward's kernels, `inputs` the bindings they share.
fn multi_pass_dx<'a>(
    st: &GroupStats,
    kernel: impl Fn(&'static str) -> Kernel<Params>,
    inputs: impl Fn() -> [crate::gpu::Binding<'a>; 5],
    dx: &Tensor,
) -> Result<()> {
    let gpu = st.work.gpu();
    let p = &st.p;
    let (ng, parts) = (p.groups_total as usize, p.parts as usize);
    let bwork = Tensor::empty(gpu, &[2 * ng * (parts + 1)], DType::F32)?;
    let k = kernel;
    let [w, xb, gb, bb, dyb] = inputs();
    gpu.dispatch(
        &k("gnb_sum"),
        p,
        &[w, xb, gb, bb, dyb, bwork.binding()],
        grid_1d(((ng * parts) as u32).div_ceil(WG)),
    );
    gpu.dispatch(
        &Kernel::new(&SHADER, "gn_stats")
            .with(ov::BWD, true)
            .with(ov::VEC, st.vec)
            .with(ov::WG, WG),
        p,
        &[bwork.binding()],
        grid_1d((ng as u32).div_ceil(WG)),
    );
    let [w, xb, gb, bb, dyb] = inputs();
    gpu.dispatch(
        &k("gnb_apply"),
        p,
        &[w, xb, gb, bb, dyb, bwork.binding(), dx.binding_vec4()],
        grid_1d(p.units.div_ceil(WG)),
    );
    Ok(())
}

/// Backward of [`group_norm`]'s `y = (x − μ)·r·γ + β` with `Act::None` (an activation is
/// its own tape node), statistics computed again: `dx = r·(t − mean(t) − x̂·mean(t·x̂))`
/// with `t = g·γ` per group of `L = C/G·S` values, `dγ = Σ_{n,s} g·x̂`, `dβ = Σ_{n,s} g`.
/// `x` and `g` are `[N, C, ..]`, `gamma` is `[C]`. Returns `(dx, dγ, dβ)`; `dγ` and `dβ`
/// only when `params` is true (latent optimisation needs `dx` alone).
pub fn group_norm_backward(
    x: &Tensor,
    groups: usize,
    gamma: &Tensor,
    g: &Tensor,
    eps: f32,
    params: bool,
) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
    check_args("group_norm backward", x, groups, Some(gamma), None, eps)?;
    check_grad(x, g)?;
    if x.numel() == 0 {
        let gpu = x.gpu();
        let c = x.dim(1);
        let dx = Tensor::empty(gpu, x.shape(), DType::F32)?;
        if !params {
            return Ok((dx, None, None));
        }
        return Ok((
            dx,
            Some(Tensor::zeros(gpu, &[c])?),
            Some(Tensor::zeros(gpu, &[c])?),
        ));
    }
    let st = statistics(x, groups, eps)?;
    group_norm_act_backward_with(x, &st, Some(gamma), None, Act::None, g, params)
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
    fn check(shape: &[usize], groups: usize, affine: bool, act: Act, offset: f32, seed: u64) {
        for one in [true, false] {
            check_path(shape, groups, affine, act, offset, seed, one);
        }
    }

    /// [`check`] on the one-dispatch kernel (where the group fits it) or the three-dispatch
    /// path.
    #[allow(clippy::too_many_arguments)]
    fn check_path(
        shape: &[usize],
        groups: usize,
        affine: bool,
        act: Act,
        offset: f32,
        seed: u64,
        one: bool,
    ) {
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
        let (y, _) = group_norm_path(
            &x,
            groups,
            affine.then_some(&gt),
            affine.then_some(&bt),
            1e-6,
            act,
            one,
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
                "{shape:?} groups {groups} affine {affine} {act:?} one {one}: element {i} got {} \
                 want {} (err {err:e} > tol {tol:e})",
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
    /// A backward test's operands: `x` (values around 0.3), `γ` (around 1), `β` and the
    /// output gradient, on the host and on the device.
    struct Operands {
        n: usize,
        c: usize,
        s: usize,
        xv: Vec<f32>,
        gv: Vec<f32>,
        bv: Vec<f32>,
        wv: Vec<f32>,
        x: Tensor,
        gt: Tensor,
        bt: Tensor,
        dy: Tensor,
    }

    fn operands(shape: &[usize], seed: u64) -> Operands {
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
        Operands {
            n,
            c,
            s,
            x: Tensor::from_slice(&g, &xv, shape).unwrap(),
            gt: Tensor::from_slice(&g, &gv, &[c]).unwrap(),
            bt: Tensor::from_slice(&g, &bv, &[c]).unwrap(),
            dy: Tensor::from_slice(&g, &wv, shape).unwrap(),
            xv,
            gv,
            bv,
            wv,
        }
    }

    fn check_act_backward(shape: &[usize], groups: usize, affine: bool, act: Act, seed: u64) {
        let Operands {
            n,
            c,
            s,
            xv,
            gv,
            bv,
            wv,
            x,
            gt,
            bt,
            dy,
        } = operands(shape, seed);
        let numel = n * c * s;
        let (ga, ba) = (affine.then_some(&gt), affine.then_some(&bt));
        // Statistics from either forward path, dx from either backward path (the one-
        // dispatch layout always takes the one-dispatch backward).
        let multi = statistics(&x, groups, 1e-6).unwrap();
        let (_, one_st) = group_norm_path(&x, groups, ga, ba, 1e-6, act, true).unwrap();
        let one_st = one_st.unwrap();
        let runs: Vec<(&str, Vec<f32>)> = [
            ("passes, passes", &multi, false),
            ("passes, one", &multi, true),
            ("one, one", &one_st, true),
        ]
        .into_iter()
        .map(|(name, st, one)| {
            let (dx, ..) = backward_path(&x, st, ga, ba, act, &dy, false, one).unwrap();
            (name, dx.to_vec().unwrap())
        })
        .collect();
        let public = group_norm_act_backward(&x, groups, ga, ba, 1e-6, act, &dy).unwrap();
        // The public entry recomputes the statistics by the passes, then takes the device's
        // backward path.
        let public_run = if one_dispatch_on(x.gpu()) { 1 } else { 0 };
        assert_eq!(public.to_vec().unwrap(), runs[public_run].1);
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
            for (name, got) in &runs {
                let err = (got[i] as f64 - want).abs();
                assert!(
                    err <= 1e-4 + 1e-3 * want.abs(),
                    "{shape:?} groups {groups} affine {affine} {act:?} ({name}): dx[{i}] {} vs \
                     {want}",
                    got[i]
                );
            }
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
    fn welford_statistics_survive_a_large_offset() {
        // Mean 1,000, σ ≈ 0.6: Σx² − (Σx)²/M in f32 would lose the variance entirely
        // (cancellation of ~1e6·M against ~0.3·M); the Welford partials keep it.
        check(&[1, 8, 32, 32], 2, true, Act::None, 1000.0, 530);
        check(&[2, 4, 1031], 2, false, Act::None, 1000.0, 540);
    }

    /// `(dx, dγ, dβ)` of `Σ dy ⊙ (GroupNorm(x)·γ + β)` from the statistics the forward saved,
    /// against the f64 formulas (`dγ[c] = Σ dy·x̂`, `dβ[c] = Σ dy`, dx as in the fused
    /// backward), on channels long enough for several loop chunks in `gnb_params`.
    fn check_param_grads(shape: &[usize], groups: usize, seed: u64) {
        for one in [true, false] {
            check_param_grads_path(shape, groups, seed, one);
        }
    }

    fn check_param_grads_path(shape: &[usize], groups: usize, seed: u64, one: bool) {
        let Operands {
            n,
            c,
            s,
            xv,
            gv,
            wv: dyv,
            x,
            gt,
            bt,
            dy,
            ..
        } = operands(shape, seed);
        let numel = n * c * s;
        let (gs, bs) = (Some(&gt), Some(&bt));
        let (_, st) = group_norm_path(&x, groups, gs, bs, 1e-6, Act::None, one).unwrap();
        let st = st.unwrap();
        let (dx, dgam, dbet) = backward_path(&x, &st, gs, bs, Act::None, &dy, true, one).unwrap();
        let (dx, dgam, dbet) = (
            dx.to_vec().unwrap(),
            dgam.unwrap().to_vec().unwrap(),
            dbet.unwrap().to_vec().unwrap(),
        );
        let m = c / groups * s;
        let xhat = reference(&xv, n, c, s, groups, None, None, 1e-6, Act::None);
        let e = f32::EPSILON as f64;
        let mut wg = vec![0.0f64; c];
        let mut wb = vec![0.0f64; c];
        let mut mag = vec![0.0f64; c];
        for i in 0..numel {
            let ch = (i / s) % c;
            wg[ch] += dyv[i] as f64 * xhat[i];
            wb[ch] += dyv[i] as f64;
            mag[ch] += (dyv[i] as f64).abs() * (1.0 + xhat[i].abs());
        }
        for ch in 0..c {
            // Chains of at most N·S additions, plus x̂'s own error (~depth·ε relative).
            let tol = (n * s + summation_depth(m, s)) as f64 * e * 4.0 * mag[ch] + 1e-6;
            assert!(
                (dgam[ch] as f64 - wg[ch]).abs() <= tol,
                "{shape:?} dγ[{ch}] {} vs {}",
                dgam[ch],
                wg[ch]
            );
            assert!(
                (dbet[ch] as f64 - wb[ch]).abs() <= tol,
                "{shape:?} dβ[{ch}] {} vs {}",
                dbet[ch],
                wb[ch]
            );
        }
        for (grp, chunk) in xhat.chunks(m).enumerate() {
            let (mut a, mut b, mut mag) = (0.0f64, 0.0f64, 0.0f64);
            let t = |i: usize| dyv[i] as f64 * gv[(i / s) % c] as f64;
            for (j, xh) in chunk.iter().enumerate() {
                let i = grp * m + j;
                a += t(i);
                b += t(i) * xh;
                mag += t(i).abs() * (1.0 + xh.abs());
            }
            let (a, b) = (a / m as f64, b / m as f64);
            let xs = &xv[grp * m..(grp + 1) * m];
            let mu = xs.iter().map(|&v| v as f64).sum::<f64>() / m as f64;
            let var = xs.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / m as f64;
            let r = 1.0 / (var + 1e-6).sqrt();
            let tol_ab = summation_depth(m, s) as f64 * e * 4.0 * mag / m as f64;
            for (j, xh) in chunk.iter().enumerate() {
                let i = grp * m + j;
                let want = r * (t(i) - a - xh * b);
                let tol = r * (tol_ab * (1.0 + xh.abs()) + 8.0 * e * t(i).abs()) + 1e-6;
                assert!(
                    (dx[i] as f64 - want).abs() <= tol,
                    "{shape:?} dx[{i}] {} vs {want}",
                    dx[i]
                );
            }
        }
    }

    #[test]
    fn parameter_gradients_from_saved_statistics() {
        check_param_grads(&[2, 4, 3, 2], 2, 1000);
        check_param_grads(&[2, 4, 72, 72], 2, 1010);
        check_param_grads(&[1, 3, 2063], 3, 1020);
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
