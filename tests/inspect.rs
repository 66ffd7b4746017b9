//! `vqclip inspect` against transformers (tests/fixtures/inspect, made by
//! tools/make_inspect_fixtures.py with eager attention, `output_attentions=True,
//! output_hidden_states=True`): every dumped tensor of both towers of a quick_gelu and a gelu
//! model, the rollout and the autograd relevance maps; the recorded forward against the
//! fused one; the command on the shipped models; bad input leaving no folder behind.

mod common;
use common::{fails, ok, s};
use serde_json::Value;
use std::path::{Path, PathBuf};
use vqclip::weights::{SafetensorsFile, TensorSource};

const MODELS: [&str; 2] = ["tiny_quickgelu", "small_gelu"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn clip_fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/clip").join(name)
}

fn meta_list(g: &SafetensorsFile, key: &str) -> Vec<String> {
    serde_json::from_str(&g.metadata()[key]).unwrap()
}

/// `|got − want| ≤ 1e-4 + 1e-4·|want|` entry by entry; returns the worst absolute and
/// relative (to |want|, over entries with |want| > 1e-3) differences.
fn check(name: &str, got: &[f32], want: &[f32]) -> (f64, f64) {
    assert_eq!(got.len(), want.len(), "{name}: sizes differ");
    let (mut abs, mut rel) = (0f64, 0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g as f64 - w as f64).abs();
        assert!(
            d <= 1e-4 + 1e-4 * (w as f64).abs(),
            "{name}[{i}]: vqclip {g}, transformers {w}"
        );
        abs = abs.max(d);
        if w.abs() > 1e-3 {
            rel = rel.max(d / (w as f64).abs());
        }
    }
    (abs, rel)
}

/// Runs inspect on a fixture model with the golden's texts and images into a temporary
/// folder; returns the folder (kept alive by the TempDir) and the golden.
fn run_fixture(name: &str) -> (tempfile::TempDir, PathBuf, SafetensorsFile) {
    let golden =
        SafetensorsFile::open(root().join(format!("tests/fixtures/inspect/{name}.safetensors")))
            .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let model = clip_fixture(name);
    let mut args: Vec<String> = vec![
        "inspect".into(),
        "--clip".into(),
        s(&model).into(),
        "--out".into(),
        s(&out).into(),
    ];
    for t in meta_list(&golden, "texts") {
        args.extend(["--text".into(), t]);
    }
    for i in meta_list(&golden, "images") {
        let p = root().join("tests/fixtures/clip/images").join(i);
        args.extend(["--image".into(), s(&p).into()]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&refs);
    (tmp, out, golden)
}

#[test]
fn every_tensor_matches_transformers() {
    let (mut worst_abs, mut worst_rel) = (0f64, 0f64);
    for name in MODELS {
        let (_tmp, out, golden) = run_fixture(name);
        let ours = SafetensorsFile::open(out.join("tensors.safetensors")).unwrap();
        let mut want: Vec<String> = golden
            .keys()
            .into_iter()
            .filter(|k| k.starts_with("text.") || k.starts_with("image."))
            .collect();
        let mut got = ours.keys();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{name}: tensor names");
        assert!(want.iter().any(|k| k == "image.1.attentions.1"));
        for k in &want {
            assert_eq!(ours.shape(k), golden.shape(k), "{name}: {k} shape");
            let (a, r) = check(
                &format!("{name} {k}"),
                &ours.read_f32(k).unwrap(),
                &golden.read_f32(k).unwrap(),
            );
            worst_abs = worst_abs.max(a);
            worst_rel = worst_rel.max(r);
        }
        // The maps of the pictures, from summary.json: rollout (numpy) and relevance
        // (gradients by PyTorch autograd) against ours on the tape.
        let summary: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap())
                .unwrap();
        let flat = |v: &Value| -> Vec<f32> {
            v.as_array()
                .unwrap()
                .iter()
                .flat_map(|r| {
                    r.as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap() as f32)
                })
                .collect()
        };
        let images = summary["images"].as_array().unwrap();
        let texts = meta_list(&golden, "texts").len();
        for (k, im) in images.iter().enumerate() {
            let want = golden.read_f32(&format!("rollout.{k}")).unwrap();
            check(&format!("{name} rollout {k}"), &flat(&im["rollout"]), &want);
            let rel = im["relevance"].as_array().unwrap();
            assert_eq!(rel.len(), texts);
            for (j, r) in rel.iter().enumerate() {
                let want = golden.read_f32(&format!("relevance.{k}.{j}")).unwrap();
                check(&format!("{name} relevance {k}/{j}"), &flat(r), &want);
            }
        }
        // Token ids as transformers' tokenizer gives them.
        let ids: Vec<Vec<u32>> = serde_json::from_str(&golden.metadata()["input_ids"]).unwrap();
        for (t, want) in summary["texts"].as_array().unwrap().iter().zip(&ids) {
            let got: Vec<u32> = serde_json::from_value(t["ids"].clone()).unwrap();
            assert_eq!(&got, want);
        }
    }
    eprintln!("worst parity: max abs {worst_abs:.3e}, max rel {worst_rel:.3e}");
}

