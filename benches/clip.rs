//! CLIP encode latency with ViT-B/32-shaped random weights (no checkpoint needed): text
//! (77-token texts, the full context) and images (224×224), batch 1 and 32. Each iteration
//! includes reading the embeddings back, so it measures the whole forward pass.
//!
//! `cargo bench --bench clip` runs criterion (10 samples per case). On a CPU adapter a batch
//! of 32 takes minutes per iteration, so `VQCLIP_BENCH_ONCE=1 cargo bench --bench clip` times
//! each case once instead (after one warm-up pass) and prints milliseconds and GFLOP/s.

use criterion::{BenchmarkId, Criterion, Throughput};
use std::time::{Duration, Instant};
use vqclip::models::clip::{random_weights, ClipConfig, ClipModel};
use vqclip::{Gpu, Tensor};

const BATCHES: [usize; 2] = [1, 32];
/// Multiply-accumulates of one encode (docs/MODEL_FACTS D2): 77-token text, 224² image.
const TEXT_GMAC: f64 = 2.98;
const IMAGE_GMAC: f64 = 4.41;

struct Setup {
    model: ClipModel,
    text: Vec<u32>,
    gpu: Gpu,
}

fn setup() -> Setup {
    let gpu = Gpu::shared().expect("a wgpu adapter");
    let config = ClipConfig::vit_base_patch32();
    let weights = random_weights(&config, 0).expect("random weights");
    let model = ClipModel::from_source(config, &weights, &gpu).expect("model");
    // 77 tokens per text: <|startoftext|>, 75 ids, <|endoftext|>.
    let text = std::iter::once(49406)
        .chain((0..75).map(|i| 320 + i * 7))
        .chain(std::iter::once(49407))
        .collect();
    Setup { model, text, gpu }
}

fn pixels(s: &Setup, batch: usize) -> Tensor {
    let px = s.model.config.vision.image_size;
    let data: Vec<f32> = (0..batch * 3 * px * px)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    Tensor::from_slice(&s.gpu, &data, &[batch, 3, px, px]).expect("pixels")
}

fn encode_text(s: &Setup, ids: &[Vec<u32>]) {
    let t = s.model.text_features_ids(ids).expect("encode text");
    t.to_vec().expect("read back");
}

fn encode_image(s: &Setup, px: &Tensor) {
    let t = s.model.encode_image(px).expect("encode image");
    t.to_vec().expect("read back");
}

fn once(s: &Setup) {
    println!(
        "adapter: {} ({:?})",
        s.gpu.info().name,
        s.gpu.info().backend
    );
    encode_text(s, std::slice::from_ref(&s.text));
    encode_image(s, &pixels(s, 1));
    for batch in BATCHES {
        let ids = vec![s.text.clone(); batch];
        let t = Instant::now();
        encode_text(s, &ids);
        let secs = t.elapsed().as_secs_f64();
        println!(
            "encode_text_77tok  batch {batch:2}: {:9.1} ms  ({:.1} ms/text, {:.2} GFLOP/s)",
            secs * 1e3,
            secs * 1e3 / batch as f64,
            2.0 * TEXT_GMAC * batch as f64 / secs
        );
        let px = pixels(s, batch);
        let t = Instant::now();
        encode_image(s, &px);
        let secs = t.elapsed().as_secs_f64();
        println!(
            "encode_image_224   batch {batch:2}: {:9.1} ms  ({:.1} ms/image, {:.2} GFLOP/s)",
            secs * 1e3,
            secs * 1e3 / batch as f64,
            2.0 * IMAGE_GMAC * batch as f64 / secs
        );
    }
}

fn bench(c: &mut Criterion, s: &Setup) {
    let mut g = c.benchmark_group("clip_vit_b32");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5));
    for batch in BATCHES {
        g.throughput(Throughput::Elements(batch as u64));
        let ids = vec![s.text.clone(); batch];
        g.bench_with_input(
            BenchmarkId::new("encode_text_77tok", batch),
            &ids,
            |b, ids| b.iter(|| encode_text(s, ids)),
        );
        let px = pixels(s, batch);
        g.bench_with_input(BenchmarkId::new("encode_image_224", batch), &px, |b, px| {
            b.iter(|| encode_image(s, px))
        });
    }
    g.finish();
}

fn main() {
    let s = setup();
    if std::env::var_os("VQCLIP_BENCH_ONCE").is_some() {
        once(&s);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &s);
    c.final_summary();
}
