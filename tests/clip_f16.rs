//! `--precision f16` CLIP (linear-layer weights stored in f16, widened to f32 by the matmul
//! kernels; on inference paths the encoder's activations stored in f16 too) against the
//! same model in f32 on the fixture checkpoints of tests/fixtures/clip: embeddings, the
//! pixel gradient VQGAN+CLIP follows, and the weight memory saved.

use std::path::{Path, PathBuf};
use vqclip::autodiff::Tape;
use vqclip::models::clip::ClipModel;
use vqclip::{DType, Precision, Tensor};

const MODELS: [&str; 3] = ["tiny_quickgelu", "small_gelu", "sparse_bf16"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/clip")
        .join(name)
}

/// The shared device, or `None` (test skipped) where it has no SHADER_F16.
fn f16_gpu() -> Option<vqclip::Gpu> {
    let g = vqclip::Gpu::shared().expect("a wgpu adapter (install mesa-vulkan-drivers)");
    if g.features().contains(wgpu::Features::SHADER_F16) {
        Some(g)
    } else {
        eprintln!("skipped: {} has no SHADER_F16", g.info().name);
        None
    }
}

/// Worst row cosine between `[N, P]` matrices.
fn worst_cos(a: &[f32], b: &[f32], p: usize) -> f64 {
    assert_eq!(a.len(), b.len());
    a.chunks(p)
        .zip(b.chunks(p))
        .map(|(x, y)| cos(x, y))
        .fold(1.0, f64::min)
}

fn cos(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Whether `key` names a linear layer's weight (what `--precision f16` stores in f16).
fn is_linear_weight(key: &str) -> bool {
    [
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "fc1",
        "fc2",
        "projection",
    ]
    .iter()
    .any(|l| key.ends_with(&format!("{l}.weight")))
}

#[test]
fn f16_weights_give_the_f32_embeddings_in_half_the_linear_weight_memory() {
    let Some(g) = f16_gpu() else { return };
    let texts: Vec<String> = [
        "a photo of a cat",
        "A cute, smiling, Nerdy Rodent",
        "a red square on a white background",
    ]
    .map(String::from)
    .to_vec();
    for name in MODELS {
        let f32m = ClipModel::load(fixture(name), &g).unwrap();
        let f16m = ClipModel::load_with(fixture(name), &g, Precision::F16).unwrap();
        assert_eq!(f16m.precision, Precision::F16);
        // Linear weights are f16, everything else f32, and their bytes exactly halve.
        let (mut lin32, mut lin16, mut linear_keys) = (0, 0, 0);
        for ((k32, t32), (k16, t16)) in f32m.params.iter().zip(&f16m.params) {
            assert_eq!(k32, k16);
            assert_eq!(t32.dtype(), DType::F32, "{name} {k32}");
            let want = if is_linear_weight(k16) {
                DType::F16
            } else {
                DType::F32
            };
            assert_eq!(t16.dtype(), want, "{name} {k16}");
            if want == DType::F16 {
                linear_keys += 1;
                lin32 += t32.bytes();
                lin16 += t16.bytes();
            }
        }
        let c = &f32m.config;
        // 4 projections and 2 MLP layers per layer, plus the two tower projections.
        let layers = c.text.num_hidden_layers + c.vision.num_hidden_layers;
        assert_eq!(linear_keys, 6 * layers + 2, "{name}");
        assert_eq!(2 * lin16, lin32, "{name}");
        assert_eq!(
            f32m.weight_bytes() - f16m.weight_bytes(),
            lin32 - lin16,
            "{name}"
        );
        eprintln!(
            "{name}: weights {} bytes f32, {} f16 (linear {lin32} -> {lin16})",
            f32m.weight_bytes(),
            f16m.weight_bytes()
        );

        let p = c.projection_dim;
        let t32 = f32m.encode_text(&texts).unwrap().to_vec().unwrap();
        let t16 = f16m.encode_text(&texts).unwrap().to_vec().unwrap();
        let tc = worst_cos(&t16, &t32, p);
        let images: Vec<_> = ["square_64.png", "photo_320x240.png", "wide_96x64.png"]
            .iter()
            .map(|f| vqclip::models::clip::load_image(fixture("images").join(f)).unwrap())
            .collect();
        let px = f32m.pixel_values(&images).unwrap();
        let i32v = f32m.encode_image(&px).unwrap().to_vec().unwrap();
        let i16v = f16m.encode_image(&px).unwrap().to_vec().unwrap();
        let ic = worst_cos(&i16v, &i32v, p);
        eprintln!(
            "{name}: f16 vs f32 worst cosine: text {tc:.7}, image {ic:.7}; max |diff| text {:.2e}",
            t16.iter()
                .zip(&t32)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max)
        );
        assert!(tc >= 0.999, "{name}: text embeddings cosine {tc}");
        assert!(ic >= 0.999, "{name}: image embeddings cosine {ic}");
        // Where rounding changed a weight (not for a checkpoint stored in f16), the f16
        // path must give other numbers: it really ran on the rounded weights.
        let w = "text_model.encoder.layers.0.mlp.fc1.weight";
        let find = |m: &ClipModel| {
            let t = &m.params.iter().find(|(k, _)| k == w).unwrap().1;
            t.to_vec().unwrap()
        };
        if find(&f32m) != find(&f16m) {
            assert_ne!(
                t16, t32,
                "{name}: f16 text embeddings equal f32 bit for bit"
            );
        } else {
            eprintln!("{name}: its weights are f16 values already");
        }
    }
}

