//! `vqclip generate` as a user runs it, with the fixture CLIP and VQGAN: outputs, metadata,
//! determinism, and refusals of bad input that leave no file behind.

use std::path::{Path, PathBuf};

mod common;
use common::vqclip;
use std::process::Command;

fn fx(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
        .display()
        .to_string()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vqclip-gen-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn base<'a>(clip: &'a str, vq: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "generate", "--clip", clip, "--vqgan", vq, "--cutn", "4", "-o", out,
    ]
}

#[test]
fn generates_deterministic_pngs_with_metadata_and_logs() {
    let (clip, vq) = (fx("clip/tiny_quickgelu"), fx("vqgan/tiny_f4.ckpt"));
    let (a, b) = (tmp("a.png"), tmp("b.png"));
    let log = tmp("a.jsonl");
    let gif = tmp("a.gif");
    let (sa, sb, sl, sg) = (
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        log.to_str().unwrap(),
        gif.to_str().unwrap(),
    );
    let mut args = base(&clip, &vq, sa);
    args.extend([
        "a red circle:1|blurry:-0.5",
        "--size",
        "32x32",
        "--steps",
        "6",
        "--seed",
        "7",
        "--json-log",
        sl,
        "--gif",
        sg,
    ]);
    let out = vqclip(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut args = base(&clip, &vq, sb);
    args.extend([
        "a red circle:1|blurry:-0.5",
        "--size",
        "32x32",
        "--steps",
        "6",
        "--seed",
        "7",
    ]);
    assert!(vqclip(&args).status.success());
    let (pa, pb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(pa, pb, "same seed and options give the same bytes");
    let text = String::from_utf8_lossy(&pa);
    for key in ["prompt", "seed", "steps", "vqclip", "precision"] {
        assert!(text.contains(key), "PNG text chunk {key} missing");
    }
    assert!(
        text.contains("precision\u{0}f32"),
        "the precision chunk says f32"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    assert_eq!(lines[0]["prompt_losses"].as_array().unwrap().len(), 2);
    assert!(std::fs::read(&gif).unwrap().starts_with(b"GIF89a"));
    // --steps 0 writes the initial image; another seed gives another one.
    let c = tmp("c.png");
    let mut args = base(&clip, &vq, c.to_str().unwrap());
    args.extend([
        "a red circle",
        "--size",
        "32x32",
        "--steps",
        "0",
        "--seed",
        "8",
    ]);
    assert!(vqclip(&args).status.success());
    assert_ne!(std::fs::read(&c).unwrap(), pa);
}

#[test]
fn bad_input_is_refused_and_leaves_no_file() {
    let (clip, vq) = (fx("clip/tiny_quickgelu"), fx("vqgan/tiny_f4.ckpt"));
    let out = tmp("never.png");
    let so = out.to_str().unwrap();
    let init = fx("../../docs/demo_red_circle.png");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec![""], "empty prompt"),
        (vec!["a cat:0"], "weight of 0"),
        (vec!["a cat", "--size", "0x32"], "must be positive"),
        (
            vec!["a cat", "--size", "3x3"],
            "smaller than the VQGAN's downsampling factor",
        ),
        (vec!["a cat", "--size", "big"], "is not WxH"),
        (vec!["a cat", "--init-image", "/no/such.png"], "no/such.png"),
        (vec!["a cat", "--optimizer", "sgd"], "unknown --optimizer"),
        (vec!["a cat", "--cut-method", "zoom"], "unknown cut method"),
        (vec!["a cat", "--cutn", "0"], "--cutn"),
        (vec!["a cat", "--size", "40000x40000"], "largest size"),
        (vec!["a cat", "--preset", "fast"], "unknown preset 'fast'"),
        (vec!["a cat", "--latent-grids", "2,99"], "latent grid 99"),
        (
            vec!["a cat", "--steps", "4", "--candidates", "3"],
            "3 candidates of 4 steps do not fit in 4 steps",
        ),
        (
            vec!["a cat", "--candidates", "2", "--init-image", &init],
            "--candidates needs random starts",
        ),
        (vec!["a cat", "--init", "noise"], "unknown --init 'noise'"),
        (
            vec!["a cat", "--init", "scenes:0"],
            "scenes:N needs a whole number",
        ),
        (
            vec!["a cat", "--init", "scenes:x"],
            "scenes:N needs a whole number",
        ),
        (
            vec!["a cat", "--init", "scenes:4", "--candidates", "2"],
            "--candidates needs random starts",
        ),
    ];
    for (extra, want) in cases {
        let mut args = base(&clip, &vq, so);
        args.extend(extra.iter().copied());
        let o = vqclip(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} should fail");
        assert!(err.contains(want), "{extra:?}: expected {want:?} in: {err}");
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?} left an output file");
    }
    // Without --vqgan / --clip the shipped models are used; with none to be found (an empty
    // weights folder) the error says what to pass.
    let empty = tmp("no-weights");
    std::fs::create_dir_all(&empty).unwrap();
    let without = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vqclip"))
            .args(args)
            .env_remove("VQCLIP_CLIP")
            .env_remove("VQCLIP_VQGAN")
            .env("VQCLIP_WEIGHTS", &empty)
            .output()
            .expect("run vqclip")
    };
    let o = without(&["generate", "a cat", "--clip", &clip, "-o", so]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("no VQGAN given") && err.contains("--vqgan FILE"),
        "{err}"
    );
    let o = without(&["generate", "a cat", "--vqgan", &vq, "-o", so]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("no CLIP model given") && err.contains("--clip DIR"),
        "{err}"
    );
    assert!(!out.exists());
    let o = vqclip(&[
        "generate",
        "a cat",
        "--clip",
        &clip,
        "--vqgan",
        "/no/model.ckpt",
        "--config",
        &fx("vqgan/tiny_f4.yaml"),
        "-o",
        so,
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("/no/model.ckpt"));
    assert!(!out.exists());
}

