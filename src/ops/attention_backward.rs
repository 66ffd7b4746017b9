//! Backward of the fused attention on the `[B, T, H·D]` layout
//! (`shaders/attention_backward.wgsl`), FlashAttention-2 style: from q, k, v, the output
//! `o` and the log-sum-exp `L` that [`attention_bthd_lse`] saved, it recomputes the
//! probabilities tile by tile and returns dQ, dK, dV without ever holding a `[Tq, Tk]`
//! matrix or permuting the heads out.
//!
//! The forward line it differentiates (per batch and head):
//! `o = softmax(scale · q kᵀ [+ causal mask]) v`, with `P = exp(scale · q kᵀ − L)`:
//! `dV = Pᵀ dO`, `dS = P ∘ (dO vᵀ − rowsum(dO ∘ o))`, `dK = scale · dSᵀ q`,
//! `dQ = scale · dS k`.
//!
//! [`path`] says whether the tape takes this fused pair or the composed
//! matmul → softmax → matmul recording (see its doc for how it is chosen).

use super::attention::{bthd_dims, qkv_dims, Addr, Layout, MAX_HEAD_DIM};
use super::CPU_LOOP_LIMIT;
use crate::gpu::{grid_1d, Gpu, Kernel, Shader};
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};

pub use super::attention::{attention_bthd_lse, attention_qkv_lse};

/// The `override` constants the kernels below set: the forward's head-row ones (same names,
/// same meaning) and their own.
mod ov {
    pub(super) use super::super::attention::ov::{CAUSAL, D4, D_MULT4, SPLIT};
    use crate::gpu::Override;
    pub(super) const WG: Override<u32> = Override::new("WG");
    pub(super) const WGE: Override<u32> = Override::new("WGE");
}

pub(crate) static SHADER: Shader<Params> = crate::shader!(
    "attention_backward",
    "grid",
    "head_row",
    overrides = [ov::WG, ov::CAUSAL, ov::SPLIT, ov::D_MULT4, ov::D4, ov::WGE]
);

crate::shader_params! {
    /// Mirrors `struct Params` in `shaders/attention_backward.wgsl`.
    pub(crate) struct Params {
        heads: u32,
        tq: u32,
        tk: u32,
        d: u32,
        rows: u32,
        span: u32,
        splits: u32,
        bh0: u32,
        scale: f32,
        bh: u32,
        q_s: [u32; 3],
        k_s: [u32; 3],
        o_s: [u32; 3],
        q_off: u32,
        k_off: u32,
        v_off: u32,
        _pad: [u32; 2],
    }
}

/// vec4s in each of the kernels' two workgroup tiles (`TILE4` in the shader).
const TILE4: usize = 512;
/// Workgroup memory the kernels declare: two tiles of [`TILE4`] vec4s, 16 KiB (the WebGPU
/// minimum of `max_compute_workgroup_storage_size`, so any conforming adapter runs them).
pub const WORKGROUP_BYTES: u32 = (2 * TILE4 * 16) as u32;
/// Loop iterations one invocation may spend (kept below [`CPU_LOOP_LIMIT`]).
const LOOP_BUDGET: usize = CPU_LOOP_LIMIT * 3 / 4;
/// Invocations per workgroup of the elementwise passes (`D`, split sums).
const WGE: u32 = 64;

/// Which attention-with-gradients recording [`crate::autodiff::Tape::attention_bthd`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// [`attention_bthd_lse`] + [`attention_bthd_backward`]: keeps only `o` and `L`.
    Fused,
    /// Heads permuted out, matmul → mask → softmax → matmul on the tape, keeping the
    /// `[B, H, Tq, Tk]` probabilities.
    Composed,
}

impl Path {
    /// The name used by `VQCLIP_ATTENTION` and the `attention` tuning key.
    pub fn name(self) -> &'static str {
        match self {
            Path::Fused => "fused",
            Path::Composed => "composed",
        }
    }
    /// Parses [`Path::name`].
    pub fn parse(s: &str) -> Option<Path> {
        match s.trim() {
            "fused" => Some(Path::Fused),
            "composed" => Some(Path::Composed),
            _ => None,
        }
    }
    /// Both paths, for tuning.
    pub const ALL: [Path; 2] = [Path::Fused, Path::Composed];
}

/// The tuning key [`path`] reads and `bench all --tune` writes.
pub const TUNING_KEY: &str = "attention";

