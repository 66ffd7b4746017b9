//! Batched matrix multiply with fused bias, activation, scale and residual:
//! `C = act(alpha * op(A) @ op(B) + bias) + residual` (`shaders/matmul.wgsl`).

use super::matmul_split::Split;
use super::Act;
use crate::gpu::{Gpu, Kernel, Shader};
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};

/// The `override` constants the kernels below set.
mod ov {
    use crate::gpu::Override;
    pub(super) const TRANS_A: Override<bool> = Override::new("TRANS_A");
    pub(super) const TRANS_B: Override<bool> = Override::new("TRANS_B");
    pub(super) const HAS_BIAS: Override<bool> = Override::new("HAS_BIAS");
    pub(super) const HAS_RES: Override<bool> = Override::new("HAS_RES");
    pub(super) const ACT: Override<u32> = Override::new("ACT");
    pub(super) const ACCUMULATE: Override<bool> = Override::new("ACCUMULATE");
    pub(super) const EPILOGUE: Override<bool> = Override::new("EPILOGUE");
    pub(super) const SG_ROWS: Override<u32> = Override::new("SG_ROWS");
    pub(super) const SG_STACK: Override<u32> = Override::new("SG_STACK");
    pub(super) const WIDE: Override<bool> = Override::new("WIDE");
    pub(super) const ARGMIN: Override<bool> = Override::new("ARGMIN");
    pub(super) const WG: Override<u32> = Override::new("WG");
}

/// The matmul shaders share their storage libraries first (`f16` with the `enable f16;`
/// directive, which must precede every declaration, where any operand is f16; then the B
/// operand's bindings and reads, `matmul_b_f32` or `matmul_b_f16`; then the storage type of
/// A, C and the residual, `elem_f32` or `elem_f16`), the activation and epilogue prologue
/// and every override; extra libraries of one shader follow after `+`, its extra overrides
/// after `,`.
macro_rules! matmul_shader {
    ($name:literal = $file:literal, [$($io:literal),+] $(+ $lib:literal)* $(, $extra:expr)*) => {
        crate::shader!(
            $name = $file,
            $($io,)+
            "act",
            "matmul_epilogue",
            $($lib,)*
            overrides = [
                ov::TRANS_A,
                ov::TRANS_B,
                ov::HAS_BIAS,
                ov::HAS_RES,
                ov::ACT,
                ov::ACCUMULATE,
                ov::EPILOGUE,
                ov::ARGMIN
                $(, $extra)*
            ]
        )
    };
}

/// Every operand f32.
pub(crate) static SHADER: Shader<Params> = matmul_shader!(
    "matmul" = "matmul",
    ["matmul_b_f32", "elem_f32"] + "tile128"
);
pub(crate) static SUBGROUP_SHADER: Shader<Params> = matmul_shader!(
    "matmul_subgroup" = "matmul_subgroup",
    ["matmul_b_f32", "elem_f32"] + "subgroup_tile",
    ov::SG_ROWS,
    ov::SG_STACK,
    ov::WIDE
);
/// [`SHADER`]'s kernels reading an f16 B (weights of `--precision f16`), widened to f32.
pub(crate) static SHADER_F16: Shader<Params> = matmul_shader!(
    "matmul_f16" = "matmul",
    ["f16", "matmul_b_f16", "elem_f32"] + "tile128"
);
/// [`SUBGROUP_SHADER`]'s kernel reading an f16 B.
pub(crate) static SUBGROUP_SHADER_F16: Shader<Params> = matmul_shader!(
    "matmul_subgroup_f16" = "matmul_subgroup",
    ["f16", "matmul_b_f16", "elem_f32"] + "subgroup_tile",
    ov::SG_ROWS,
    ov::SG_STACK,
    ov::WIDE
);
/// [`SHADER`]'s kernels on f16 weights and f16 activations (A, C and the residual), with
/// f32 products, accumulation and epilogue: the `--precision f16` inference path.
pub(crate) static SHADER_F16_IO: Shader<Params> = matmul_shader!(
    "matmul_f16_io" = "matmul",
    ["f16", "matmul_b_f16", "elem_f16"] + "tile128"
);
/// [`SUBGROUP_SHADER`]'s kernel on f16 weights and activations.
pub(crate) static SUBGROUP_SHADER_F16_IO: Shader<Params> = matmul_shader!(
    "matmul_subgroup_f16_io" = "matmul_subgroup",
    ["f16", "matmul_b_f16", "elem_f16"] + "subgroup_tile",
    ov::SG_ROWS,
    ov::SG_STACK,
    ov::WIDE
);

/// [`Variant::Coop`] on 16×16×16 f16 × f16 → f32 cooperative matrices (NVIDIA, AMD).
pub(crate) static COOP16_SHADER: Shader<Params> = matmul_shader!(
    "matmul_coop16" = "matmul_coop",
    ["f16", "coop", "coop16", "matmul_b_f16", "elem_f16"],
    ov::WG
);
/// [`Variant::Coop`] on 8×8×8 cooperative matrices (lavapipe).
pub(crate) static COOP8_SHADER: Shader<Params> = matmul_shader!(
    "matmul_coop8" = "matmul_coop",
    ["f16", "coop", "coop8", "matmul_b_f16", "elem_f16"],
    ov::WG
);

crate::shader_params! {
    /// Mirrors `struct Params` in `shaders/matmul.wgsl`.
    pub(crate) struct Params {
        m: u32,
        n: u32,
        k: u32,
        batch: u32,
        stride_a: u32,
        stride_b: u32,
        stride_c: u32,
        row0: u32,
        batch0: u32,
        alpha: f32,
        k0: u32,
        k1: u32,
    }
}

/// Most of K one dispatch sums. The register and shared kernels loop about 1.25 times per k
/// (loads included), the vec4 and subgroup kernels once per 4 k, so a split stays well under
/// llvmpipe's 65,535-iteration cap ([`super::CPU_LOOP_LIMIT`]). A multiple of 4, so that
/// every split of a vec4 kernel starts on a vec4 boundary.
pub const K_SPLIT: usize = 16_384;
const _: () = assert!(K_SPLIT.is_multiple_of(4));
/// K per dispatch of [`Variant::Tile128`]: each slice of 8 k runs about 70 loop iterations
/// (staging loops included) where the compiler keeps the loops, so 4,096 stays under the cap.
const K_SPLIT_TILE128: usize = 4_096;

/// Options of [`matmul`]. `Default` is a plain `A @ B`.
#[derive(Clone, Copy, Default)]
pub struct MatmulOpts<'a> {
    /// A is stored `[.., K, M]`.
    pub trans_a: bool,
    /// B is stored `[.., N, K]` (a PyTorch `Linear` weight is `[out, in]`: use `trans_b`).
    pub trans_b: bool,
    /// Scale of the product (1.0 when left at 0.0 by `Default`; see [`MatmulOpts::alpha`]).
    pub alpha: Option<f32>,
    /// Bias `[N]` added after scaling.
    pub bias: Option<&'a Tensor>,
    /// Activation applied after the bias.
    pub act: Act,
    /// Tensor of the output's shape added last (residual connection).
    pub residual: Option<&'a Tensor>,
}

impl<'a> MatmulOpts<'a> {
    /// `x @ W^T + b` with a PyTorch `Linear` weight `[out, in]`.
    pub fn linear(bias: Option<&'a Tensor>) -> Self {
        MatmulOpts {
            trans_b: true,
            bias,
            ..Default::default()
        }
    }
}

