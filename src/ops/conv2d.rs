//! 2-D convolution in NCHW with arbitrary (asymmetric) zero padding, stride, fused bias,
//! residual and an optional fused nearest x2 upsample of the input (`shaders/conv2d.wgsl`).

use super::concat::{concat, slice};
use super::matmul::{matmul, MatmulOpts};
use super::permute::permute;
use super::CPU_LOOP_LIMIT;
use crate::gpu::{grid_1d, Kernel, Shader};
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};

/// The `override` constants the kernels below (and `conv2d_igemm`, `conv2d_igemm_tiled`) set.
pub(super) mod ov {
    use crate::gpu::Override;
    pub(in crate::ops) const KH: Override<u32> = Override::new("KH");
    pub(in crate::ops) const KW: Override<u32> = Override::new("KW");
    pub(in crate::ops) const STRIDE: Override<u32> = Override::new("STRIDE");
    pub(in crate::ops) const UPSAMPLE: Override<bool> = Override::new("UPSAMPLE");
    pub(in crate::ops) const HAS_BIAS: Override<bool> = Override::new("HAS_BIAS");
    pub(in crate::ops) const HAS_RES: Override<bool> = Override::new("HAS_RES");
    pub(in crate::ops) const ONES_ROW: Override<bool> = Override::new("ONES_ROW");
}

pub(crate) static SHADER: Shader<Params> = crate::shader!(
    "conv2d",
    "grid",
    overrides = [
        ov::KH,
        ov::KW,
        ov::STRIDE,
        ov::UPSAMPLE,
        ov::HAS_BIAS,
        ov::HAS_RES
    ]
);

crate::shader_params! {
    /// Mirrors `struct Params` in `shaders/conv2d.wgsl`.
    pub(crate) struct Params {
        n: u32,
        cin: u32,
        h: u32,
        w: u32,
        cout: u32,
        ho: u32,
        wo: u32,
        wblocks: u32,
        blocks: u32,
        pad_top: u32,
        pad_left: u32,
        hv: u32,
        wv: u32,
        co_base: u32,
        ci0: u32,
        ci1: u32,
    }
}

/// Options of [`conv2d`]. `Default` is stride 1, no padding, no bias.
#[derive(Clone, Copy, Debug)]
pub struct Conv2dOpts<'a> {
    /// Stride in both directions (1 or more).
    pub stride: usize,
    /// Zero padding `[top, bottom, left, right]`; taming's downsample uses `[0, 1, 0, 1]`.
    pub pad: [usize; 4],
    /// Nearest-neighbour x2 upsample of the input before the convolution (fused: the
    /// upsampled tensor is never stored).
    pub upsample: bool,
    /// Bias `[Cout]`.
    pub bias: Option<&'a Tensor>,
    /// Tensor of the output's shape added to the result (residual connection).
    pub residual: Option<&'a Tensor>,
}

impl Default for Conv2dOpts<'_> {
    fn default() -> Self {
        Conv2dOpts {
            stride: 1,
            pad: [0; 4],
            upsample: false,
            bias: None,
            residual: None,
        }
    }
}

impl<'a> Conv2dOpts<'a> {
    /// Stride 1, symmetric padding `p` on every side, with `bias`: PyTorch's
    /// `Conv2d(k, stride=1, padding=p)`.
    pub fn padded(p: usize, bias: Option<&'a Tensor>) -> Self {
        Conv2dOpts {
            pad: [p; 4],
            bias,
            ..Default::default()
        }
    }
}

/// Output size of one spatial dim: `(in + pad_a + pad_b - k) / stride + 1`, or None if the
/// window does not fit.
pub fn out_size(
    input: usize,
    k: usize,
    stride: usize,
    pad_a: usize,
    pad_b: usize,
) -> Option<usize> {
    let full = input + pad_a + pad_b;
    (full >= k && stride > 0).then(|| (full - k) / stride + 1)
}

/// Which kernel computes a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Any kernel size and stride with `3·stride + KW <= 16`: 4 channels x 4 pixels per
    /// invocation.
    Generic,
    /// 3x3 with stride 1 or 2, everything in registers: 8 channels x 4 pixels per invocation.
    Conv3x3,
    /// The input's columns (im2col, bias as a row of ones) times the weights with the tuned
    /// matmul; images are processed in batches whose columns fit one storage binding and
    /// [`IM2COL_BUDGET`] bytes. Falls back to the direct kernels when one image's columns do
    /// not fit.
    Im2col,
    /// Implicit GEMM ([`super::conv2d_igemm`]): the subgroup matmul's tile reading the
    /// columns from the input, no column buffer (CPU adapters with 8-wide subgroups). Runs
    /// [`Variant::Im2col`] where it does not apply.
    Implicit,
    /// Implicit GEMM on the GPU matmul's 128×128 workgroup tile
    /// ([`super::conv2d_igemm_tiled`]): K slices staged in workgroup memory, the input's
    /// columns gathered into them, no column buffer and no subgroup operations (GPUs). Runs
    /// [`Variant::Im2col`] where it does not apply.
    ImplicitTiled,
}

/// Most bytes of im2col columns held at once (images are processed in groups under it).
pub const IM2COL_BUDGET: u64 = 96 << 20;

/// The [`crate::Gpu::tuning`] key of the measured convolution variant (`vqclip bench all
/// --tune`): a [`Variant::name`].
pub const TUNING_KEY: &str = "conv";