/// The recorded forward (unfused attention) gives the embeddings of the fused one.
#[test]
fn recorded_forward_gives_the_embeddings_of_the_fused_one() {
    use vqclip::models::clip::{load_image, ClipModel};
    let gpu = vqclip::Gpu::shared().expect("a wgpu adapter");
    let model = ClipModel::load(clip_fixture("small_gelu"), &gpu).unwrap();
    let texts = vec!["a photo of a cat".to_string(), "two dogs".to_string()];
    let images = vec![
        load_image(root().join("tests/fixtures/clip/images/square_64.png")).unwrap(),
        load_image(root().join("tests/fixtures/clip/images/wide_96x64.png")).unwrap(),
    ];
    let mut calls = 0;
    let ins = vqclip::inspect::inspect(&model, &texts, &images, None, &mut |_| calls += 1).unwrap();
    assert_eq!(calls as u64, vqclip::inspect::work_units(2, 2));
    let te = model.encode_text(&texts).unwrap().to_vec().unwrap();
    let ie = model
        .encode_image(&model.pixel_values(&images).unwrap())
        .unwrap()
        .to_vec()
        .unwrap();
    let p = model.config.projection_dim;
    for (k, t) in ins.texts.iter().enumerate() {
        for (a, b) in t.embeds.iter().zip(&te[k * p..(k + 1) * p]) {
            assert!((a - b).abs() <= 1e-5, "text {k}: {a} vs {b}");
        }
    }
    for (k, i) in ins.images.iter().enumerate() {
        for (a, b) in i.embeds.iter().zip(&ie[k * p..(k + 1) * p]) {
            assert!((a - b).abs() <= 1e-5, "image {k}: {a} vs {b}");
        }
    }
}

/// Recording keeps every activation; asking it to recompute them too is refused, not
/// silently ignored.
#[test]
fn a_recorded_forward_refuses_to_recompute() {
    use vqclip::autodiff::Tape;
    use vqclip::inspect::Recorder;
    use vqclip::models::clip::ClipModel;
    let gpu = vqclip::Gpu::shared().expect("a wgpu adapter");
    let model = ClipModel::load(clip_fixture("tiny_quickgelu"), &gpu).unwrap();
    let s = model.config.vision.image_size;
    let tape = Tape::new();
    let x = tape.leaf(vqclip::Tensor::zeros(&gpu, &[1, 3, s, s]).unwrap(), false);
    let mut rec = Recorder::new();
    let e = model
        .vision_model
        .forward_recorded(&tape, &x, true, Some(&mut rec))
        .unwrap_err();
    assert!(e.to_string().contains("recompute"), "{e}");
    // Without recompute: L + 1 hidden states, L attention maps.
    let l = model.config.vision.num_hidden_layers;
    let mut rec = Recorder::new();
    model
        .vision_model
        .forward_recorded(&tape, &x, false, Some(&mut rec))
        .unwrap();
    assert_eq!((rec.hidden_states.len(), rec.attentions.len()), (l + 1, l));
}

fn png_size(path: &Path) -> (u32, u32) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (img.width(), img.height())
}