/// Which kernel computes the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// 4×4 register tile per invocation, no barriers (CPU Vulkan).
    Register,
    /// 64×64 workgroup-memory tile (GPUs).
    Shared,
    /// 4×4 register tile fed by vec4 loads along each operand's contiguous axis (CPU
    /// Vulkan). Applies when K % 4 == 0, M % 4 == 0 if `trans_a`, and N % 4 == 0 unless
    /// `trans_b`; other shapes run [`Variant::Register`].
    Vec4,
    /// 8×32 block per subgroup of 8 lanes, A shared between lanes by subgroup broadcasts
    /// (CPU Vulkan such as lavapipe, whose subgroups are its 8 SIMD lanes). Needs the
    /// SUBGROUP feature with subgroups of exactly 8 and the shapes of [`Variant::Vec4`];
    /// otherwise runs [`Variant::Vec4`] (or [`Variant::Register`]).
    Subgroup,
    /// [`Variant::Subgroup`] with 16 rows per subgroup: the same B loads feed twice the
    /// FMAs.
    Subgroup16,
    /// [`Variant::Subgroup`] with 32 rows per subgroup: 8 loads per 512 FMAs per lane
    /// against 6 per 256 at 16 rows. Its 32 vec4 accumulators spill on any CPU, but
    /// lavapipe's loads cost more than the spills (1024²: 44 GFLOP/s against 32).
    Subgroup32,
    /// [`Variant::Subgroup32`] over 128 columns per subgroup (each lane four blocks of 4):
    /// every broadcast row of A feeds 16 columns, 20 loads per 2048 FMAs per lane (1024²:
    /// 54-55 GFLOP/s on lavapipe, against 50 over 64 columns). A quarter as many
    /// workgroups along N: for large products.
    Subgroup32Wide,
    /// 128×128 workgroup tile, 8×8 outputs per invocation, workgroup memory read as vec4
    /// and double-buffered (GPUs; large products).
    Tile128,
    /// Cooperative matrices (tensor cores): f16 A and B staged through workgroup memory,
    /// f32 accumulation, a 4S × 4S tile per workgroup on the adapter's S×S×S
    /// configuration ([`Gpu::coop_f16_size`]). Only for products of f16 activations with
    /// f16 weights (`--precision f16` inference) on a device opened with the feature;
    /// elsewhere the product runs the variant [`variant_for`] picks. Not in
    /// [`Variant::ALL`], whose variants all run every product.
    Coop,
}

impl Variant {
    /// All variants, for tuning and benches.
    pub const ALL: [Variant; 8] = [
        Variant::Register,
        Variant::Shared,
        Variant::Vec4,
        Variant::Subgroup,
        Variant::Subgroup16,
        Variant::Subgroup32,
        Variant::Subgroup32Wide,
        Variant::Tile128,
    ];
    /// Short name used in `VQCLIP_MATMUL`, the tuning cache and bench output.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Register => "register4x4",
            Variant::Shared => "shared64",
            Variant::Vec4 => "vec4x4",
            Variant::Subgroup => "subgroup8",
            Variant::Subgroup16 => "subgroup16",
            Variant::Subgroup32 => "subgroup32",
            Variant::Subgroup32Wide => "subgroup32w",
            Variant::Tile128 => "tile128",
            Variant::Coop => "coop",
        }
    }
    fn parse(s: &str) -> Option<Variant> {
        Variant::ALL.into_iter().find(|v| v.name() == s)
    }
}

/// Whether this device can run [`Variant::Subgroup`]: the SUBGROUP feature, with every
/// subgroup exactly 8 invocations wide.
pub fn subgroup_supported(gpu: &Gpu) -> bool {
    let info = gpu.info();
    gpu.features().contains(wgpu::Features::SUBGROUP)
        && info.subgroup_min_size == 8
        && info.subgroup_max_size == 8
}

/// Shape classes tuned separately: a product with few rows or columns (one image's 50
/// tokens through a linear layer, say) wants other tiles than a large square one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShapeClass {
    /// M or N at most [`ShapeClass::SKINNY_MAX`].
    Skinny,
    /// Everything else.
    Large,
}

impl ShapeClass {
    /// Largest M or N of a [`ShapeClass::Skinny`] product.
    pub const SKINNY_MAX: usize = 128;
    /// Both classes.
    pub const ALL: [ShapeClass; 2] = [ShapeClass::Skinny, ShapeClass::Large];
    /// The class of an `[M, K] @ [K, N]` product.
    pub fn of(m: usize, n: usize) -> ShapeClass {
        if m.min(n) <= Self::SKINNY_MAX {
            ShapeClass::Skinny
        } else {
            ShapeClass::Large
        }
    }
    /// The class's tuning key ([`Gpu::tuning`]): `matmul.skinny`, `matmul.large`.
    pub fn tuning_key(self) -> &'static str {
        match self {
            ShapeClass::Skinny => "matmul.skinny",
            ShapeClass::Large => "matmul.large",
        }
    }
}

/// The variant used on this device for products of `class`: `VQCLIP_MATMUL`, else the
/// winner measured on this adapter for the class (`vqclip bench all`, key
/// [`ShapeClass::tuning_key`]), else for large products the winner of `vqclip bench
/// matmul` (key `"matmul"`, measured on square products), else a default: on CPU adapters with 8-wide subgroups the 32-row subgroup
/// kernel, over 64 columns per subgroup for large products and 32 for skinny ones (which
/// need the workgroups along N); a skinny product stacks fewer subgroups along M, so M = 50
/// still runs on a 64-row tile (the ViT-B/32 image encode took 266-285 ms against 418 ms
/// with the 8-row kernel on lavapipe); the vec4 kernel without subgroups (all fall back to
/// register tiles for shapes they cannot read as vec4); on GPUs 128-wide workgroup tiles
/// for large products and 64-wide ones for skinny products, which would leave most of a 128
/// tile idle.
pub fn variant_for(gpu: &Gpu, class: ShapeClass) -> Variant {
    if let Some(v) = super::env::MATMUL.get().and_then(|s| Variant::parse(&s)) {
        return v;
    }
    let tuned = |key: &str| gpu.tuning(key).and_then(|s| Variant::parse(&s));
    // `bench matmul`'s winner comes from square products: it stands in for large ones only.
    let square = || {
        (class == ShapeClass::Large)
            .then(|| tuned("matmul"))
            .flatten()
    };
    if let Some(v) = tuned(class.tuning_key()).or_else(square) {
        return v;
    }
    match (gpu.is_cpu(), class) {
        (true, ShapeClass::Large) if subgroup_supported(gpu) => Variant::Subgroup32Wide,
        (true, ShapeClass::Skinny) if subgroup_supported(gpu) => Variant::Subgroup32,
        (true, _) => Variant::Vec4,
        (false, ShapeClass::Large) => Variant::Tile128,
        (false, ShapeClass::Skinny) => Variant::Shared,
    }
}

/// Tuning key ([`Gpu::tuning`]) of the choice between [`Variant::Coop`] (`coop`) and the
/// other kernels (`fma`) for f16 products, saved by `vqclip bench all --tune`.
pub const COOP_TUNING_KEY: &str = "matmul.f16";

/// Whether f16 products run on [`Variant::Coop`] where the device has a configuration for
/// it: `VQCLIP_COOP_MATRIX=on|off`, else the choice `bench all --tune` measured on this
/// adapter ([`COOP_TUNING_KEY`]), else on GPUs yes, on CPU adapters no (lavapipe of Mesa
/// 26.1 ran the f16 image encode 6.7× slower on it than on its SIMD kernels, about 6×
/// after the vec4 staging of `matmul_coop4`: it emulates the multiply-adds lane by lane). An explicit `VQCLIP_MATMUL` kernel wins over all.
pub fn coop_default(gpu: &Gpu) -> bool {
    match super::env::COOP_MATRIX.get().as_deref() {
        Some("on") => true,
        Some("off") => false,
        _ => match gpu.tuning(COOP_TUNING_KEY).as_deref() {
            Some("coop") => true,
            Some("fma") => false,
            _ => !gpu.is_cpu(),
        },
    }
}

/// Subgroups per workgroup of [`Variant::Coop`]: 4 (the kernel's first four own the
/// tile); tests raise it on their thread to run the kernel with idle subgroups, as on
/// adapters whose driver picks subgroups narrower than the largest size.
fn coop_subgroups() -> u32 {
    #[cfg(test)]
    return tests::COOP_SUBGROUPS.with(|c| c.get());
    #[cfg(not(test))]
    4
}

