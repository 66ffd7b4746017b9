//! CLIP against goldens from Hugging Face transformers (tests/fixtures/clip, made by
//! tools/make_clip_fixtures.py): token ids, preprocessing, embeddings, logits, bad input.

mod common;
use std::path::{Path, PathBuf};
use vqclip::models::clip::preprocess::{load_image, PreprocessConfig};
use vqclip::models::clip::ClipTokenizer;
use vqclip::weights::{SafetensorsFile, TensorSource};

const MODELS: [&str; 3] = ["tiny_quickgelu", "small_gelu", "sparse_bf16"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip")
}

struct Golden {
    dir: PathBuf,
    json: serde_json::Value,
    tensors: SafetensorsFile,
}

impl Golden {
    fn load(name: &str) -> Golden {
        let dir = fixtures().join(name);
        let json = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
            .unwrap();
        let tensors = SafetensorsFile::open(dir.join("golden.safetensors")).unwrap();
        Golden { dir, json, tensors }
    }
    fn texts(&self) -> Vec<String> {
        self.json["texts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect()
    }
    fn ids(&self) -> Vec<Vec<u32>> {
        self.json["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect()
    }
    fn images(&self) -> Vec<PathBuf> {
        self.json["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| self.dir.join(p.as_str().unwrap()))
            .collect()
    }
    fn tensor(&self, key: &str) -> (Vec<usize>, Vec<f32>) {
        (
            self.tensors.shape(key).unwrap(),
            self.tensors.read_f32(key).unwrap(),
        )
    }
    fn context(&self) -> usize {
        self.json["context_length"].as_u64().unwrap() as usize
    }
}

#[test]
fn token_ids_equal_transformers() {
    for name in MODELS {
        let g = Golden::load(name);
        let tok = ClipTokenizer::from_dir(&g.dir, g.context()).unwrap();
        let got = tok.encode_all(&g.texts()).unwrap();
        let want = g.ids();
        for ((t, a), b) in g.texts().iter().zip(&got).zip(&want) {
            assert_eq!(a, b, "{name}: {t:?}");
            assert!(a.len() <= g.context());
            assert_eq!(
                *a.last().unwrap(),
                tok.eos_id(),
                "{name}: EOS last for {t:?}"
            );
        }
    }
    // The first fixture has both tokenizer.json and vocab.json + merges.txt: both routes agree.
    let g = Golden::load("tiny_quickgelu");
    let tok = ClipTokenizer::from_vocab_merges(
        &g.dir.join("vocab.json"),
        &g.dir.join("merges.txt"),
        g.context(),
    )
    .unwrap();
    assert_eq!(tok.encode_all(&g.texts()).unwrap(), g.ids());
    assert_eq!((tok.bos_id(), tok.eos_id()), (49406, 49407));
    assert_eq!(tok.vocab_size(), 49408);
}

#[test]
fn tokenizer_matches_openai_test_vectors() {
    // Independent vectors from OpenAI's SimpleTokenizer (docs MODEL_FACTS A8).
    let tok = ClipTokenizer::from_dir(fixtures().join("tiny_quickgelu"), 77).unwrap();
    let cases: [(&str, &[u32]); 4] = [
        ("hello world", &[49406, 3306, 1002, 49407]),
        (
            "a photo of a cat",
            &[49406, 320, 1125, 539, 320, 2368, 49407],
        ),
        (
            "A cute, smiling, Nerdy Rodent",
            &[49406, 320, 2242, 267, 9200, 267, 33124, 532, 1258, 49407],
        ),
        (
            "1024x768!!",
            &[49406, 272, 271, 273, 275, 343, 278, 277, 279, 748, 49407],
        ),
    ];
    for (t, ids) in cases {
        assert_eq!(tok.encode(t).unwrap(), ids, "{t}");
    }
    assert_eq!(
        tok.decode(&tok.encode("a photo of a cat").unwrap())
            .unwrap(),
        "a photo of a cat"
    );
    assert!(!tok.encode_checked("a photo of a cat").unwrap().1);
    // Exactly 75 text tokens fit with the two special tokens: not truncated.
    assert!(!tok.encode_checked(&"a ".repeat(75)).unwrap().1);
    assert!(tok.encode_checked(&"a ".repeat(76)).unwrap().1);
    // Truncation keeps EOS last at any context.
    let long = "word ".repeat(200);
    for ctx in [2usize, 3, 10, 77] {
        let t = ClipTokenizer::from_dir(fixtures().join("tiny_quickgelu"), ctx).unwrap();
        let (ids, truncated) = t.encode_checked(&long).unwrap();
        assert!(truncated);
        assert_eq!(ids.len(), ctx);
        assert_eq!((ids[0], ids[ctx - 1]), (49406, 49407));
    }
}

#[test]
fn tokenizer_errors_name_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let e = ClipTokenizer::from_dir(dir.path(), 77)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("merges.txt"),
        "{e}"
    );
    std::fs::write(dir.path().join("tokenizer.json"), "{ not json").unwrap();
    let e = ClipTokenizer::from_dir(dir.path(), 77)
        .unwrap_err()
        .to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    std::fs::write(dir.path().join("vocab.json"), r#"{"a": 0}"#).unwrap();
    std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\na b c\n").unwrap();
    let e = ClipTokenizer::from_dir(dir.path(), 77)
        .unwrap_err()
        .to_string();
    assert!(e.contains("merges.txt") && e.contains("line 2"), "{e}");
    assert!(ClipTokenizer::from_dir(fixtures().join("tiny_quickgelu"), 1).is_err());
}

/// Compares preprocessed images with a golden `[N, 3, S, S]`; returns the largest
/// difference in units of one 8-bit step (1/255/std) and the count of differing values.
fn preprocess_diff(
    cfg: &PreprocessConfig,
    images: &[PathBuf],
    golden: &(Vec<usize>, Vec<f32>),
) -> (f32, usize) {
    let (shape, want) = golden;
    assert_eq!(shape[0], images.len());
    let per = shape[1] * shape[2] * shape[3];
    let (mut worst, mut count) = (0f32, 0usize);
    for (i, p) in images.iter().enumerate() {
        let got = cfg.apply(&load_image(p).unwrap()).unwrap();
        assert_eq!(got.len(), per, "{}", p.display());
        for (j, (&a, &b)) in got.iter().zip(&want[i * per..(i + 1) * per]).enumerate() {
            let c = j / (shape[2] * shape[3]);
            let step = 1.0 / 255.0 / vqclip::models::clip::preprocess::OPENAI_CLIP_STD[c];
            let d = (a - b).abs() / step;
            if d > 1e-3 {
                count += 1;
            }
            worst = worst.max(d);
        }
    }
    (worst, count)
}

#[test]
fn preprocessing_matches_clip_image_processor() {
    let mut cases = vec![("preprocess_224".to_string(), 224u32)];
    for m in MODELS {
        let g = Golden::load(m);
        let size = g.tensor("pixel_values_pil").0[2] as u32;
        cases.push((m.to_string(), size));
    }
    for (name, size) in cases {
        let dir = fixtures().join(&name);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
                .unwrap();
        let images: Vec<PathBuf> = json["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| dir.join(p.as_str().unwrap()))
            .collect();
        let gt = SafetensorsFile::open(dir.join("golden.safetensors")).unwrap();
        let golden = |k: &str| (gt.shape(k).unwrap(), gt.read_f32(k).unwrap());
        let cfg = PreprocessConfig::from_file(dir.join("preprocessor_config.json"), size).unwrap();
        // PIL backend: the resampler is Pillow's own algorithm, so the values agree to f32
        // rounding (1e-3 of an 8-bit step).
        let (worst, n) = preprocess_diff(&cfg, &images, &golden("pixel_values_pil"));
        eprintln!("{name}: vs PIL backend: worst {worst:.2e} steps, {n} values differ");
        assert!(worst < 1e-3, "{name}: PIL backend differs by {worst} steps");
        // torchvision backend (transformers' default class when torchvision is present): its
        // uint8 antialiased bicubic computes the same filter with other fixed-point precision
        // (int16 weights), so a few values land one or two 8-bit steps away. Measured here:
        // at most 2 steps, at most 0.14% of values; bound: 2 steps and 1% of values.
        let (worst, n) = preprocess_diff(&cfg, &images, &golden("pixel_values_torchvision"));
        let total = gt.read_f32("pixel_values_torchvision").unwrap().len();
        eprintln!(
            "{name}: vs torchvision backend: worst {worst:.3} steps, {n} of {total} values differ"
        );
        assert!(
            worst <= 2.001,
            "{name}: torchvision backend differs by {worst} steps"
        );
        assert!(
            n * 100 < total,
            "{name}: {n} of {total} values differ from torchvision"
        );
    }
}

#[test]
fn undecodable_image_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.png");
    std::fs::write(&p, b"\x89PNG\r\n\x1a\nnot really a png").unwrap();
    let e = load_image(&p).unwrap_err().to_string();
    assert!(e.contains("broken.png") && e.contains("decode"), "{e}");
    let e = load_image(dir.path().join("missing.jpg"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.jpg"), "{e}");
}

#[test]
fn an_image_header_claiming_too_many_pixels_is_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bomb.png");
    std::fs::write(&p, common::png_header_only(65535, 65535)).unwrap();
    let e = load_image(&p).unwrap_err().to_string();
    assert!(
        e.contains("bomb.png") && e.contains("65535x65535") && e.contains("at most"),
        "{e}"
    );
    // A header within the limits gets as far as the (missing) pixel data.
    std::fs::write(&p, common::png_header_only(64, 64)).unwrap();
    let e = load_image(&p).unwrap_err().to_string();
    assert!(!e.contains("at most"), "{e}");
}

fn gpu() -> vqclip::Gpu {
    vqclip::Gpu::shared().expect("a wgpu adapter (install mesa-vulkan-drivers for lavapipe)")
}

/// Worst row cosine and largest absolute difference between `[N, P]` matrices.
fn compare(got: &[f32], want: &[f32], p: usize) -> (f64, f64) {
    assert_eq!(got.len(), want.len());
    let (mut worst_cos, mut max_abs) = (1f64, 0f64);
    for (a, b) in got.chunks(p).zip(want.chunks(p)) {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        worst_cos = worst_cos.min(dot / (na * nb));
        for (x, y) in a.iter().zip(b) {
            max_abs = max_abs.max((*x as f64 - *y as f64).abs());
        }
    }
    (worst_cos, max_abs)
}

#[test]
fn embeddings_and_logits_match_transformers() {
    use vqclip::models::clip::ClipModel;
    let g0 = gpu();
    for name in MODELS {
        let g = Golden::load(name);
        let model = ClipModel::load(&g.dir, &g0).unwrap();
        let p = model.config.projection_dim;
        let (pshape, pv) = g.tensor("pixel_values_pil");
        let pixels = vqclip::Tensor::from_slice(&g0, &pv, &pshape).unwrap();
        let texts = g.texts();

        let img = model.encode_image(&pixels).unwrap();
        let txt = model.encode_text(&texts).unwrap();
        let logits = model.logits_per_image(&img, &txt).unwrap();
        let feats = model.image_features(&pixels).unwrap();
        let tfeats = model.text_features(&texts).unwrap();
        for (what, got, key, pp) in [
            ("image_embeds", &img, "image_embeds", p),
            ("text_embeds", &txt, "text_embeds", p),
            ("image_features", &feats, "image_features", p),
            ("text_features", &tfeats, "text_features", p),
            ("logits_per_image", &logits, "logits_per_image", texts.len()),
        ] {
            let (shape, want) = g.tensor(key);
            assert_eq!(got.shape(), shape.as_slice(), "{name} {what}");
            let (cos, abs) = compare(&got.to_vec().unwrap(), &want, pp);
            eprintln!(
                "{name} {what}: worst cosine {cos:.9} (1 - cos = {:.1e}), max abs error {abs:.2e}",
                1.0 - cos
            );
            assert!(cos >= 0.9999, "{name} {what}: cosine {cos}");
            // Unit vectors: f32 forward passes that differ only in summation order and in
            // exp/erf approximations agree to ~1e-6 (3e-7 measured on lavapipe); 1e-5 leaves
            // room for other adapters. Logits are exp(logit_scale) (30 here) times a dot of
            // two such vectors of P <= 24 entries: |Δ| <= 30 · 2 · 1e-5 · √24 < 3e-3.
            let bound = match what {
                "image_embeds" | "text_embeds" => 1e-5,
                "logits_per_image" => 3e-3,
                _ => f64::INFINITY, // unnormalised features: checked by cosine only
            };
            assert!(
                abs <= bound,
                "{name} {what}: max abs error {abs:e} > {bound:e}"
            );
        }
        // Batching pads to the longest text; each text alone gives the same embedding.
        let want = g.tensor("text_embeds").1;
        for (i, t) in texts.iter().enumerate().step_by(3) {
            let one = model
                .encode_text(std::slice::from_ref(t))
                .unwrap()
                .to_vec()
                .unwrap();
            let (cos, abs) = compare(&one, &want[i * p..(i + 1) * p], p);
            assert!(
                cos >= 0.9999 && abs <= 1e-5,
                "{name}: {t:?} alone: cos {cos} abs {abs}"
            );
        }
        // From the PNG files through preprocessing (bit-exact with the PIL backend).
        let images: Vec<_> = g
            .images()
            .iter()
            .map(|p| vqclip::models::clip::load_image(p).unwrap())
            .collect();
        let from_files = model
            .encode_image(&model.pixel_values(&images).unwrap())
            .unwrap();
        let (cos, abs) = compare(
            &from_files.to_vec().unwrap(),
            &g.tensor("image_embeds").1,
            p,
        );
        assert!(
            cos >= 0.9999 && abs <= 1e-5,
            "{name}: images from files: cos {cos} abs {abs}"
        );
        let ls = g.json["logit_scale"].as_f64().unwrap();
        assert!(
            (model.logit_scale as f64 - ls).abs() < 1e-6,
            "{name}: logit_scale"
        );
    }
}

/// A copy of a fixture folder that a test may break.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    tmp
}

#[test]
fn bad_model_folders_give_clear_errors() {
    use vqclip::models::clip::ClipModel;
    let g = gpu();
    let err = |dir: &Path| {
        ClipModel::load(dir, &g)
            .expect_err("load should fail")
            .to_string()
    };

    let e = err(Path::new("/nonexistent/clip"));
    assert!(
        e.contains("/nonexistent/clip") && e.contains("no such folder"),
        "{e}"
    );

    let d = copy_fixture("small_gelu");
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    let e = err(d.path());
    assert!(e.contains("config.json"), "{e}");

    let d = copy_fixture("small_gelu");
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    let e = err(d.path());
    assert!(e.contains("model.safetensors"), "{e}");

    // Truncated weights: named, and said to be truncated.
    let d = copy_fixture("small_gelu");
    let w = d.path().join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() - 1000]).unwrap();
    let e = err(d.path());
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );

    // A config that disagrees with the weights: the key and both shapes.
    let d = copy_fixture("small_gelu");
    let c = d.path().join("config.json");
    let text = std::fs::read_to_string(&c)
        .unwrap()
        .replace("\"intermediate_size\": 96", "\"intermediate_size\": 100");
    std::fs::write(&c, text).unwrap();
    let e = err(d.path());
    assert!(
        e.contains("text_model.encoder.layers.0.mlp.fc1.weight")
            && e.contains("[96, 48]")
            && e.contains("[100, 48]"),
        "{e}"
    );

    // A tensor missing from the file.
    let d = copy_fixture("small_gelu");
    let c = d.path().join("config.json");
    let text = std::fs::read_to_string(&c)
        .unwrap()
        .replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3");
    std::fs::write(&c, text).unwrap();
    let e = err(d.path());
    assert!(
        e.contains("missing tensor") && e.contains("layers.2"),
        "{e}"
    );
}