#[test]
fn inspect_on_the_shipped_models_writes_a_complete_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("look");
    let img = root().join("tests/fixtures/clip/images/square_64.png");
    let vq = root().join("weights/vqgan/shapes.safetensors");
    let run = ok(&[
        "inspect",
        "--text",
        "a red circle",
        "--text",
        "a blue square",
        "--image",
        s(&img),
        "--vqgan",
        s(&vq),
        "--out",
        s(&out),
        "--json",
    ]);
    let printed: Value = serde_json::from_slice(&run.stdout).expect("--json prints JSON");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(printed, summary);
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("weights/clip/config.json")).unwrap(),
    )
    .unwrap();
    let layers = |tower: &str| cfg[tower]["num_hidden_layers"].as_u64().unwrap() as usize;
    let heads = |tower: &str| cfg[tower]["num_attention_heads"].as_u64().unwrap() as usize;
    let (lt, lv) = (layers("text_config"), layers("vision_config"));
    let side = cfg["vision_config"]["image_size"].as_u64().unwrap() as usize;
    let g = side / cfg["vision_config"]["patch_size"].as_u64().unwrap() as usize;

    // Tensors: names and shapes as transformers gives them.
    let t = SafetensorsFile::open(out.join("tensors.safetensors")).unwrap();
    let n_tokens = summary["texts"][0]["ids"].as_array().unwrap().len();
    assert_eq!(
        t.shape(&format!("text.0.attentions.{}", lt - 1)).unwrap(),
        vec![heads("text_config"), n_tokens, n_tokens]
    );
    assert_eq!(
        t.shape(&format!("text.0.hidden_states.{lt}")).unwrap()[0],
        n_tokens
    );
    assert!(t
        .shape(&format!("text.0.hidden_states.{}", lt + 1))
        .is_none());
    assert_eq!(
        t.shape(&format!("image.0.attentions.{}", lv - 1)).unwrap(),
        vec![heads("vision_config"), g * g + 1, g * g + 1]
    );
    assert_eq!(t.keys().len(), 2 * (2 * lt + 2) + (2 * lv + 2));
    // Attention rows are probabilities.
    let a = t.read_f32("image.0.attentions.0").unwrap();
    for row in a.chunks(g * g + 1) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    }

    // Summary: a row per hidden state; the lens at the last layer is the final embedding, so
    // its cosine with the image is the cosine of the two embeddings.
    let text0 = &summary["texts"][0];
    assert_eq!(text0["hidden_states"].as_array().unwrap().len(), lt + 1);
    assert_eq!(text0["attention_entropy"].as_array().unwrap().len(), lt);
    let lens = text0["logit_lens"].as_array().unwrap();
    assert_eq!(lens.len(), lt + 1);
    let last = &lens[lt]["cosine"];
    let image_cos = last
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["input"] == "image 0")
        .unwrap()["cosine"]
        .as_f64()
        .unwrap();
    let te = t.read_f32("text.0.embeds").unwrap();
    let ie = t.read_f32("image.0.embeds").unwrap();
    let dot: f64 = te.iter().zip(&ie).map(|(a, b)| *a as f64 * *b as f64).sum();
    assert!(
        (image_cos - dot).abs() < 1e-4,
        "lens {image_cos} vs embeds {dot}"
    );
    assert_eq!(
        summary["images"][0]["relevance"].as_array().unwrap().len(),
        2
    );
    assert_eq!(summary["images"][0]["rollout"].as_array().unwrap().len(), g);
    assert!(summary["images"][0]["vqgan_codes"].is_array());

    // Pictures decode; the report holds them inline and fetches nothing.
    for name in [
        "image0_rollout.png",
        "image0_relevance_text0.png",
        "image0_relevance_text1.png",
        "image0_heads.png",
        "image0_vqgan.png",
        "text0_attention.png",
        "text1_attention.png",
    ] {
        let (w, h) = png_size(&out.join(name));
        assert!(w >= 16 && h >= 16, "{name}: {w}x{h}");
    }
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert_eq!(html.matches("src=\"data:image/png;base64,").count(), 7);
    assert!(!html.contains("src=\"http") && !html.contains("<script"));
    // Nothing else beside the folder: no temporary folder left.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);

    // A second run replaces the earlier output whole.
    ok(&["inspect", "--text", "a circle", "--out", s(&out)]);
    assert!(!out.join("image0_rollout.png").exists());
    assert!(out.join("text0_attention.png").is_file());
}