#[test]
fn f16_activations_keep_the_f32_embeddings() {
    // Inference with f16 activations (the GPU default of `--precision f16`; CPU adapters
    // keep f32 unless VQCLIP_F16_ACTIVATIONS=on) against the f32 model and against the
    // same f16 weights with f32 activations: both at cosine >= 0.999 of f32, and the two
    // f16 runs differ, so the f16 one really stored its activations in f16. With pixels
    // that need a gradient (the VQGAN+CLIP path) activations stay f32 whatever is set.
    let Some(g) = f16_gpu() else { return };
    let images: Vec<_> = ["square_64.png", "photo_320x240.png", "wide_96x64.png"]
        .iter()
        .map(|f| vqclip::models::clip::load_image(fixture("images").join(f)).unwrap())
        .collect();
    let texts: Vec<String> = ["a photo of a cat", "A cute, smiling, Nerdy Rodent"]
        .map(String::from)
        .to_vec();
    for name in MODELS {
        let f32m = ClipModel::load(fixture(name), &g).unwrap();
        let mut f16m = ClipModel::load_with(fixture(name), &g, Precision::F16).unwrap();
        let p = f32m.config.projection_dim;
        let px = f32m.pixel_values(&images).unwrap();
        let want = f32m.image_features(&px).unwrap().to_vec().unwrap();
        let want_t = f32m.text_features(&texts).unwrap().to_vec().unwrap();
        let mut run = |dt: DType| {
            f16m.set_activations(dt).unwrap();
            assert_eq!(f16m.activations(), dt);
            let i = f16m.image_features(&px).unwrap();
            assert_eq!(i.dtype(), DType::F32, "{name}: features come back in f32");
            let t = f16m.text_features(&texts).unwrap().to_vec().unwrap();
            let tape = Tape::new();
            let x = tape.leaf(px.clone(), true);
            let grad_path = f16m.image_features_on(&tape, &x, false).unwrap();
            (i.to_vec().unwrap(), t, grad_path.value().to_vec().unwrap())
        };
        let (i16, t16, g16) = run(DType::F16);
        let (i32, t32, g32) = run(DType::F32);
        let ci = worst_cos(&i16, &want, p);
        let ct = worst_cos(&t16, &want_t, p);
        let cw = worst_cos(&i32, &want, p);
        eprintln!(
            "{name}: cosine to f32 with f16 weights + f16 activations: image {ci:.7}, text \
             {ct:.7}; with f16 weights + f32 activations: image {cw:.7}"
        );
        assert!(
            ci >= 0.999 && ct >= 0.999,
            "{name}: f16 activations {ci} {ct}"
        );
        assert!(cw >= 0.999, "{name}: f16 weights {cw}");
        assert_ne!(
            i16, i32,
            "{name}: f16 activations gave the f32-activation numbers"
        );
        assert_ne!(
            t16, t32,
            "{name}: f16 activations gave the f32-activation text numbers"
        );
        assert_eq!(
            g16, g32,
            "{name}: a gradient path must not take f16 activations"
        );
    }
    // f16 activations need f16 weights.
    let mut f32m = ClipModel::load(fixture("tiny_quickgelu"), &g).unwrap();
    assert_eq!(f32m.activations(), DType::F32);
    let e = f32m.set_activations(DType::F16).unwrap_err().to_string();
    assert!(e.contains("need f16 weights"), "{e}");
}

