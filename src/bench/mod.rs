//! Measurements behind `vqclip bench`: each checks the GPU result against the CPU reference
//! before it reports a speed.

pub mod all;
pub mod peak;
mod report;
pub mod vqgan;

use crate::ops::matmul::{self, MatmulOpts, Variant};
use crate::{Error, Gpu, Result, Tensor};
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// One kernel variant's timing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VariantTiming {
    /// Variant name.
    pub name: String,
    /// Median milliseconds per multiply.
    pub ms: f64,
    /// GFLOP/s at the median (2·N³ FLOPs).
    pub gflops: f64,
    /// Largest |gpu − cpu| over the checked entries, in units of f32 eps · Σ|a·b| (recursive
    /// summation of K products stays below K).
    pub max_err: f64,
}

/// Result of a square matmul benchmark.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MatmulBench {
    /// Matrix size N (N×N times N×N).
    pub size: usize,
    /// Adapter name.
    pub adapter: String,
    /// Backend name.
    pub backend: String,
    /// Fastest variant.
    pub best: String,
    /// GFLOP/s of the fastest variant.
    pub gflops: f64,
    /// Every variant measured.
    pub variants: Vec<VariantTiming>,
    /// Output entries compared with the f64 CPU reference.
    pub checked_entries: usize,
}

/// `n` uniform numbers in [-1, 1) from `seed` (the benches' inputs).
fn random(n: usize, seed: u64) -> Vec<f32> {
    random_in(n, seed, -1.0, 1.0)
}

/// `n` uniform numbers in [`lo`, `hi`) from `seed`.
fn random_in(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| r.random_range(lo..hi)).collect()
}

/// Times `variants` of an N×N×N matmul; records the winner with [`Gpu::save_tuning`].
pub fn matmul_square(
    gpu: &Gpu,
    n: usize,
    variants: &[Variant],
    min_secs: f64,
) -> Result<MatmulBench> {
    if n == 0 {
        return Err(Error::invalid("matrix size must be at least 1"));
    }
    let av = random(n * n, 1);
    let bv = random(n * n, 2);
    let a = Tensor::from_slice(gpu, &av, &[n, n])?;
    let b = Tensor::from_slice(gpu, &bv, &[n, n])?;
    // Spot-check entries spread over the matrix (a full f64 reference at N = 2048 would
    // take far longer than the benchmark).
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let samples: Vec<(usize, usize)> = (0..256.min(n * n))
        .map(|_| (rng.random_range(0..n), rng.random_range(0..n)))
        .chain([(0, 0), (n - 1, n - 1)])
        .collect();
    let mut out = Vec::new();
    for &v in variants {
        let c = matmul::matmul_variant(&a, &b, &MatmulOpts::default(), v)?;
        let got = c.to_vec()?;
        let mut max_err = 0.0f64;
        for &(i, j) in &samples {
            let (mut s, mut g) = (0.0f64, 0.0f64);
            for k in 0..n {
                let p = av[i * n + k] as f64 * bv[k * n + j] as f64;
                s += p;
                g += p.abs();
            }
            let err = (got[i * n + j] as f64 - s).abs() / (g * f32::EPSILON as f64);
            max_err = max_err.max(err);
        }
        // err is in units of eps·Σ|a·b|; recursive summation stays below K.
        if max_err > 1.2 * n as f64 + 2.0 {
            return Err(Error::invalid(format!(
                "matmul variant {} disagrees with the CPU reference (error {max_err:.1} eps-units)",
                v.name()
            )));
        }
        let mut times = Vec::new();
        let start = Instant::now();
        while times.len() < 3 || (start.elapsed().as_secs_f64() < min_secs && times.len() < 50) {
            let t = Instant::now();
            let c = matmul::matmul_variant(&a, &b, &MatmulOpts::default(), v)?;
            gpu.sync()?;
            times.push(t.elapsed().as_secs_f64());
            drop(c);
        }
        times.sort_by(f64::total_cmp);
        let med = times[times.len() / 2];
        out.push(VariantTiming {
            name: v.name().to_string(),
            ms: med * 1e3,
            gflops: 2.0 * (n as f64).powi(3) / med / 1e9,
            max_err,
        });
    }
    let best = out
        .iter()
        .max_by(|x, y| x.gflops.total_cmp(&y.gflops))
        .cloned()
        .ok_or_else(|| Error::invalid("no variant to benchmark"))?;
    if variants.len() > 1 {
        // Later runs on this adapter use the winner (see `Gpu::tuning`).
        gpu.save_tuning("matmul", &best.name)?;
    }
    Ok(MatmulBench {
        size: n,
        adapter: gpu.info().name.clone(),
        backend: format!("{:?}", gpu.info().backend),
        best: best.name.clone(),
        gflops: best.gflops,
        variants: out,
        checked_entries: samples.len(),
    })
}

