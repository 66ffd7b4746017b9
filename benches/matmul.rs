//! Matmul throughput: square N×N×N products and the GEMM shapes of CLIP ViT-B/32, for every
//! kernel variant. Criterion reports FLOP/s as "elements"/s (one element = one FLOP,
//! 2·M·N·K per product), and a GFLOP/s line at the median follows each case.
//!
//! Short by design (10 samples, ~2 s each case) so it finishes in minutes on lavapipe;
//! N = 2048 (17 GFLOP per product) runs only on real GPUs or with `VQCLIP_BENCH_LARGE=1`.
//! `cargo bench --bench matmul -- clip` runs only the CLIP shapes.

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use std::time::{Duration, Instant};
use vqclip::ops::matmul::{matmul_variant, MatmulOpts, Variant};
use vqclip::{Gpu, Tensor};

struct Case {
    name: String,
    m: usize,
    n: usize,
    k: usize,
    /// `x @ Wᵀ + b` with a PyTorch Linear weight `[N, K]`, as the models call it.
    linear: bool,
}

fn cases(gpu: &Gpu) -> (Vec<Case>, Vec<Case>) {
    let large = !gpu.is_cpu() || std::env::var("VQCLIP_BENCH_LARGE").is_ok_and(|v| v == "1");
    let square = [256usize, 512, 1024, 2048]
        .into_iter()
        .filter(|&s| s < 2048 || large)
        .map(|s| Case {
            name: format!("{s}"),
            m: s,
            n: s,
            k: s,
            linear: false,
        })
        .collect();
    // ViT-B/32 vision tower on a batch of 8 images (8 × 50 tokens, width 768, MLP 3072) and
    // the text tower on one prompt (77 tokens, width 512, MLP 2048).
    let clip = [
        ("vision_qkvo_400x768x768", 400, 768, 768),
        ("vision_fc1_400x3072x768", 400, 3072, 768),
        ("vision_fc2_400x768x3072", 400, 768, 3072),
        ("text_qkvo_77x512x512", 77, 512, 512),
        ("text_fc1_77x2048x512", 77, 2048, 512),
        ("text_fc2_77x512x2048", 77, 512, 2048),
    ]
    .into_iter()
    .map(|(name, m, n, k)| Case {
        name: name.to_string(),
        m,
        n,
        k,
        linear: true,
    })
    .collect();
    (square, clip)
}

fn operands(gpu: &Gpu, c: &Case) -> (Tensor, Tensor, Tensor) {
    let fill = |len: usize, seed: usize| -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    };
    let a = Tensor::from_slice(gpu, &fill(c.m * c.k, 1), &[c.m, c.k]).expect("upload A");
    let b_shape = if c.linear { [c.n, c.k] } else { [c.k, c.n] };
    let b = Tensor::from_slice(gpu, &fill(c.k * c.n, 2), &b_shape).expect("upload B");
    let bias = Tensor::from_slice(gpu, &fill(c.n, 3), &[c.n]).expect("upload bias");
    (a, b, bias)
}

fn run_group(crit: &mut Criterion, gpu: &Gpu, group: &str, cases: &[Case]) {
    let mut g = crit.benchmark_group(group);
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for c in cases {
        let flops = 2 * (c.m * c.n * c.k) as u64;
        g.throughput(Throughput::Elements(flops));
        let (a, b, bias) = operands(gpu, c);
        let opts = if c.linear {
            MatmulOpts::linear(Some(&bias))
        } else {
            MatmulOpts::default()
        };
        for v in Variant::ALL {
            let once = || {
                let y = matmul_variant(&a, &b, &opts, v).expect("matmul");
                gpu.sync().expect("sync");
                y
            };
            // Per-iteration seconds of every batch criterion times (warm-up included),
            // for the GFLOP/s line; empty when a filter skips this case.
            let times = std::cell::RefCell::new(Vec::new());
            g.bench_function(BenchmarkId::new(v.name(), &c.name), |bch| {
                bch.iter_custom(|iters| {
                    let t = Instant::now();
                    for _ in 0..iters {
                        once();
                    }
                    let d = t.elapsed();
                    times.borrow_mut().push(d.as_secs_f64() / iters as f64);
                    d
                })
            });
            let mut t = times.into_inner();
            if !t.is_empty() {
                t.sort_by(f64::total_cmp);
                let med = t[t.len() / 2];
                println!(
                    "{group}/{}/{}: {:.2} GFLOP/s (median {:.2} ms)",
                    v.name(),
                    c.name,
                    flops as f64 / med / 1e9,
                    med * 1e3
                );
            }
        }
    }
    g.finish();
}

fn bench(crit: &mut Criterion) {
    let gpu = Gpu::shared().expect("a wgpu adapter");
    println!("adapter: {} ({:?})", gpu.info().name, gpu.info().backend);
    let (square, clip) = cases(&gpu);
    run_group(crit, &gpu, "matmul_square", &square);
    run_group(crit, &gpu, "matmul_clip", &clip);
}

criterion_group!(benches, bench);
criterion_main!(benches);
