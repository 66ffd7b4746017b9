//! Fused multi-head attention (`shaders/attention.wgsl`): `softmax(scale·QKᵀ [+ causal
//! mask]) V` with an online softmax, never materialising the score matrix.
//!
//! [`attention`] takes `[B, H, T, D]` tensors; [`attention_bthd`] takes the `[B, T, H·D]`
//! layout that q/k/v projections produce and returns the same layout, with no permutes.
//! [`split_heads`] / [`merge_heads`] convert between the two. The forward runs on one of two
//! kernels, chosen per device by [`super::attention_tiled::forward`].

use super::attention_tiled::{self, Forward};
use super::permute::permute;
use super::CPU_LOOP_LIMIT;
use crate::gpu::{grid_1d, Gpu, Kernel, Shader};
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};

/// The `override` constants the kernels below set (the head-row ones shared with
/// `attention_backward`).
pub(super) mod ov {
    use crate::gpu::Override;
    pub(in crate::ops) const WGQ: Override<u32> = Override::new("WGQ");
    pub(in crate::ops) const CAUSAL: Override<bool> = Override::new("CAUSAL");
    pub(in crate::ops) const SPLIT: Override<bool> = Override::new("SPLIT");
    pub(in crate::ops) const D_MULT4: Override<bool> = Override::new("D_MULT4");
    pub(in crate::ops) const D4: Override<u32> = Override::new("D4");
    pub(super) const WGC: Override<u32> = Override::new("WGC");
    pub(in crate::ops) const LSE: Override<bool> = Override::new("LSE");
}

/// An attention forward module (`$file`: `attention` or `attention_tiled`) over `elem`
/// storage given by `$lib`s (after the `f16` directive library, if any), with the
/// overrides both forward kernels read and `$extra` ones of its own: one kernel text, an
/// f32 and an f16-activation module each.
macro_rules! attention_shader {
    ($name:literal = $file:literal, [$($lib:literal),+] $(, $extra:expr)*) => {
        crate::shader!(
            $name = $file,
            $($lib,)+
            "grid",
            "head_row",
            "attention_io",
            overrides = [
                ov::WGQ,
                ov::CAUSAL,
                ov::SPLIT,
                ov::D_MULT4,
                ov::D4,
                ov::LSE
                $(, $extra)*
            ]
        )
    };
}
pub(super) use attention_shader;

pub(crate) static SHADER: Shader<Params> =
    attention_shader!("attention" = "attention", ["elem_f32"], ov::WGC);
/// [`SHADER`] on f16 q, k, v and output (`--precision f16` inference); scores, softmax and
/// accumulation stay f32.
pub(crate) static SHADER_F16: Shader<Params> =
    attention_shader!("attention_f16" = "attention", ["f16", "elem_f16"], ov::WGC);
/// Largest head dim the kernel holds in its private arrays.
pub const MAX_HEAD_DIM: usize = 512;
/// Loop iterations one invocation may spend (kept below [`CPU_LOOP_LIMIT`]).
const LOOP_BUDGET: usize = CPU_LOOP_LIMIT * 3 / 4;
/// Invocations per workgroup of the combine pass.
const WGC: u32 = 64;

crate::shader_params! {
    /// Mirrors `struct Params` in `shaders/attention.wgsl`.
    pub(crate) struct Params {
        heads: u32,
        tq: u32,
        tk: u32,
        d: u32,
        kps: u32,
        splits: u32,
        bh0: u32,
        scale: f32,
        q_s: [u32; 3],
        k_s: [u32; 3],
        o_s: [u32; 3],
        bh: u32,
        q_off: u32,
        k_off: u32,
        v_off: u32,
        _pad: [u32; 3],
    }
}

/// Where q, k, v and the output live in their buffers: (batch, head, token) element strides
/// (k and v share theirs) and the element offsets of q, k and v. Separate `[B, T, H·D]` or
/// `[B, H, T, D]` tensors have offsets 0; the fused QKV projection's `[B, T, 3·H·D]` output
/// holds all three, row stride 3·H·D, k and v H·D and 2·H·D values into each row.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Addr {
    pub q_s: [u32; 3],
    pub k_s: [u32; 3],
    pub o_s: [u32; 3],
    pub offs: [u32; 3],
}

impl Addr {
    /// Separate q, k, v and output tensors in `layout`.
    pub(crate) fn separate(layout: Layout, h: usize, tq: usize, tk: usize, d: usize) -> Addr {
        Addr {
            q_s: layout.strides(h, tq, d),
            k_s: layout.strides(h, tk, d),
            o_s: layout.strides(h, tq, d),
            offs: [0; 3],
        }
    }

    /// q, k and v side by side in one `[B, T, 3·H·D]` buffer; output `[B, T, H·D]`.
    pub(crate) fn packed_qkv(h: usize, t: usize, d: usize) -> Addr {
        let c = h * d;
        let s = [(t * 3 * c) as u32, d as u32, (3 * c) as u32];
        Addr {
            q_s: s,
            k_s: s,
            o_s: Layout::Bthd.strides(h, t, d),
            offs: [0, c as u32, (2 * c) as u32],
        }
    }

    /// Whether every row q, k and v start on a 16-byte boundary (their vec4 views apply).
    fn vec4_aligned(&self) -> bool {
        self.q_s
            .iter()
            .chain(&self.k_s)
            .chain(&self.offs)
            .all(|x| x % 4 == 0)
    }
}

/// How q, k, v and the output are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// `[B, H, T, D]`.
    Bhtd,
    /// `[B, T, H·D]`.
    Bthd,
}

impl Layout {
    /// (batch, head, token) element strides of a tensor with `t` tokens.
    pub(crate) fn strides(self, h: usize, t: usize, d: usize) -> [u32; 3] {
        match self {
            Layout::Bhtd => [(h * t * d) as u32, (t * d) as u32, d as u32],
            Layout::Bthd => [(t * h * d) as u32, d as u32, (h * d) as u32],
        }
    }
}