/// The attention-with-gradients path for this device: `VQCLIP_ATTENTION=fused|composed` if
/// set, else the `attention` tuning entry (`bench all --tune` times both on a CLIP layer),
/// else composed on CPU adapters and fused on GPUs.
///
/// Why composed on CPU: on lavapipe (2 shared cores, forward + backward through the tape)
/// the composed path won both shapes measured: a CLIP ViT layer, 4 × 12 heads × 50 tokens ×
/// D 64, median 63–67 ms composed vs 95–98 ms fused; the VQGAN AttnBlock, 1 head × 256
/// positions × D 512, 25–28 ms composed vs 364–382 ms fused. Its tuned matmuls outrun the
/// per-invocation dot products of the fused kernels there, whose 512-wide private rows
/// lavapipe keeps in memory. GPUs get the fused kernels (rows staged in workgroup memory,
/// no permutes, no `[Tq, Tk]` probabilities kept); not measured on one yet.
pub fn path(gpu: &Gpu) -> Path {
    if let Some(p) = super::env::ATTENTION.get().and_then(|s| Path::parse(&s)) {
        return p;
    }
    if let Some(p) = gpu.tuning(TUNING_KEY).and_then(|s| Path::parse(&s)) {
        return p;
    }
    if gpu.is_cpu() {
        Path::Composed
    } else {
        Path::Fused
    }
}

/// Whether the fused kernels handle this head dim on this device: `1 ≤ D ≤ 512` and the
/// 16 KiB of workgroup tiles within the adapter's limit. Otherwise the tape records the
/// composed path.
pub fn fused_fits(gpu: &Gpu, d: usize) -> bool {
    (1..=MAX_HEAD_DIM).contains(&d)
        && gpu.limits().max_compute_workgroup_storage_size >= WORKGROUP_BYTES
}

/// Invocations per workgroup: 8 on CPU adapters (lavapipe's SIMD width: more lanes only
/// lengthen each workgroup), 64 on GPUs.
fn workgroup(gpu: &Gpu) -> usize {
    if gpu.is_cpu() {
        8
    } else {
        64
    }
}

/// Rows per workgroup tile for head dim `d`: as many whole rows as [`TILE4`] vec4s hold.
fn tile_rows(d: usize) -> usize {
    TILE4 / d.div_ceil(4)
}

/// Rows (queries or keys) one split walks so that an invocation stays within
/// [`LOOP_BUDGET`]: `2·d4` steps for its own rows, `d4` to store; per tile `⌈rows·d4/wg⌉`
/// staging steps, and per walked row `2·d4 + 1`.
fn span(d: usize, wg: usize) -> usize {
    let d4 = d.div_ceil(4);
    let rows = tile_rows(d);
    let per_tile = (rows * d4).div_ceil(wg) + 1 + rows * (2 * d4 + 1);
    rows * ((LOOP_BUDGET - 3 * d4) / per_tile).max(1)
}

/// Gradients of the fused attention; `None` where the caller did not ask for one.
#[derive(Debug)]
pub struct AttentionGrads {
    /// `[B, Tq, H·D]`.
    pub dq: Option<Tensor>,
    /// `[B, Tk, H·D]`.
    pub dk: Option<Tensor>,
    /// `[B, Tk, H·D]`.
    pub dv: Option<Tensor>,
}