/// Whether [`Variant::Vec4`] can read this product with vec4 loads: K % 4 == 0, and the
/// contiguous axis of each operand (K, or M for a transposed A, or N for a plain B) a
/// multiple of 4.
fn vec4_applies(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> bool {
    k.is_multiple_of(4) && (!trans_a || m.is_multiple_of(4)) && (trans_b || n.is_multiple_of(4))
}

/// `act(alpha * op(A) @ op(B) + bias) + residual`.
///
/// `a`: `[.., M, K]` (`[.., K, M]` if `trans_a`); `b`: `[.., K, N]` (`[.., N, K]` if
/// `trans_b`). Leading (batch) dims must be equal, or one side has none and is broadcast.
/// Returns `[.., M, N]`.
///
/// `b` may be f16 (`--precision f16` weights, widened to f32 as they are read). With an
/// f16 `b`, `a` may be f16 too (f16 activations): the residual must then be f16 and C is
/// f16; products, accumulation, bias and activation stay f32.
pub fn matmul(a: &Tensor, b: &Tensor, o: &MatmulOpts) -> Result<Tensor> {
    matrix(matmul_impl(a, b, o, None, Output::Matrix, Split::Auto)?)
}

/// [`matmul`] with an explicit kernel variant (benches and tests).
pub fn matmul_variant(a: &Tensor, b: &Tensor, o: &MatmulOpts, v: Variant) -> Result<Tensor> {
    matrix(matmul_impl(a, b, o, Some(v), Output::Matrix, Split::Auto)?)
}

/// [`matmul_variant`] with K in `slices` parallel slices where it divides into them
/// ([`super::matmul_split`]; tests).
pub fn matmul_split_variant(
    a: &Tensor,
    b: &Tensor,
    o: &MatmulOpts,
    v: Variant,
    slices: usize,
) -> Result<Tensor> {
    matrix(matmul_impl(
        a,
        b,
        o,
        Some(v),
        Output::Matrix,
        Split::Slices(slices),
    )?)
}

/// Per row of `C = alpha · op(A) @ op(B) + bias` (as [`matmul`]; no activation or
/// residual), the lowest value and its column, without writing C: the product's kernel
/// keeps, per row and block of columns, the minimum and its column (lowest on ties; the
/// `ARGMIN` epilogue in `shaders/lib/matmul_epilogue.wgsl`). Returns those pairs as
/// `[.., M, blocks, 2]` (the value, then the column's bits), for a reduction over the blocks
/// that compares values, then columns (`vq.wgsl`'s `nearest_reduce`); `None` where the
/// product's kernel has no such epilogue (only the subgroup and 128-tile kernels do) or K
/// would be split. The nearest-code search's distance matmul (16,384 codes per position)
/// so never writes its scores.
pub fn matmul_row_argmin(a: &Tensor, b: &Tensor, o: &MatmulOpts) -> Result<Option<Tensor>> {
    matmul_impl(a, b, o, None, Output::RowArgmin, Split::Auto)
}

/// [`matmul_row_argmin`] with an explicit kernel variant (tests).
pub fn matmul_row_argmin_variant(
    a: &Tensor,
    b: &Tensor,
    o: &MatmulOpts,
    v: Variant,
) -> Result<Option<Tensor>> {
    matmul_impl(a, b, o, Some(v), Output::RowArgmin, Split::Auto)
}

/// Rows `rows` of a product and the kernel that computes them ([`matmul_impl`] may cover
/// a product's last rows with a narrower kernel than the rest).
struct RowSegment {
    kernel: Kernel<Params>,
    /// Rows one workgroup covers.
    rows_per_wg: usize,
    /// Workgroups along N.
    wg_x: usize,
    rows: std::ops::Range<usize>,
}

/// What [`matmul_impl`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    /// C.
    Matrix,
    /// Per row and block of columns, C's minimum and its column ([`matmul_row_argmin`]).
    RowArgmin,
}

fn matrix(c: Option<Tensor>) -> Result<Tensor> {
    c.ok_or_else(|| Error::invalid("matmul wrote no product (an engine bug)"))
}