/// Keys per split so that one invocation stays within [`LOOP_BUDGET`]: it runs `d4` steps
/// to load q, `2·d4 + 1` steps per 4 keys, and `d` steps to store.
fn keys_per_split(d: usize) -> usize {
    let d4 = d.div_ceil(4);
    let per4 = 2 * d4 + 1;
    4 * ((LOOP_BUDGET - d4 - d) / per4).max(1)
}

/// Scaled dot-product attention. `q`: `[B, H, Tq, D]`; `k`, `v`: `[B, H, Tk, D]`; returns
/// `[B, H, Tq, D]`. With `causal`, query `i` attends to keys `j <= i` only (`torch`'s
/// `is_causal`, top-left aligned when `Tq != Tk`). `scale` multiplies the scores (usually
/// `1/√D`). `D` can be at most [`MAX_HEAD_DIM`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, scale: f32) -> Result<Tensor> {
    for (n, t) in [("q", q), ("k", k), ("v", v)] {
        if t.rank() != 4 {
            return Err(Error::shape(format!(
                "attention {n} must be [B, H, T, D], got {:?}",
                t.shape()
            )));
        }
    }
    let (b, h, tq, d) = (q.dim(0), q.dim(1), q.dim(2), q.dim(3));
    let tk = k.dim(2);
    if k.shape() != [b, h, tk, d] || v.shape() != k.shape() {
        return Err(Error::shape(format!(
            "attention k and v must be [B, H, Tk, D] = [{b}, {h}, Tk, {d}] like q {:?}, got k \
             {:?} and v {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        )));
    }
    let addr = Addr::separate(Layout::Bhtd, h, tq, tk, d);
    run([q, k, v], [b, h, tq, tk, d], addr, causal, scale, None)
}

/// [`attention`] on the `[B, T, H·D]` layout of q/k/v projections: `q`: `[B, Tq, H·D]`,
/// `k`, `v`: `[B, Tk, H·D]`; returns `[B, Tq, H·D]` (heads concatenated, ready for the output
/// projection).
pub fn attention_bthd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    causal: bool,
    scale: f32,
) -> Result<Tensor> {
    let dims = bthd_dims(q, k, v, heads)?;
    let [_, h, tq, tk, d] = dims;
    let addr = Addr::separate(Layout::Bthd, h, tq, tk, d);
    run([q, k, v], dims, addr, causal, scale, None)
}

/// Self-attention reading q, k and v in place from the fused QKV projection's output
/// `qkv`: `[B, T, 3·H·D]`, each row `[q | k | v]` with the heads side by side in each
/// part. Returns `[B, T, H·D]`, the same as [`attention_bthd`] on the three thirds, with no
/// copy of them made.
pub fn attention_qkv(qkv: &Tensor, heads: usize, causal: bool, scale: f32) -> Result<Tensor> {
    attention_qkv_by(
        qkv,
        heads,
        causal,
        scale,
        attention_tiled::forward(qkv.gpu()),
    )
}

/// [`attention_qkv`] on the given forward kernel instead of the device's choice (tuning).
pub(crate) fn attention_qkv_by(
    qkv: &Tensor,
    heads: usize,
    causal: bool,
    scale: f32,
    kernel: Forward,
) -> Result<Tensor> {
    let dims = qkv_dims(qkv, heads)?;
    let [_, h, t, _, d] = dims;
    let addr = Addr::packed_qkv(h, t, d);
    let launch = Launch::on(qkv.gpu(), kernel);
    run_by([qkv; 3], dims, addr, causal, scale, None, launch)
}

/// A forward kernel and the queries (invocations) each of its workgroups takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Launch {
    /// Which shader entry point.
    pub kernel: Forward,
    /// Queries per workgroup (`WGQ`).
    pub wgq: usize,
}

impl Launch {
    /// `kernel` with the device's workgroup: lavapipe's SIMD width on CPU adapters (more
    /// lanes only lengthen each workgroup), 64 on GPUs.
    pub(crate) fn on(gpu: &Gpu, kernel: Forward) -> Launch {
        let wgq = if gpu.is_cpu() { 8 } else { 64 };
        Launch { kernel, wgq }
    }
}

/// [`attention_qkv`] that also returns the log-sum-exp `[B, H, T]`, as
/// [`attention_bthd_lse`] does.
pub fn attention_qkv_lse(
    qkv: &Tensor,
    heads: usize,
    causal: bool,
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    let dims = qkv_dims(qkv, heads)?;
    let [b, h, t, _, d] = dims;
    let lse = Tensor::empty(qkv.gpu(), &[b, h, t], DType::F32)?;
    let o = run(
        [qkv; 3],
        dims,
        Addr::packed_qkv(h, t, d),
        causal,
        scale,
        Some(&lse),
    )?;
    Ok((o, lse))
}

/// `[B, H, T, T, D]` of a packed `[B, T, 3·H·D]` qkv tensor, or why it is not one.
pub(crate) fn qkv_dims(qkv: &Tensor, heads: usize) -> Result<[usize; 5]> {
    if qkv.rank() != 3 || heads == 0 || !qkv.dim(2).is_multiple_of(3 * heads) {
        return Err(Error::shape(format!(
            "attention_qkv needs [B, T, 3*H*D] with {heads} heads, got {:?}",
            qkv.shape()
        )));
    }
    let (b, t, w) = (qkv.dim(0), qkv.dim(1), qkv.dim(2));
    Ok([b, heads, t, t, w / 3 / heads])
}