#[test]
fn bad_inputs_to_a_loaded_model() {
    use vqclip::models::clip::ClipModel;
    let g = gpu();
    let model = ClipModel::load(fixtures().join("small_gelu"), &g).unwrap();
    // Wrong pixel shape: both shapes in the message.
    let wrong = vqclip::Tensor::zeros(&g, &[1, 3, 32, 32]).unwrap();
    let e = model.encode_image(&wrong).unwrap_err().to_string();
    assert!(
        e.contains("[N, 3, 64, 64]") && e.contains("[1, 3, 32, 32]"),
        "{e}"
    );
    // Text longer than the context (32 here) is truncated, not refused.
    let long = "a very long caption that goes on ".repeat(20);
    let ids = model.tokenize(std::slice::from_ref(&long)).unwrap();
    assert_eq!(ids[0].len(), 32);
    assert_eq!(model.encode_text(&[long]).unwrap().shape(), &[1, 24]);
    // Ids the vocabulary does not have.
    let e = model
        .text_features_ids(&[vec![2512, 99_999, 2513]])
        .unwrap_err()
        .to_string();
    assert!(e.contains("99999") && e.contains("vocabulary"), "{e}");
    // More ids than positions.
    let e = model
        .text_features_ids(&[vec![5; 33]])
        .unwrap_err()
        .to_string();
    assert!(e.contains("33 tokens") && e.contains("32"), "{e}");
}