/// Result of timing VQGAN+CLIP generation steps ([`generate_steps`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateBench {
    /// Adapter name.
    pub adapter: String,
    /// Backend name.
    pub backend: String,
    /// Image width.
    pub width: usize,
    /// Image height.
    pub height: usize,
    /// Cutouts per step.
    pub cutn: usize,
    /// Whether blocks were recomputed in the backward pass (gradient checkpointing).
    pub recompute: bool,
    /// Milliseconds of the untimed warm-up step (pipeline compilation, first allocations).
    pub warmup_ms: f64,
    /// Milliseconds of each timed step, in order.
    pub step_ms: Vec<f64>,
    /// Mean of `step_ms`.
    pub mean_ms: f64,
    /// Bytes of live tensors before the first step: both models' weights, the latent and
    /// the optimiser state.
    pub base_bytes: u64,
    /// Highest bytes of live tensors during the steps (buffer-pool size classes, so up to a
    /// quarter above the tensors' own sizes; uniforms and readback buffers not counted).
    pub peak_bytes: u64,
    /// `peak_bytes − base_bytes`: what one step adds (activations, tape, gradients).
    pub step_peak_bytes: u64,
    /// Bytes the pool holds on the device after the steps (live plus idle buffers kept
    /// for reuse).
    pub resident_bytes: u64,
}

/// Times `steps` VQGAN+CLIP optimisation steps after one warm-up step. Each step ends with
/// reading its loss back, so its time includes all of its GPU work.
pub fn generate_steps(
    gpu: &Gpu,
    clip: &dyn crate::generate::Perceptor,
    vqgan: &dyn crate::generate::Generator,
    opts: crate::generate::Options,
    steps: usize,
) -> Result<GenerateBench> {
    if steps == 0 {
        return Err(Error::invalid("at least one timed step is needed"));
    }
    let (width, height, cutn, recompute) = (opts.width, opts.height, opts.cutn, opts.recompute);
    let mut gen = crate::generate::Generation::new(gpu, clip, vqgan, opts)?;
    gpu.sync()?;
    let base_bytes = gpu.memory().live;
    gpu.reset_peak();
    let t = Instant::now();
    let first = gen.step()?;
    let warmup_ms = t.elapsed().as_secs_f64() * 1e3;
    if !first.loss.is_finite() {
        return Err(Error::invalid(format!(
            "the warm-up step's loss is {}",
            first.loss
        )));
    }
    let mut step_ms = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        gen.step()?;
        step_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mem = gpu.memory();
    Ok(GenerateBench {
        adapter: gpu.info().name.clone(),
        backend: format!("{:?}", gpu.info().backend),
        width,
        height,
        cutn,
        recompute,
        warmup_ms,
        mean_ms: step_ms.iter().sum::<f64>() / steps as f64,
        step_ms,
        base_bytes,
        peak_bytes: mem.peak,
        step_peak_bytes: mem.peak.saturating_sub(base_bytes),
        resident_bytes: mem.live + mem.idle,
    })
}

/// Random VQGAN weights of `cfg`'s shapes, as the benches use them: group-norm gains 1,
/// biases 0, other tensors PyTorch's default uniform init.
pub fn random_vqgan(
    cfg: &crate::models::vqgan::VqGanConfig,
    seed: u64,
) -> Result<crate::weights::MemorySource> {
    use crate::train::{default_init, init_weights, Init};
    init_weights(&cfg.tensor_shapes(), seed, |key, shape| {
        if key.contains("norm") && key.ends_with("weight") {
            Init::Const(1.0)
        } else if key.ends_with("bias") {
            Init::Const(0.0)
        } else {
            default_init(shape)
        }
    })
}
