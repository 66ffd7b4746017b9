//! Permute (general transpose) of f32 or u32 tensors (`shaders/permute.wgsl`).
//!
//! `permute(x, perm)` follows `torch.permute`: output dim `i` is input dim `perm[i]`.
//! Dims that stay adjacent and in order are merged first, so any rank whose permutation
//! reduces to [`MAX_RANK`] moving blocks or fewer works; a permutation that moves nothing
//! returns a reshaped view of the same buffer without a dispatch.

use crate::gpu::{grid_1d, Kernel, Shader};
use crate::tensor::Tensor;
use crate::{Error, Result};

/// The `override` constants the kernels below set.
mod ov {
    use crate::gpu::Override;
    pub(super) const WG: Override<u32> = Override::new("WG");
    pub(super) const RUN: Override<u32> = Override::new("RUN");
}

pub(crate) static SHADER: Shader<Params> =
    crate::shader!("permute", "grid", overrides = [ov::WG, ov::RUN]);
const WG: u32 = 256;
/// Most dims the kernel handles after merging.
pub const MAX_RANK: usize = 8;

crate::shader_params! {
    /// Mirrors `struct Params` in `shaders/permute.wgsl`.
    pub(crate) struct Params {
        n: u32,
        rank: u32,
        off: u32,
        _pad: u32,
        out_dims: [u32; MAX_RANK],
        in_strides: [u32; MAX_RANK],
    }
}

