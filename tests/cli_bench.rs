//! `vqclip bench` from the command line: `matmul`, `generate` and `vqgan` run on small shapes
//! and report positive, finite figures (and matmul its check against the CPU); `peak` and
//! `all` figures come out as JSON, bad options and files are refused with a message and no
//! report, and a peer file is merged into an existing report without measuring again.

mod common;
use common::{fails, ok, s};

#[test]
fn peak_prints_positive_figures_as_json() {
    let out = ok(&["bench", "peak", "--copy-mib", "1", "--runs", "1", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["f32_fma", "copy"] {
        let best = v[key]["best"].as_f64().unwrap();
        assert!(best > 0.0 && best.is_finite(), "{key}: {v}");
    }
    assert_eq!(v["copy_bytes"], 1 << 20);
}

#[test]
fn bad_options_and_files_are_refused_without_a_report() {
    fails(&["bench", "peak", "--runs", "0"], "--runs");
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r");
    fails(
        &["bench", "all", "--report", s(&report), "--seconds", "nan"],
        "--seconds",
    );
    fails(
        &[
            "bench",
            "all",
            "--report",
            s(&report),
            "--only",
            "no such item",
        ],
        "no benchmark item",
    );
    // Merging needs an existing report.
    let peer = dir.path().join("peer.json");
    std::fs::write(&peer, r#"{"peer": "p", "items": []}"#).unwrap();
    fails(
        &[
            "bench",
            "all",
            "--report",
            s(&report),
            "--merge-peer",
            s(&peer),
        ],
        "report.json",
    );
    assert!(!report.join("report.md").exists());
}

#[test]
fn a_peer_file_is_merged_into_an_existing_report() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r");
    let tuning = dir.path().join("tuning.json");
    ok_with_tuning(
        &[
            "bench",
            "all",
            "--quick",
            "--seconds",
            "0.01",
            "--only",
            "layer_norm",
            "--report",
            s(&report),
        ],
        &tuning,
    );
    for f in ["report.json", "report.md", "roofline.svg"] {
        assert!(report.join(f).exists(), "{f}");
    }
    let peer = dir.path().join("peer.json");
    std::fs::write(
        &peer,
        r#"{"peer": "test peer", "items": [{"name": "layer_norm 50x768", "ms_min": 0.5, "ms_median": 1.0}]}"#,
    )
    .unwrap();
    ok(&[
        "bench",
        "all",
        "--report",
        s(&report),
        "--merge-peer",
        s(&peer),
    ]);
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("report.json")).unwrap()).unwrap();
    assert_eq!(v["peer"], "test peer");
    let item = &v["items"][0];
    assert_eq!(item["peer_ms_median"], 1.0);
    let ratio = item["ratio_to_peer"].as_f64().unwrap();
    assert!((ratio - item["ms_median"].as_f64().unwrap()).abs() < 1e-9);
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("test peer"), "{md}");
}

/// Runs `vqclip args` with its tuning file at `tuning` (so that other tests keep their kernel
/// choices) and asserts that it succeeded.
fn ok_with_tuning(args: &[&str], tuning: &std::path::Path) -> std::process::Output {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vqclip"))
        .args(args)
        .env("VQCLIP_TUNING_FILE", tuning)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn positive(v: &serde_json::Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
    assert!(x > 0.0 && x.is_finite(), "{what} = {x}");
    x
}

#[test]
fn matmul_checks_every_variant_against_the_cpu_and_reports_its_speed() {
    // The winner is remembered in the tuning file: point it at a scratch file so that the
    // other tests keep their kernel choices.
    let tuning =
        std::env::temp_dir().join(format!("vqclip-bench-tuning-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&tuning);
    let out = ok_with_tuning(
        &[
            "bench",
            "matmul",
            "--size",
            "64",
            "--seconds",
            "0.05",
            "--json",
        ],
        &tuning,
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["size"], 64);
    assert!(v["checked_entries"].as_u64().unwrap() > 0, "{v}");
    let variants = v["variants"].as_array().unwrap();
    assert!(variants.len() >= 4, "{v}");
    for var in variants {
        positive(&var["gflops"], "gflops");
        // in units of f32 eps · Σ|a·b|: recursive summation of K = 64 products stays below 64
        let err = var["max_err"].as_f64().unwrap();
        assert!(err < 64.0, "{}: error {err}", var["name"]);
    }
    let best = v["best"].as_str().unwrap();
    assert!(variants.iter().any(|x| x["name"] == best), "{v}");
    let saved = std::fs::read_to_string(&tuning).unwrap();
    assert!(saved.contains(&format!("\"{best}\"")), "{saved}");
    let _ = std::fs::remove_file(&tuning);
}

#[test]
fn generate_times_steps_on_the_fixture_models() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let clip = root.join("tests/fixtures/clip/tiny_quickgelu");
    let vq = root.join("tests/fixtures/vqgan/tiny_f4.ckpt");
    #[rustfmt::skip]
    let out = ok(&[
        "bench", "generate", "--clip", s(&clip), "--vqgan", s(&vq), "--size", "32x32",
        "--cutn", "2", "--steps", "2", "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["width"].clone(), v["cutn"].clone()),
        (32.into(), 2.into())
    );
    let steps = v["step_ms"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "{v}");
    for t in steps {
        positive(t, "step_ms");
    }
    positive(&v["peak_bytes"], "peak_bytes");
}

#[test]
fn vqgan_times_each_stage_on_a_fixture_model() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let vq = root.join("tests/fixtures/vqgan/tiny_f4.ckpt");
    #[rustfmt::skip]
    let out = ok(&[
        "bench", "vqgan", "--vqgan", s(&vq), "--size", "32x32", "--repeats", "1", "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stages: Vec<&str> = v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            positive(&x["min_ms"], "min_ms");
            positive(&x["gflop"], "gflop");
            x["stage"].as_str().unwrap()
        })
        .collect();
    assert_eq!(stages, ["encode", "quantize", "decode", "decode_backward"]);
}