/// [`matmul`] on variant `v`, or (`None`) on [`variant_for`] the product's shape class.
fn matmul_impl(
    a: &Tensor,
    b: &Tensor,
    o: &MatmulOpts,
    v: Option<Variant>,
    out: Output,
    split: Split,
) -> Result<Option<Tensor>> {
    // A (and with it C and the residual) may be f16: activations of the `--precision f16`
    // inference path, on f16 weights.
    let io_f16 = match a.dtype() {
        DType::F32 => false,
        DType::F16 if out == Output::Matrix && b.dtype() == DType::F16 => true,
        d => {
            return Err(Error::invalid(format!(
                "matmul A: expected an f32 tensor, or an f16 one with f16 weights (B {:?}) \
                 and no row argmin; got {d:?}",
                b.dtype()
            )))
        }
    };
    if let Some(r) = o.residual {
        if r.dtype() != a.dtype() {
            return Err(Error::invalid(format!(
                "matmul residual is {:?} but A is {:?}: they must match",
                r.dtype(),
                a.dtype()
            )));
        }
    }
    // B may also be f16 (weights of `--precision f16`): the f16 twins of the kernels read
    // it and widen it to f32; the nearest-code search keeps f32 codebooks.
    let b_f16 = match b.dtype() {
        DType::F32 => false,
        DType::F16 if out == Output::Matrix => {
            b.gpu().require_f16("matmul with an f16 B")?;
            true
        }
        d => {
            return Err(Error::invalid(format!(
                "matmul B: expected an f32 tensor{}, got {d:?}",
                if out == Output::Matrix {
                    " or an f16 one"
                } else {
                    " (the row argmin reads f32 only)"
                }
            )))
        }
    };
    if a.rank() < 2 || b.rank() < 2 {
        return Err(Error::shape(format!(
            "matmul needs rank >= 2 operands, got {:?} and {:?}",
            a.shape(),
            b.shape()
        )));
    }
    let (ab, bb) = (&a.shape()[..a.rank() - 2], &b.shape()[..b.rank() - 2]);
    let (m, ka) = if o.trans_a {
        (a.dim(-1), a.dim(-2))
    } else {
        (a.dim(-2), a.dim(-1))
    };
    let (kb, n) = if o.trans_b {
        (b.dim(-1), b.dim(-2))
    } else {
        (b.dim(-2), b.dim(-1))
    };
    if ka != kb {
        return Err(Error::shape(format!(
            "matmul inner dims differ: A {:?}{} and B {:?}{}",
            a.shape(),
            if o.trans_a { "ᵀ" } else { "" },
            b.shape(),
            if o.trans_b { "ᵀ" } else { "" }
        )));
    }
    let batch_dims = if ab.is_empty() {
        bb
    } else if bb.is_empty() || ab == bb {
        ab
    } else {
        return Err(Error::shape(format!(
            "matmul batch dims differ: {:?} vs {:?}",
            a.shape(),
            b.shape()
        )));
    };
    let batch: usize = batch_dims.iter().product();
    let mut out_shape = batch_dims.to_vec();
    out_shape.extend([m, n]);
    if let Some(bias) = o.bias {
        if bias.numel() != n {
            return Err(Error::shape(format!(
                "matmul bias has {} elements, expected N = {n}",
                bias.numel()
            )));
        }
    }
    if let Some(r) = o.residual {
        if r.shape() != out_shape.as_slice() {
            return Err(Error::shape(format!(
                "matmul residual {:?} does not match output {:?}",
                r.shape(),
                out_shape
            )));
        }
    }
    if out == Output::RowArgmin && (o.residual.is_some() || o.act != Act::None) {
        return Err(Error::invalid(
            "matmul row argmin takes no activation or residual",
        ));
    }
    // A batch of A's against one shared B (tokens of several images through a linear
    // layer): A's rows are contiguous over the batch, so it is one [batch·M, K] product. One
    // tall product fills whole tiles where `batch` short ones (M = 50 tokens) would each
    // leave part of a tile idle.
    if bb.is_empty() && batch > 1 && !o.trans_a && batch * m <= u32::MAX as usize {
        let a2 = a.reshape(&[batch * m, ka])?;
        let res2 = match o.residual {
            Some(r) => Some(r.reshape(&[batch * m, n])?),
            None => None,
        };
        let o2 = MatmulOpts {
            residual: res2.as_ref(),
            ..*o
        };
        let Some(c) = matmul_impl(&a2, b, &o2, v, out, split)? else {
            return Ok(None);
        };
        let mut shape = batch_dims.to_vec();
        shape.push(m);
        shape.extend_from_slice(&c.shape()[1..]);
        return Ok(Some(c.reshape(&shape)?));
    }
    let gpu = a.gpu();
    if batch * m * n == 0 {
        return match out {
            Output::Matrix => Ok(Some(Tensor::empty(gpu, &out_shape, a.dtype())?)),
            Output::RowArgmin => Ok(None),
        };
    }
    let limit = u32::MAX as usize;
    if [m, n, ka, batch, a.numel(), b.numel(), batch * m * n]
        .iter()
        .any(|&x| x > limit)
    {
        return Err(Error::shape("matmul operand has more than 2^32 elements"));
    }
    let stride_a = if ab.is_empty() { 0 } else { m * ka } as u32;
    let stride_b = if bb.is_empty() { 0 } else { ka * n } as u32;
    let vec4 = vec4_applies(m, n, ka, o.trans_a, o.trans_b);
    // Cooperative matrices take f16 activations on f16 weights, where the device has them.
    let coop = gpu
        .coop_f16_size()
        .filter(|_| io_f16 && out == Output::Matrix);
    let class = ShapeClass::of(m, n);
    let v = match v {
        Some(Variant::Coop) if coop.is_none() => variant_for(gpu, class),
        Some(v) => v,
        None if coop.is_some() && super::env::MATMUL.get().is_none() && coop_default(gpu) => {
            Variant::Coop
        }
        None => variant_for(gpu, class),
    };
    let v = match v {
        Variant::Subgroup | Variant::Subgroup16 | Variant::Subgroup32 | Variant::Subgroup32Wide
            if !(vec4 && subgroup_supported(gpu)) =>
        {
            Variant::Vec4
        }
        v => v,
    };
    let v = if v == Variant::Vec4 && !vec4 {
        Variant::Register
    } else {
        v
    };
    // Rows per subgroup of the subgroup kernels.
    let sg_rows = match v {
        Variant::Subgroup => 8,
        Variant::Subgroup16 => 16,
        Variant::Subgroup32 | Variant::Subgroup32Wide => 32,
        _ => 0,
    };
    let wide = v == Variant::Subgroup32Wide;
    // Subgroups stacked along M: as many as M needs, up to all 8.
    let stack = m.div_ceil(sg_rows.max(1)).next_power_of_two().min(8);
    let (shader, subgroup_shader) = match (b_f16, io_f16) {
        (true, true) => (&SHADER_F16_IO, &SUBGROUP_SHADER_F16_IO),
        (true, false) => (&SHADER_F16, &SUBGROUP_SHADER_F16),
        _ => (&SHADER, &SUBGROUP_SHADER),
    };
    // The kernel of variant `v`; the subgroup kernels with `sg_rows` rows per subgroup,
    // `stack` subgroups stacked along M and `wide` column blocks.
    let make = |sg_rows: usize, stack: usize, wide: bool| {
        match v {
            Variant::Register => Kernel::new(shader, "matmul_reg"),
            Variant::Shared => Kernel::new(shader, "matmul_shared"),
            Variant::Vec4 => Kernel::new(shader, "matmul_vec4"),
            Variant::Subgroup
            | Variant::Subgroup16
            | Variant::Subgroup32
            | Variant::Subgroup32Wide => Kernel::new(subgroup_shader, "matmul_subgroup")
                .with(ov::SG_ROWS, sg_rows as u32)
                .with(ov::SG_STACK, stack as u32)
                .with(ov::WIDE, wide),
            Variant::Tile128 => Kernel::new(shader, "matmul_tile128"),
            // Four subgroups of the adapter's largest size, so that at least four exist.
            Variant::Coop => Kernel::new(
                if coop == Some(16) {
                    &COOP16_SHADER
                } else {
                    &COOP8_SHADER
                },
                // Both operands contiguous along K: staged by vec4 loads.
                if !o.trans_a && o.trans_b && ka.is_multiple_of(4) {
                    "matmul_coop4"
                } else {
                    "matmul_coop"
                },
            )
            .with(
                ov::WG,
                coop_subgroups() * gpu.info().subgroup_max_size.max(1),
            ),
        }
        .with(ov::TRANS_A, o.trans_a)
        .with(ov::TRANS_B, o.trans_b)
        .with(ov::HAS_BIAS, o.bias.is_some())
        .with(ov::HAS_RES, o.residual.is_some())
        .with(ov::ACT, o.act as u32)
        .with(ov::ARGMIN, out == Output::RowArgmin)
    };
    let kernel = make(sg_rows, stack, wide);
    // Column blocks of the row argmin's pairs (see the kernels' ARGMIN epilogues).
    let blocks = match (out, v) {
        (Output::Matrix, _) => 0,
        (Output::RowArgmin, Variant::Subgroup32Wide) => n.div_ceil(64),
        (Output::RowArgmin, Variant::Subgroup | Variant::Subgroup16 | Variant::Subgroup32) => {
            n.div_ceil(32)
        }
        (Output::RowArgmin, Variant::Tile128) => n.div_ceil(128) * 16,
        (Output::RowArgmin, _) => return Ok(None),
    };
    // Rows and columns covered by one workgroup.
    let (rows_per_wg, cols_per_wg) = match v {
        Variant::Register | Variant::Vec4 => (32usize, 32usize),
        Variant::Shared => (64, 64),
        Variant::Subgroup | Variant::Subgroup16 | Variant::Subgroup32 | Variant::Subgroup32Wide => {
            (stack * sg_rows, if wide { 1024 } else { 256 } / stack)
        }
        Variant::Tile128 => (128, 128),
        Variant::Coop => {
            let side = 4 * coop.unwrap_or(8) as usize;
            (side, side)
        }
    };
    let k_split = if v == Variant::Tile128 {
        K_SPLIT_TILE128
    } else {
        K_SPLIT
    };
    // Loop iterations per invocation per split: K (register), K/4 (vec4, subgroup), and
    // K/16 steps of up to 1 + 4 + 16 iterations (shared).
    debug_assert!(K_SPLIT.div_ceil(16) * 21 <= super::CPU_LOOP_LIMIT);
    let wg_x = n.div_ceil(cols_per_wg);
    if wg_x > 65535 {
        return Err(Error::shape(format!(
            "matmul N = {n} is too wide for one dispatch"
        )));
    }
    let bias_b = o.bias.map_or(gpu.unused_binding(), Tensor::binding);
    let res_b = o.residual.map_or(gpu.unused_binding(), Tensor::binding);
    const MAX: usize = 65535;
    let row_tiles = m.div_ceil(rows_per_wg);
    let splits: Vec<(usize, usize)> = if ka == 0 {
        vec![(0, 0)]
    } else {
        (0..ka)
            .step_by(k_split)
            .map(|k0| (k0, (k0 + k_split).min(ka)))
            .collect()
    };
    // Parallel split-K (a single product with few tiles): the slices of K are a batch of
    // products whose batch strides step along K, written as partials [S, M, N] (alpha only)
    // and summed with the epilogue by a second pass.
    let slices = match split {
        _ if out != Output::Matrix || batch != 1 || splits.len() != 1 => 1,
        Split::Auto => super::matmul_split::slices(gpu, v, wg_x * row_tiles, ka),
        Split::Slices(s) if super::matmul_split::fits(ka, s) => s,
        Split::Slices(_) => 1,
    };
    // Partial sums over slices of K live in C between passes (or in a partials tensor):
    // f16 storage would round them. With f16 activations such a product (K past the loop
    // cap of CPU adapters, or a GPU's split-K) runs in f32 between two conversions.
    if io_f16 && (slices > 1 || splits.len() > 1) {
        use super::cast::cast;
        let a32 = cast(a, DType::F32)?;
        let r32 = o.residual.map(|r| cast(r, DType::F32)).transpose()?;
        let o32 = MatmulOpts {
            residual: r32.as_ref(),
            ..*o
        };
        let c = matrix(matmul_impl(&a32, b, &o32, Some(v), out, split)?)?;
        return cast(&c, DType::F16).map(Some);
    }
    // What the dispatch loop below runs: the batch and its strides, K's sequential splits,
    // the output, the epilogue's operands. Split-K's slices are a batch stepping along K
    // that writes the partials with no epilogue.
    let (run_batch, stride_a, stride_b, splits, c, bias_b, res_b, kernel) = if slices > 1 {
        let kc = ka / slices;
        let part = Tensor::empty(gpu, &[slices, m, n], DType::F32)?;
        let kernel = kernel
            .with(ov::HAS_BIAS, false)
            .with(ov::HAS_RES, false)
            .with(ov::ACT, Act::None as u32);
        let unused = gpu.unused_binding();
        let stride_a = if o.trans_a { kc * m } else { kc };
        let stride_b = if o.trans_b { kc } else { kc * n };
        let (sa, sb) = (stride_a as u32, stride_b as u32);
        (slices, sa, sb, vec![(0, kc)], part, unused, unused, kernel)
    } else {
        let c = match out {
            Output::Matrix => Tensor::empty(gpu, &out_shape, a.dtype())?,
            Output::RowArgmin if splits.len() > 1 => return Ok(None),
            Output::RowArgmin => {
                let mut shape = batch_dims.to_vec();
                shape.extend([m, blocks, 2]);
                if batch * m * blocks * 2 > limit {
                    return Ok(None);
                }
                Tensor::empty(gpu, &shape, DType::F32)?
            }
        };
        (batch, stride_a, stride_b, splits, c, bias_b, res_b, kernel)
    };
    // Row ranges and the kernel that covers each: one, or (32-row subgroup tiles whose
    // last tile would hold 9 to 16 live rows) the whole tiles on the 32-row kernel and the
    // tail on 16-row subgroups: 77 text tokens then compute 80 rows instead of 96 (text
    // encode 188-190 -> 175-182 ms min on lavapipe). A tail of 8 rows or fewer stays on the
    // 32-row tile: per tile the B loads dominate, so an 8-row tile costs nearly as much,
    // and 200 cutout tokens (tail 8) on 16- or 8-row tails measured no faster in a
    // generation step. The row argmin keeps one kernel: its column blocks depend on the
    // kernel's width.
    let tail = m % 32;
    let segments = if matches!(v, Variant::Subgroup32 | Variant::Subgroup32Wide)
        && out == Output::Matrix
        && slices == 1
        && m > 32
        && (9..=16).contains(&tail)
    {
        let whole = m - tail;
        let stack = (whole / 32).next_power_of_two().min(8);
        let tail_rows = 16;
        let cols = if wide { 512 } else { 256 };
        vec![
            RowSegment {
                kernel: make(32, stack, wide),
                rows_per_wg: 32 * stack,
                wg_x: n.div_ceil(cols / stack),
                rows: 0..whole,
            },
            RowSegment {
                kernel: make(tail_rows, 1, false),
                rows_per_wg: tail_rows,
                wg_x: n.div_ceil(256),
                rows: whole..m,
            },
        ]
    } else {
        vec![RowSegment {
            kernel,
            rows_per_wg,
            wg_x,
            rows: 0..m,
        }]
    };
    for (si, &(k0, k1)) in splits.iter().enumerate() {
        for seg in &segments {
            let kernel = seg
                .kernel
                .clone()
                .with(ov::ACCUMULATE, si > 0)
                .with(ov::EPILOGUE, si + 1 == splits.len() && slices == 1);
            let row_tiles = seg.rows.len().div_ceil(seg.rows_per_wg);
            for batch0 in (0..run_batch).step_by(MAX) {
                let nz = (run_batch - batch0).min(MAX);
                for t0 in (0..row_tiles).step_by(MAX) {
                    let ny = (row_tiles - t0).min(MAX);
                    let p = Params {
                        m: m as u32,
                        n: n as u32,
                        k: ka as u32,
                        batch: run_batch as u32,
                        stride_a,
                        stride_b,
                        stride_c: (m * n) as u32,
                        row0: (seg.rows.start + t0 * seg.rows_per_wg) as u32,
                        batch0: batch0 as u32,
                        alpha: o.alpha.unwrap_or(1.0),
                        k0: k0 as u32,
                        k1: k1 as u32,
                    };
                    gpu.dispatch(
                        &kernel,
                        &p,
                        &[a.binding(), b.binding(), bias_b, res_b, c.binding()],
                        [seg.wg_x as u32, ny as u32, nz as u32],
                    );
                }
            }
        }
    }
    if slices > 1 {
        return super::matmul_split::sum(&c, o.bias, o.act, o.residual, &out_shape).map(Some);
    }
    Ok(Some(c))
}

