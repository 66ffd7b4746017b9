//! GPU ops. One file per op family: its params struct (mirrored by a WGSL struct in
//! `shaders/<op>.wgsl`), shape guards, dispatch, backward rule (`<op>_backward`, right under
//! the forward it differentiates; [`crate::autodiff::Tape`] only wires them), CPU reference
//! and tests.

pub mod attention;
pub mod attention_backward;
pub mod attention_tiled;
pub mod cast;
pub mod concat;
#[cfg(test)]
mod contract_tests;
pub mod conv2d;
pub mod conv2d_igemm;
pub mod conv2d_igemm_tiled;
pub mod elementwise;
pub mod env;
pub mod gather;
pub mod group_norm;
pub mod l2_normalize;
pub mod layer_norm;
pub mod loss;
pub mod matmul;
pub mod matmul_split;
pub mod permute;
pub mod reduce;
pub mod softmax;
pub mod upsample;
pub mod vq;
pub mod warp;

pub use attention::{attention, attention_bthd, merge_heads, split_heads};
pub use cast::cast;
pub use concat::{concat, slice};
pub use elementwise::{binary, unary, BinaryOp, UnaryOp};
pub use gather::{gather_rows, gather_rows_table, RowTable};
pub use group_norm::group_norm;
pub use layer_norm::layer_norm;
pub use matmul::{matmul, MatmulOpts};
pub use permute::{permute, transpose};
pub use reduce::{reduce, sum_all, ReduceOp};
pub use softmax::{softmax, softmax_scaled};

/// How a row-wise kernel (norms, softmax, attention) spreads its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// One invocation per row, looping over it: no workgroup memory and no barriers, which
    /// are expensive on CPU Vulkan (lavapipe runs a workgroup's invocations as SIMD lanes and
    /// splits the program at every barrier).
    Invocation,
    /// One workgroup per row (or per tile of rows), cooperating through workgroup memory:
    /// what GPUs want.
    Workgroup,
}

/// Loop iterations one invocation may run on Mesa's llvmpipe/lavapipe (up to at least Mesa
/// 22.3): every loop in a shader shares one counter, and once 65,535 iterations have run all
/// loops exit early, silently leaving work undone. Kernels that loop per invocation size their
/// work below this (splitting rows, keys or reductions into more invocations).
pub const CPU_LOOP_LIMIT: usize = 65_535;

impl Strategy {
    /// Both strategies, for tests and benches.
    pub const ALL: [Strategy; 2] = [Strategy::Invocation, Strategy::Workgroup];

    /// The default for a device: [`Strategy::Invocation`] on CPU adapters, else
    /// [`Strategy::Workgroup`].
    pub fn for_gpu(gpu: &crate::Gpu) -> Strategy {
        if gpu.is_cpu() {
            Strategy::Invocation
        } else {
            Strategy::Workgroup
        }
    }

    /// [`Strategy::for_gpu`], except that rows whose loop would run more than `iters`
    /// iterations in one invocation (see [`CPU_LOOP_LIMIT`]) go to [`Strategy::Workgroup`],
    /// which also spreads one long row over many threads.
    pub fn for_rows(gpu: &crate::Gpu, iters: usize) -> Strategy {
        if iters > CPU_LOOP_LIMIT / 4 {
            Strategy::Workgroup
        } else {
            Strategy::for_gpu(gpu)
        }
    }
}

/// Activation applied in fused epilogues. The codes match `shaders/lib/act.wgsl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Act {
    /// Identity.
    #[default]
    None = 0,
    /// GELU, exact erf form (`torch.nn.functional.gelu`, HF `"gelu"`).
    Gelu = 1,
    /// QuickGELU `x * sigmoid(1.702 x)` (OpenAI CLIP, HF `"quick_gelu"`).
    QuickGelu = 2,
    /// SiLU / swish `x * sigmoid(x)`.
    Silu = 3,
    /// Logistic sigmoid.
    Sigmoid = 4,
    /// ReLU.
    Relu = 5,
    /// GELU, tanh approximation (HF `"gelu_new"`).
    GeluTanh = 6,
}

impl Act {
    /// Every activation, in code order.
    pub const ALL: [Act; 7] = [
        Act::None,
        Act::Gelu,
        Act::QuickGelu,
        Act::Silu,
        Act::Sigmoid,
        Act::Relu,
        Act::GeluTanh,
    ];

    /// The Hugging Face `hidden_act` name (transformers' `ACT2FN` key); [`Act::from_hf`]
    /// reads it back.
    pub fn hf_name(self) -> &'static str {
        match self {
            Act::None => "linear",
            Act::Gelu => "gelu",
            Act::QuickGelu => "quick_gelu",
            Act::Silu => "silu",
            Act::Sigmoid => "sigmoid",
            Act::Relu => "relu",
            Act::GeluTanh => "gelu_new",
        }
    }

    /// Parses a Hugging Face `hidden_act` name.
    pub fn from_hf(name: &str) -> crate::Result<Act> {
        Ok(match name {
            "linear" => Act::None,
            "gelu" => Act::Gelu,
            "quick_gelu" => Act::QuickGelu,
            "silu" | "swish" => Act::Silu,
            "relu" => Act::Relu,
            "gelu_new" | "gelu_pytorch_tanh" => Act::GeluTanh,
            "sigmoid" => Act::Sigmoid,
            other => {
                return Err(crate::Error::invalid(format!(
                    "unsupported activation '{other}'"
                )))
            }
        })
    }

    /// CPU reference of the activation (f64).
    pub fn reference(self, x: f64) -> f64 {
        match self {
            Act::None => x,
            Act::Gelu => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
            Act::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
            Act::Silu => x / (1.0 + (-x).exp()),
            Act::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Act::Relu => x.max(0.0),
            Act::GeluTanh => {
                let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
                0.5 * x * (1.0 + u.tanh())
            }
        }
    }
}