#[test]
fn bad_input_fails_clearly_and_leaves_no_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let missing = tmp.path().join("missing.png");
    let corrupt = tmp.path().join("corrupt.png");
    std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\nnot really a png").unwrap();
    let good = root().join("tests/fixtures/clip/images/square_64.png");
    fails(
        &["inspect", "--image", s(&missing), "--out", s(&out)],
        "missing.png",
    );
    fails(
        &[
            "inspect",
            "--text",
            "x",
            "--image",
            s(&good),
            "--image",
            s(&corrupt),
            "--out",
            s(&out),
        ],
        "corrupt.png",
    );
    fails(&["inspect", "--out", s(&out)], "nothing to inspect");
    fails(
        &[
            "inspect",
            "--text",
            "x",
            "--vqgan",
            s(&missing),
            "--out",
            s(&out),
        ],
        "missing",
    );
    assert!(!out.exists());
    // Only the corrupt file is left in the folder: no temporary output folders.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);

    // --out naming a file, or a folder of someone else's files: refused, untouched.
    fails(
        &["inspect", "--text", "x", "--out", s(&corrupt)],
        "not a folder",
    );
    let theirs = tmp.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::write(theirs.join("notes.txt"), "keep").unwrap();
    fails(
        &["inspect", "--text", "x", "--out", s(&theirs)],
        "other files",
    );
    assert_eq!(
        std::fs::read_to_string(theirs.join("notes.txt")).unwrap(),
        "keep"
    );
    assert!(std::fs::read(&corrupt).unwrap().ends_with(b"png"));
}

/// How long `inspect` takes on a model of ViT-B/32's shape (random weights, the OpenAI
/// tokenizer of the tiny fixture, whose vocabulary is ViT-B/32's) for one text and one
/// 224px image: the whole library path of the command (recorded forwards, relevance
/// backward, summary, pictures, folder). A measurement, not a check: run it by hand with
/// `cargo test --release --test inspect vit_b32 -- --ignored --nocapture`.
#[test]
#[ignore]
fn vit_b32_random_weights_timing() {
    use std::time::Instant;
    use vqclip::inspect::{folder, inspect, summary};
    use vqclip::models::clip::{random_weights, ClipConfig, ClipModel, ClipTokenizer};
    let gpu = vqclip::Gpu::shared().expect("a wgpu adapter");
    let cfg = ClipConfig::vit_base_patch32();
    let src = random_weights(&cfg, 7).unwrap();
    let mut model = ClipModel::from_source(cfg, &src, &gpu).unwrap();
    model.tokenizer = Some(ClipTokenizer::from_dir(clip_fixture("tiny_quickgelu"), 77).unwrap());
    let img = vqclip::models::clip::load_image(
        root().join("tests/fixtures/clip/images/photo_320x240.png"),
    )
    .unwrap();
    let texts = vec!["a photo of a cat sitting on a red sofa".to_string()];
    let tmp = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for r in 0..4 {
        let out = tmp.path().join(format!("run{r}"));
        let t0 = Instant::now();
        let mut last = Instant::now();
        let mut steps = Vec::new();
        let ins = inspect(
            &model,
            &texts,
            std::slice::from_ref(&img),
            None,
            &mut |what| {
                steps.push(format!("{what} {:.3} s", last.elapsed().as_secs_f64()));
                last = Instant::now();
            },
        )
        .unwrap();
        eprintln!("  {}", steps.join(", "));
        let t1 = Instant::now();
        let s = summary::summarize(&model, &ins, &["photo".to_string()]).unwrap();
        let pics = folder::pictures(&ins).unwrap();
        folder::write(&out, &ins, &s, &pics, "timing").unwrap();
        let t2 = Instant::now();
        let (a, b) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
        eprintln!(
            "run {r}: inspect {a:.3} s, summary+pictures+write {b:.3} s, total {:.3} s",
            a + b
        );
        if r > 0 {
            runs.push(a + b);
        }
    }
    runs.sort_by(f64::total_cmp);
    eprintln!(
        "ViT-B/32 random weights, 1 text + 1 image: min {:.3} s, median {:.3} s (3 runs after a warm-up)",
        runs[0],
        runs[1]
    );
}