/// [`attention_bthd`] that also returns the log-sum-exp of each query's scaled scores,
/// `L[b, h, i] = m + log Σⱼ exp(sᵢⱼ − m)` as `[B, H, Tq]`: what the fused backward
/// ([`super::attention_backward`]) needs to recompute the probabilities `exp(s − L)`
/// instead of keeping the `[Tq, Tk]` matrix.
pub fn attention_bthd_lse(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    causal: bool,
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    let dims = bthd_dims(q, k, v, heads)?;
    let [b, h, tq, tk, d] = dims;
    let lse = Tensor::empty(q.gpu(), &[b, h, tq], DType::F32)?;
    let addr = Addr::separate(Layout::Bthd, h, tq, tk, d);
    let o = run([q, k, v], dims, addr, causal, scale, Some(&lse))?;
    Ok((o, lse))
}

/// `[B, H, Tq, Tk, D]` of `[B, T, H·D]` q, k, v, or why they do not fit together.
pub(crate) fn bthd_dims(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<[usize; 5]> {
    for (n, t) in [("q", q), ("k", k), ("v", v)] {
        if t.rank() != 3 {
            return Err(Error::shape(format!(
                "attention_bthd {n} must be [B, T, H*D], got {:?}",
                t.shape()
            )));
        }
    }
    let (b, tq, hd) = (q.dim(0), q.dim(1), q.dim(2));
    if heads == 0 || hd % heads != 0 {
        return Err(Error::shape(format!(
            "attention_bthd: width {hd} of q {:?} is not a multiple of {heads} heads",
            q.shape()
        )));
    }
    let tk = k.dim(1);
    if k.shape() != [b, tk, hd] || v.shape() != k.shape() {
        return Err(Error::shape(format!(
            "attention_bthd k and v must be [B, Tk, H*D] = [{b}, Tk, {hd}] like q {:?}, got k \
             {:?} and v {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        )));
    }
    Ok([b, heads, tq, tk, hd / heads])
}

/// The forward dispatch(es) over q, k, v addressed by `addr`, writing a new `[B, Tq, H·D]`
/// or `[B, H, Tq, D]` output (by `addr.o_s`); with `lse` (`[B·H·Tq]` values) also the
/// log-sum-exp per query. On the device's forward kernel ([`attention_tiled::forward`]).
fn run(
    qkv: [&Tensor; 3],
    dims: [usize; 5],
    addr: Addr,
    causal: bool,
    scale: f32,
    lse: Option<&Tensor>,
) -> Result<Tensor> {
    let gpu = qkv[0].gpu();
    let launch = Launch::on(gpu, attention_tiled::forward(gpu));
    run_by(qkv, dims, addr, causal, scale, lse, launch)
}

/// [`run`] on the forward kernel and workgroup `launch`.
fn run_by(
    [q, k, v]: [&Tensor; 3],
    [b, h, tq, tk, d]: [usize; 5],
    addr: Addr,
    causal: bool,
    scale: f32,
    lse: Option<&Tensor>,
    Launch { kernel, wgq }: Launch,
) -> Result<Tensor> {
    // f32, or f16 activations (`--precision f16` inference) for all three.
    let dt = q.dtype();
    for (n, t) in [("q", q), ("k", k), ("v", v)] {
        if t.dtype() != dt || !matches!(dt, DType::F32 | DType::F16) {
            return Err(Error::invalid(format!(
                "attention {n}: q, k and v must be all f32 or all f16, got q {:?}, k {:?}, \
                 v {:?}",
                q.dtype(),
                k.dtype(),
                v.dtype()
            )));
        }
    }
    if dt == DType::F16 {
        q.gpu().require_f16("attention on f16 activations")?;
    }
    if d > MAX_HEAD_DIM {
        return Err(Error::shape(format!(
            "attention head dim {d} is larger than the supported {MAX_HEAD_DIM}"
        )));
    }
    if !scale.is_finite() {
        return Err(Error::invalid(format!(
            "attention scale must be finite, got {scale}"
        )));
    }
    let gpu = q.gpu();
    // Separate tensors: the output is shaped like q; packed qkv: [B, T, H·D].
    let out_shape = if addr.offs == [0; 3] {
        q.shape().to_vec()
    } else {
        vec![b, tq, h * d]
    };
    let out = Tensor::empty(gpu, &out_shape, dt)?;
    if out.numel() == 0 {
        return Ok(out);
    }
    if tk == 0 {
        return Err(Error::shape(format!(
            "attention over zero keys (k {:?}): the softmax is undefined",
            k.shape()
        )));
    }
    if kernel == Forward::Tiled && !attention_tiled::tiled_fits(gpu) {
        return Err(Error::invalid(format!(
            "the tiled attention forward needs {} B of workgroup storage; this adapter has {}",
            attention_tiled::WORKGROUP_BYTES,
            gpu.limits().max_compute_workgroup_storage_size
        )));
    }
    let kps = match kernel {
        Forward::Broadcast => keys_per_split(d),
        Forward::Tiled => attention_tiled::keys_per_split(d, wgq),
    };
    // Causal queries never look past key Tq - 1.
    let keys_used = if causal { tk.min(tq) } else { tk };
    let splits = keys_used.div_ceil(kps);
    let q_blocks = tq.div_ceil(wgq);
    if q_blocks > 65535 || splits > 65535 {
        return Err(Error::shape(format!(
            "attention with Tq = {tq}, Tk = {tk} is too long for one dispatch"
        )));
    }
    // The f16 kernel keeps no partials of key splits (they would be rounded) and writes no
    // log-sum-exp (training runs on f32 activations): such calls run in f32 between two
    // conversions.
    if dt == DType::F16 && (splits > 1 || lse.is_some()) {
        use super::cast::cast;
        let q32 = cast(q, DType::F32)?;
        let same = |t: &Tensor| t.buffer_id() == q.buffer_id();
        let k32 = if same(k) {
            q32.clone()
        } else {
            cast(k, DType::F32)?
        };
        let v32 = if same(v) {
            q32.clone()
        } else {
            cast(v, DType::F32)?
        };
        let o = run(
            [&q32, &k32, &v32],
            [b, h, tq, tk, d],
            addr,
            causal,
            scale,
            lse,
        )?;
        return cast(&o, DType::F16);
    }
    let bh = b * h;
    let mut p = Params {
        heads: h as u32,
        tq: tq as u32,
        tk: tk as u32,
        d: d as u32,
        kps: kps as u32,
        splits: splits as u32,
        bh0: 0,
        scale,
        q_s: addr.q_s,
        k_s: addr.k_s,
        o_s: addr.o_s,
        bh: bh as u32,
        q_off: addr.offs[0],
        k_off: addr.offs[1],
        v_off: addr.offs[2],
        _pad: [0; 3],
    };
    let vec4 = d % 4 == 0 && addr.vec4_aligned();
    let split = splits > 1;
    let f16 = dt == DType::F16;
    let kernel = match kernel {
        Forward::Broadcast => Kernel::new(if f16 { &SHADER_F16 } else { &SHADER }, "attn"),
        Forward::Tiled => {
            let shader = if f16 {
                &attention_tiled::SHADER_F16
            } else {
                &attention_tiled::SHADER
            };
            Kernel::new(shader, "attn_tiled").with(
                attention_tiled::KT,
                attention_tiled::keys_per_tile(d) as u32,
            )
        }
    }
    .with(ov::WGQ, wgq as u32)
    .with(ov::CAUSAL, causal)
    .with(ov::SPLIT, split)
    .with(ov::D_MULT4, vec4)
    .with(ov::D4, d.div_ceil(4) as u32)
    .with(ov::LSE, lse.is_some());
    let scratch = if split {
        let rows = bh * tq * splits;
        Some((
            Tensor::empty(gpu, &[rows, d], DType::F32)?,
            Tensor::empty(gpu, &[rows, 2], DType::F32)?,
        ))
    } else {
        None
    };
    // Without splits `ml` takes the log-sum-exp, if asked for, or is never written; it
    // needs a buffer of its own: the shared unused binding may be bound read-only below.
    let no_ml;
    let (o_b, ml_b) = match (&scratch, lse) {
        (Some((part, ml)), _) => (part.binding(), ml.binding()),
        (None, Some(lse)) => (out.binding(), lse.binding()),
        (None, None) => {
            no_ml = Tensor::empty(gpu, &[4], DType::F32)?;
            (out.binding(), no_ml.binding())
        }
    };
    // vec4 views of k and v (D % 4 == 0 and 4-aligned strides and offsets keep every row
    // 16-byte aligned); otherwise unread.
    let (k4, v4) = if vec4 {
        (k.binding(), v.binding())
    } else {
        (gpu.unused_binding(), gpu.unused_binding())
    };
    for bh0 in (0..bh).step_by(65535) {
        p.bh0 = bh0 as u32;
        let ny = (bh - bh0).min(65535);
        gpu.dispatch(
            &kernel,
            &p,
            &[o_b, ml_b, q.binding(), k.binding(), v.binding(), k4, v4],
            [q_blocks as u32, ny as u32, splits as u32],
        );
    }
    if let Some((part, ml)) = &scratch {
        let n = bh * tq * d;
        if n > u32::MAX as usize - WGC as usize {
            return Err(Error::shape("attention output has more than 2^32 elements"));
        }
        p.bh0 = 0;
        let k = Kernel::new(&SHADER, "attn_combine")
            .with(ov::WGC, WGC)
            .with(ov::LSE, lse.is_some());
        let lse_b = lse.map_or_else(|| gpu.unused_binding(), Tensor::binding);
        gpu.dispatch(
            &k,
            &p,
            &[out.binding(), ml.binding(), part.binding(), lse_b],
            grid_1d((n as u32).div_ceil(WGC)),
        );
    }
    Ok(out)
}

/// `[B, T, H·D]` → `[B, H, T, D]`.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    if x.rank() != 3 || heads == 0 || !x.dim(2).is_multiple_of(heads) {
        return Err(Error::shape(format!(
            "split_heads needs [B, T, H*D] with a width divisible by {heads}, got {:?}",
            x.shape()
        )));
    }
    let (b, t, hd) = (x.dim(0), x.dim(1), x.dim(2));
    permute(&x.reshape(&[b, t, heads, hd / heads])?, &[0, 2, 1, 3])
}

/// `[B, H, T, D]` → `[B, T, H·D]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    if x.rank() != 4 {
        return Err(Error::shape(format!(
            "merge_heads needs [B, H, T, D], got {:?}",
            x.shape()
        )));
    }
    let (b, h, t, d) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    permute(x, &[0, 2, 1, 3])?.reshape(&[b, t, h * d])
}