/// Records `entry` (`permute` or `scatter`) over `p`'s elements. On CPU adapters each
/// invocation copies a run of up to 16 consecutive elements of the innermost dim, so that
/// the index arithmetic (integer divisions, which lavapipe runs lane by lane) is done once
/// per run: the CLIP patchify copy of one image (150,528 values) took 5-14 ms with one
/// element per invocation. GPUs keep one element per invocation (coalesced accesses).
fn dispatch(
    gpu: &crate::Gpu,
    entry: &'static str,
    p: &Params,
    bindings: &[crate::gpu::Binding<'_>],
    run: Option<u32>,
) {
    let run = run.unwrap_or(if gpu.is_cpu() { 16 } else { 1 });
    let inner = p.out_dims[p.rank as usize - 1];
    let runs = (p.n / inner) * inner.div_ceil(run);
    let k = Kernel::new(&SHADER, entry)
        .with(ov::WG, WG)
        .with(ov::RUN, run);
    gpu.dispatch(&k, p, bindings, grid_1d(runs.div_ceil(WG)));
}

/// Checks that `perm` is a permutation of `0..rank`.
fn check_perm(shape: &[usize], perm: &[usize]) -> Result<()> {
    let mut seen = vec![false; shape.len()];
    let ok = perm.len() == shape.len()
        && perm
            .iter()
            .all(|&p| p < seen.len() && !std::mem::replace(&mut seen[p], true));
    if ok {
        Ok(())
    } else {
        Err(Error::shape(format!(
            "permute order {perm:?} is not a permutation of the {} dims of {shape:?}",
            shape.len()
        )))
    }
}

/// Output dims and the input stride of each, after dropping size-1 dims and merging
/// neighbours that are contiguous in the input.
fn plan(shape: &[usize], perm: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let mut in_strides = vec![0usize; shape.len()];
    let mut s = 1;
    for d in (0..shape.len()).rev() {
        in_strides[d] = s;
        s *= shape[d];
    }
    let (mut dims, mut strides): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
    for &p in perm {
        let (d, st) = (shape[p], in_strides[p]);
        if d == 1 {
            continue;
        }
        if let (Some(ld), Some(ls)) = (dims.last_mut(), strides.last_mut()) {
            if *ls == st * d {
                *ld *= d;
                *ls = st;
                continue;
            }
        }
        dims.push(d);
        strides.push(st);
    }
    (dims, strides)
}

/// `x.permute(perm)`: output dim `i` is input dim `perm[i]`. Works for f32 and u32 tensors.
pub fn permute(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    permute_run(x, perm, None)
}

/// [`permute`] with `run` elements per invocation (default: the adapter's; tests force
/// both).
fn permute_run(x: &Tensor, perm: &[usize], run: Option<u32>) -> Result<Tensor> {
    check_perm(x.shape(), perm)?;
    let out_shape: Vec<usize> = perm.iter().map(|&p| x.shape()[p]).collect();
    let (dims, strides) = plan(x.shape(), perm);
    // Nothing moves: the bytes are already in output order.
    if dims.len() <= 1 {
        return x.reshape(&out_shape);
    }
    x.expect_4_byte("permute")?;
    if dims.len() > MAX_RANK {
        return Err(Error::shape(format!(
            "permute {perm:?} of {:?} moves more than {MAX_RANK} separate blocks of dims",
            x.shape()
        )));
    }
    let gpu = x.gpu();
    let y = Tensor::empty(gpu, &out_shape, x.dtype())?;
    let n = y.numel();
    if n > u32::MAX as usize - WG as usize {
        return Err(Error::shape("permute of more than 2^32 elements"));
    }
    let mut p = Params {
        n: n as u32,
        rank: dims.len() as u32,
        off: 0,
        _pad: 0,
        out_dims: [1; MAX_RANK],
        in_strides: [0; MAX_RANK],
    };
    for i in 0..dims.len() {
        p.out_dims[i] = dims[i] as u32;
        p.in_strides[i] = strides[i] as u32;
    }
    dispatch(gpu, "permute", &p, &[x.binding(), y.binding()], run);
    Ok(y)
}

/// Params of a strided gather or scatter over `dims` with element `strides` and `off`, and
/// the last element index it touches.
fn strided_params(
    dims: &[usize],
    strides: &[usize],
    off: usize,
    what: &str,
) -> Result<(Params, usize)> {
    let n: usize = dims.iter().product();
    let last = off
        + dims
            .iter()
            .zip(strides)
            .map(|(d, s)| d.saturating_sub(1) * s)
            .sum::<usize>();
    if dims.len() != strides.len() || dims.len() > MAX_RANK || dims.is_empty() {
        return Err(Error::shape(format!(
            "{what}: {} dims and {} strides (1 to {MAX_RANK} of each)",
            dims.len(),
            strides.len()
        )));
    }
    if n > u32::MAX as usize - WG as usize || last > u32::MAX as usize {
        return Err(Error::shape(format!("{what} beyond 2^32 elements")));
    }
    let mut p = Params {
        n: n as u32,
        rank: dims.len() as u32,
        off: off as u32,
        _pad: 0,
        out_dims: [1; MAX_RANK],
        in_strides: [0; MAX_RANK],
    };
    for i in 0..dims.len() {
        p.out_dims[i] = dims[i] as u32;
        p.in_strides[i] = strides[i] as u32;
    }
    Ok((p, last))
}

/// A new contiguous tensor of shape `dims` whose element `(i_0, ..)` is
/// `x[off + Σ i_d · strides[d]]` (`x` read as flat memory): a strided view copied out, such
/// as the heads of one third of the fused QKV projection's `[B, T, 3·H·D]` output split to
/// `[B, H, T, D]` in one pass.
pub fn gather_strided(x: &Tensor, dims: &[usize], strides: &[usize], off: usize) -> Result<Tensor> {
    gather_strided_run(x, dims, strides, off, None)
}

/// [`gather_strided`] with `run` elements per invocation (as [`permute_run`]).
fn gather_strided_run(
    x: &Tensor,
    dims: &[usize],
    strides: &[usize],
    off: usize,
    run: Option<u32>,
) -> Result<Tensor> {
    x.expect_4_byte("gather_strided")?;
    let (p, last) = strided_params(dims, strides, off, "gather_strided")?;
    if dims.contains(&0) {
        return Tensor::empty(x.gpu(), dims, x.dtype());
    }
    if last >= x.numel() {
        return Err(Error::shape(format!(
            "gather_strided {dims:?} by {strides:?} from {off} reads past the {} elements of {:?}",
            x.numel(),
            x.shape()
        )));
    }
    let y = Tensor::empty(x.gpu(), dims, x.dtype())?;
    dispatch(x.gpu(), "permute", &p, &[x.binding(), y.binding()], run);
    Ok(y)
}

/// The inverse of [`gather_strided`]: writes `src`'s elements, in order over `dims` (its
/// shape), to `into[off + Σ i_d · strides[d]]`, leaving the rest of `into` as it was. Used
/// to put dQ, dK and dV `[B, H, T, D]` back into one `[B, T, 3·H·D]` gradient.
pub fn scatter_strided(src: &Tensor, into: &Tensor, strides: &[usize], off: usize) -> Result<()> {
    scatter_strided_run(src, into, strides, off, None)
}

/// [`scatter_strided`] with `run` elements per invocation (as [`permute_run`]).
fn scatter_strided_run(
    src: &Tensor,
    into: &Tensor,
    strides: &[usize],
    off: usize,
    run: Option<u32>,
) -> Result<()> {
    src.expect_4_byte("scatter_strided")?;
    let dims = src.shape();
    let (p, last) = strided_params(dims, strides, off, "scatter_strided")?;
    if src.numel() == 0 {
        return Ok(());
    }
    if last >= into.numel() || src.dtype() != into.dtype() {
        return Err(Error::shape(format!(
            "scatter_strided {dims:?} by {strides:?} from {off} writes past the {} elements \
             of {:?} (or the dtypes differ)",
            into.numel(),
            into.shape()
        )));
    }
    dispatch(
        src.gpu(),
        "scatter",
        &p,
        &[src.binding(), into.binding()],
        run,
    );
    Ok(())
}

/// Backward of [`permute`]'s `y = x.permute(perm)`: `dx = g.permute(perm⁻¹)`, since output
/// dim `i` came from input dim `perm[i]`. `g` has `y`'s shape; returns `x`'s.
pub fn permute_backward(g: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    permute(g, &inv)
}

/// Swaps dims `a` and `b`.
pub fn transpose(x: &Tensor, a: usize, b: usize) -> Result<Tensor> {
    if a >= x.rank() || b >= x.rank() {
        return Err(Error::shape(format!(
            "transpose of dims {a} and {b} of a rank-{} tensor {:?}",
            x.rank(),
            x.shape()
        )));
    }
    let mut perm: Vec<usize> = (0..x.rank()).collect();
    perm.swap(a, b);
    permute(x, &perm)
}

/// CPU reference: `x` (row-major, `shape`) permuted by `perm`.
pub fn reference<T: Copy>(x: &[T], shape: &[usize], perm: &[usize]) -> Vec<T> {
    let r = shape.len();
    let mut strides = vec![1usize; r];
    for d in (0..r.saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    let out: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let n: usize = out.iter().product();
    (0..n)
        .map(|i| {
            let (mut rem, mut src) = (i, 0);
            for d in (0..r).rev() {
                src += (rem % out[d]) * strides[perm[d]];
                rem /= out[d];
            }
            x[src]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};

    #[test]
    fn strided_gather_and_scatter_split_and_rebuild_packed_qkv() {
        // [B, T, 3·H·D] → q, k, v [B, H, T, D] by strided gathers (checked against the
        // reshape + permute reference), then scattered back into a fresh tensor: the same
        // bytes, every element written once.
        let g = gpu();
        let (b, t, h, d) = (2, 5, 3, 4);
        let c = h * d;
        let xv = rand_vec(b * t * 3 * c, 77);
        let x = Tensor::from_slice(&g, &xv, &[b, t, 3 * c]).unwrap();
        let (dims, strides) = ([b, h, t, d], [t * 3 * c, d, 3 * c, 1]);
        let all = reference(&xv, &[b, t, 3, h, d], &[2, 0, 3, 1, 4]);
        // The adapter's run length, one element per invocation (GPUs) and partial runs.
        for run in [None, Some(1), Some(3)] {
            let back = Tensor::full(&g, &[b, t, 3 * c], f32::NAN).unwrap();
            for s in 0..3 {
                let part = gather_strided_run(&x, &dims, &strides, s * c, run).unwrap();
                assert_eq!(part.shape(), &dims);
                let n = b * h * t * d;
                let want = &all[s * n..(s + 1) * n];
                assert_eq!(part.to_vec().unwrap(), want, "part {s} run {run:?}");
                scatter_strided_run(&part, &back, &strides, s * c, run).unwrap();
            }
            assert_eq!(back.to_vec().unwrap(), xv, "run {run:?}");
        }
        let back = Tensor::full(&g, &[b, t, 3 * c], f32::NAN).unwrap();
        let e = gather_strided(&x, &dims, &strides, 3 * c)
            .unwrap_err()
            .to_string();
        assert!(e.contains("reads past"), "{e}");
        let e = scatter_strided(&x, &back, &[1], 0).unwrap_err().to_string();
        assert!(e.contains("strides"), "{e}");
    }

    #[test]
    fn matches_reference_over_shapes_and_orders() {
        let g = gpu();
        let cases: &[(&[usize], &[usize])] = &[
            (&[1], &[0]),
            (&[3, 17], &[1, 0]),
            (&[65, 1000], &[1, 0]),
            (&[2, 50, 12, 64], &[0, 2, 1, 3]),
            (&[2, 12, 50, 64], &[0, 2, 1, 3]),
            (&[3, 1, 17, 5], &[3, 2, 1, 0]),
            (&[2, 3, 4, 5, 6], &[4, 0, 3, 1, 2]),
            (&[2, 3, 2, 3, 2, 3], &[5, 4, 3, 2, 1, 0]),
            (&[2, 3, 2, 3, 2, 3, 2, 2], &[7, 6, 5, 4, 3, 2, 1, 0]),
            (&[4, 1, 1, 7], &[1, 0, 3, 2]),
            (&[1031, 3], &[1, 0]),
        ];
        for (ci, (shape, perm)) in cases.iter().enumerate() {
            let n: usize = shape.iter().product();
            let xv = rand_vec(n, ci as u64);
            let x = Tensor::from_slice(&g, &xv, shape).unwrap();
            // The adapter's run length, one element per invocation (GPUs), and runs of 16
            // (CPU adapters) and 5 (partial runs on every row).
            for run in [None, Some(1), Some(16), Some(5)] {
                let y = permute_run(&x, perm, run).unwrap();
                let want_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
                assert_eq!(y.shape(), want_shape.as_slice());
                // A copy: results are bit-exact.
                assert_eq!(
                    y.to_vec().unwrap(),
                    reference(&xv, shape, perm),
                    "{shape:?} {perm:?} run {run:?}"
                );
            }
        }
    }

    #[test]
    fn u32_tensors_and_transpose() {
        let g = gpu();
        let xv: Vec<u32> = (0..3 * 5 * 7).collect();
        let x = Tensor::from_u32(&g, &xv, &[3, 5, 7]).unwrap();
        let y = transpose(&x, 0, 2).unwrap();
        assert_eq!(y.shape(), &[7, 5, 3]);
        assert_eq!(y.dtype(), crate::DType::U32);
        assert_eq!(
            y.to_vec_u32().unwrap(),
            reference(&xv, &[3, 5, 7], &[2, 1, 0])
        );
    }

    #[test]
    fn identity_orders_need_no_dispatch() {
        let g = gpu();
        let x = Tensor::from_slice(&g, &rand_vec(12, 1), &[3, 1, 4]).unwrap();
        let y = permute(&x, &[1, 0, 2]).unwrap();
        assert_eq!(y.shape(), &[1, 3, 4]);
        assert_eq!(y.to_vec().unwrap(), x.to_vec().unwrap());
    }

    #[test]
    fn more_than_65535_workgroups() {
        // 17.3M elements = 67,500 workgroups of 256.
        let g = gpu();
        let (a, b) = (4100usize, 4215usize);
        let xv: Vec<u32> = (0..(a * b) as u32).collect();
        let x = Tensor::from_u32(&g, &xv, &[a, b]).unwrap();
        // One element per invocation (as on GPUs), so that the grid passes 65,535.
        let y = permute_run(&x, &[1, 0], Some(1))
            .unwrap()
            .to_vec_u32()
            .unwrap();
        for (j, i) in [(0, 0), (b - 1, a - 1), (17, 4000), (4214, 3)] {
            assert_eq!(y[j * a + i], (i * b + j) as u32, "({j}, {i})");
        }
    }

    #[test]
    fn bad_orders_are_reported() {
        let g = gpu();
        let x = Tensor::zeros(&g, &[2, 3, 4]).unwrap();
        for perm in [&[0, 1][..], &[0, 1, 1], &[0, 1, 3]] {
            let e = permute(&x, perm).unwrap_err().to_string();
            assert!(e.contains("not a permutation"), "{e}");
        }
        let e = transpose(&x, 0, 3).unwrap_err().to_string();
        assert!(e.contains("rank-3"), "{e}");
        let big = Tensor::zeros(&g, &[2; 9]).unwrap();
        let e = permute(&big, &[8, 7, 6, 5, 4, 3, 2, 1, 0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 8"), "{e}");
    }
}
