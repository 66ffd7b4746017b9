//! `vqclip bench peak` and `vqclip bench all` from the command line: figures come out as
//! JSON, bad options and files are refused with a message and no report, and a peer file is
//! merged into an existing report without measuring again.

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
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vqclip"))
        .args([
            "bench",
            "all",
            "--quick",
            "--seconds",
            "0.01",
            "--only",
            "layer_norm",
            "--report",
            s(&report),
        ])
        .env("VQCLIP_TUNING_FILE", &tuning)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
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