/// Gradients of [`matmul`] that [`matmul_backward`] was asked for.
pub struct MatmulGrads {
    /// `dA`, `A`'s shape.
    pub da: Option<Tensor>,
    /// `dB`, `B`'s shape.
    pub db: Option<Tensor>,
    /// `dbias` `[N]`.
    pub dbias: Option<Tensor>,
}

/// Backward of [`matmul`]'s `C = alpha · op(A) @ op(B) + bias` (no activation or residual:
/// the tape records those as their own nodes). With `G = dC`:
///
/// - `A [M,K]`: `dA = alpha · G @ op(B)ᵀ`; `A` stored `[K,M]`: `dA = alpha · op(B) @ Gᵀ`;
/// - `B [K,N]`: `dB = alpha · op(A)ᵀ @ G`; `B` stored `[N,K]`: `dB = alpha · Gᵀ @ op(A)`;
/// - `dbias = Σ_rows G`.
///
/// `a`, `b` are the forward's operands (a rank-2 side may be shared over the other's batch:
/// its gradient is summed over that batch), `g` is `[.., M, N]`; `o` gives `trans_a`,
/// `trans_b` and `alpha` (its bias, residual and activation are not read). `need` says
/// which of `(dA, dB, dbias)` to compute.
pub fn matmul_backward(
    a: &Tensor,
    b: &Tensor,
    g: &Tensor,
    o: &MatmulOpts,
    need: [bool; 3],
) -> Result<MatmulGrads> {
    use super::reduce::sum_leading;
    if a.dtype() == DType::F16 || g.dtype() == DType::F16 {
        return Err(Error::invalid(
            "matmul backward: f16 activations (--precision f16) are for inference only; \
             gradients run on f32 activations",
        ));
    }
    if b.dtype() == DType::F16 && need[1] {
        return Err(Error::invalid(
            "matmul backward: a gradient was asked for an f16 weight; f16 weights \
             (--precision f16) are frozen, for inference and generation only: train in f32",
        ));
    }
    let (ta, tb) = (o.trans_a, o.trans_b);
    let s = Some(o.alpha.unwrap_or(1.0));
    let da = if !need[0] {
        None
    } else if ta {
        let opts = MatmulOpts {
            trans_a: tb,
            trans_b: true,
            alpha: s,
            ..Default::default()
        };
        Some(matmul(b, g, &opts)?)
    } else {
        let opts = MatmulOpts {
            trans_b: !tb,
            alpha: s,
            ..Default::default()
        };
        Some(matmul(g, b, &opts)?)
    };
    let db = if !need[1] {
        None
    } else {
        let b_broadcast = b.rank() == 2 && a.rank() > 2;
        let (a2, g2) = if b_broadcast {
            // A weight shared over the batch: fold the batch into the rows (A must be stored
            // row-major [.., M, K] for that) so one product sums over it.
            if ta {
                return Err(Error::invalid(
                    "matmul backward: a shared weight with a transposed batched A is not supported",
                ));
            }
            let rows = a.numel() / a.dim(-1);
            (
                a.reshape(&[rows, a.dim(-1)])?,
                g.reshape(&[rows, g.dim(-1)])?,
            )
        } else {
            (a.clone(), g.clone())
        };
        let db = if tb {
            let opts = MatmulOpts {
                trans_a: true,
                trans_b: ta,
                alpha: s,
                ..Default::default()
            };
            matmul(&g2, &a2, &opts)?
        } else {
            let opts = MatmulOpts {
                trans_a: !ta,
                alpha: s,
                ..Default::default()
            };
            matmul(&a2, &g2, &opts)?
        };
        Some(db.reshape(b.shape())?)
    };
    // A rank-2 A shared over B's batch gets its batch gradients summed.
    let da = da.map(|d| sum_leading(&d, a.shape())).transpose()?;
    let dbias = if need[2] {
        let n = g.dim(-1);
        Some(sum_leading(g, &[n])?)
    } else {
        None
    };
    Ok(MatmulGrads { da, db, dbias })
}