/// CPU reference in f64 on `[B, H, T, D]` data: the naive `softmax(scale·QKᵀ)V`.
/// Inputs are f32 (the kernel tests) or f64 (the autodiff tests' finite differences).
#[allow(clippy::too_many_arguments)]
pub fn reference<T: Copy + Into<f64>>(
    q: &[T],
    k: &[T],
    v: &[T],
    bh: usize,
    tq: usize,
    tk: usize,
    d: usize,
    causal: bool,
    scale: f32,
) -> Vec<f64> {
    let mut out = vec![0.0; bh * tq * d];
    for x in 0..bh {
        for i in 0..tq {
            let qi = &q[(x * tq + i) * d..][..d];
            let keys = if causal { tk.min(i + 1) } else { tk };
            let s: Vec<f64> = (0..keys)
                .map(|j| {
                    let kj = &k[(x * tk + j) * d..][..d];
                    scale as f64
                        * qi.iter()
                            .zip(kj)
                            .map(|(&a, &b)| a.into() * b.into())
                            .sum::<f64>()
                })
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = s.iter().map(|a| (a - m).exp()).collect();
            let z: f64 = w.iter().sum();
            let o = &mut out[(x * tq + i) * d..][..d];
            for (j, wj) in w.iter().enumerate() {
                for (dd, od) in o.iter_mut().enumerate() {
                    *od += wj / z * v[(x * tk + j) * d + dd].into();
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};

    /// Error bound per output value, from f32 rounding: each score is a D-term dot product,
    /// off by at most δ = D·ε·scale·Σ|q·k| (which scales its softmax weight by e^δ ≈ 1 + δ);
    /// `exp` is good to 3 + 2|a| ULP at argument a; the sums over Tk keys add Tk·ε in
    /// relative terms. So |err| ≤ Σⱼ wⱼ|vⱼ|·(2δmax + ε·(Tk + 2(3 + 2Δmax) + 8)) with Δmax the
    /// largest score gap; the check allows twice that plus 1e-7·max|v| for the rescaling
    /// and the combine pass.
    #[allow(clippy::too_many_arguments)]
    fn tolerances(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        bh: usize,
        tq: usize,
        tk: usize,
        d: usize,
        causal: bool,
        scale: f32,
    ) -> Vec<f64> {
        let e = f32::EPSILON as f64;
        let vmax = v.iter().fold(0.0f64, |a, &x| a.max((x as f64).abs()));
        let mut tol = vec![0.0; bh * tq * d];
        for x in 0..bh {
            for i in 0..tq {
                let qi = &q[(x * tq + i) * d..][..d];
                let keys = if causal { tk.min(i + 1) } else { tk };
                let (mut s, mut mag) = (Vec::new(), Vec::new());
                for j in 0..keys {
                    let kj = &k[(x * tk + j) * d..][..d];
                    let (mut a, mut g) = (0.0, 0.0);
                    for (&qa, &kb) in qi.iter().zip(kj) {
                        a += qa as f64 * kb as f64;
                        g += (qa as f64 * kb as f64).abs();
                    }
                    s.push(scale as f64 * a);
                    mag.push((scale as f64).abs() * g);
                }
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let gap = s.iter().fold(0.0f64, |g, &a| g.max(m - a));
                let delta = mag.iter().fold(0.0f64, |g, &a| g.max(d as f64 * e * a));
                let w: Vec<f64> = s.iter().map(|a| (a - m).exp()).collect();
                let z: f64 = w.iter().sum();
                let rel = 2.0 * delta + e * (keys as f64 + 2.0 * (3.0 + 2.0 * gap) + 8.0);
                for dd in 0..d {
                    let vbar: f64 = (0..keys)
                        .map(|j| w[j] / z * (v[(x * tk + j) * d + dd] as f64).abs())
                        .sum();
                    tol[(x * tq + i) * d + dd] = 2.0 * vbar * rel + 1e-7 * vmax;
                }
            }
        }
        tol
    }

    #[allow(clippy::too_many_arguments)]
    fn check(
        b: usize,
        h: usize,
        tq: usize,
        tk: usize,
        d: usize,
        causal: bool,
        bthd: bool,
        seed: u64,
    ) {
        check_on(b, h, tq, tk, d, causal, bthd, seed, None, false);
    }

    /// [`check`] on `launch`, or through the public functions (the device's kernel) when
    /// `None`; with `f16` on f16 q, k, v (rounded: the reference takes the rounded values)
    /// and an f16 output, one f16 ulp more (2⁻¹⁰ relative: WGSL may round to either
    /// neighbour).
    #[allow(clippy::too_many_arguments)]
    fn check_on(
        b: usize,
        h: usize,
        tq: usize,
        tk: usize,
        d: usize,
        causal: bool,
        bthd: bool,
        seed: u64,
        launch: Option<Launch>,
        f16: bool,
    ) {
        let g = gpu();
        let round = |v: Vec<f32>| -> Vec<f32> {
            if !f16 {
                return v;
            }
            v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
        };
        let qv = round(rand_vec(b * h * tq * d, seed));
        let kv = round(rand_vec(b * h * tk * d, seed + 1));
        let vv = round(rand_vec(b * h * tk * d, seed + 2));
        // Scores of a few units, as in trained models.
        let scale = 2.0 / (d as f32).sqrt();
        let upload = |v: &[f32], shape: &[usize]| {
            if f16 {
                Tensor::from_f32_as_f16(&g, v, shape).unwrap()
            } else {
                Tensor::from_slice(&g, v, shape).unwrap()
            }
        };
        let qt = upload(&qv, &[b, h, tq, d]);
        let kt = upload(&kv, &[b, h, tk, d]);
        let vt = upload(&vv, &[b, h, tk, d]);
        let dims = [b, h, tq, tk, d];
        let got = if bthd {
            let (q3, k3, v3) = (
                merge_heads(&qt).unwrap(),
                merge_heads(&kt).unwrap(),
                merge_heads(&vt).unwrap(),
            );
            let o = match launch {
                None => attention_bthd(&q3, &k3, &v3, h, causal, scale),
                Some(l) => {
                    let addr = Addr::separate(Layout::Bthd, h, tq, tk, d);
                    run_by([&q3, &k3, &v3], dims, addr, causal, scale, None, l)
                }
            }
            .unwrap();
            assert_eq!(o.shape(), &[b, tq, h * d]);
            split_heads(&o, h).unwrap()
        } else {
            match launch {
                None => attention(&qt, &kt, &vt, causal, scale),
                Some(l) => {
                    let addr = Addr::separate(Layout::Bhtd, h, tq, tk, d);
                    run_by([&qt, &kt, &vt], dims, addr, causal, scale, None, l)
                }
            }
            .unwrap()
        };
        assert_eq!(got.shape(), &[b, h, tq, d]);
        assert_eq!(got.dtype(), qt.dtype());
        let got = got.to_vec().unwrap();
        let want = reference(&qv, &kv, &vv, b * h, tq, tk, d, causal, scale);
        let tol = tolerances(&qv, &kv, &vv, b * h, tq, tk, d, causal, scale);
        for i in 0..got.len() {
            let err = (got[i] as f64 - want[i]).abs();
            let ulp = if f16 {
                (want[i].abs() * 2f64.powi(-10)).max(2f64.powi(-24))
            } else {
                0.0
            };
            assert!(
                err <= tol[i] + ulp,
                "B{b} H{h} Tq{tq} Tk{tk} D{d} causal {causal} bthd {bthd} {launch:?} f16 {f16}: \
                 element {i} got {} want {} (err {err:e} > tol {:e})",
                got[i],
                want[i],
                tol[i]
            );
        }
    }

    /// (B, H, Tq, Tk, D) of the reference checks: Tq below, at and above a workgroup of
    /// queries, Tq != Tk both ways, D not a multiple of 4, partial last key tiles.
    const SHAPES: [(usize, usize, usize, usize, usize); 8] = [
        (1, 1, 1, 1, 1),
        (2, 3, 5, 7, 3),
        (1, 2, 17, 65, 17),
        (1, 2, 65, 17, 8),
        (1, 12, 50, 50, 64),
        (2, 8, 77, 77, 64),
        (1, 2, 9, 33, 128),
        (1, 1, 3, 1000, 5),
    ];

    #[test]
    fn f16_activations_match_the_reference_of_the_rounded_inputs() {
        // The f16 twins of both forward kernels, at lavapipe's 8 and the GPUs' 64 queries
        // per workgroup (`--precision f16` inference), on CLIP's shapes (text: 8 heads x 77
        // causal tokens; vision: 12 heads x 50), a head dim that is not a multiple of 4
        // (no vec4 views), Tq != Tk, and keys enough to split (run in f32 between
        // conversions); then the packed-qkv layout read in place.
        if !gpu().features().contains(wgpu::Features::SHADER_F16) {
            eprintln!("skipped: the adapter has no SHADER_F16");
            return;
        }
        for (i, &(b, h, tq, tk, d, causal)) in [
            (2, 8, 77, 77, 64, true),
            (2, 12, 50, 50, 64, false),
            (1, 3, 7, 19, 5, true),
            (1, 2, 9, 4, 12, false),
            (1, 1, 5, 9000, 128, false),
        ]
        .iter()
        .enumerate()
        {
            let seed = 900 + 10 * i as u64;
            for (kernel, wgq) in [
                (Forward::Broadcast, 8),
                (Forward::Tiled, 8),
                (Forward::Tiled, 64),
            ] {
                check_on(
                    b,
                    h,
                    tq,
                    tk,
                    d,
                    causal,
                    false,
                    seed,
                    Some(Launch { kernel, wgq }),
                    true,
                );
            }
        }
        let g = gpu();
        let (b, h, t, d) = (2, 3, 11, 8);
        let c = h * d;
        let qkv: Vec<f32> = rand_vec(b * t * 3 * c, 77)
            .iter()
            .map(|&x| half::f16::from_f32(x).to_f32())
            .collect();
        let packed = Tensor::from_f32_as_f16(&g, &qkv, &[b, t, 3 * c]).unwrap();
        let got = attention_qkv(&packed, h, false, 0.3).unwrap();
        assert_eq!((got.dtype(), got.shape()), (DType::F16, &[b, t, c][..]));
        let want = attention_qkv(
            &Tensor::from_slice(&g, &qkv, &[b, t, 3 * c]).unwrap(),
            h,
            false,
            0.3,
        )
        .unwrap()
        .to_vec()
        .unwrap();
        for (i, (x, y)) in got.to_vec().unwrap().iter().zip(&want).enumerate() {
            let tol = 2e-6 + y.abs() * 2f32.powi(-10);
            assert!(
                (x - y).abs() <= tol,
                "packed qkv element {i}: {x} against f32 {y}"
            );
        }
        // Mixed dtypes are refused.
        let f = Tensor::from_slice(&g, &qkv[..b * t * c], &[b, t, c]).unwrap();
        let hq = Tensor::from_f32_as_f16(&g, &qkv[..b * t * c], &[b, t, c]).unwrap();
        let e = attention_bthd(&hq, &f, &f, h, false, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("all f32 or all f16"), "{e}");
    }

    #[test]
    fn matches_reference_over_shapes() {
        let mut seed = 0;
        for &(b, h, tq, tk, d) in &SHAPES {
            for causal in [false, true] {
                seed += 10;
                check(b, h, tq, tk, d, causal, false, seed);
            }
        }
    }

    /// The tiled kernel on `wgq` queries per workgroup: 8 as on CPU adapters, 64 as on GPUs
    /// (so the GPU's staging loop and splits run here too).
    fn tiled(wgq: usize) -> Option<Launch> {
        Some(Launch {
            kernel: Forward::Tiled,
            wgq,
        })
    }

    #[test]
    fn tiled_matches_reference_over_shapes_and_layouts() {
        let mut seed = 1000;
        for &(b, h, tq, tk, d) in &SHAPES {
            for causal in [false, true] {
                for bthd in [false, true] {
                    for wgq in [8, 64] {
                        seed += 10;
                        check_on(b, h, tq, tk, d, causal, bthd, seed, tiled(wgq), false);
                    }
                }
            }
        }
    }

    #[test]
    fn tiled_large_head_dim_and_key_splits() {
        // D = 512: 4-key tiles, 600 keys per split on 8 lanes (728 on 64): 1500 keys need
        // three splits, 800 causal ones two (the first workgroups' second split is empty);
        // 9000 keys of D = 128 (16-key tiles, 2400 / 2912 per split) need four; D = 2
        // walks 9000 causal keys in 512-key tiles of one split.
        assert_eq!(attention_tiled::keys_per_split(512, 64), 728);
        assert_eq!(attention_tiled::keys_per_split(128, 8), 2400);
        assert_eq!(attention_tiled::keys_per_split(128, 64), 2912);
        for (wgq, seed) in [(8, 1200), (64, 1300)] {
            let t = tiled(wgq);
            check_on(1, 1, 64, 300, 512, false, false, seed, t, false);
            check_on(1, 1, 20, 1500, 512, false, true, seed + 10, t, false);
            check_on(1, 1, 800, 800, 512, true, false, seed + 20, t, false);
            check_on(1, 2, 5, 9000, 128, false, false, seed + 30, t, false);
            check_on(1, 1, 9000, 9000, 2, true, false, seed + 40, t, false);
        }
        check_on(70_000, 1, 1, 2, 2, false, false, 1250, tiled(8), false);
    }

    #[test]
    fn bthd_layout_matches() {
        check(2, 8, 77, 77, 64, true, true, 100);
        check(2, 12, 50, 50, 64, false, true, 110);
        check(1, 3, 7, 19, 5, true, true, 120);
    }

    #[test]
    fn large_head_dim_and_long_key_splits() {
        // VQGAN attention: one head of 512 channels. 300 keys fit one split (752 keys);
        // 1500 keys (or 800 causal ones) need two; 9000 keys of D = 128 need three (3,012 keys each); D = 2 fits
        // 9000 keys in one.
        assert_eq!(keys_per_split(512), 752);
        assert_eq!(keys_per_split(128), 3012);
        check(1, 1, 64, 300, 512, false, false, 200);
        check(1, 1, 20, 1500, 512, false, false, 210);
        check(1, 1, 800, 800, 512, true, false, 220);
        check(1, 2, 5, 9000, 128, false, false, 230);
        check(1, 1, 9000, 9000, 2, true, false, 240);
    }

    #[test]
    fn more_than_65535_heads() {
        check(70_000, 1, 1, 2, 2, false, false, 300);
    }

    #[test]
    fn shape_errors_are_reported() {
        let g = gpu();
        let q = Tensor::zeros(&g, &[1, 2, 3, 4]).unwrap();
        let k = Tensor::zeros(&g, &[1, 2, 5, 4]).unwrap();
        let bad = Tensor::zeros(&g, &[1, 2, 5, 3]).unwrap();
        let e = attention(&q, &bad, &bad, false, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[B, H, Tk, D]"), "{e}");
        let e = attention(&q, &k, &bad, false, 1.0).unwrap_err().to_string();
        assert!(e.contains("v"), "{e}");
        let e = attention(&q, &k, &k, false, f32::INFINITY)
            .unwrap_err()
            .to_string();
        assert!(e.contains("scale"), "{e}");
        let big = Tensor::zeros(&g, &[1, 1, 2, 513]).unwrap();
        let e = attention(&big, &big, &big, false, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("513"), "{e}");
        let q3 = Tensor::zeros(&g, &[1, 3, 10]).unwrap();
        let e = attention_bthd(&q3, &q3, &q3, 3, false, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("multiple of 3 heads"), "{e}");
        let e = split_heads(&q3, 4).unwrap_err().to_string();
        assert!(e.contains("divisible by 4"), "{e}");
        let empty = Tensor::zeros(&g, &[1, 2, 0, 4]).unwrap();
        let e = attention(&q, &empty, &empty, false, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("zero keys"), "{e}");
    }

    #[test]
    fn packed_qkv_reads_the_three_parts_in_place() {
        // attention_qkv on [B, T, 3·H·D] against attention_bthd on the three thirds copied
        // out: the same kernel and summation order, so the same bits, on CLIP shapes, a
        // causal text-like one, D not a multiple of 4 (offsets off the vec4 grid) and a
        // key split (T past one split of D = 512).
        use crate::ops::concat::slice;
        let g = gpu();
        let cases = [
            (2, 50, 12, 64, false),
            (2, 77, 8, 64, true),
            (3, 7, 3, 5, true),
            (1, 9, 2, 6, false),
            (1, 800, 1, 512, true),
        ];
        for (ci, &(b, t, h, d, causal)) in cases.iter().enumerate() {
            let c = h * d;
            let qkv =
                Tensor::from_slice(&g, &rand_vec(b * t * 3 * c, 40 + ci as u64), &[b, t, 3 * c])
                    .unwrap();
            let part = |s: usize| slice(&qkv, 2, s * c, c).unwrap();
            let scale = 1.0 / (d as f32).sqrt();
            let want = attention_bthd(&part(0), &part(1), &part(2), h, causal, scale).unwrap();
            let got = attention_qkv(&qkv, h, causal, scale).unwrap();
            assert_eq!(got.shape(), &[b, t, c]);
            assert_eq!(got.to_vec().unwrap(), want.to_vec().unwrap(), "case {ci}");
            let (o, lse) = attention_qkv_lse(&qkv, h, causal, scale).unwrap();
            let (ow, lw) =
                attention_bthd_lse(&part(0), &part(1), &part(2), h, causal, scale).unwrap();
            assert_eq!(o.to_vec().unwrap(), ow.to_vec().unwrap(), "case {ci} (lse)");
            assert_eq!(lse.to_vec().unwrap(), lw.to_vec().unwrap(), "case {ci} lse");
        }
        let e = attention_qkv(&Tensor::zeros(&g, &[1, 2, 10]).unwrap(), 2, false, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("3*H*D"), "{e}");
    }

    /// The f64 log-sum-exp of each query's scaled scores, `[B·H·Tq]`, and its error bound:
    /// the scores' f32 error δ (as in [`tolerances`]) moves L by at most δmax; the sum of
    /// the exponentials adds Tk·ε relative, each `exp` 3 + 2Δ ULP, the final `m + log l`
    /// ε·|L|; twice that is allowed.
    #[allow(clippy::too_many_arguments)]
    fn reference_lse(
        q: &[f32],
        k: &[f32],
        bh: usize,
        tq: usize,
        tk: usize,
        d: usize,
        causal: bool,
        scale: f32,
    ) -> (Vec<f64>, Vec<f64>) {
        let e = f32::EPSILON as f64;
        let (mut lse, mut tol) = (Vec::new(), Vec::new());
        for x in 0..bh {
            for i in 0..tq {
                let qi = &q[(x * tq + i) * d..][..d];
                let keys = if causal { tk.min(i + 1) } else { tk };
                let (mut s, mut delta) = (Vec::new(), 0.0f64);
                for j in 0..keys {
                    let kj = &k[(x * tk + j) * d..][..d];
                    let (mut a, mut g) = (0.0, 0.0);
                    for (&qa, &kb) in qi.iter().zip(kj) {
                        a += qa as f64 * kb as f64;
                        g += (qa as f64 * kb as f64).abs();
                    }
                    s.push(scale as f64 * a);
                    delta = delta.max(d as f64 * e * (scale as f64).abs() * g);
                }
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let gap = s.iter().fold(0.0f64, |g, &a| g.max(m - a));
                let l = m + s.iter().map(|a| (a - m).exp()).sum::<f64>().ln();
                lse.push(l);
                let t = delta + e * (keys as f64 + 2.0 * (3.0 + 2.0 * gap) + 8.0) + e * l.abs();
                tol.push(2.0 * t);
            }
        }
        (lse, tol)
    }

    #[test]
    fn tiled_packed_qkv_and_log_sum_exp() {
        // The tiled kernel with LSE on the packed [B, T, 3·H·D] layout, on this device's
        // workgroup and on a GPU's: the same bits as on the three thirds copied out
        // ([B, T, H·D], the training forward's layout) and as attention_qkv_by, and both
        // output and log-sum-exp within the f64 references' bounds. CLIP shapes, a causal
        // text-like one, D not a multiple of 4 (offsets off the vec4 grid), and D = 512
        // past one split (causal and not: the combine pass writes L there).
        use crate::ops::concat::slice;
        let g = gpu();
        let cases = [
            (2, 50, 12, 64, false),
            (2, 77, 8, 64, true),
            (3, 7, 3, 5, true),
            (1, 9, 2, 6, false),
            (1, 800, 1, 512, true),
            (1, 1300, 1, 512, false),
        ];
        let own = Launch::on(&g, Forward::Tiled);
        for (ci, &(b, t, h, d, causal)) in cases.iter().enumerate() {
            let c = h * d;
            let data = rand_vec(b * t * 3 * c, 60 + ci as u64);
            let qkv = Tensor::from_slice(&g, &data, &[b, t, 3 * c]).unwrap();
            let part = |s: usize| slice(&qkv, 2, s * c, c).unwrap();
            let (q, k, v) = (part(0), part(1), part(2));
            let heads = |x: &Tensor| split_heads(x, h).unwrap().to_vec().unwrap();
            let (qv, kv, vv) = (heads(&q), heads(&k), heads(&v));
            let bh = b * h;
            let scale = 1.0 / (d as f32).sqrt();
            let want = reference(&qv, &kv, &vv, bh, t, t, d, causal, scale);
            let tol = tolerances(&qv, &kv, &vv, bh, t, t, d, causal, scale);
            let (lwant, ltol) = reference_lse(&qv, &kv, bh, t, t, d, causal, scale);
            let dims = [b, h, t, t, d];
            for launch in [own, tiled(64).unwrap()] {
                let what = format!("case {ci} on {} lanes", launch.wgq);
                let lse = Tensor::empty(&g, &[b, h, t], DType::F32).unwrap();
                let addr = Addr::packed_qkv(h, t, d);
                let o = run_by([&qkv; 3], dims, addr, causal, scale, Some(&lse), launch).unwrap();
                assert_eq!(o.shape(), &[b, t, c]);
                let (o, lse) = (o.to_vec().unwrap(), lse.to_vec().unwrap());
                if launch == own {
                    let plain = attention_qkv_by(&qkv, h, causal, scale, Forward::Tiled).unwrap();
                    assert_eq!(plain.to_vec().unwrap(), o, "{what}: without LSE");
                }
                let lw = Tensor::empty(&g, &[b, h, t], DType::F32).unwrap();
                let addr = Addr::separate(Layout::Bthd, h, t, t, d);
                let ow =
                    run_by([&q, &k, &v], dims, addr, causal, scale, Some(&lw), launch).unwrap();
                assert_eq!(ow.to_vec().unwrap(), o, "{what}: o");
                assert_eq!(lw.to_vec().unwrap(), lse, "{what}: lse");

                let got = split_heads(&ow, h).unwrap().to_vec().unwrap();
                for i in 0..got.len() {
                    let err = (got[i] as f64 - want[i]).abs();
                    assert!(
                        err <= tol[i],
                        "{what}: o {i} got {} want {}",
                        got[i],
                        want[i]
                    );
                }
                for i in 0..lse.len() {
                    let err = (lse[i] as f64 - lwant[i]).abs();
                    assert!(
                        err <= ltol[i],
                        "{what}: lse {i} got {} want {} (err {err:e} > tol {:e})",
                        lse[i],
                        lwant[i],
                        ltol[i]
                    );
                }
            }
        }
    }

    #[test]
    fn split_and_merge_heads_round_trip() {
        let g = gpu();
        let xv = rand_vec(2 * 5 * 12, 9);
        let x = Tensor::from_slice(&g, &xv, &[2, 5, 12]).unwrap();
        let s = split_heads(&x, 3).unwrap();
        assert_eq!(s.shape(), &[2, 3, 5, 4]);
        let sv = s.to_vec().unwrap();
        // x[b, t, h·4 + d] lands at s[b, h, t, d]; b = 1, t = 3, h = 2, d = 1:
        assert_eq!(sv[((3 + 2) * 5 + 3) * 4 + 1], xv[(5 + 3) * 12 + 2 * 4 + 1]);
        assert_eq!(merge_heads(&s).unwrap().to_vec().unwrap(), xv);
    }
}
