//! The CLIP subcommands as a user runs them: `embed`, `classify`, `search`, with the fixture
//! models and images, and their errors.

use serde_json::Value;
use std::path::{Path, PathBuf};

mod common;
use common::{fails, ok};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip")
}

fn ok_json(args: &[&str]) -> Value {
    let out = ok(args);
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

fn golden(model: &str) -> (Value, vqclip::weights::SafetensorsFile) {
    let dir = fixtures().join(model);
    let json =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let t = vqclip::weights::SafetensorsFile::open(dir.join("golden.safetensors")).unwrap();
    (json, t)
}

fn rows(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

#[test]
fn embed_json_matches_transformers_in_argument_order() {
    use vqclip::weights::TensorSource;
    let model = fixtures().join("tiny_quickgelu");
    let (g, t) = golden("tiny_quickgelu");
    let texts = g["texts"].as_array().unwrap();
    let imgs = g["images"].as_array().unwrap();
    // Golden rows 1 and 0 (texts), 2 and 0 (images): reversed order in the arguments.
    let (t1, t0) = (texts[1].as_str().unwrap(), texts[0].as_str().unwrap());
    let i2 = model.join(imgs[2].as_str().unwrap());
    let i0 = model.join(imgs[0].as_str().unwrap());
    let out = ok_json(&[
        "embed",
        "--clip",
        model.to_str().unwrap(),
        "--json",
        "--text",
        t1,
        "--image",
        i2.to_str().unwrap(),
        "--text",
        t0,
        "--image",
        i0.to_str().unwrap(),
    ]);
    let p = 16;
    let te = t.read_f32("text_embeds").unwrap();
    let ie = t.read_f32("image_embeds").unwrap();
    let check = |got: &[Vec<f32>], want: &[f32], order: &[usize]| {
        assert_eq!(got.len(), order.len());
        for (row, &k) in got.iter().zip(order) {
            assert_eq!(row.len(), p);
            for (a, b) in row.iter().zip(&want[k * p..(k + 1) * p]) {
                assert!((a - b).abs() <= 1e-5, "row {k}: {a} vs {b}");
            }
        }
    };
    check(&rows(&out["text_embeds"]), &te, &[1, 0]);
    check(&rows(&out["image_embeds"]), &ie, &[2, 0]);
    // Only images: an empty text list.
    let out = ok_json(&[
        "embed",
        "--clip",
        model.to_str().unwrap(),
        "--json",
        "--image",
        i0.to_str().unwrap(),
    ]);
    assert_eq!(out["text_embeds"], serde_json::json!([]));
    assert_eq!(rows(&out["image_embeds"]).len(), 1);
}

#[test]
fn embed_empty_text_as_transformers() {
    use vqclip::weights::TensorSource;
    let model = fixtures().join("tiny_quickgelu");
    let (g, t) = golden("tiny_quickgelu");
    let texts = g["texts"].as_array().unwrap();
    // The golden's text 7 is "" (ids [49406, 49407]); text 0 is an ordinary caption, so the
    // empty text also sits in a padded batch beside a longer one.
    assert_eq!(texts[7], "");
    assert_eq!(g["input_ids"][7], serde_json::json!([49406, 49407]));
    let out = ok_json(&[
        "embed",
        "--clip",
        model.to_str().unwrap(),
        "--json",
        "--text",
        "",
        "--text",
        texts[0].as_str().unwrap(),
        "--text",
        "  ",
    ]);
    let te = t.read_f32("text_embeds").unwrap();
    let p = 16;
    let got = rows(&out["text_embeds"]);
    assert_eq!(got.len(), 3);
    for (row, k) in got.iter().zip([7, 0, 7]) {
        for (a, b) in row.iter().zip(&te[k * p..(k + 1) * p]) {
            assert!((a - b).abs() <= 1e-5, "golden row {k}: {a} vs {b}");
        }
        let norm: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    }
}

#[test]
fn classify_gives_softmax_of_logits_best_first() {
    use vqclip::weights::TensorSource;
    let model = fixtures().join("small_gelu");
    let (g, t) = golden("small_gelu");
    let texts: Vec<&str> = g["texts"].as_array().unwrap()[..4]
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    // Labels must not contain commas: take golden texts without them.
    let labels: Vec<usize> = (0..4).filter(|&i| !texts[i].contains(',')).collect();
    let label_arg = labels
        .iter()
        .map(|&i| texts[i])
        .collect::<Vec<_>>()
        .join(",");
    let img = model.join(g["images"][0].as_str().unwrap());
    let out = ok_json(&[
        "classify",
        "--clip",
        model.to_str().unwrap(),
        "--labels",
        &label_arg,
        "--json",
        img.to_str().unwrap(),
    ]);
    let logits = t.read_f32("logits_per_image").unwrap();
    let want: Vec<f64> = labels.iter().map(|&i| logits[i] as f64).collect();
    let max = want.iter().cloned().fold(f64::MIN, f64::max);
    let z: f64 = want.iter().map(|l| (l - max).exp()).sum();
    let ranked = out["results"][0]["labels"].as_array().unwrap();
    assert_eq!(ranked.len(), labels.len());
    let mut last = f64::INFINITY;
    for r in ranked {
        let label = r["label"].as_str().unwrap();
        let k = labels.iter().position(|&i| texts[i] == label).unwrap();
        let p = r["probability"].as_f64().unwrap();
        assert!(p <= last, "not sorted best first");
        last = p;
        let want_p = (want[k] - max).exp() / z;
        assert!((p - want_p).abs() < 1e-4, "{label}: {p} vs {want_p}");
        assert!((r["logit"].as_f64().unwrap() - want[k]).abs() < 3e-3);
    }
}

#[test]
fn clip_commands_refuse_bad_input_clearly() {
    let model = fixtures().join("tiny_quickgelu");
    let m = model.to_str().unwrap();
    let img = fixtures().join("images/square_32.png");
    let i = img.to_str().unwrap();
    // No --clip and no shipped model to fall back on.
    for args in [
        &["embed", "--text", "a cat"][..],
        &["classify", "--labels", "a,b", i],
        &["search", "--dir", ".", "a cat"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_vqclip"))
            .args(args)
            .env_remove("VQCLIP_CLIP")
            .env("VQCLIP_WEIGHTS", "/nonexistent-vqclip-weights")
            .output()
            .expect("run vqclip");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            err.contains("no CLIP model given") && err.contains("--clip DIR"),
            "{args:?}: {err}"
        );
    }
    fails(&["embed", "--clip", m], "nothing to embed");
    // An empty --text is embedded, not refused: see embed_empty_text_as_transformers.
    fails(
        &["embed", "--clip", "/no/such/clip", "--text", "x"],
        "no such folder",
    );
    fails(
        &["classify", "--clip", m, "--labels", "", i],
        "--labels is empty",
    );
    fails(
        &["classify", "--clip", m, "--labels", "a,,b", i],
        "empty label",
    );
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.png");
    std::fs::write(&broken, b"not an image").unwrap();
    fails(
        &[
            "classify",
            "--clip",
            m,
            "--labels",
            "a,b",
            broken.to_str().unwrap(),
        ],
        "broken.png",
    );
    fails(
        &["embed", "--clip", m, "--image", "/no/such.png"],
        "/no/such.png",
    );
    // A model folder with corrupt weights.
    for e in std::fs::read_dir(&model).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    let w = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    fails(
        &[
            "embed",
            "--clip",
            dir.path().to_str().unwrap(),
            "--text",
            "x",
        ],
        "model.safetensors",
    );
}

#[test]
fn search_indexes_incrementally_and_skips_undecodable_images() {
    let model = fixtures().join("tiny_quickgelu");
    let m = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    for name in [
        "wide_96x64.png",
        "tall_30x45.png",
        "square_32.png",
        "rgba_40.png",
    ] {
        std::fs::copy(fixtures().join("images").join(name), d.join(name)).unwrap();
    }
    std::fs::copy(
        fixtures().join("images/grey_50x40.png"),
        d.join("sub/grey.png"),
    )
    .unwrap();
    std::fs::write(d.join("broken.jpg"), b"not a jpeg").unwrap();
    std::fs::write(d.join("notes.txt"), b"not an image at all").unwrap();
    let ds = d.to_str().unwrap();
    let search = |q: &str| {
        ok_json(&[
            "search", "--clip", m, "--dir", ds, q, "--top", "3", "--json", "--batch", "2",
        ])
    };

    let r = search("a red disc");
    assert_eq!(r["indexed"], 5);
    assert_eq!(r["encoded"], 5);
    assert_eq!(r["skipped"].as_array().unwrap().len(), 1);
    assert_eq!(r["skipped"][0]["path"], "broken.jpg");
    assert_eq!(r["results"].as_array().unwrap().len(), 3);
    assert!(d.join(".vqclip-index.sqlite").is_file());

    // Nothing changed: nothing encoded, the broken file still counted.
    let r = search("a red disc");
    assert_eq!(
        (r["indexed"].clone(), r["encoded"].clone()),
        (5.into(), 0.into())
    );
    assert_eq!(r["skipped"].as_array().unwrap().len(), 1);

    // An image query finds itself first, with cosine 1.
    let q = d.join("tall_30x45.png");
    let r = search(q.to_str().unwrap());
    assert_eq!(r["query_kind"], "image");
    assert_eq!(r["results"][0]["path"], "tall_30x45.png");
    assert!((r["results"][0]["score"].as_f64().unwrap() - 1.0).abs() < 1e-5);

    // A changed file is re-encoded, a removed one forgotten, a new one added.
    std::fs::copy(
        fixtures().join("images/square_64.png"),
        d.join("square_32.png"),
    )
    .unwrap();
    std::fs::remove_file(d.join("rgba_40.png")).unwrap();
    std::fs::copy(
        fixtures().join("images/photo_320x240.png"),
        d.join("sub/photo.PNG"),
    )
    .unwrap();
    let r = search("a red disc");
    assert_eq!(r["indexed"], 5);
    assert_eq!(r["encoded"], 2);
    assert_eq!(r["removed"], 1);

    // Scores are the cosines `embed` gives.
    let e = ok_json(&[
        "embed",
        "--clip",
        m,
        "--json",
        "--text",
        "a red disc",
        "--image",
        d.join("sub/grey.png").to_str().unwrap(),
    ]);
    let (t, i) = (rows(&e["text_embeds"]), rows(&e["image_embeds"]));
    let cos: f32 = t[0].iter().zip(&i[0]).map(|(a, b)| a * b).sum();
    let r = ok_json(&[
        "search",
        "--clip",
        m,
        "--dir",
        ds,
        "a red disc",
        "--top",
        "10",
        "--json",
    ]);
    let hit = r["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["path"] == "sub/grey.png")
        .unwrap();
    assert!((hit["score"].as_f64().unwrap() as f32 - cos).abs() < 1e-5);

    // A corrupt index file is rebuilt, with a warning naming it (see also tests/search_index.rs).
    std::fs::write(d.join(".vqclip-index.sqlite"), vec![7u8; 4096]).unwrap();
    let out = ok(&["search", "--clip", m, "--dir", ds, "x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(".vqclip-index.sqlite") && err.contains("rebuilt"),
        "{err}"
    );
    let r = search("a red disc");
    assert_eq!(
        (r["indexed"].clone(), r["encoded"].clone()),
        (5.into(), 0.into())
    );

    fails(
        &["search", "--clip", m, "--dir", "/no/such/dir", "x"],
        "not a folder",
    );
    fails(
        &["search", "--clip", m, "--dir", ds, "missing.jpg"],
        "no such file",
    );
    fails(
        &["search", "--clip", m, "--dir", ds, "x", "--top", "0"],
        "--top",
    );
}

#[test]
fn embed_with_f16_weights_stays_within_cosine_0_999_of_transformers() {
    use vqclip::weights::TensorSource;
    let gpu = vqclip::Gpu::shared().unwrap();
    if !gpu.features().contains(wgpu::Features::SHADER_F16) {
        eprintln!("skipped: {} has no SHADER_F16", gpu.info().name);
        return;
    }
    // small_gelu is an f32 checkpoint: rounding its linear weights to f16 changes them.
    let model = fixtures().join("small_gelu");
    let (g, t) = golden("small_gelu");
    let text = g["texts"][0].as_str().unwrap();
    let img = model.join(g["images"][0].as_str().unwrap());
    let run = |precision: &str| {
        ok_json(&[
            "embed",
            "--clip",
            model.to_str().unwrap(),
            "--precision",
            precision,
            "--json",
            "--text",
            text,
            "--image",
            img.to_str().unwrap(),
        ])
    };
    let (f16, f32) = (run("f16"), run("f32"));
    let p = rows(&f16["text_embeds"])[0].len();
    let cos = |a: &[f32], b: &[f32]| {
        let d: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        d / (n(a) * n(b))
    };
    for (key, want) in [
        ("text_embeds", t.read_f32("text_embeds").unwrap()),
        ("image_embeds", t.read_f32("image_embeds").unwrap()),
    ] {
        let got = &rows(&f16[key])[0];
        let c = cos(got, &want[..p]);
        assert!(c >= 0.999, "{key}: f16 vs transformers cosine {c}");
        assert_ne!(got, &rows(&f32[key])[0], "{key}: f16 gave the f32 numbers");
    }
    // The help says what f16 covers; an unknown precision is clap's error.
    let help = ok(&["embed", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--precision") && help.contains("SHADER_F16"),
        "{help}"
    );
    fails(
        &[
            "embed",
            "--clip",
            model.to_str().unwrap(),
            "--precision",
            "f8",
            "--text",
            "x",
        ],
        "invalid value 'f8' for '--precision <PRECISION>'",
    );
}
