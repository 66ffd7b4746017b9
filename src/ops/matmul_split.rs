//! Parallel split-K for products with too few output tiles to fill a GPU: a linear layer on
//! one image's 50 tokens (`[50, 768] @ [768, 768]ᵀ`) is 12 workgroups of 64×64, a few
//! percent of a large GPU's compute units. K is cut into S equal slices that run as one
//! dispatch of S times the workgroups, the slices being a batch of S products over the same
//! buffers (the batch strides step along K: no copy of A or B is made, so it works with
//! every kernel and transpose); they write S partial products `[S, M, N]`, and a second
//! pass (`shaders/matmul_split_sum.wgsl`) sums them with the bias, activation and residual
//! the single-pass kernels fuse.

use super::matmul::Variant;
use crate::gpu::{grid_1d, Kernel, Shader};
use crate::ops::Act;
use crate::tensor::{DType, Tensor};
use crate::{Gpu, Result};

/// The `override` constants of the summing kernel.
mod ov {
    use crate::gpu::Override;
    pub(super) const HAS_BIAS: Override<bool> = Override::new("HAS_BIAS");
    pub(super) const HAS_RES: Override<bool> = Override::new("HAS_RES");
    pub(super) const ACT: Override<u32> = Override::new("ACT");
    pub(super) const WG: Override<u32> = Override::new("WG");
}

pub(crate) static SHADER: Shader<Params> = crate::shader!(
    "matmul_split_sum",
    "act",
    "grid",
    overrides = [ov::HAS_BIAS, ov::HAS_RES, ov::ACT, ov::WG]
);
const WG: u32 = 256;

crate::shader_params! {
    /// Mirrors `struct Params` in `shaders/matmul_split_sum.wgsl`.
    pub(crate) struct Params {
        mn: u32,
        n: u32,
        splits: u32,
        _pad: u32,
    }
}

/// How many K slices a product runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Split {
    /// [`slices`] decides.
    Auto,
    /// Exactly this many (1: no split), if K divides into them ([`fits`]); tests.
    Slices(usize),
}

/// Workgroups a split product aims for: enough to occupy the compute units of a large GPU
/// (an H200 has 132) a couple of times over.
const TARGET_WORKGROUPS: usize = 256;
/// Most slices: each adds a partial `[M, N]` to write and read back.
const MAX_SLICES: usize = 16;
/// Fewest k per slice: shorter slices spend more on the partials than they gain.
const MIN_SLICE_K: usize = 64;

/// Whether K splits into `s` slices the kernels can read: equal, each a multiple of 4 (the
/// vec4 kernels' batch offsets are in vec4 units).
pub(crate) fn fits(k: usize, s: usize) -> bool {
    s >= 2 && k.is_multiple_of(s) && (k / s).is_multiple_of(4)
}

/// Slices for a product of `workgroups` output tiles (a single product, not a batch) and
/// inner size `k` on kernel `v`: `VQCLIP_SPLIT_K=off` never splits, `on` splits wherever
/// that gives at least twice the workgroups (any adapter: to try it on a CPU adapter);
/// unset, GPUs split products on the workgroup-tile kernels (`shared64`, `tile128`) that
/// have fewer than half of [`TARGET_WORKGROUPS`] tiles into the fewest slices of at least
/// [`MIN_SLICE_K`] that reach it (at most [`MAX_SLICES`]). CPU adapters never split by
/// default: their few cores are busy with a dozen workgroups. Not yet measured on a GPU.
pub(crate) fn slices(gpu: &Gpu, v: Variant, workgroups: usize, k: usize) -> usize {
    match super::env::SPLIT_K.get().as_deref() {
        Some("off") => return 1,
        Some("on") => {}
        _ => {
            if gpu.is_cpu() || !matches!(v, Variant::Shared | Variant::Tile128) {
                return 1;
            }
        }
    }
    if workgroups.saturating_mul(2) > TARGET_WORKGROUPS {
        return 1;
    }
    let valid: Vec<usize> = (2..=MAX_SLICES)
        .filter(|&s| fits(k, s) && k / s >= MIN_SLICE_K)
        .collect();
    valid
        .iter()
        .copied()
        .find(|&s| workgroups * s >= TARGET_WORKGROUPS)
        .or_else(|| valid.last().copied())
        .unwrap_or(1)
}

/// The second pass: `C = act(Σ_s part[s] + bias) + residual`; `part` `[S, M, N]`, C
/// `out_shape` (`M·N` values).
pub(crate) fn sum(
    part: &Tensor,
    bias: Option<&Tensor>,
    act: Act,
    residual: Option<&Tensor>,
    out_shape: &[usize],
) -> Result<Tensor> {
    let gpu = part.gpu();
    let (s, m, n) = (part.dim(0), part.dim(1), part.dim(2));
    let c = Tensor::empty(gpu, out_shape, DType::F32)?;
    let p = Params {
        mn: (m * n) as u32,
        n: n as u32,
        splits: s as u32,
        _pad: 0,
    };
    let kernel = Kernel::new(&SHADER, "split_sum")
        .with(ov::HAS_BIAS, bias.is_some())
        .with(ov::HAS_RES, residual.is_some())
        .with(ov::ACT, act as u32)
        .with(ov::WG, WG);
    gpu.dispatch(
        &kernel,
        &p,
        &[
            part.binding(),
            bias.map_or(gpu.unused_binding(), Tensor::binding),
            residual.map_or(gpu.unused_binding(), Tensor::binding),
            c.binding(),
        ],
        grid_1d((m * n).div_ceil(WG as usize) as u32),
    );
    Ok(c)
}

/// Tests here cover the slicing rule and an unsplittable K; every kernel with forced slices
/// runs against the reference in `ops::matmul`'s tests (`split_k_slices_match_..`).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::matmul::{matmul_split_variant, reference, MatmulOpts};
    use crate::ops::testutil::{gpu, rand_vec};

    /// A K that does not divide into vec4-aligned slices runs in one pass, still right.
    #[test]
    fn an_unsplittable_k_runs_in_one_pass() {
        let g = gpu();
        let (m, n, k) = (5, 7, 30);
        let (av, bv) = (rand_vec(m * k, 5), rand_vec(k * n, 6));
        let a = Tensor::from_slice(&g, &av, &[m, k]).unwrap();
        let b = Tensor::from_slice(&g, &bv, &[k, n]).unwrap();
        let o = MatmulOpts::default();
        let (want, _) = reference(
            &av,
            &bv,
            1,
            m,
            n,
            k,
            false,
            false,
            false,
            1.0,
            None,
            Act::None,
            None,
        );
        let got = matmul_split_variant(&a, &b, &o, Variant::Register, 4)
            .unwrap()
            .to_vec()
            .unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "{g} vs {w}"
            );
        }
    }

    #[test]
    fn slices_divide_k_into_vec4_multiples() {
        assert!(fits(768, 8) && fits(768, 12) && fits(3072, 16));
        assert!(!fits(768, 7) && !fits(768, 1) && !fits(36, 6) && !fits(100, 2));
    }
}
