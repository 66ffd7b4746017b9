//! `vqclip train vqgan` and `vqclip eval vqgan` as a user runs them: a tiny run end to end
//! (checkpoint, resume, shipped files that load back), and bad input.

mod common;
use common::{fails, vqclip};

#[test]
fn tiny_run_checkpoints_resumes_and_ships_taming_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = out.to_str().unwrap();
    let common = ["--config", "tiny", "--batch", "2", "--eval-images", "4"];
    let mut args = vec![
        "train",
        "vqgan",
        "--out",
        o,
        "--steps",
        "2",
        "--save-every",
        "1",
    ];
    args.extend(common);
    let r = vqclip(&args);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(stdout.contains("held-out PSNR"), "{stdout}");
    assert!(out.join("state.safetensors").is_file());
    fails(&args, "--resume");
    // A run killed while writing its next checkpoint leaves a hidden temporary beside the
    // last whole one: resuming reads the whole one and ignores the fragment.
    let whole = std::fs::read(out.join("state.safetensors")).unwrap();
    std::fs::write(
        out.join(".state.safetensors.Xk3q9Z.tmp"),
        &whole[..whole.len() / 3],
    )
    .unwrap();
    let r = vqclip(&[
        "train",
        "vqgan",
        "--out",
        o,
        "--steps",
        "3",
        "--resume",
        "--eval-images",
        "0",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stderr).contains("resumed at step 2/3"));
    let w = out.join("shapes_f2.safetensors");
    let y = out.join("shapes_f2.yaml");
    let text = std::fs::read_to_string(&y).unwrap();
    assert!(
        text.contains("target: taming.models.vqgan.VQModel"),
        "{text}"
    );
    let e = vqclip(&[
        "eval",
        "vqgan",
        "--vqgan",
        w.to_str().unwrap(),
        "--n",
        "3",
        "--json",
    ]);
    assert!(e.status.success(), "{}", String::from_utf8_lossy(&e.stderr));
    let v: serde_json::Value = serde_json::from_slice(&e.stdout).unwrap();
    assert_eq!(v["images"], 3);
    assert!(v["psnr_db"].as_f64().unwrap().is_finite());
    // Only model tensors in the shipped file: no optimiser state.
    let f = vqclip::weights::SafetensorsFile::open(&w).unwrap();
    use vqclip::weights::TensorSource;
    assert!(f.keys().iter().all(|k| !k.starts_with("optim.")));
}

#[test]
fn bad_input_fails_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().join("x");
    let o = o.to_str().unwrap();
    fails(
        &["train", "vqgan", "--out", o, "--steps", "0"],
        "--steps must be at least 1",
    );
    fails(
        &["train", "vqgan", "--out", o, "--batch", "0"],
        "--batch must be at least 1",
    );
    fails(&["train", "vqgan", "--out", o, "--resume"], "no checkpoint");
    fails(
        &[
            "train",
            "vqgan",
            "--out",
            o,
            "--config",
            "/nonexistent.yaml",
        ],
        "neither small, tiny nor a taming .yaml",
    );
    fails(
        &[
            "train", "vqgan", "--out", o, "--config", "tiny", "--crop", "3",
        ],
        "crop 3",
    );
    fails(
        &["eval", "vqgan", "--vqgan", "/nonexistent.safetensors"],
        "not found",
    );
    fails(&["eval", "vqgan", "--n", "0"], "--n must be at least 1");
}