/// Backward of [`attention_bthd_lse`]. `q`: `[B, Tq, H·D]`; `k`, `v`: `[B, Tk, H·D]`; `o`
/// and the output gradient `dout`: `[B, Tq, H·D]`; `lse`: `[B, H, Tq]` as the forward
/// returned them. `need` = which of (dq, dk, dv) to compute: dq is one pass over key
/// tiles, dk and dv one pass over query tiles (each with its own workgroup per output
/// row, so no atomics and the same bits every run).
#[allow(clippy::too_many_arguments)]
pub fn attention_bthd_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    heads: usize,
    causal: bool,
    scale: f32,
    need: [bool; 3],
) -> Result<AttentionGrads> {
    let dims = bthd_dims(q, k, v, heads)?;
    let [b, h, tq, tk, d] = dims;
    for (n, t) in [
        ("q", q),
        ("k", k),
        ("v", v),
        ("o", o),
        ("dout", dout),
        ("lse", lse),
    ] {
        t.expect_f32(&format!("attention backward {n}"))?;
    }
    if o.shape() != q.shape() || dout.shape() != q.shape() || lse.shape() != [b, h, tq] {
        return Err(Error::shape(format!(
            "attention backward: o {:?} and dout {:?} must be q's {:?}, lse {:?} must be \
             [{b}, {h}, {tq}]",
            o.shape(),
            dout.shape(),
            q.shape(),
            lse.shape()
        )));
    }
    let gpu = q.gpu();
    check_fits(gpu, d)?;
    // Every output value is written below unless there is nothing to attend over.
    let trivial = b * h * tq == 0 || tk == 0;
    let alloc = |want: bool, shape: &[usize]| -> Result<Option<Tensor>> {
        match (want, trivial) {
            (false, _) => Ok(None),
            (true, true) => Tensor::zeros(gpu, shape).map(Some),
            (true, false) => Tensor::empty(gpu, shape, DType::F32).map(Some),
        }
    };
    let grads = AttentionGrads {
        dq: alloc(need[0], q.shape())?,
        dk: alloc(need[1], k.shape())?,
        dv: alloc(need[2], k.shape())?,
    };
    if trivial || !need.contains(&true) {
        return Ok(grads);
    }
    let addr = Addr::separate(Layout::Bthd, h, tq, tk, d);
    let outs = [grads.dq.as_ref(), grads.dk.as_ref(), grads.dv.as_ref()];
    run_backward([q, k, v], o, lse, dout, dims, addr, causal, scale, outs)?;
    Ok(grads)
}

/// Backward of [`attention_qkv_lse`]: from the packed `qkv` `[B, T, 3·H·D]`, the output
/// `o` and its gradient `dout` `[B, T, H·D]` and `lse` `[B, H, T]`, the gradient of `qkv`,
/// `[B, T, 3·H·D]` with dQ, dK and dV side by side in each row, written in place by the
/// same kernels (so the input gradient of the fused projection is one product
/// `dqkv @ W_qkv`).
#[allow(clippy::too_many_arguments)]
pub fn attention_qkv_backward(
    qkv: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    heads: usize,
    causal: bool,
    scale: f32,
) -> Result<Tensor> {
    let dims = qkv_dims(qkv, heads)?;
    let [b, h, t, _, d] = dims;
    for (n, x) in [("qkv", qkv), ("o", o), ("dout", dout), ("lse", lse)] {
        x.expect_f32(&format!("attention backward {n}"))?;
    }
    if o.shape() != [b, t, h * d] || dout.shape() != o.shape() || lse.shape() != [b, h, t] {
        return Err(Error::shape(format!(
            "attention backward: o {:?} and dout {:?} must be [{b}, {t}, {}], lse {:?} must \
             be [{b}, {h}, {t}]",
            o.shape(),
            dout.shape(),
            h * d,
            lse.shape()
        )));
    }
    let gpu = qkv.gpu();
    check_fits(gpu, d)?;
    if b * h * t == 0 {
        return Tensor::zeros(gpu, qkv.shape());
    }
    let dqkv = Tensor::empty(gpu, qkv.shape(), DType::F32)?;
    let addr = Addr::packed_qkv(h, t, d);
    let outs = [Some(&dqkv); 3];
    run_backward([qkv; 3], o, lse, dout, dims, addr, causal, scale, outs)?;
    Ok(dqkv)
}

/// Err unless [`fused_fits`].
fn check_fits(gpu: &Gpu, d: usize) -> Result<()> {
    if fused_fits(gpu, d) {
        return Ok(());
    }
    Err(Error::shape(format!(
        "fused attention backward: head dim {d} (at most {MAX_HEAD_DIM}) or workgroup \
         storage {} B (needs {WORKGROUP_BYTES}) does not fit; record the composed path",
        gpu.limits().max_compute_workgroup_storage_size
    )))
}