#[test]
fn random_weights_build_a_working_model() {
    use vqclip::models::clip::{random_weights, ClipConfig, ClipModel};
    let mut c = ClipConfig::from_json(
        r#"{"projection_dim": 8,
            "text_config": {"vocab_size": 100, "hidden_size": 16, "intermediate_size": 24,
                            "num_hidden_layers": 1, "num_attention_heads": 2,
                            "max_position_embeddings": 9, "eos_token_id": 99},
            "vision_config": {"hidden_size": 12, "intermediate_size": 20, "num_hidden_layers": 1,
                              "num_attention_heads": 3, "image_size": 8, "patch_size": 4}}"#,
    )
    .unwrap();
    let g = gpu();
    let w = random_weights(&c, 1).unwrap();
    let model = ClipModel::from_source(c.clone(), &w, &g).unwrap();
    let t = model
        .text_features_ids(&[vec![98, 5, 99], vec![98, 7, 8, 9, 99]])
        .unwrap();
    assert_eq!(t.shape(), &[2, 8]);
    assert!(t.to_vec().unwrap().iter().all(|x| x.is_finite()));
    let px = vqclip::Tensor::zeros(&g, &[3, 3, 8, 8]).unwrap();
    let e = model.encode_image(&px).unwrap().to_vec().unwrap();
    for row in e.chunks(8) {
        let n: f32 = row.iter().map(|x| x * x).sum();
        assert!((n - 1.0).abs() < 1e-5, "row norm² {n}");
    }
    // Weights that do not fit the config: the key and both shapes.
    c.vision.intermediate_size = 21;
    let e = ClipModel::from_source(c, &w, &g).unwrap_err().to_string();
    assert!(
        e.contains("vision_model.encoder.layers.0.mlp.fc1.weight")
            && e.contains("[20, 12]")
            && e.contains("[21, 12]"),
        "{e}"
    );
}

/// ViT-L/14@336 with random weights: the largest OpenAI shape (577 tokens, a token table
/// larger than lavapipe's 128 MiB binding limit). Minutes on lavapipe, so run on request:
/// `cargo test --release --test clip -- --ignored`.
#[test]
#[ignore]
fn vit_large_336_runs() {
    use vqclip::models::clip::{random_weights, ClipConfig, ClipModel};
    let c = ClipConfig::vit_large_patch14(336);
    let g = gpu();
    let model = ClipModel::from_source(c.clone(), &random_weights(&c, 2).unwrap(), &g).unwrap();
    let t = model
        .text_features_ids(&[vec![49406, 320, 1125, 49407]])
        .unwrap();
    assert_eq!(t.shape(), &[1, 768]);
    assert!(t.to_vec().unwrap().iter().all(|x| x.is_finite()));
    let px = vqclip::Tensor::zeros(&g, &[1, 3, 336, 336]).unwrap();
    let e = model.encode_image(&px).unwrap();
    assert_eq!(e.shape(), &[1, 768]);
    assert!(e.to_vec().unwrap().iter().all(|x| x.is_finite()));
}