impl Act {
    /// CPU reference of the derivative `act'(x)` (f64, analytic).
    pub fn grad_reference(self, x: f64) -> f64 {
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        match self {
            Act::None => 1.0,
            Act::Gelu => {
                0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2))
                    + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
            }
            Act::QuickGelu => {
                let s = sig(1.702 * x);
                s + 1.702 * x * s * (1.0 - s)
            }
            Act::Silu => {
                let s = sig(x);
                s * (1.0 + x * (1.0 - s))
            }
            Act::Sigmoid => sig(x) * (1.0 - sig(x)),
            Act::Relu => {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Act::GeluTanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                let t = (c * (x + 0.044715 * x * x * x)).tanh();
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
            }
        }
    }
}

/// The checks a normalisation's affine parameters and epsilon share: `gamma` and `beta`
/// f32 with `c` values each (the input `x_shape`'s normalised channels), `eps >= 0`;
/// `what` names the op in the error.
pub(crate) fn check_affine(
    what: &str,
    x_shape: &[usize],
    c: usize,
    gamma: Option<&crate::Tensor>,
    beta: Option<&crate::Tensor>,
    eps: f32,
) -> crate::Result<()> {
    use crate::Error;
    for (name, t) in [("gamma", gamma), ("beta", beta)] {
        if let Some(t) = t {
            t.expect_f32(name)?;
            if t.numel() != c {
                return Err(Error::shape(format!(
                    "{what} {name} has shape {:?} but the input {x_shape:?} has C = {c}",
                    t.shape()
                )));
            }
        }
    }
    if eps.is_nan() || eps < 0.0 {
        return Err(Error::invalid(format!(
            "{what} eps must be >= 0, got {eps}"
        )));
    }
    Ok(())
}

/// erf to ~1e-15 (Numerical Recipes erfc via Chebyshev), for CPU references.
pub fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 2.0 / (2.0 + z);
    let ty = 4.0 * t - 2.0;
    const COF: [f64; 28] = [
        -1.3026537197817094,
        6.419_697_923_564_903e-1,
        1.9476473204185836e-2,
        -9.561_514_786_808_63e-3,
        -9.46595344482036e-4,
        3.66839497852761e-4,
        4.2523324806907e-5,
        -2.0278578112534e-5,
        -1.624290004647e-6,
        1.303655835580e-6,
        1.5626441722e-8,
        -8.5238095915e-8,
        6.529054439e-9,
        5.059343495e-9,
        -9.91364156e-10,
        -2.27365122e-10,
        9.6467911e-11,
        2.394038e-12,
        -6.886027e-12,
        8.94487e-13,
        3.13092e-13,
        -1.12708e-13,
        3.81e-16,
        7.106e-15,
        -1.523e-15,
        -9.4e-17,
        1.21e-16,
        -2.8e-17,
    ];
    let (mut d, mut dd) = (0.0f64, 0.0f64);
    for &c in COF.iter().skip(1).rev() {
        let tmp = d;
        d = ty * d - dd + c;
        dd = tmp;
    }
    let erfc = t * (-z * z + 0.5 * (COF[0] + ty * d) - dd).exp();
    if x >= 0.0 {
        1.0 - erfc
    } else {
        erfc - 1.0
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Shared helpers for op tests.
    use crate::gpu::Gpu;
    use rand::{Rng, SeedableRng};

    /// The shared test device.
    pub fn gpu() -> Gpu {
        Gpu::shared().expect("a wgpu adapter (install mesa-vulkan-drivers for lavapipe)")
    }

    /// Deterministic uniform values in [-1, 1).
    pub fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect()
    }

    /// Asserts |got - want| <= atol + rtol * |want| elementwise, naming the worst element.
    pub fn assert_close(got: &[f32], want: &[f64], atol: f64, rtol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let mut worst = (0usize, 0.0f64);
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let err = (g as f64 - w).abs();
            let excess = err - (atol + rtol * w.abs());
            if excess > worst.1 || g.is_nan() != w.is_nan() {
                worst = (i, excess.max(f64::MIN_POSITIVE));
            }
        }
        if worst.1 > 0.0 {
            let i = worst.0;
            panic!(
                "{what}: element {i}: got {} want {} (atol {atol}, rtol {rtol})",
                got[i], want[i]
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Act;

    #[test]
    fn hf_names_read_back_as_the_same_activation() {
        for (i, a) in Act::ALL.into_iter().enumerate() {
            assert_eq!(a as usize, i, "Act::ALL is in code order and complete");
            assert_eq!(Act::from_hf(a.hf_name()).unwrap(), a, "{}", a.hf_name());
        }
        // The aliases transformers also accepts.
        assert_eq!(Act::from_hf("swish").unwrap(), Act::Silu);
        assert_eq!(Act::from_hf("gelu_pytorch_tanh").unwrap(), Act::GeluTanh);
        assert!(Act::from_hf("tanh").is_err());
    }

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.5204998778130465),
            (1.0, 0.8427007929497149),
            (-2.0, -0.9953222650189527),
            (3.0, 0.9999779095030014),
        ] {
            assert!((super::erf(x) - want).abs() < 1e-13, "erf({x})");
        }
    }
}