/// CPU reference in f64 with the same contract as [`matmul`] on flat row-major data; also
/// returns, per output, `Σ|a·b|` (scaled by |alpha|), the bound used for f32 tolerances.
/// Inputs are f32 (the kernel tests) or f64 (the autodiff tests' finite differences).
#[allow(clippy::too_many_arguments)]
pub fn reference<T: Copy + Into<f64>>(
    a: &[T],
    b: &[T],
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    broadcast_b: bool,
    alpha: f32,
    bias: Option<&[T]>,
    act: Act,
    residual: Option<&[T]>,
) -> (Vec<f64>, Vec<f64>) {
    let mut out = vec![0.0; batch * m * n];
    let mut mag = vec![0.0; batch * m * n];
    for bi in 0..batch {
        let ab = bi * m * k;
        let bb = if broadcast_b { 0 } else { bi * k * n };
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut g) = (0.0f64, 0.0f64);
                for kk in 0..k {
                    let av: f64 = if trans_a {
                        a[ab + kk * m + i]
                    } else {
                        a[ab + i * k + kk]
                    }
                    .into();
                    let bv: f64 = if trans_b {
                        b[bb + j * k + kk]
                    } else {
                        b[bb + kk * n + j]
                    }
                    .into();
                    s += av * bv;
                    g += (av * bv).abs();
                }
                let o = bi * m * n + i * n + j;
                let mut x = alpha as f64 * s + bias.map_or(0.0, |bv| bv[j].into());
                x = act.reference(x);
                if let Some(r) = residual {
                    x += r[o].into();
                }
                out[o] = x;
                mag[o] = (alpha as f64).abs() * g + bias.map_or(0.0, |bv| bv[j].into().abs());
            }
        }
    }
    (out, mag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};

    /// Asserts that a product's values `got` are within f32 rounding of [`reference`]'s `want`
    /// (with its magnitudes `mag`) over `k` products: recursive f32 summation of K products is
    /// within K·eps·Σ|a·b| of the exact sum; activations are 1-Lipschitz-ish (≤ 1.13) and add
    /// their own ~1e-6 error.
    /// With `f16_out` the values were stored as f16: one f16 ulp more (2⁻¹⁰ relative, as
    /// WGSL may round to either neighbour, and 2⁻²⁴ in f16's subnormal range).
    fn assert_near_reference(
        got: &[f32],
        want: &[f64],
        mag: &[f64],
        k: usize,
        f16_out: bool,
        what: &str,
    ) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let f16_ulp = |x: f64| (x.abs() * 2f64.powi(-10)).max(2f64.powi(-24));
        for i in 0..got.len() {
            let tol = 1.2 * (k as f64 + 2.0) * f32::EPSILON as f64 * mag[i]
                + 2e-6 * (1.0 + want[i].abs())
                + if f16_out { f16_ulp(want[i]) } else { 0.0 };
            let err = (got[i] as f64 - want[i]).abs();
            assert!(
                err <= tol,
                "{what}: element {i} got {} want {} (err {err:e} > tol {tol:e})",
                got[i],
                want[i]
            );
        }
    }

    /// One test problem: `op(A) [batch, m, k] @ op(B) [batch (or none: broadcast), k, n]`,
    /// optionally with the fused bias, activation and residual (alpha 0.5 with a residual).
    #[derive(Debug, Clone, Copy)]
    struct Problem {
        batch: usize,
        m: usize,
        n: usize,
        k: usize,
        trans_a: bool,
        trans_b: bool,
        broadcast_b: bool,
        bias: bool,
        act: Act,
        residual: bool,
        /// B uploaded as f16 (the reference uses the same f16-rounded values).
        f16_b: bool,
        /// A and the residual uploaded as f16 and C written as f16 (f16 activations; with
        /// `f16_b`), the reference on the f16-rounded A and residual.
        f16_io: bool,
        /// K forced into this many parallel slices ([`matmul_split_variant`]); 0: the
        /// default choice.
        slices: usize,
    }

    impl Problem {
        /// A plain `A @ B`.
        fn new(batch: usize, m: usize, n: usize, k: usize) -> Problem {
            Problem {
                batch,
                m,
                n,
                k,
                trans_a: false,
                trans_b: false,
                broadcast_b: false,
                bias: false,
                act: Act::None,
                residual: false,
                f16_b: false,
                f16_io: false,
                slices: 0,
            }
        }
        /// f16 weights and f16 activations.
        fn f16_io(self) -> Problem {
            Problem {
                f16_b: true,
                f16_io: true,
                ..self
            }
        }
        fn slices(self, slices: usize) -> Problem {
            Problem { slices, ..self }
        }
        fn f16_b(self) -> Problem {
            Problem {
                f16_b: true,
                ..self
            }
        }
        fn trans(self, trans_a: bool, trans_b: bool) -> Problem {
            Problem {
                trans_a,
                trans_b,
                ..self
            }
        }
        /// B is one `[k, n]` matrix for every batch entry.
        fn broadcast_b(self) -> Problem {
            Problem {
                broadcast_b: true,
                ..self
            }
        }
        fn bias(self) -> Problem {
            Problem { bias: true, ..self }
        }
        fn act(self, act: Act) -> Problem {
            Problem { act, ..self }
        }
        fn residual(self) -> Problem {
            Problem {
                residual: true,
                ..self
            }
        }

        /// Runs the problem on variant `v` with inputs from `seed` and compares with
        /// [`reference`].
        fn check(self, v: Variant, seed: u64) {
            let Problem {
                batch,
                m,
                n,
                k,
                trans_a: ta,
                trans_b: tb,
                broadcast_b: bcast,
                bias,
                act,
                residual: res,
                f16_b,
                f16_io,
                slices,
            } = self;
            let g = gpu();
            // The kernels widen f16 exactly: f16-rounded values are the exact operands.
            let round = |v: Vec<f32>, f16: bool| -> Vec<f32> {
                if !f16 {
                    return v;
                }
                v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
            };
            let upload = |v: &[f32], shape: &[usize], f16: bool| {
                if f16 {
                    Tensor::from_f32_as_f16(&g, v, shape).unwrap()
                } else {
                    Tensor::from_slice(&g, v, shape).unwrap()
                }
            };
            let av = round(rand_vec(batch * m * k, seed), f16_io);
            let bv = round(
                rand_vec(if bcast { k * n } else { batch * k * n }, seed + 1),
                f16_b,
            );
            let biasv = rand_vec(n, seed + 2);
            let resv = round(rand_vec(batch * m * n, seed + 3), f16_io);
            let a_shape = if ta { [batch, k, m] } else { [batch, m, k] };
            let b_shape: Vec<usize> = match (bcast, tb) {
                (true, true) => vec![n, k],
                (true, false) => vec![k, n],
                (false, true) => vec![batch, n, k],
                (false, false) => vec![batch, k, n],
            };
            let a = upload(&av, &a_shape, f16_io);
            let b = upload(&bv, &b_shape, f16_b);
            assert_eq!(b.dtype(), if f16_b { DType::F16 } else { DType::F32 });
            let bias_t = Tensor::from_slice(&g, &biasv, &[n]).unwrap();
            let res_t = upload(&resv, &[batch, m, n], f16_io);
            let alpha = if res { 0.5 } else { 1.0 };
            let o = MatmulOpts {
                trans_a: ta,
                trans_b: tb,
                alpha: Some(alpha),
                bias: bias.then_some(&bias_t),
                act,
                residual: res.then_some(&res_t),
            };
            let c = match slices {
                0 => matmul_variant(&a, &b, &o, v),
                s => matmul_split_variant(&a, &b, &o, v, s),
            }
            .unwrap();
            assert_eq!(c.shape(), &[batch, m, n]);
            assert_eq!(c.dtype(), if f16_io { DType::F16 } else { DType::F32 });
            let got = c.to_vec().unwrap();
            let (want, mag) = reference(
                &av,
                &bv,
                batch,
                m,
                n,
                k,
                ta,
                tb,
                bcast,
                alpha,
                bias.then_some(&biasv),
                act,
                res.then_some(&resv),
            );
            let what = format!("{v:?} {self:?}");
            assert_near_reference(&got, &want, &mag, k, f16_io, &what);
        }
    }

    #[test]
    fn matches_reference_over_shapes_and_transposes() {
        let shapes = [
            (1, 1, 1, 1),
            (1, 3, 5, 7),
            (2, 17, 65, 33),
            (1, 64, 64, 64),
            (3, 65, 17, 129),
            (1, 50, 768, 64),
            (1, 1000, 3, 17),
            (1, 7, 1031, 5),
        ];
        let mut seed = 0;
        for v in Variant::ALL {
            for &(batch, m, n, k) in &shapes {
                for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                    seed += 10;
                    Problem::new(batch, m, n, k).trans(ta, tb).check(v, seed);
                }
            }
        }
    }

    #[test]
    fn fused_epilogue_and_broadcast_weights() {
        let mut seed = 1000;
        for v in Variant::ALL {
            for act in [
                Act::None,
                Act::Gelu,
                Act::QuickGelu,
                Act::Silu,
                Act::Relu,
                Act::GeluTanh,
            ] {
                seed += 10;
                Problem::new(3, 33, 47, 70)
                    .trans(false, true)
                    .broadcast_b()
                    .bias()
                    .act(act)
                    .residual()
                    .check(v, seed);
            }
            Problem::new(2, 5, 9, 3)
                .trans(true, false)
                .broadcast_b()
                .bias()
                .act(Act::Sigmoid)
                .check(v, seed + 5);
        }
    }

    /// The variants that read their operands as vec4s.
    const VEC4_VARIANTS: [Variant; 5] = [
        Variant::Vec4,
        Variant::Subgroup,
        Variant::Subgroup16,
        Variant::Subgroup32,
        Variant::Subgroup32Wide,
    ];

    #[test]
    fn vec4_and_subgroup_variants_on_eligible_shapes() {
        // Shapes where matmul_vec4 and matmul_subgroup themselves run (the latter where the
        // device supports it), with ragged edges on the dims they clamp: M not a multiple
        // of 4 or 8, N not a multiple of 4 (trans_b) or 32.
        let cases = [
            (1, 4, 4, 4, false, false),
            (1, 17, 36, 20, false, false),
            (1, 50, 77, 64, false, true),
            (2, 50, 768, 768, false, true),
            (1, 20, 12, 132, true, false),
            (1, 36, 13, 8, true, true),
            (2, 4, 44, 12, true, true),
            (3, 65, 1028, 16, false, false),
            (2, 8, 1031, 12, false, true),
            (1, 132, 68, 36, true, false),
            // 32-row tiles with a tail of 9 to 16 rows, which runs on 16-row subgroups: 77
            // text tokens (tail 13), 44 and 48 (tails 12 and 16) with a transposed A, and
            // around them tails that stay on the 32-row tile (200: 8, 33: 1, 36: 4).
            (1, 77, 520, 64, false, true),
            (1, 44, 72, 16, true, false),
            (1, 48, 36, 8, true, true),
            (2, 200, 36, 20, false, false),
            (1, 33, 68, 8, false, true),
            (1, 36, 68, 8, true, true),
        ];
        let mut seed = 2000;
        for v in VEC4_VARIANTS {
            for (batch, m, n, k, ta, tb) in cases {
                assert!(vec4_applies(m, n, k, ta, tb), "{m}x{n}x{k} {ta} {tb}");
                seed += 10;
                Problem::new(batch, m, n, k).trans(ta, tb).check(v, seed);
            }
            Problem::new(3, 33, 48, 72)
                .trans(false, true)
                .broadcast_b()
                .bias()
                .act(Act::QuickGelu)
                .residual()
                .check(v, seed + 1);
            Problem::new(2, 12, 20, 8)
                .trans(true, false)
                .broadcast_b()
                .bias()
                .act(Act::Gelu)
                .residual()
                .check(v, seed + 2);
            Problem::new(70_000, 2, 4, 4).bias().check(v, seed + 3);
        }
    }

    #[test]
    fn long_k_is_split_under_the_cpu_loop_limit() {
        // llvmpipe stops an invocation's loops after 65,535 iterations in total
        // (ops::CPU_LOOP_LIMIT); long K runs as accumulating splits of K_SPLIT, for every
        // variant, whether or not K is a multiple of 4.
        for v in Variant::ALL {
            for (k, tb) in [(65_540, true), (65_537, false), (2 * K_SPLIT + 3, true)] {
                Problem::new(1, 2, 3, k)
                    .trans(false, tb)
                    .bias()
                    .act(Act::Gelu)
                    .residual()
                    .check(v, 3000 + k as u64);
            }
        }
    }

    #[test]
    fn vec4_kernels_split_long_k() {
        // K = 65,540 is summed in 4 accumulating splits of at most K_SPLIT (the vec4 kernels
        // step K by 4, so the splits must stay multiples of 4); fused epilogue on the last.
        for v in VEC4_VARIANTS {
            Problem::new(1, 9, 6, 65_540)
                .trans(false, true)
                .broadcast_b()
                .bias()
                .act(Act::Gelu)
                .residual()
                .check(v, 3000);
            Problem::new(1, 8, 4, 40_004)
                .trans(true, false)
                .check(v, 3010);
        }
    }

    #[test]
    fn batch_past_65535_workgroups_is_split() {
        for v in Variant::ALL {
            Problem::new(70_000, 2, 3, 4).bias().check(v, 77);
        }
    }

    /// Whether the test device can run the f16 kernels (skips f16 tests where it cannot).
    fn has_f16() -> bool {
        let ok = gpu().features().contains(wgpu::Features::SHADER_F16);
        if !ok {
            eprintln!("skipped: the adapter has no SHADER_F16");
        }
        ok
    }

    /// Every kernel with K forced into parallel slices ([`super::super::matmul_split`])
    /// gives the reference's result: all four transposes, M and N off every tile size
    /// (partial tiles), alpha, bias, QuickGELU and a residual (the last three in the
    /// summing pass), and an f16 B where the adapter has SHADER_F16.
    #[test]
    fn split_k_slices_match_the_reference_on_every_kernel() {
        let f16 = has_f16();
        let mut seed = 3000;
        for v in Variant::ALL {
            for (ta, tb) in [(false, true), (false, false), (true, false), (true, true)] {
                let p = Problem::new(1, 50, 36, 768)
                    .trans(ta, tb)
                    .bias()
                    .act(Act::QuickGelu)
                    .residual();
                for s in [2, 8, 12] {
                    seed += 10;
                    p.slices(s).check(v, seed);
                }
                if f16 {
                    p.slices(8).f16_b().check(v, seed + 1);
                }
            }
        }
    }

    /// The problems the f16 tests run on every variant, in f32 before their f16 option:
    /// ragged tiles, all four transposes, a batch, shapes the vec4 and subgroup kernels read
    /// as vec4 (the operands' last vec4 included), broadcast weights with bias + activation
    /// + residual (CLIP's fused QuickGELU layers among them), and K in 4 parallel slices.
    fn f16_problems() -> Vec<Problem> {
        let mut v = Vec::new();
        for &(batch, m, n, k) in &[(1, 3, 5, 7), (2, 17, 65, 33), (1, 50, 768, 64)] {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                v.push(Problem::new(batch, m, n, k).trans(ta, tb));
            }
        }
        for (batch, m, n, k, ta, tb) in [
            (1, 17, 36, 20, false, false),
            (2, 50, 77, 64, false, true),
            (1, 36, 13, 8, true, true),
            (1, 132, 68, 36, true, false),
            (1, 130, 260, 36, false, true),
        ] {
            v.push(Problem::new(batch, m, n, k).trans(ta, tb));
        }
        let epilogue = |batch, m, n, k, ta, tb, act| {
            Problem::new(batch, m, n, k)
                .trans(ta, tb)
                .broadcast_b()
                .bias()
                .act(act)
                .residual()
        };
        v.push(epilogue(3, 33, 48, 72, false, true, Act::QuickGelu));
        v.push(epilogue(2, 12, 20, 8, true, false, Act::Gelu));
        v.push(epilogue(3, 50, 96, 64, false, true, Act::QuickGelu));
        v.push(
            Problem::new(1, 40, 64, 256)
                .trans(false, true)
                .bias()
                .residual()
                .slices(4),
        );
        v
    }

    #[test]
    fn f16_b_every_variant_matches_the_reference_of_the_rounded_b() {
        // The f16-weight twins of every kernel against the f64 reference on the f16-rounded
        // B, at the f32 tolerances, over [`f16_problems`].
        if !has_f16() {
            return;
        }
        let mut seed = 5000;
        for v in Variant::ALL {
            for p in f16_problems() {
                seed += 10;
                p.f16_b().check(v, seed);
            }
        }
    }

    #[test]
    fn f16_activations_every_variant_match_the_reference_of_the_rounded_operands() {
        // f16 A, residual and C on f16 weights (the `--precision f16` inference path)
        // against the f64 reference on the f16-rounded operands, within f32 accumulation
        // error plus one f16 ulp of the stored C, over [`f16_problems`] (K split into
        // slices runs in f32 between conversions).
        if !has_f16() {
            return;
        }
        let mut seed = 7000;
        for v in Variant::ALL {
            for p in f16_problems() {
                seed += 10;
                p.f16_io().check(v, seed);
            }
        }
    }

    thread_local! {
        /// [`super::coop_subgroups`] on this test thread.
        pub(super) static COOP_SUBGROUPS: std::cell::Cell<u32> = const { std::cell::Cell::new(4) };
    }

    #[test]
    fn coop_matches_the_reference_of_the_rounded_operands() {
        // The cooperative-matrix kernel, where the device has it (lavapipe of Mesa 26.1 at
        // 8×8×8: `scripts/coop-lavapipe.sh`; GPUs at 16×16×16), over [`f16_problems`] and
        // shapes that cross its 4S-wide tiles and its 2S-deep k slices with partial tiles
        // on every side; at f32 accumulation tolerances plus the f16 rounding of C.
        let g = gpu();
        let Some(s) = g.coop_f16_size() else {
            // scripts/coop-lavapipe.sh sets this: there the kernel must run.
            assert!(
                std::env::var_os("VQCLIP_TEST_REQUIRE_COOP").is_none(),
                "VQCLIP_TEST_REQUIRE_COOP is set but the device has no f16 cooperative matrix"
            );
            eprintln!("skipped: the adapter has no f16 cooperative-matrix configuration");
            return;
        };
        let mut problems = f16_problems();
        let t = 4 * s as usize;
        for (batch, m, n, k, ta, tb) in [
            (1, t + 3, 2 * t + 5, 2 * s as usize + 3, false, true),
            (2, 2 * t - 1, t + 1, 5 * s as usize, true, false),
            (1, 3 * t, 3 * t, 7 * s as usize + 1, true, true),
            (1, 197, 300, 200, false, false),
        ] {
            problems.push(Problem::new(batch, m, n, k).trans(ta, tb));
        }
        problems.push(
            Problem::new(4, 50, 3 * t + 7, 96)
                .trans(false, true)
                .broadcast_b()
                .bias()
                .act(Act::QuickGelu)
                .residual(),
        );
        let mut seed = 9000;
        for p in &problems {
            seed += 10;
            p.f16_io().check(Variant::Coop, seed);
        }
        // Twice the subgroups: the four past the fourth own no tile and only stage.
        COOP_SUBGROUPS.with(|c| c.set(8));
        for p in &problems[problems.len() - 5..] {
            seed += 10;
            p.f16_io().check(Variant::Coop, seed);
        }
        COOP_SUBGROUPS.with(|c| c.set(4));
    }

    #[test]
    fn f16_activations_need_f16_weights_and_a_matching_residual() {
        if !has_f16() {
            return;
        }
        let g = gpu();
        let h = Tensor::from_f32_as_f16(&g, &[1.0; 16], &[4, 4]).unwrap();
        let f = Tensor::full(&g, &[4, 4], 1.0).unwrap();
        let o = MatmulOpts {
            residual: Some(&f),
            ..Default::default()
        };
        let e = matmul(&h, &h, &o).unwrap_err().to_string();
        assert!(e.contains("residual is F32 but A is F16"), "{e}");
        let e = matmul_row_argmin(&h, &h, &MatmulOpts::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("matmul A") && e.contains("row argmin"), "{e}");
        let e = matmul_backward(&h, &h, &h, &MatmulOpts::default(), [true, false, false])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("inference only"), "{e}");
        // Exact small values: the f16 product is written as f16.
        let c = matmul(&h, &h, &MatmulOpts::default()).unwrap();
        assert_eq!(c.dtype(), DType::F16);
        assert_eq!(c.to_vec().unwrap(), vec![4.0; 16]);
    }

    #[test]
    fn f16_b_is_read_as_f16_not_as_f32_bytes() {
        // Values that f16 holds exactly, so any misread (f32 kernels on f16 bytes, a wrong
        // index scale) shows as a wrong product rather than a rounding difference.
        if !has_f16() {
            return;
        }
        let g = gpu();
        let (m, n, k) = (5, 12, 8);
        let av: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let bv: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.25 - 0.5).collect();
        let a = Tensor::from_slice(&g, &av, &[m, k]).unwrap();
        let b = Tensor::from_f32_as_f16(&g, &bv, &[n, k]).unwrap();
        assert_eq!(b.bytes(), (n * k * 2) as u64);
        assert_eq!(b.to_vec().unwrap(), bv, "to_vec widens f16");
        let (want, _) = reference(
            &av,
            &bv,
            1,
            m,
            n,
            k,
            false,
            true,
            false,
            1.0,
            None,
            Act::None,
            None,
        );
        let want: Vec<f32> = want.iter().map(|&x| x as f32).collect();
        for v in Variant::ALL {
            let c = matmul_variant(&a, &b, &MatmulOpts::linear(None), v).unwrap();
            assert_eq!(c.to_vec().unwrap(), want, "{v:?}");
        }
    }

    #[test]
    fn f16_operands_where_only_f32_is_read_are_errors() {
        if !has_f16() {
            return;
        }
        let g = gpu();
        let h = Tensor::from_f32_as_f16(&g, &[1.0; 16], &[4, 4]).unwrap();
        let f = Tensor::full(&g, &[4, 4], 1.0).unwrap();
        let e = matmul(&h, &f, &MatmulOpts::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("matmul A") && e.contains("F16"), "{e}");
        let e = matmul_row_argmin(&f, &h, &MatmulOpts::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("row argmin reads f32 only"), "{e}");
        // dX of an f16 weight is fine (generation); dW is refused.
        let o = MatmulOpts::linear(None);
        let r = matmul_backward(&f, &h, &f, &o, [true, false, false]).unwrap();
        assert!(r.da.is_some());
        let e = matmul_backward(&f, &h, &f, &o, [false, true, false])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("f16 weight") && e.contains("train in f32"),
            "{e}"
        );
        let e = crate::ops::elementwise::add(&h, &f)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected an f32 tensor, got F16"), "{e}");
        let e = h.to_vec_u32().unwrap_err().to_string();
        assert!(e.contains("non-u32"), "{e}");
    }

    #[test]
    fn shape_classes_split_at_skinny_max() {
        let t = ShapeClass::SKINNY_MAX;
        assert_eq!(ShapeClass::of(50, 2304), ShapeClass::Skinny);
        assert_eq!(ShapeClass::of(4096, t), ShapeClass::Skinny);
        assert_eq!(ShapeClass::of(t + 1, t + 1), ShapeClass::Large);
        assert_eq!(ShapeClass::of(1024, 1024), ShapeClass::Large);
        assert_ne!(
            ShapeClass::Skinny.tuning_key(),
            ShapeClass::Large.tuning_key()
        );
    }

    #[test]
    fn shape_errors_are_reported() {
        let g = gpu();
        let a = Tensor::zeros(&g, &[2, 3]).unwrap();
        let b = Tensor::zeros(&g, &[4, 5]).unwrap();
        let e = matmul(&a, &b, &MatmulOpts::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("inner dims"), "{e}");
        let bias = Tensor::zeros(&g, &[7]).unwrap();
        let b = Tensor::zeros(&g, &[3, 5]).unwrap();
        let e = matmul(
            &a,
            &b,
            &MatmulOpts {
                bias: Some(&bias),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("bias"), "{e}");
    }

    #[test]
    fn many_dispatches_share_few_submits() {
        // A device of its own, so that no other test's submits are counted.
        let g = Gpu::new(&crate::gpu::DeviceOptions::from_env().unwrap()).unwrap();
        let a = Tensor::from_slice(&g, &rand_vec(16 * 16, 5), &[16, 16]).unwrap();
        g.sync().unwrap();
        let before = g.submit_count();
        let mut x = a.clone();
        for _ in 0..20 {
            x = matmul(
                &x,
                &a,
                &MatmulOpts {
                    alpha: Some(0.1),
                    ..Default::default()
                },
            )
            .unwrap();
        }
        let _ = x.to_vec().unwrap();
        // One submit for the readback; 20 if each op submitted on its own.
        assert_eq!(g.submit_count() - before, 1);
    }
}