/// The backward dispatches over q, k, v addressed by `addr` (dQ, dK, dV are written with
/// q's, k's and v's strides and offsets into `outs`, which may be one tensor), O and dO
/// by `addr.o_s`. At least one output; B·H·Tq and Tk non-zero.
#[allow(clippy::too_many_arguments)]
fn run_backward(
    [q, k, v]: [&Tensor; 3],
    o: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    [b, h, tq, tk, d]: [usize; 5],
    addr: Addr,
    causal: bool,
    scale: f32,
    [dq_out, dk_out, dv_out]: [Option<&Tensor>; 3],
) -> Result<()> {
    let gpu = q.gpu();
    let bh = b * h;
    let wg = workgroup(gpu);
    let sp = span(d, wg);
    let mut p = Params {
        heads: h as u32,
        tq: tq as u32,
        tk: tk as u32,
        d: d as u32,
        rows: tile_rows(d) as u32,
        span: sp as u32,
        splits: 1,
        bh0: 0,
        scale,
        bh: bh as u32,
        q_s: addr.q_s,
        k_s: addr.k_s,
        o_s: addr.o_s,
        q_off: addr.offs[0],
        k_off: addr.offs[1],
        v_off: addr.offs[2],
        _pad: [0; 2],
    };
    if bh * tq > u32::MAX as usize - WGE as usize {
        return Err(Error::shape(
            "attention backward: more than 2^32 query rows",
        ));
    }

    // D_i = dO_i · O_i, read by both passes.
    let delta = Tensor::empty(gpu, &[bh * tq], DType::F32)?;
    let k_delta = Kernel::new(&SHADER, "attn_bwd_delta").with(ov::WGE, WGE);
    gpu.dispatch(
        &k_delta,
        &p,
        &[dout.binding(), o.binding(), delta.binding()],
        grid_1d(((bh * tq) as u32).div_ceil(WGE)),
    );

    let kernel = |entry: &'static str, split: bool| {
        Kernel::new(&SHADER, entry)
            .with(ov::WG, wg as u32)
            .with(ov::CAUSAL, causal)
            .with(ov::SPLIT, split)
            .with(ov::D_MULT4, d % 4 == 0)
            .with(ov::D4, d.div_ceil(4) as u32)
    };
    // Runs one pass over `blocks` workgroups per (batch, head) and `splits` ranges of the
    // walked rows, writing straight into the outputs or into split partials then summed.
    let pass = |p: &mut Params,
                entry: &'static str,
                blocks: usize,
                walked: usize,
                ntok: usize,
                outs: &[(&Tensor, [u32; 3], u32)]|
     -> Result<()> {
        let splits = walked.div_ceil(sp).max(1);
        if blocks > 65535 || splits > 65535 {
            return Err(Error::shape(format!(
                "attention backward with Tq = {tq}, Tk = {tk} is too long for one dispatch"
            )));
        }
        if splits * bh * ntok * d > u32::MAX as usize - WGE as usize {
            return Err(Error::shape(
                "attention backward: more than 2^32 partial gradient values",
            ));
        }
        p.splits = splits as u32;
        let split = splits > 1;
        let parts = if split {
            outs.iter()
                .map(|_| Tensor::empty(gpu, &[splits * bh * ntok, d], DType::F32))
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let targets: Vec<&Tensor> = if split {
            parts.iter().collect()
        } else {
            outs.iter().map(|o| o.0).collect()
        };
        let mut binds = vec![
            q.binding(),
            k.binding(),
            v.binding(),
            dout.binding(),
            lse.binding(),
            delta.binding(),
        ];
        binds.extend(targets.iter().map(|t| t.binding()));
        let kern = kernel(entry, split);
        for bh0 in (0..bh).step_by(65535) {
            p.bh0 = bh0 as u32;
            let ny = (bh - bh0).min(65535);
            gpu.dispatch(&kern, p, &binds, [blocks as u32, ny as u32, splits as u32]);
        }
        if split {
            // The sum pass reads T from `tk`, the output strides from `k_s` and its offset
            // from `k_off`.
            let mut ps = *p;
            ps.tk = ntok as u32;
            ps.bh0 = 0;
            let k_sum = Kernel::new(&SHADER, "attn_bwd_sum").with(ov::WGE, WGE);
            let n = (bh * ntok * d) as u32;
            for (part, &(out, strides, off)) in parts.iter().zip(outs) {
                ps.k_s = strides;
                ps.k_off = off;
                gpu.dispatch(
                    &k_sum,
                    &ps,
                    &[part.binding(), out.binding()],
                    grid_1d(n.div_ceil(WGE)),
                );
            }
        }
        Ok(())
    };

    // The key pass writes dK and dV both; a scratch (separate tensors only, offset 0)
    // takes the one not asked for.
    let kv_scratch;
    let kv = match (dk_out, dv_out) {
        (Some(dk), Some(dv)) => Some((dk, dv)),
        (Some(dk), None) => {
            kv_scratch = Tensor::empty(gpu, k.shape(), DType::F32)?;
            Some((dk, &kv_scratch))
        }
        (None, Some(dv)) => {
            kv_scratch = Tensor::empty(gpu, k.shape(), DType::F32)?;
            Some((&kv_scratch, dv))
        }
        (None, None) => None,
    };
    let [q_off, k_off, v_off] = addr.offs;
    if let Some((dk, dv)) = kv {
        let outs = [(dk, addr.k_s, k_off), (dv, addr.k_s, v_off)];
        pass(&mut p, "attn_bwd_kv", tk.div_ceil(wg), tq, tk, &outs)?;
    }
    if let Some(dq) = dq_out {
        // Causal queries never look past key Tq − 1.
        let keys = if causal { tk.min(tq) } else { tk };
        let outs = [(dq, addr.q_s, q_off)];
        pass(&mut p, "attn_bwd_q", tq.div_ceil(wg), keys, tq, &outs)?;
    }
    Ok(())
}