impl Variant {
    /// The variant for a shape on `gpu`: `VQCLIP_CONV` if set (`implicit-tiled`, `implicit`,
    /// `im2col`, `direct`: [`Variant::Conv3x3`] where it applies, else [`Variant::Generic`],
    /// or `generic`), else the winner measured on this adapter (key [`TUNING_KEY`]), else:
    /// [`Variant::Implicit`] on CPU adapters with 8-wide subgroups (it skips the column
    /// buffer: the 128² f16-16384 decode + backward ran in 4.69 s against 7.13 s with
    /// [`Variant::Im2col`] on lavapipe, see docs/perf.md); [`Variant::ImplicitTiled`] on
    /// other adapters that are not CPUs (GPUs: the column buffer's memory and its write and
    /// read are gone; not yet measured against [`Variant::Im2col`] on a GPU, which `--tune`
    /// does); [`Variant::Im2col`] on the remaining CPU adapters (2-4x the direct kernels on
    /// lavapipe).
    pub fn for_shape(gpu: &crate::Gpu, kh: usize, kw: usize, stride: usize) -> Variant {
        match super::env::CONV.get().as_deref() {
            Some("direct") => return Self::direct(kh, kw, stride),
            Some(s) => {
                if let Some(v) = Self::parse(s) {
                    return v;
                }
            }
            None => {}
        }
        if let Some(v) = gpu.tuning(TUNING_KEY).and_then(|s| Self::parse(&s)) {
            return v;
        }
        match gpu.is_cpu() {
            true if super::matmul::subgroup_supported(gpu) => Variant::Implicit,
            true => Variant::Im2col,
            false => Variant::ImplicitTiled,
        }
    }

    /// Short name, as in `VQCLIP_CONV` and the tuning cache.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Generic => "generic",
            Variant::Conv3x3 => "conv3x3",
            Variant::Im2col => "im2col",
            Variant::Implicit => "implicit",
            Variant::ImplicitTiled => "implicit-tiled",
        }
    }

    /// The variant named `s` ([`Variant::name`]).
    pub fn parse(s: &str) -> Option<Variant> {
        Variant::ALL.into_iter().find(|v| v.name() == s)
    }

    /// Every variant.
    pub const ALL: [Variant; 5] = [
        Variant::Generic,
        Variant::Conv3x3,
        Variant::Im2col,
        Variant::Implicit,
        Variant::ImplicitTiled,
    ];

    /// The fastest direct kernel for the shape.
    pub fn direct(kh: usize, kw: usize, stride: usize) -> Variant {
        if kh == 3 && kw == 3 && stride <= 2 {
            Variant::Conv3x3
        } else {
            Variant::Generic
        }
    }
}

/// `y = conv(x, w) + bias + residual`.
///
/// `x`: `[N, Cin, H, W]`; `w`: `[Cout, Cin, KH, KW]` (PyTorch layout). Returns
/// `[N, Cout, Ho, Wo]`, `Ho = (H' + pad_top + pad_bottom - KH) / stride + 1` with `H' = 2H` if
/// `upsample`, else `H`.
pub fn conv2d(x: &Tensor, w: &Tensor, o: &Conv2dOpts) -> Result<Tensor> {
    let v = if w.rank() == 4 {
        Variant::for_shape(x.gpu(), w.dim(2), w.dim(3), o.stride)
    } else {
        Variant::Generic
    };
    conv2d_variant(x, w, o, v)
}