#[cfg(test)]
mod loop_limit_tests {
    use super::*;
    use crate::ops::testutil::gpu;

    #[test]
    fn inner_dimension_beyond_the_cpu_loop_limit() {
        // llvmpipe stops an invocation's loops after 65,535 iterations in total
        // (ops::CPU_LOOP_LIMIT); a long K must still be summed completely.
        let g = gpu();
        for k in [65_535usize, 70_000, 200_001] {
            let a = Tensor::full(&g, &[2, k], 1.0).unwrap();
            let b = Tensor::full(&g, &[k, 3], 0.5).unwrap();
            for v in Variant::ALL {
                let c = matmul_variant(&a, &b, &MatmulOpts::default(), v)
                    .unwrap()
                    .to_vec()
                    .unwrap();
                for x in c {
                    assert_eq!(x, 0.5 * k as f32, "{v:?} k={k}");
                }
            }
        }
        // The epilogue runs once, after the last split: relu(−Σ + 1) + 2 = 2, while a
        // per-split epilogue would leave a different value.
        let k = 40_000;
        let a = Tensor::full(&g, &[1, k], 1.0).unwrap();
        let b = Tensor::full(&g, &[k, 1], 0.001).unwrap();
        let bias = Tensor::full(&g, &[1], 1.0).unwrap();
        let res = Tensor::full(&g, &[1, 1], 2.0).unwrap();
        for v in Variant::ALL {
            let o = MatmulOpts {
                alpha: Some(-1.0),
                bias: Some(&bias),
                act: Act::Relu,
                residual: Some(&res),
                ..Default::default()
            };
            let c = matmul_variant(&a, &b, &o, v).unwrap().to_vec().unwrap();
            assert_eq!(c, vec![2.0], "{v:?}");
            let o = MatmulOpts {
                alpha: Some(1.0),
                ..o
            };
            let c = matmul_variant(&a, &b, &o, v).unwrap().to_vec().unwrap();
            // Σ of 40,000 f32 terms: within K·eps·Σ|ab| ≈ 0.19 of exact; a bias or residual
            // applied per split would be off by whole units.
            assert!((c[0] - 43.0).abs() < 0.2, "{v:?}: {}", c[0]);
        }
    }
}