/// CPU reference of the backward in f64 on `[B·H, T, D]` data (the layout
/// [`super::attention::reference`] takes): returns (dq, dk, dv) computed from the explicit
/// probability matrix, plus the log-sum-exp per query. Inputs are f32 (the kernel tests) or
/// f64 (its own finite-difference test).
#[allow(clippy::too_many_arguments)]
pub fn reference_backward<T: Copy + Into<f64>>(
    q: &[T],
    k: &[T],
    v: &[T],
    dout: &[T],
    bh: usize,
    tq: usize,
    tk: usize,
    d: usize,
    causal: bool,
    scale: f32,
) -> ReferenceGrads {
    let sc = scale as f64;
    let mut r = ReferenceGrads {
        dq: vec![0.0; bh * tq * d],
        dk: vec![0.0; bh * tk * d],
        dv: vec![0.0; bh * tk * d],
        lse: vec![0.0; bh * tq],
    };
    for x in 0..bh {
        for i in 0..tq {
            let qi = &q[(x * tq + i) * d..][..d];
            let gi = &dout[(x * tq + i) * d..][..d];
            let keys = if causal { tk.min(i + 1) } else { tk };
            let row = |t: &[T], j: usize| -> Vec<f64> {
                t[(x * tk + j) * d..][..d]
                    .iter()
                    .map(|&a| a.into())
                    .collect()
            };
            let s: Vec<f64> = (0..keys)
                .map(|j| {
                    sc * row(k, j)
                        .iter()
                        .zip(qi)
                        .map(|(a, &b)| a * b.into())
                        .sum::<f64>()
                })
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let l = m + s.iter().map(|a| (a - m).exp()).sum::<f64>().ln();
            r.lse[x * tq + i] = l;
            let pr: Vec<f64> = s.iter().map(|a| (a - l).exp()).collect();
            // O_i and dP_ij = dO_i · v_j.
            let dp: Vec<f64> = (0..keys)
                .map(|j| {
                    row(v, j)
                        .iter()
                        .zip(gi)
                        .map(|(a, &b)| a * b.into())
                        .sum::<f64>()
                })
                .collect();
            let di: f64 = (0..d)
                .map(|dd| {
                    let od: f64 = (0..keys)
                        .map(|j| pr[j] * v[(x * tk + j) * d + dd].into())
                        .sum();
                    od * gi[dd].into()
                })
                .sum();
            for j in 0..keys {
                let ds = pr[j] * (dp[j] - di);
                for dd in 0..d {
                    r.dv[(x * tk + j) * d + dd] += pr[j] * gi[dd].into();
                    r.dk[(x * tk + j) * d + dd] += sc * ds * qi[dd].into();
                    r.dq[(x * tq + i) * d + dd] += sc * ds * k[(x * tk + j) * d + dd].into();
                }
            }
        }
    }
    r
}

/// What [`reference_backward`] returns, in its `[B·H, T, D]` layout.
#[derive(Debug)]
pub struct ReferenceGrads {
    /// `[B·H, Tq, D]`.
    pub dq: Vec<f64>,
    /// `[B·H, Tk, D]`.
    pub dk: Vec<f64>,
    /// `[B·H, Tk, D]`.
    pub dv: Vec<f64>,
    /// `[B·H, Tq]`.
    pub lse: Vec<f64>,
}

#[cfg(test)]
mod tests;