/// [`conv2d`] with an explicit kernel (tests and benches); [`Variant::Conv3x3`] needs a 3x3
/// kernel and stride 1 or 2.
pub fn conv2d_variant(x: &Tensor, w: &Tensor, o: &Conv2dOpts, v: Variant) -> Result<Tensor> {
    x.expect_f32("conv2d input")?;
    w.expect_f32("conv2d weight")?;
    if x.rank() != 4 || w.rank() != 4 {
        return Err(Error::shape(format!(
            "conv2d needs x [N, Cin, H, W] and w [Cout, Cin, KH, KW], got {:?} and {:?}",
            x.shape(),
            w.shape()
        )));
    }
    let (n, cin, h, wd) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let (cout, wcin, kh, kw) = (w.dim(0), w.dim(1), w.dim(2), w.dim(3));
    if wcin != cin {
        return Err(Error::shape(format!(
            "conv2d weight {:?} expects {wcin} input channels but x {:?} has {cin}",
            w.shape(),
            x.shape()
        )));
    }
    let s = o.stride;
    if s == 0 || kh == 0 || kw == 0 || 3 * s + kw > 16 {
        return Err(Error::shape(format!(
            "conv2d supports 3*stride + KW <= 16 (stride {s}, kernel {kh}x{kw})"
        )));
    }
    let (hv, wv) = if o.upsample { (2 * h, 2 * wd) } else { (h, wd) };
    let [pt, pb, pl, pr] = o.pad;
    let (ho, wo) = match (out_size(hv, kh, s, pt, pb), out_size(wv, kw, s, pl, pr)) {
        (Some(a), Some(b)) => (a, b),
        _ => {
            return Err(Error::shape(format!(
                "conv2d kernel {kh}x{kw} does not fit input {hv}x{wv} padded by {:?}",
                o.pad
            )))
        }
    };
    let out_shape = [n, cout, ho, wo];
    if let Some(b) = o.bias {
        if b.numel() != cout {
            return Err(Error::shape(format!(
                "conv2d bias has {} elements, expected Cout = {cout}",
                b.numel()
            )));
        }
    }
    if let Some(r) = o.residual {
        if r.shape() != out_shape {
            return Err(Error::shape(format!(
                "conv2d residual {:?} does not match output {out_shape:?}",
                r.shape()
            )));
        }
    }
    if v == Variant::Implicit && cin > 0 && n * ho * wo > 0 {
        if let Some(y) = super::conv2d_igemm::try_conv2d(x, w, o, [ho, wo, hv, wv])? {
            return Ok(y);
        }
    }
    if v == Variant::ImplicitTiled && cin > 0 && n * ho * wo > 0 {
        if let Some(y) = super::conv2d_igemm_tiled::try_conv2d(x, w, o, [ho, wo, hv, wv])? {
            return Ok(y);
        }
    }
    if matches!(
        v,
        Variant::Im2col | Variant::Implicit | Variant::ImplicitTiled
    ) && cin > 0
        && n * ho * wo > 0
    {
        let kp = (cin * kh * kw + o.bias.is_some() as usize).next_multiple_of(4);
        let per_image = (kp * ho * wo * 4) as u64;
        let limit = x
            .gpu()
            .limits()
            .max_storage_buffer_binding_size
            .min(IM2COL_BUDGET);
        if per_image <= limit {
            return conv2d_im2col(x, w, o, [ho, wo, hv, wv], kp, (limit / per_image) as usize);
        }
        return conv2d_variant(x, w, o, Variant::direct(kh, kw, s));
    }
    let gpu = x.gpu();
    let y = Tensor::empty(gpu, &out_shape, DType::F32)?;
    if y.numel() == 0 || cin == 0 {
        if cin == 0 && y.numel() > 0 {
            return Err(Error::shape("conv2d with zero input channels"));
        }
        return Ok(y);
    }
    let wblocks = wo.div_ceil(4);
    let blocks = n * ho * wblocks;
    if [blocks, x.numel(), w.numel(), y.numel()]
        .iter()
        .any(|&v| v > u32::MAX as usize)
        || pt > i32::MAX as usize / 2
        || pl > i32::MAX as usize / 2
    {
        return Err(Error::shape("conv2d operand has more than 2^32 elements"));
    }
    let k3 = v == Variant::Conv3x3;
    if k3 && (kh != 3 || kw != 3 || s > 2) {
        return Err(Error::shape(format!(
            "the 3x3 conv kernel cannot run a {kh}x{kw} stride-{s} convolution"
        )));
    }
    let kernel = Kernel::new(&SHADER, if k3 { "conv3x3" } else { "conv2d" })
        .with(ov::KH, kh as u32)
        .with(ov::KW, kw as u32)
        .with(ov::STRIDE, s as u32)
        .with(ov::UPSAMPLE, o.upsample);
    // Loop iterations per input channel, and so channels per dispatch under llvmpipe's cap.
    let per_ci = if k3 {
        4
    } else {
        kh * (3 * s + kw + kw + 1) + 1
    };
    let ci_step = (CPU_LOOP_LIMIT * 3 / 4 - 64) / per_ci;
    let grid = grid_1d((blocks as u32).div_ceil(64));
    let per_wg = if k3 { 8 } else { 4 };
    let cblocks = cout.div_ceil(per_wg);
    const MAX: usize = 65535;
    let mut y = y;
    for ci0 in (0..cin).step_by(ci_step) {
        let ci1 = (ci0 + ci_step).min(cin);
        let first = ci0 == 0;
        // Later chunks add onto the previous partial sum (a fresh output each time: a buffer
        // is never bound read-only and read-write at once).
        let prev = if first { None } else { Some(y.clone()) };
        let out = if first {
            y.clone()
        } else {
            Tensor::empty(gpu, &out_shape, DType::F32)?
        };
        let res = if first { o.residual } else { prev.as_ref() };
        let k = kernel
            .clone()
            .with(ov::HAS_BIAS, first && o.bias.is_some())
            .with(ov::HAS_RES, res.is_some());
        let bias_b = o.bias.map_or(gpu.unused_binding(), Tensor::binding);
        let res_b = res.map_or(gpu.unused_binding(), Tensor::binding);
        for cb0 in (0..cblocks).step_by(MAX) {
            let nz = (cblocks - cb0).min(MAX);
            let p = Params {
                n: n as u32,
                cin: cin as u32,
                h: h as u32,
                w: wd as u32,
                cout: cout as u32,
                ho: ho as u32,
                wo: wo as u32,
                wblocks: wblocks as u32,
                blocks: blocks as u32,
                pad_top: pt as u32,
                pad_left: pl as u32,
                hv: hv as u32,
                wv: wv as u32,
                co_base: (cb0 * per_wg) as u32,
                ci0: ci0 as u32,
                ci1: ci1 as u32,
            };
            gpu.dispatch(
                &k,
                &p,
                &[x.binding(), w.binding(), bias_b, res_b, out.binding()],
                [grid[0], grid[1], nz as u32],
            );
        }
        y = out;
    }
    Ok(y)
}

pub(crate) static IM2COL: Shader<Im2colParams> = crate::shader!(
    "im2col",
    "grid",
    overrides = [ov::KH, ov::KW, ov::STRIDE, ov::UPSAMPLE, ov::ONES_ROW]
);

crate::shader_params! {
    /// Mirrors `struct Params` in `shaders/im2col.wgsl`.
    pub(crate) struct Im2colParams {
        n: u32,
        cin: u32,
        h: u32,
        w: u32,
        ho: u32,
        wo: u32,
        hv: u32,
        wv: u32,
        pad_top: u32,
        pad_left: u32,
        k: u32,
        kp: u32,
        total: u32,
        _pad: [u32; 3],
    }
}

/// The columns of `up?(x)` for a `kh`x`kw` convolution: `[N, K, Ho·Wo]` with `K = C·KH·KW`
/// in `(c, ky, kx)` order (the weight gradient's operand). Errors when they exceed one
/// storage binding.
pub fn im2col(
    x: &Tensor,
    kernel: [usize; 2],
    stride: usize,
    pad: [usize; 4],
    upsample: bool,
) -> Result<Tensor> {
    let (n, cin, h, wd) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let [kh, kw] = kernel;
    let (hv, wv) = if upsample { (2 * h, 2 * wd) } else { (h, wd) };
    let (Some(ho), Some(wo)) = (
        out_size(hv, kh, stride, pad[0], pad[1]),
        out_size(wv, kw, stride, pad[2], pad[3]),
    ) else {
        return Err(Error::shape(format!(
            "im2col: kernel {kh}x{kw} does not fit input {hv}x{wv} padded by {pad:?}"
        )));
    };
    let k = cin * kh * kw;
    let bytes = (n * k * ho * wo * 4) as u64;
    if bytes > x.gpu().limits().max_storage_buffer_binding_size {
        return Err(Error::shape(format!(
            "conv2d columns of {bytes} bytes exceed one storage binding"
        )));
    }
    let o = Conv2dOpts {
        stride,
        pad,
        upsample,
        ..Default::default()
    };
    columns(x, &o, [kh, kw], [ho, wo, hv, wv], k, false)
}

