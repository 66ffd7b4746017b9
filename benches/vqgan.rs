//! VQGAN f16_16384 (the ImageNet/WikiArt f16 architecture: ch 128, ch_mult [1,1,2,2,4], two
//! residual blocks per level, attention at 16, z 256, 16,384 codes) with random weights built
//! in memory: encoder (+ quant_conv) and decoder (+ post_quant_conv) latency, the quantiser,
//! and peak GPU memory per stage.
//!
//! Each stage's peak is measured once before timing: `gpu.reset_peak()`, the stage, sync,
//! `gpu.memory().peak` (pooled bytes held by live tensors, weights included; the weights'
//! share is printed too).
//!
//! Sizes: `VQCLIP_VQGAN_SIZES` (comma-separated image sides, default `256`; `256,512` adds
//! 512²). Criterion runs 10 samples of one pass each, which on lavapipe takes many minutes;
//! `VQCLIP_VQGAN_ONESHOT=1` prints the one-pass figures and skips criterion.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use vqclip::models::vqgan::{VqGan, VqGanConfig};
use vqclip::weights::TensorSource;
use vqclip::{Gpu, Result, Tensor};

/// Random weights generated on demand (deterministic per key), scaled like PyTorch's default
/// init so activations stay in range: uniform(±1/√fan_in) for weights, GroupNorm gamma 1 and
/// beta 0, a unit-normal-ish codebook.
struct RandomWeights {
    shapes: HashMap<String, Vec<usize>>,
    order: Vec<String>,
}

impl RandomWeights {
    fn new(cfg: &VqGanConfig) -> Self {
        let list = cfg.tensor_shapes();
        RandomWeights {
            order: list.iter().map(|(k, _)| k.clone()).collect(),
            shapes: list.into_iter().collect(),
        }
    }
}

impl TensorSource for RandomWeights {
    fn path(&self) -> &str {
        "<random f16_16384 weights>"
    }
    fn keys(&self) -> Vec<String> {
        self.order.clone()
    }
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.shapes.get(key).cloned()
    }
    fn read_f32(&self, key: &str) -> Result<Vec<f32>> {
        let shape = &self.shapes[key];
        let n: usize = shape.iter().product();
        let is_norm = key.contains("norm");
        if is_norm {
            return Ok(vec![if key.ends_with(".weight") { 1.0 } else { 0.0 }; n]);
        }
        let seed = key.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let scale = if key.starts_with("quantize.embedding") {
            1.0
        } else if shape.len() == 4 {
            1.0 / ((shape[1] * shape[2] * shape[3]) as f32).sqrt()
        } else {
            0.05
        };
        Ok((0..n).map(|_| r.random_range(-scale..scale)).collect())
    }
}

fn sizes() -> Vec<usize> {
    std::env::var("VQCLIP_VQGAN_SIZES")
        .unwrap_or_else(|_| "256".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Runs `f` once and returns (seconds, peak pooled bytes during it).
fn measure<T>(gpu: &Gpu, f: impl FnOnce() -> T) -> (f64, u64, T) {
    gpu.sync().unwrap();
    gpu.reset_peak();
    let t = Instant::now();
    let out = f();
    gpu.sync().unwrap();
    (t.elapsed().as_secs_f64(), gpu.memory().peak, out)
}

fn bench(c: &mut Criterion) {
    let gpu = Gpu::shared().expect("a wgpu adapter");
    let cfg = VqGanConfig::imagenet_f16(16384);
    let t = Instant::now();
    let model = VqGan::from_source(&RandomWeights::new(&cfg), cfg, &gpu).unwrap();
    gpu.sync().unwrap();
    let weights = gpu.memory().live;
    eprintln!(
        "vqgan f16_16384 on {} ({:?}): weights {:.1} MiB on the GPU, built in {:.1} s",
        gpu.info().name,
        gpu.info().backend,
        mib(weights),
        t.elapsed().as_secs_f64()
    );
    let mut g = c.benchmark_group("vqgan_f16_16384");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1));
    for s in sizes() {
        let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(s as u64);
        let xv: Vec<f32> = (0..3 * s * s).map(|_| r.random_range(-1.0..1.0)).collect();
        let x = Tensor::from_slice(&gpu, &xv, &[1, 3, s, s]).unwrap();
        // One measured pass per stage (pipelines are compiled on a tiny input first, so the
        // pass times the kernels, not the shader compiler).
        let warm = Tensor::from_slice(&gpu, &vec![0.0; 3 * 16 * 16], &[1, 3, 16, 16]).unwrap();
        let (wz, _) = model.quantize(&model.encode(&warm).unwrap()).unwrap();
        let _ = model.decode(&wz).unwrap().to_vec().unwrap();
        let (te, pe, z) = measure(&gpu, || model.encode(&x).unwrap());
        let (tq, pq, (zq, _codes)) = measure(&gpu, || model.quantize(&z).unwrap());
        let (td, pd, _y) = measure(&gpu, || model.decode(&zq).unwrap());
        for (stage, secs, peak) in [("encode", te, pe), ("quantize", tq, pq), ("decode", td, pd)] {
            eprintln!(
                "  {s}x{s} {stage:<8} {:>9.1} ms   peak {:>7.1} MiB ({:.1} MiB above the weights)",
                secs * 1e3,
                mib(peak),
                mib(peak.saturating_sub(weights))
            );
        }
        if std::env::var("VQCLIP_VQGAN_ONESHOT").is_ok_and(|v| v == "1") {
            continue;
        }
        g.bench_function(BenchmarkId::new("encode", s), |b| {
            b.iter(|| {
                let z = model.encode(&x).unwrap();
                gpu.sync().unwrap();
                z
            })
        });
        g.bench_function(BenchmarkId::new("quantize", s), |b| {
            b.iter(|| {
                let q = model.quantize(&z).unwrap();
                gpu.sync().unwrap();
                q
            })
        });
        g.bench_function(BenchmarkId::new("decode", s), |b| {
            b.iter(|| {
                let y = model.decode(&zq).unwrap();
                gpu.sync().unwrap();
                y
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
