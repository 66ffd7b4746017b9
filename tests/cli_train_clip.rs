//! `vqclip train clip` and `vqclip eval clip` as a user runs them, on a tiny architecture:
//! a run resumed from its checkpoint ends with the same weights as an uninterrupted one, the
//! folder evaluates, and bad input fails with a message.

use std::path::Path;

mod common;
use common::{fails, ok, s};

const TINY: &str = r#"{"model_type":"clip","projection_dim":16,
  "text_config":{"hidden_size":16,"intermediate_size":32,"num_hidden_layers":1,
    "num_attention_heads":2,"max_position_embeddings":20},
  "vision_config":{"hidden_size":16,"intermediate_size":32,"num_hidden_layers":1,
    "num_attention_heads":2,"image_size":16,"patch_size":8}}"#;

#[test]
fn train_resume_and_eval_clip() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tiny.json");
    std::fs::write(&cfg, TINY).unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let common = ["--config", s(&cfg), "--batch", "4", "--seed", "3"];
    let run = |out: &Path, steps: &str, extra: &[&str]| {
        let mut args = vec!["train", "clip", "--out", s(out), "--steps", steps];
        args.extend_from_slice(&common);
        args.extend_from_slice(extra);
        ok(&args);
    };
    run(&a, "4", &["--shape-negatives"]);
    // Two steps of a four-step run (--stop-after), then resume to four: the same weights.
    // The resumed run takes --shape-negatives from the checkpoint.
    run(&b, "4", &["--shape-negatives", "--stop-after", "2"]);
    let log = std::fs::read_to_string(b.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 2, "--stop-after 2 ran: {log}");
    let mut args = vec!["train", "clip", "--out", s(&b), "--steps", "4", "--resume"];
    args.extend_from_slice(&common);
    ok(&args);
    let state = b.join("train_state.safetensors");
    assert!(state.is_file());
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(weights(&a), weights(&b));
    // A run of two steps resumed to a new total of four also ends there (with under 40
    // steps the warm-up is one step, so steps 0 and 1 run at the peak rate for a total of 2
    // or 4 alike, and the resumed steps follow the 4-step schedule).
    let b2 = dir.path().join("b2");
    run(&b2, "2", &["--shape-negatives"]);
    let mut args = vec!["train", "clip", "--out", s(&b2), "--steps", "4", "--resume"];
    args.extend_from_slice(&common);
    ok(&args);
    assert_eq!(weights(&a), weights(&b2));
    // Without the negative captions the same run ends elsewhere.
    let plain = dir.path().join("plain");
    run(&plain, "4", &[]);
    assert_ne!(weights(&a), weights(&plain));
    for f in [
        "config.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "preprocessor_config.json",
    ] {
        assert!(a.join(f).is_file(), "{f}");
    }
    let out = ok(&["eval", "clip", "--clip", s(&a), "--n", "4", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["n"], 4);
    assert!(v["colour_correct"].as_u64().unwrap() <= 4);

    // Errors.
    fails(
        &["train", "clip", "--out", s(&a), "--steps", "1"],
        "already holds a training state",
    );
    let c = dir.path().join("c");
    fails(
        &["train", "clip", "--out", s(&c), "--resume"],
        "no checkpoint",
    );
    fails(
        &["train", "clip", "--out", s(&c), "--batch", "1"],
        "--batch",
    );
    fails(
        &["eval", "clip", "--clip", s(&dir.path().join("nope"))],
        "no such folder",
    );
    fails(&["eval", "clip", "--clip", s(&a), "--n", "0"], "--n");
    fails(
        &["train", "clip", "--out", s(&c), "--stop-after", "0"],
        "--stop-after must be at least 1",
    );
    fails(
        &["train", "clip", "--out", s(&c), "--adv-norm", "l3"],
        "expected l2 or linf",
    );
    fails(
        &["train", "clip", "--out", s(&c), "--adv-eps=-1"],
        "--adv-eps",
    );
    let nope = dir.path().join("nope");
    for (from, extra, want) in [
        (
            &a,
            "--resume",
            "cannot be combined with --resume or --config",
        ),
        (&nope, "--shape-negatives", "--init-from"),
    ] {
        let args = [
            "train",
            "clip",
            "--out",
            s(&c),
            "--init-from",
            s(from),
            extra,
        ];
        fails(&args, want);
    }
    assert!(!c.exists(), "a refused run left {}", c.display());

    // A fine-tune: --init-from starts at the folder's weights and architecture (two steps
    // move the weights), here with colour-role negatives too; the same fine-tune twice gives
    // the same weights.
    let (f1, f2) = (dir.path().join("f1"), dir.path().join("f2"));
    for f in [&f1, &f2] {
        ok(&[
            "train",
            "clip",
            "--out",
            s(f),
            "--init-from",
            s(&a),
            "--steps",
            "2",
            "--batch",
            "4",
            "--swap-negatives",
            "--shape-negatives",
        ]);
    }
    assert_eq!(weights(&f1), weights(&f2));
    assert_ne!(weights(&f1), weights(&a));
    let cfg_of = |d: &Path| {
        serde_json::from_slice::<serde_json::Value>(&std::fs::read(d.join("config.json")).unwrap())
            .unwrap()
    };
    assert_eq!(
        cfg_of(&f1)["vision_config"]["hidden_size"],
        cfg_of(&a)["vision_config"]["hidden_size"],
        "the architecture comes from the --init-from folder"
    );
    let out = ok(&["eval", "clip", "--clip", s(&f1), "--n", "4", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["n"], 4);
}

/// Adversarial training (`--adv-eps`) changes the run, and a run stopped and resumed takes
/// the attack from its checkpoint and ends where an unbroken one does.
#[test]
fn adversarial_training_changes_the_run_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tiny.json");
    std::fs::write(&cfg, TINY).unwrap();
    let common = ["--config", s(&cfg), "--batch", "4", "--seed", "3"];
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec!["train", "clip", "--out", s(out), "--steps", "3"];
        args.extend_from_slice(&common);
        args.extend_from_slice(extra);
        ok(&args)
    };
    let adv = ["--adv-eps", "0.5", "--adv-steps", "2", "--adv-norm", "linf"];
    let (a, b, plain) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("p"),
    );
    let out = run(&a, &adv);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("adversarial training: 2 PGD steps"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut stopped = adv.to_vec();
    stopped.extend(["--stop-after", "1"]);
    run(&b, &stopped);
    run(&b, &["--resume"]);
    run(&plain, &[]);
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(weights(&a), weights(&b));
    assert_ne!(weights(&a), weights(&plain));
}