#[test]
fn the_pixel_gradient_through_f16_weights_follows_the_f32_one() {
    // What VQGAN+CLIP asks of the perceptor: d loss / d pixels with frozen weights, here
    // the spherical distance of the image features to a fixed direction. The f16 weights
    // are read untransposed by the input-gradient products (dX = dY · W).
    let Some(g) = f16_gpu() else { return };
    for name in MODELS {
        let f32m = ClipModel::load(fixture(name), &g).unwrap();
        let f16m = ClipModel::load_with(fixture(name), &g, Precision::F16).unwrap();
        let v = &f32m.config.vision;
        let (s, p) = (v.image_size, f32m.config.projection_dim);
        let n = 2;
        let px: Vec<f32> = (0..n * 3 * s * s)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 1.5)
            .collect();
        let target: Vec<f32> = (0..n * p).map(|i| ((i * 31 % 17) as f32) - 8.0).collect();
        let grad = |m: &ClipModel| -> Vec<f32> {
            let tape = Tape::new();
            let x = tape.leaf(Tensor::from_slice(&g, &px, &[n, 3, s, s]).unwrap(), true);
            let f = m.image_features_on(&tape, &x, false).unwrap();
            let t = tape.leaf(Tensor::from_slice(&g, &target, &[n, p]).unwrap(), false);
            let loss = tape.sum(&tape.spherical_distance(&f, &t).unwrap()).unwrap();
            let grads = tape.backward(&loss).unwrap();
            grads.get(&x).unwrap().to_vec().unwrap()
        };
        let (g32, g16) = (grad(&f32m), grad(&f16m));
        let c = cos(&g16, &g32);
        eprintln!("{name}: pixel gradient cosine f16 vs f32 {c:.7}");
        assert!(c >= 0.99, "{name}: pixel gradient cosine {c}");
        assert!(g16.iter().any(|&x| x != 0.0), "{name}: zero gradient");
    }
}

#[test]
fn training_an_f16_model_is_refused() {
    // A training tape asks for every weight's gradient: the f16 ones are refused with a
    // clear error instead of an f32 gradient for an f16 tensor.
    let Some(g) = f16_gpu() else { return };
    let m = ClipModel::load_with(fixture("tiny_quickgelu"), &g, Precision::F16).unwrap();
    let s = m.config.vision.image_size;
    let tape = Tape::training();
    let x = tape.leaf(Tensor::full(&g, &[1, 3, s, s], 0.5).unwrap(), false);
    let f = m.image_features_on(&tape, &x, false).unwrap();
    let loss = tape.sum(&f).unwrap();
    let e = tape.backward(&loss).err().map(|e| e.to_string());
    let e = e.expect("backward of an f16 model on a training tape must fail");
    assert!(
        e.contains("f16 weight") && e.contains("train in f32"),
        "{e}"
    );
}