#[test]
fn a_scene_start_reports_its_choice_and_is_seeded() {
    let (clip, vq) = (fx("clip/tiny_quickgelu"), fx("vqgan/tiny_f4.ckpt"));
    let (a, b) = (tmp("scenes_a.png"), tmp("scenes_b.png"));
    let run = |out: &PathBuf| {
        let mut args = base(&clip, &vq, out.to_str().unwrap());
        args.extend([
            "a red circle on a blue background",
            "--init",
            "scenes:8",
            "--size",
            "32x32",
            "--steps",
            "1",
        ]);
        let o = vqclip(&args);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{err}");
        err
    };
    let err = run(&a);
    assert!(
        err.contains("from the best of 8 shapes-world scenes"),
        "{err}"
    );
    assert!(err.contains("start: the best of 8 scenes by CLIP"), "{err}");
    run(&b);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

#[test]
fn a_run_that_fails_at_the_end_leaves_no_log_or_gif() {
    let (clip, vq) = (fx("clip/tiny_quickgelu"), fx("vqgan/tiny_f4.ckpt"));
    let dir = tempfile::tempdir().unwrap();
    // The output is a folder: every step runs and logs, then writing the image fails.
    let out = dir.path().join("out.png");
    std::fs::create_dir(&out).unwrap();
    let (log, gif) = (dir.path().join("run.jsonl"), dir.path().join("run.gif"));
    let mut args = base(&clip, &vq, out.to_str().unwrap());
    args.extend([
        "a red circle",
        "--size",
        "32x32",
        "--steps",
        "3",
        "--json-log",
        log.to_str().unwrap(),
        "--gif",
        gif.to_str().unwrap(),
    ]);
    let o = vqclip(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("out.png"), "{err}");
    // Neither a partial log nor a partial GIF under the final names, and no temporaries.
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["out.png"]);
}