/// The im2col dispatch: `[N, Kp, Ho·Wo]` columns of all of `x`.
fn columns(
    x: &Tensor,
    o: &Conv2dOpts,
    kernel: [usize; 2],
    dims: [usize; 4],
    kp: usize,
    ones_row: bool,
) -> Result<Tensor> {
    let [ho, wo, hv, wv] = dims;
    let [kh, kw] = kernel;
    let (m, cin, h, wd) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let total = m * kp * ho;
    if m * kp * ho * wo > u32::MAX as usize - 256 {
        return Err(Error::shape("conv2d columns have more than 2^32 elements"));
    }
    let gpu = x.gpu();
    let kernel = Kernel::new(&IM2COL, "im2col")
        .with(ov::KH, kh as u32)
        .with(ov::KW, kw as u32)
        .with(ov::STRIDE, o.stride as u32)
        .with(ov::UPSAMPLE, o.upsample)
        .with(ov::ONES_ROW, ones_row);
    let cols = Tensor::empty(gpu, &[m, kp, ho * wo], DType::F32)?;
    let p = Im2colParams {
        n: m as u32,
        cin: cin as u32,
        h: h as u32,
        w: wd as u32,
        ho: ho as u32,
        wo: wo as u32,
        hv: hv as u32,
        wv: wv as u32,
        pad_top: o.pad[0] as u32,
        pad_left: o.pad[2] as u32,
        k: (cin * kh * kw) as u32,
        kp: kp as u32,
        total: total as u32,
        _pad: [0; 3],
    };
    gpu.dispatch(
        &kernel,
        &p,
        &[x.binding(), cols.binding()],
        grid_1d((total as u32).div_ceil(256)),
    );
    Ok(cols)
}

/// [`Variant::Im2col`] after the shape checks: `dims` = `[Ho, Wo, H', W']`, `kp` rows of
/// columns per image, at most `group` images per product.
fn conv2d_im2col(
    x: &Tensor,
    w: &Tensor,
    o: &Conv2dOpts,
    dims: [usize; 4],
    kp: usize,
    group: usize,
) -> Result<Tensor> {
    let [ho, wo, _, _] = dims;
    let (n, cin) = (x.dim(0), x.dim(1));
    let (cout, kh, kw) = (w.dim(0), w.dim(2), w.dim(3));
    let k = cin * kh * kw;
    let gpu = x.gpu();
    // Weights [Cout, Kp]: the kernel, then the bias column, then zeros; made once per
    // weight and bias (a copy of the whole weight per call cost 8% of a decode + backward).
    let pack = || -> Result<Tensor> {
        let mut parts = vec![w.reshape(&[cout, k])?];
        if let Some(b) = o.bias {
            parts.push(b.reshape(&[cout, 1])?);
        }
        let fill = kp - k - o.bias.is_some() as usize;
        if fill > 0 {
            parts.push(Tensor::zeros(gpu, &[cout, fill])?);
        }
        if parts.len() == 1 {
            return Ok(parts.remove(0));
        }
        let refs: Vec<&Tensor> = parts.iter().collect();
        super::concat::concat(&refs, 1)
    };
    let wk = match o.bias {
        _ if kp == k && o.bias.is_none() => w.reshape(&[cout, k])?,
        Some(b) => gpu.derived("conv2d_packed", &[w, b], pack)?,
        None => gpu.derived("conv2d_packed", &[w], pack)?,
    };
    let group = group.clamp(1, n);
    let mut outs = Vec::with_capacity(n.div_ceil(group));
    for n0 in (0..n).step_by(group) {
        let m = group.min(n - n0);
        let xs = if m == n {
            x.clone()
        } else {
            super::concat::slice(x, 0, n0, m)?
        };
        let cols = columns(&xs, o, [kh, kw], dims, kp, o.bias.is_some())?;
        let res = match o.residual {
            Some(r) if m == n => Some(r.reshape(&[m, cout, ho * wo])?),
            Some(r) => Some(super::concat::slice(r, 0, n0, m)?.reshape(&[m, cout, ho * wo])?),
            None => None,
        };
        let y = super::matmul::matmul(
            &wk,
            &cols,
            &super::matmul::MatmulOpts {
                residual: res.as_ref(),
                ..Default::default()
            },
        )?;
        outs.push(y.reshape(&[m, cout, ho, wo])?);
    }
    if outs.len() == 1 {
        return Ok(outs.remove(0));
    }
    let refs: Vec<&Tensor> = outs.iter().collect();
    super::concat::concat(&refs, 0)
}

/// Gradients of [`conv2d`] that [`conv2d_backward`] was asked for.
pub struct Conv2dGrads {
    /// `dx` `[N, C, H, W]`.
    pub dx: Option<Tensor>,
    /// `dw` `[O, C, KH, KW]`.
    pub dw: Option<Tensor>,
    /// `db` `[O]`.
    pub db: Option<Tensor>,
}

/// Backward of [`conv2d`]'s `y[n, o] = Σ_c w[o, c] ⋆ up?(x)[n, c] + b[o]` (the sum the
/// `conv2d.wgsl` kernels evaluate), reusing the forward kernels:
///
/// - `dx`: a stride-1 convolution of the (zero-dilated, for stride 2) output gradient with
///   the kernel flipped in space and transposed in channels, padded so that it lands on the
///   input grid; a fused nearest ×2 upsample adds a 2×2 sum pool;
/// - `dw [O, C·KH·KW] = Σ_n g_n [O, Ho·Wo] @ cols_n [Ho·Wo, C·KH·KW]`, the columns from
///   [`im2col`];
/// - `db`: the sum of `g` over batch and positions.
///
/// `x` is `[N, C, H, W]`, `w` is `[O, C, KH, KW]`, `g` is `[N, O, Ho, Wo]`; `o` gives the
/// forward's stride, padding and upsample (its bias and residual are not read). `need` says
/// which of `(dx, dw, db)` to compute.
pub fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    o: &Conv2dOpts,
    need: [bool; 3],
) -> Result<Conv2dGrads> {
    let (stride, p, up) = (o.stride, o.pad, o.upsample);
    let dx = need[0]
        .then(|| {
            let v = Variant::for_shape(w.gpu(), w.dim(2), w.dim(3), 1);
            conv2d_input_grad(x.shape(), w, g, o, v)
        })
        .transpose()?;
    let dw = if need[1] {
        Some(conv2d_weight_grad(x, w.shape(), g, stride, p, up)?)
    } else {
        None
    };
    let db = if need[2] {
        let (n, o) = (g.dim(0), g.dim(1));
        let per = super::reduce::sum(&g.reshape(&[n, o, g.numel() / (n * o).max(1)])?, 2)?;
        Some(super::reduce::sum(&per, 0)?)
    } else {
        None
    };
    Ok(Conv2dGrads { dx, dw, db })
}

/// `w'[c, o, ky, kx] = w[o, c, KH−1−ky, KW−1−kx]`: flipped in space (a product with a
/// reversal permutation, exact in floating point), channels swapped. `w` is `[O, C, KH, KW]`.
pub(crate) fn flip_transpose(w: &Tensor) -> Result<Tensor> {
    let (o, c, kh, kw) = (w.dim(0), w.dim(1), w.dim(2), w.dim(3));
    let k = kh * kw;
    let mut rev = vec![0.0f32; k * k];
    for i in 0..k {
        rev[i * k + (k - 1 - i)] = 1.0;
    }
    let rev = Tensor::from_slice(w.gpu(), &rev, &[k, k])?;
    let flipped = matmul(&w.reshape(&[o * c, k])?, &rev, &MatmulOpts::default())?;
    permute(&flipped.reshape(&[o, c, kh, kw])?, &[1, 0, 2, 3])
}

/// Inserts `s − 1` zeros between neighbours along H and W: `x` `[N, C, H, W]` →
/// `[N, C, s(H−1)+1, s(W−1)+1]`.
fn dilate(x: &Tensor, s: usize) -> Result<Tensor> {
    if s == 1 {
        return Ok(x.clone());
    }
    let (n, c, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let z = Tensor::zeros(x.gpu(), &[n, c, h, s - 1, w])?;
    let rows = concat(&[&x.reshape(&[n, c, h, 1, w])?, &z], 3)?.reshape(&[n, c, h * s, w])?;
    let rows = slice(&rows, 2, 0, s * (h - 1) + 1)?;
    let hh = rows.dim(2);
    let z = Tensor::zeros(x.gpu(), &[n, c, hh, w, s - 1])?;
    let both = concat(&[&rows.reshape(&[n, c, hh, w, 1])?, &z], 4)?.reshape(&[n, c, hh, w * s])?;
    slice(&both, 3, 0, s * (w - 1) + 1)
}

/// The input gradient `[N, C, H, W]` of `y = conv(up?(x), w)` for output gradient `g`
/// `[N, O, Ho, Wo]`; `x_shape` is `[N, C, H, W]`, `w` is `[O, C, KH, KW]`, `o` the forward's
/// stride, padding and upsample. `v` is the variant of the stride-1 convolution it runs: the
/// implicit ones use a flipped packed weight derived once from `w`.
pub(crate) fn conv2d_input_grad(
    x_shape: &[usize],
    w: &Tensor,
    g: &Tensor,
    o: &Conv2dOpts,
    v: Variant,
) -> Result<Tensor> {
    let (stride, p, upsample) = (o.stride, o.pad, o.upsample);
    let (kh, kw) = (w.dim(2), w.dim(3));
    let (h, wd) = if upsample {
        (2 * x_shape[2], 2 * x_shape[3])
    } else {
        (x_shape[2], x_shape[3])
    };
    if p[0] >= kh || p[2] >= kw {
        return Err(Error::shape(
            "conv2d backward: padding must be smaller than the kernel",
        ));
    }
    let gd = dilate(g, stride)?;
    let (ld, lw) = (gd.dim(2), gd.dim(3));
    let top = kh - 1 - p[0];
    let left = kw - 1 - p[2];
    // rows out = ld + top + bottom − kh + 1 = h
    let bottom = (h + kh - 1).checked_sub(ld + top);
    let right = (wd + kw - 1).checked_sub(lw + left);
    let (Some(bottom), Some(right)) = (bottom, right) else {
        return Err(Error::shape(
            "conv2d backward: output gradient larger than the input",
        ));
    };
    let o = Conv2dOpts {
        pad: [top, bottom, left, right],
        ..Default::default()
    };
    let dims = [h, wd, ld, lw];
    let dx = match v {
        Variant::Implicit => super::conv2d_igemm::try_conv2d_flipped(&gd, w, &o, dims)?,
        Variant::ImplicitTiled => super::conv2d_igemm_tiled::try_conv2d_flipped(&gd, w, &o, dims)?,
        _ => None,
    };
    let dx = match dx {
        Some(dx) => dx,
        None => {
            // Made once per weight: rebuilding it per call cost 14% of a decode + backward.
            let flipped = w
                .gpu()
                .derived("conv2d_flipped", &[w], || flip_transpose(w))?;
            conv2d_variant(&gd, &flipped, &o, v)?
        }
    };
    if upsample {
        super::upsample::upsample_nearest2_backward(&dx)
    } else {
        Ok(dx)
    }
}

/// The weight gradient `[O, C, KH, KW]` of `y = conv(x', w)` (`x'` the possibly upsampled
/// input) for output gradient `g` `[N, O, Ho, Wo]`; `x` is `[N, C, H, W]`.
fn conv2d_weight_grad(
    x: &Tensor,
    w_shape: &[usize],
    g: &Tensor,
    stride: usize,
    p: [usize; 4],
    upsample: bool,
) -> Result<Tensor> {
    // cols [m, C·KH·KW, Ho·Wo] for a group of m images in one im2col pass (the fused upsample
    // included), then dW = Σ_n g_n [O, P] @ cols_nᵀ [P, C·K] as one batched product and a
    // sum over n. Groups keep the columns under IM2COL_BUDGET (and one storage binding).
    let cap = IM2COL_BUDGET.min(x.gpu().limits().max_storage_buffer_binding_size);
    weight_grad_in_groups(x, w_shape, g, stride, p, upsample, cap)
}

/// [`conv2d_weight_grad`] with the im2col columns of at most `cap` bytes at once.
fn weight_grad_in_groups(
    x: &Tensor,
    w_shape: &[usize],
    g: &Tensor,
    stride: usize,
    p: [usize; 4],
    upsample: bool,
    cap: u64,
) -> Result<Tensor> {
    let (o, c, kh, kw) = (w_shape[0], w_shape[1], w_shape[2], w_shape[3]);
    let (n, ho, wo) = (g.dim(0), g.dim(2), g.dim(3));
    let per_image = (c * kh * kw * ho * wo * 4) as u64;
    let group = ((cap / per_image.max(1)) as usize).clamp(1, n);
    let mut dw: Option<Tensor> = None;
    for n0 in (0..n).step_by(group) {
        let m = group.min(n - n0);
        let (xs, gs) = if m == n {
            (x.clone(), g.clone())
        } else {
            (slice(x, 0, n0, m)?, slice(g, 0, n0, m)?)
        };
        let cols = im2col(&xs, [kh, kw], stride, p, upsample)?;
        let per = matmul(
            &gs.reshape(&[m, o, ho * wo])?,
            &cols,
            &MatmulOpts {
                trans_b: true,
                ..Default::default()
            },
        )?;
        let part = if m == 1 {
            per.reshape(&[o * c * kh * kw])?
        } else {
            super::reduce::sum(&per.reshape(&[m, o * c * kh * kw])?, 0)?
        };
        dw = Some(match dw {
            None => part,
            Some(acc) => super::elementwise::add(&acc, &part)?,
        });
    }
    let dw = dw.ok_or_else(|| Error::shape("conv2d weight gradient of an empty batch"))?;
    dw.reshape(w_shape)
}

/// Shape and options of a [`reference()`] convolution.
#[derive(Clone, Copy, Debug)]
pub struct RefShape {
    /// Batch.
    pub n: usize,
    /// Input channels.
    pub cin: usize,
    /// Input height (before upsampling).
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride.
    pub stride: usize,
    /// `[top, bottom, left, right]`.
    pub pad: [usize; 4],
    /// Nearest x2 upsample first.
    pub upsample: bool,
}

/// CPU reference in f64 with the contract of [`conv2d`]. Returns the output `[N, Cout, Ho,
/// Wo]` and, per output, `Σ|x·w| + |bias|` (the bound used for f32 tolerances).
pub fn reference(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    s: &RefShape,
) -> (Vec<f64>, Vec<f64>, [usize; 4]) {
    let (hv, wv) = if s.upsample {
        (2 * s.h, 2 * s.w)
    } else {
        (s.h, s.w)
    };
    let [pt, pb, pl, pr] = s.pad;
    let ho = out_size(hv, s.kh, s.stride, pt, pb).expect("kernel fits");
    let wo = out_size(wv, s.kw, s.stride, pl, pr).expect("kernel fits");
    let shape = [s.n, s.cout, ho, wo];
    let mut out = vec![0.0; s.n * s.cout * ho * wo];
    let mut mag = vec![0.0; out.len()];
    for n in 0..s.n {
        for co in 0..s.cout {
            for oy in 0..ho {
                for ox in 0..wo {
                    let (mut acc, mut g) = (0.0f64, 0.0f64);
                    for ci in 0..s.cin {
                        for ky in 0..s.kh {
                            let iy = (oy * s.stride + ky) as isize - pt as isize;
                            if iy < 0 || iy >= hv as isize {
                                continue;
                            }
                            for kx in 0..s.kw {
                                let ix = (ox * s.stride + kx) as isize - pl as isize;
                                if ix < 0 || ix >= wv as isize {
                                    continue;
                                }
                                let (sy, sx) = if s.upsample {
                                    (iy as usize / 2, ix as usize / 2)
                                } else {
                                    (iy as usize, ix as usize)
                                };
                                let xv = x[((n * s.cin + ci) * s.h + sy) * s.w + sx] as f64;
                                let wv = w[((co * s.cin + ci) * s.kh + ky) * s.kw + kx] as f64;
                                acc += xv * wv;
                                g += (xv * wv).abs();
                            }
                        }
                    }
                    let o = ((n * s.cout + co) * ho + oy) * wo + ox;
                    let b = bias.map_or(0.0, |b| b[co] as f64);
                    out[o] = acc + b + residual.map_or(0.0, |r| r[o] as f64);
                    mag[o] = g + b.abs();
                }
            }
        }
    }
    (out, mag, shape)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};

    #[test]
    fn weight_grad_in_groups_of_images_matches_one_product() {
        // 5 images of 3x6x6 columns (3·9·36·4 = 3888 bytes each) in groups of 2, 2 and 1.
        let g = gpu();
        let (n, c, o, h) = (5, 3, 4, 6);
        let x = Tensor::from_slice(&g, &rand_vec(n * c * h * h, 1), &[n, c, h, h]).unwrap();
        let gy = Tensor::from_slice(&g, &rand_vec(n * o * h * h, 2), &[n, o, h, h]).unwrap();
        let w = [o, c, 3, 3];
        let one = weight_grad_in_groups(&x, &w, &gy, 1, [1; 4], false, u64::MAX).unwrap();
        let grouped = weight_grad_in_groups(&x, &w, &gy, 1, [1; 4], false, 2 * 3888).unwrap();
        let (a, b) = (one.to_vec().unwrap(), grouped.to_vec().unwrap());
        assert_eq!(grouped.shape(), &w);
        for (i, (a, b)) in a.iter().zip(&b).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                "dw[{i}]: {a} vs {b}"
            );
        }
    }

    fn check(s: RefShape, bias: bool, res: bool, seed: u64) {
        check_variant(s, bias, res, seed, Variant::Generic);
        check_variant(s, bias, res, seed, Variant::Im2col);
        check_variant(s, bias, res, seed, Variant::Implicit);
        check_variant(s, bias, res, seed, Variant::ImplicitTiled);
        if s.kh == 3 && s.kw == 3 && s.stride <= 2 {
            check_variant(s, bias, res, seed, Variant::Conv3x3);
        }
    }

    fn check_variant(s: RefShape, bias: bool, res: bool, seed: u64, v: Variant) {
        check_with(s, bias, res, seed, &format!("{v:?}"), &|x, w, o| {
            conv2d_variant(x, w, o, v).unwrap()
        });
    }

    /// Runs `conv` on random inputs of shape `s` (with a bias and a residual if asked) and
    /// checks it against the f64 [`reference`] within f32 accumulation error.
    pub(crate) fn check_with(
        s: RefShape,
        bias: bool,
        res: bool,
        seed: u64,
        what: &str,
        conv: &dyn Fn(&Tensor, &Tensor, &Conv2dOpts) -> Tensor,
    ) {
        let g = gpu();
        let xv = rand_vec(s.n * s.cin * s.h * s.w, seed);
        let wv = rand_vec(s.cout * s.cin * s.kh * s.kw, seed + 1);
        let bv = rand_vec(s.cout, seed + 2);
        let x = Tensor::from_slice(&g, &xv, &[s.n, s.cin, s.h, s.w]).unwrap();
        let w = Tensor::from_slice(&g, &wv, &[s.cout, s.cin, s.kh, s.kw]).unwrap();
        let b = Tensor::from_slice(&g, &bv, &[s.cout]).unwrap();
        let (_, _, shape) = reference(&xv, &wv, None, None, &s);
        let rv = rand_vec(shape.iter().product(), seed + 3);
        let r = Tensor::from_slice(&g, &rv, &shape).unwrap();
        let o = Conv2dOpts {
            stride: s.stride,
            pad: s.pad,
            upsample: s.upsample,
            bias: bias.then_some(&b),
            residual: res.then_some(&r),
        };
        let y = conv(&x, &w, &o);
        assert_eq!(y.shape(), shape, "{s:?}");
        let got = y.to_vec().unwrap();
        let (want, mag, _) = reference(&xv, &wv, bias.then_some(&bv), res.then_some(&rv), &s);
        let k = s.cin * s.kh * s.kw;
        for i in 0..got.len() {
            // f32 accumulation of K products: |err| <= K·eps·Σ|x·w| (plus the bias/residual adds).
            let tol = 1.2 * (k as f64 + 3.0) * f32::EPSILON as f64 * mag[i]
                + 1e-6 * (1.0 + want[i].abs());
            let err = (got[i] as f64 - want[i]).abs();
            assert!(
                err <= tol,
                "{what} {s:?} bias{bias} res{res}: element {i} got {} want {} (err {err:e} > {tol:e})",
                got[i],
                want[i]
            );
        }
    }

    #[test]
    fn cached_weight_copies_follow_in_place_weight_updates() {
        // The packed forward weights and the flipped backward weights are kept per weight
        // buffer; an assign must not leave the old ones in use.
        let g = gpu();
        let s = shape(1, 3, (5, 4), 4, 3);
        let xv = rand_vec(60, 1);
        let x = Tensor::from_slice(&g, &xv, &[1, 3, 5, 4]).unwrap();
        let w = Tensor::from_slice(&g, &rand_vec(108, 2), &[4, 3, 3, 3]).unwrap();
        let bv = rand_vec(4, 3);
        let b = Tensor::from_slice(&g, &bv, &[4]).unwrap();
        let gy = Tensor::from_slice(&g, &rand_vec(80, 4), &[1, 4, 5, 4]).unwrap();
        let o = Conv2dOpts::padded(1, Some(&b));
        let run = |v| conv2d_variant(&x, &w, &o, v).unwrap().to_vec().unwrap();
        let before = run(Variant::Im2col);
        let before_implicit = run(Variant::Implicit);
        let before_tiled = run(Variant::ImplicitTiled);
        let dx_before = conv2d_backward(&x, &w, &gy, &o, [true, false, false])
            .unwrap()
            .dx
            .unwrap()
            .to_vec()
            .unwrap();
        let tiled_dx = |w: &Tensor| {
            conv2d_input_grad(x.shape(), w, &gy, &o, Variant::ImplicitTiled)
                .unwrap()
                .to_vec()
                .unwrap()
        };
        let dx_before_tiled = tiled_dx(&w);
        let wv = rand_vec(108, 5);
        w.assign(&Tensor::from_slice(&g, &wv, &[4, 3, 3, 3]).unwrap())
            .unwrap();
        let (want, _, _) = reference(&xv, &wv, Some(&bv), None, &s);
        for (v, before) in [
            (Variant::Im2col, before),
            (Variant::Implicit, before_implicit),
            (Variant::ImplicitTiled, before_tiled),
        ] {
            let after = run(v);
            for (i, (a, b)) in after.iter().zip(&want).enumerate() {
                assert!((*a as f64 - b).abs() < 1e-4, "{v:?} y[{i}]: {a} vs {b}");
            }
            assert_ne!(before, after);
        }
        // dx of a linear map in w: dx(w) for the new w equals a fresh copy's.
        let fresh = Tensor::from_slice(&g, &wv, &[4, 3, 3, 3]).unwrap();
        let dx_fresh = conv2d_backward(&x, &fresh, &gy, &o, [true, false, false])
            .unwrap()
            .dx
            .unwrap()
            .to_vec()
            .unwrap();
        let dx_after = conv2d_backward(&x, &w, &gy, &o, [true, false, false])
            .unwrap()
            .dx
            .unwrap()
            .to_vec()
            .unwrap();
        assert_eq!(dx_after, dx_fresh);
        assert_ne!(dx_before, dx_after);
        // The tiled kernel's flipped packed weight likewise.
        let dx_after_tiled = tiled_dx(&w);
        assert_eq!(dx_after_tiled, tiled_dx(&fresh));
        assert_ne!(dx_before_tiled, dx_after_tiled);
    }

    #[test]
    fn im2col_in_groups_of_images_matches_one_product() {
        // Stride 2 with taming's padding, bias and residual, three images one at a time.
        let g = gpu();
        let (n, cin, h, cout) = (3, 5, 9, 6);
        let x = Tensor::from_slice(&g, &rand_vec(n * cin * h * h, 1), &[n, cin, h, h]).unwrap();
        let w = Tensor::from_slice(&g, &rand_vec(cout * cin * 9, 2), &[cout, cin, 3, 3]).unwrap();
        let b = Tensor::from_slice(&g, &rand_vec(cout, 3), &[cout]).unwrap();
        let r = Tensor::from_slice(&g, &rand_vec(n * cout * 16, 4), &[n, cout, 4, 4]).unwrap();
        let o = Conv2dOpts {
            stride: 2,
            pad: [0, 1, 0, 1],
            bias: Some(&b),
            residual: Some(&r),
            ..Default::default()
        };
        let kp = (cin * 9 + 1).next_multiple_of(4);
        let whole = conv2d_im2col(&x, &w, &o, [4, 4, h, h], kp, n).unwrap();
        let grouped = conv2d_im2col(&x, &w, &o, [4, 4, h, h], kp, 1).unwrap();
        let direct = conv2d_variant(&x, &w, &o, Variant::Generic).unwrap();
        assert_eq!(grouped.shape(), &[n, cout, 4, 4]);
        assert_eq!(whole.to_vec().unwrap(), grouped.to_vec().unwrap());
        for (a, b) in whole.to_vec().unwrap().iter().zip(direct.to_vec().unwrap()) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    /// A same-padded `k`x`k` stride-1 convolution of `n` images `cin`x`hw` to `cout` channels.
    pub(crate) fn shape(
        n: usize,
        cin: usize,
        hw: (usize, usize),
        cout: usize,
        k: usize,
    ) -> RefShape {
        RefShape {
            n,
            cin,
            h: hw.0,
            w: hw.1,
            cout,
            kh: k,
            kw: k,
            stride: 1,
            pad: [k / 2; 4],
            upsample: false,
        }
    }

    #[test]
    fn same_padding_3x3_and_1x1_over_shapes() {
        let mut seed = 0;
        for &(n, cin, hw, cout) in &[
            (1, 1, (1, 1), 1),
            (1, 3, (5, 7), 5),
            (2, 4, (17, 9), 17),
            (1, 32, (8, 8), 32),
            (1, 3, (16, 65), 8),
            (3, 5, (3, 1), 2),
            (1, 65, (6, 5), 3),
        ] {
            for k in [1, 3] {
                seed += 10;
                check(
                    shape(n, cin, hw, cout, k),
                    seed % 20 == 0,
                    seed % 30 == 0,
                    seed,
                );
            }
        }
    }

    #[test]
    fn stride_two_with_taming_asymmetric_padding() {
        // taming Downsample: pad (left 0, right 1, top 0, bottom 1), 3x3, stride 2, padding 0.
        let mut seed = 500;
        for &(n, cin, hw, cout) in &[
            (1, 4, (8, 8), 4),
            (2, 3, (16, 12), 5),
            (1, 7, (9, 17), 9),
            (1, 1, (2, 2), 1),
            (1, 2, (2, 3), 3),
        ] {
            seed += 10;
            let mut s = shape(n, cin, hw, cout, 3);
            s.stride = 2;
            s.pad = [0, 1, 0, 1];
            check(s, true, false, seed);
            // symmetric stride-2 padding and 1x1 stride 2 as well
            s.pad = [1; 4];
            check(s, false, true, seed + 1);
            let mut s1 = shape(n, cin, hw, cout, 1);
            s1.stride = 2;
            check(s1, true, false, seed + 2);
        }
    }

    #[test]
    fn odd_kernels_paddings_and_strides() {
        let mut seed = 900;
        for (kh, kw, stride, pad) in [
            (3, 3, 3, [2, 0, 1, 3]),
            (2, 5, 1, [0, 0, 2, 2]),
            (4, 4, 2, [1, 2, 1, 2]),
            (1, 7, 1, [0, 0, 3, 3]),
            (3, 1, 4, [0, 0, 0, 0]),
        ] {
            seed += 10;
            let s = RefShape {
                n: 2,
                cin: 3,
                h: 13,
                w: 11,
                cout: 6,
                kh,
                kw,
                stride,
                pad,
                upsample: false,
            };
            check(s, true, true, seed);
        }
    }

    #[test]
    fn fused_nearest_upsample_then_conv() {
        let mut seed = 1300;
        for &(n, cin, hw, cout) in &[(1, 4, (4, 4), 4), (2, 3, (5, 3), 7), (1, 8, (1, 9), 2)] {
            seed += 10;
            let mut s = shape(n, cin, hw, cout, 3);
            s.upsample = true;
            check(s, true, false, seed);
        }
    }

    #[test]
    fn long_channel_reductions_are_split_under_the_loop_cap() {
        // llvmpipe caps loop iterations per invocation; 12,300 input channels need two
        // chained dispatches in the 3x3 kernel, 7,100 in the generic 1x1.
        let mut s = shape(1, 12_300, (2, 5), 3, 3);
        s.pad = [1, 0, 0, 1];
        check(s, true, true, 31);
        check(shape(1, 7_100, (1, 6), 2, 1), true, false, 32);
    }

    #[test]
    fn more_than_65535_workgroups() {
        // 2049 x 8192 output = 4.2M pixel blocks of 4 = 65,568 workgroups of 64.
        let s = RefShape {
            n: 1,
            cin: 1,
            h: 2049,
            w: 8192,
            cout: 1,
            kh: 1,
            kw: 1,
            stride: 1,
            pad: [0; 4],
            upsample: false,
        };
        check(s, true, false, 77);
    }

    #[test]
    fn shape_errors_name_the_shapes() {
        let g = gpu();
        let x = Tensor::zeros(&g, &[1, 3, 8, 8]).unwrap();
        let w = Tensor::zeros(&g, &[4, 2, 3, 3]).unwrap();
        let e = conv2d(&x, &w, &Conv2dOpts::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[4, 2, 3, 3]") && e.contains("[1, 3, 8, 8]"),
            "{e}"
        );
        let w = Tensor::zeros(&g, &[4, 3, 9, 9]).unwrap();
        let e = conv2d(&x, &w, &Conv2dOpts::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not fit"), "{e}");
        let w = Tensor::zeros(&g, &[4, 3, 3, 3]).unwrap();
        let b = Tensor::zeros(&g, &[5]).unwrap();
        let e = conv2d(&x, &w, &Conv2dOpts::padded(1, Some(&b)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bias"), "{e}");
    }
}