/// Issue 15: NaN, infinity (`1e309` parses to it), out-of-range numbers, unbounded counts and
/// sizes whose products overflow are refused with a message naming the problem, before any
/// work, and leave no file.
#[test]
fn non_finite_numbers_huge_counts_and_sizes_are_refused_before_work() {
    let (clip, vq) = (fx("clip/tiny_quickgelu"), fx("vqgan/tiny_f4.ckpt"));
    let out = tmp("never-numbers.png");
    let so = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["x:nan"],
            "prompt 'x:nan': the weight must be a finite number",
        ),
        (
            vec!["x:1e309"],
            "prompt 'x:1e309': the weight must be a finite number",
        ),
        (vec!["x:1:nan"], "the stop must be a finite number"),
        (vec!["a cat | x:inf"], "prompt ' x:inf'"),
        (
            vec!["x", "--noise", "nan"],
            "invalid value 'nan' for '--noise",
        ),
        (
            vec!["x", "--noise=-0.5"],
            "'--noise <NOISE>': must be 0 or more",
        ),
        (
            vec!["x", "--tv-weight", "nan"],
            "invalid value 'nan' for '--tv-weight",
        ),
        (
            vec!["x", "--init-weight", "inf"],
            "invalid value 'inf' for '--init-weight",
        ),
        (vec!["x", "--lr", "1e309"], "'1e309' is not a finite number"),
        (
            vec!["x", "--lr", "0"],
            "'--lr <LR>': must be greater than 0",
        ),
        (vec!["x", "--cut-pow", "nan"], "--cut-pow"),
        (
            vec!["x", "--noise-prompt", "3:nan"],
            "--noise-prompt '3:nan'",
        ),
        (
            vec!["x", "--noise-prompt", "3:1e309"],
            "must be a finite number",
        ),
        (
            vec!["x", "--image-prompt", "/no/such.png:nan"],
            "the weight must be a finite number",
        ),
        (
            vec!["x", "--init", "scenes:99999999"],
            "at most 4096 scenes",
        ),
        (
            vec!["x", "--cutn", "99999999999"],
            "more than the 4096 allowed",
        ),
        (
            vec!["x", "--size", "4294967296x4294967296"],
            "each side may be at most 65536 pixels",
        ),
        (vec!["x", "--size", "1x4294967296"], "at most 65536 pixels"),
        (vec!["x", "--size", "0x0"], "must be positive"),
        (vec!["x", "--size", "65536x65536"], "largest size"),
        (vec!["x", "--max-memory", "nan"], "--max-memory"),
        (
            vec!["x", "--max-memory", "12parsecs"],
            "unknown unit 'parsecs'",
        ),
    ];
    for (extra, want) in cases {
        let mut args = base(&clip, &vq, so);
        if extra.contains(&"--cutn") {
            args.retain(|&a| a != "--cutn" && a != "4");
        }
        args.extend(extra.iter().copied());
        let o = vqclip(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} should fail");
        assert!(err.contains(want), "{extra:?}: expected {want:?} in: {err}");
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
        // Refused before the run starts: the settings line comes just before the work.
        assert!(!err.contains("preset:"), "{extra:?} started work: {err}");
        assert!(!out.exists(), "{extra:?} left an output file");
    }
}

/// `--max-memory`: a size whose lower-bound need passes the budget is refused before work
/// with the largest size that might fit; one that passes the estimate but not the pool
/// fails during the run with the budget named and no file; a small size still works.
#[test]
fn the_memory_budget_refuses_sizes_that_cannot_fit() {
    let (clip, vq) = (fx("clip/tiny_quickgelu"), fx("vqgan/tiny_f4.ckpt"));
    let out = tmp("budget.png");
    let so = out.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = base(&clip, &vq, so);
        args.extend(["a cat", "--steps", "2", "--max-memory", "16MiB"]);
        args.extend(extra);
        vqclip(&args)
    };
    let o = run(&["--size", "256x256"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("256x256 with 4 cutouts would need at least")
            && err.contains("budget of 16.0 MiB")
            && err.contains("might fit is 64x64"),
        "{err}"
    );
    assert!(
        !err.contains("preset:"),
        "refused only after starting: {err}"
    );
    assert!(!out.exists());
    // The tiny models peak near 28 MiB at 64x64: the pool stops the run.
    let o = run(&["--size", "64x64"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("over the GPU memory budget"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists());
    let o = run(&["--size", "32x32"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.exists());
    std::fs::remove_file(&out).unwrap();
    // The example, with the shipped models.
    let o = vqclip(&[
        "generate",
        "a red circle",
        "--max-memory",
        "64MiB",
        "--size",
        "512x512",
        "-o",
        so,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("would need at least") && err.contains("budget of 64.0 MiB"),
        "{err}"
    );
    assert!(!out.exists());
}
