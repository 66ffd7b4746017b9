//! Files built to crash a parser (nesting hundreds of thousands deep, sizes that lie) given
//! to the `vqclip` binary and the library loaders: each must be a clear error naming what
//! was wrong, with a normal non-zero exit, never a stack overflow, an abort or a signal.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::s;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Asserts that `out` is an orderly failure: exit code 1-ish (not killed by a signal, which
/// is how a stack overflow or an abort ends), `want` in stderr, and no panic.
fn refused(out: &Output, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(c) if c != 0),
        "expected a normal failure exit, got {:?}: {err}",
        out.status
    );
    assert!(err.contains(want), "expected {want:?} in: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
}

/// A zip checkpoint holding `archive/data.pkl` = `pkl` and the given storage entries.
fn checkpoint(path: &Path, pkl: &[u8], storages: &[(&str, &[u8])]) {
    let mut w = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    w.start_file("archive/data.pkl", opts).unwrap();
    w.write_all(pkl).unwrap();
    for (name, bytes) in storages {
        w.start_file(format!("archive/data/{name}"), opts).unwrap();
        w.write_all(bytes).unwrap();
    }
    w.finish().unwrap();
}

fn reconstruct(ckpt: &Path, config: &Path, out: &Path) -> Output {
    common::vqclip(&[
        "reconstruct",
        "--vqgan",
        s(ckpt),
        "--config",
        s(config),
        s(&fixture("vqgan/input.png")),
        "-o",
        s(out),
    ])
}

#[test]
fn a_pickle_nesting_lists_200000_deep_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let n = 200_000;
    let mut pkl = vec![0x80, 2];
    pkl.extend(std::iter::repeat_n(b']', n));
    pkl.extend(std::iter::repeat_n(b'a', n - 1));
    pkl.push(b'.');
    let ckpt = dir.path().join("deep.ckpt");
    checkpoint(&ckpt, &pkl, &[]);

    let e = vqclip::weights::torch::TorchCheckpoint::open(&ckpt)
        .unwrap_err()
        .to_string();
    assert!(e.contains("MAX_NESTING") && e.contains("deep.ckpt"), "{e}");

    let out = dir.path().join("out.png");
    refused(
        &reconstruct(&ckpt, &fixture("vqgan/tiny_f2.yaml"), &out),
        "MAX_NESTING",
    );
    assert!(!out.exists(), "a partial output was written");
}

/// `{'w': _rebuild_tensor_v2(storage('0', FloatStorage, numel), 0, (numel,), (1,))}`.
fn one_tensor_pickle(numel: u16) -> Vec<u8> {
    let n = numel.to_le_bytes();
    let mut p = vec![0x80, 2, b'}', 0x8c, 1, b'w'];
    p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
    p.extend([0x8c, 7]);
    p.extend(b"storage");
    p.extend(b"ctorch\nFloatStorage\n");
    p.extend([0x8c, 1, b'0', 0x8c, 3]);
    p.extend(b"cpu");
    p.extend([
        b'M', n[0], n[1], b't', b'Q', b'K', 0, b'M', n[0], n[1], 0x85,
    ]);
    p.extend([b'K', 1, 0x85, b't', b'R', b's', b'.']);
    p
}

#[test]
fn a_storage_shorter_than_its_view_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("short.ckpt");
    checkpoint(&ckpt, &one_tensor_pickle(1000), &[("0", &[0u8; 8])]);
    let e = vqclip::weights::torch::TorchCheckpoint::open(&ckpt)
        .unwrap_err()
        .to_string();
    assert!(e.contains("has 8 bytes, expected 4000"), "{e}");
}

/// A checkpoint whose storage entry is deflated and whose central directory then claims
/// `claimed` bytes for it.
fn lying_checkpoint(path: &Path, claimed: u32) {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    w.start_file("archive/data.pkl", stored).unwrap();
    w.write_all(&one_tensor_pickle(1000)).unwrap();
    let deflated = stored.compression_method(zip::CompressionMethod::Deflated);
    w.start_file("archive/data/0", deflated).unwrap();
    w.write_all(&[0u8; 4000]).unwrap();
    let mut bytes = w.finish().unwrap().into_inner();
    // The storage's central directory record: signature PK\1\2, uncompressed size at +24.
    let cd = bytes
        .windows(4)
        .enumerate()
        .filter(|(_, w)| *w == [b'P', b'K', 1, 2])
        .map(|(i, _)| i)
        .nth(1)
        .unwrap();
    assert_eq!(bytes[cd + 24..cd + 28], 4000u32.to_le_bytes());
    bytes[cd + 24..cd + 28].copy_from_slice(&claimed.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn entries_whose_sizes_lie_are_refused() {
    use vqclip::weights::TensorSource;
    let dir = tempfile::tempdir().unwrap();
    // 4 GB claimed from a few dozen compressed bytes: refused at open, before any read.
    let bomb = dir.path().join("bomb.ckpt");
    lying_checkpoint(&bomb, 0xffff_fff0);
    let e = vqclip::weights::torch::TorchCheckpoint::open(&bomb)
        .unwrap_err()
        .to_string();
    assert!(e.contains("MAX_DEFLATE_RATIO") && e.contains("bomb"), "{e}");
    // One byte more than the entry holds: found when the tensor is read.
    let off_by_one = dir.path().join("lie.ckpt");
    lying_checkpoint(&off_by_one, 4001);
    let ck = vqclip::weights::torch::TorchCheckpoint::open(&off_by_one).unwrap();
    let e = ck.read_f32("w").unwrap_err().to_string();
    assert!(
        e.contains("'w'") && e.contains("truncated or corrupt"),
        "{e}"
    );
    // The honest file reads.
    let honest = dir.path().join("honest.ckpt");
    lying_checkpoint(&honest, 4000);
    let ck = vqclip::weights::torch::TorchCheckpoint::open(&honest).unwrap();
    assert_eq!(ck.read_f32("w").unwrap(), vec![0.0; 1000]);
}

#[test]
fn a_taming_yaml_nesting_100000_deep_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("deep.yaml");
    std::fs::write(&yaml, "[".repeat(100_000) + &"]".repeat(100_000)).unwrap();
    let e = vqclip::models::vqgan::VqGanConfig::from_file(&yaml)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("MAX_YAML_FLOW_NESTING") && e.contains("deep.yaml"),
        "{e}"
    );
    let out = dir.path().join("out.png");
    refused(
        &reconstruct(&fixture("vqgan/tiny_f2.ckpt"), &yaml, &out),
        "MAX_YAML_FLOW_NESTING",
    );
    assert!(!out.exists());

    // Deep inside the config: where any value is kept (temperature_scheduler_config), where
    // unknown keys are skipped, and under a key the config parses.
    let base = std::fs::read_to_string(fixture("vqgan/tiny_f2.yaml")).unwrap();
    let with = |key: &str, value: &str| {
        let text = base.replacen(
            "  params:\n",
            &format!("  params:\n    {key}: {value}\n"),
            1,
        );
        assert_ne!(text, base);
        vqclip::models::vqgan::VqGanConfig::from_yaml(&text, "deep.yaml")
    };
    let deep_map = "{a: ".repeat(50_000) + "1" + &"}".repeat(50_000);
    let deep_seq = "[".repeat(50_000) + &"]".repeat(50_000);
    for (key, value) in [
        ("temperature_scheduler_config", &deep_map),
        ("unknown_key", &deep_seq),
        ("embed_dim", &deep_seq),
    ] {
        let e = with(key, value).unwrap_err().to_string();
        assert!(e.contains("MAX_YAML_FLOW_NESTING"), "{key}: {e}");
    }
    // Under the pre-check's limit, serde_yaml's own recursion limit (128) still holds, for
    // flow and for block (indented) nesting alike.
    let e = with(
        "temperature_scheduler_config",
        &("[".repeat(60) + &"]".repeat(60)),
    );
    assert!(e.is_ok(), "{e:?}");
    let mut block = String::new();
    for i in 0..200 {
        block += &format!("\n{}k{i}:", " ".repeat(6 + 2 * i));
    }
    block += " 1";
    let e = with("temperature_scheduler_config", &block)
        .unwrap_err()
        .to_string();
    assert!(e.contains("recursion limit"), "{e}");
    // And a billion laughs (aliases of aliases) is refused rather than expanded.
    let mut laughs = String::from("\n      a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]");
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 9].join(", ");
        laughs += &format!("\n      a{i}: &a{i} [{refs}]");
    }
    let e = with("temperature_scheduler_config", &laughs)
        .unwrap_err()
        .to_string();
    assert!(e.contains("repetition limit"), "{e}");
}

#[test]
fn a_clip_config_json_nesting_100000_deep_is_refused() {
    let deep = "[".repeat(100_000) + &"]".repeat(100_000);
    let e = vqclip::models::clip::ClipConfig::from_json(&deep).unwrap_err();
    assert!(e.contains("recursion limit"), "{e}");
    let inner = format!("{{\"text_config\": {{\"x\": {deep}}}}}");
    let e = vqclip::models::clip::ClipConfig::from_json(&inner).unwrap_err();
    assert!(e.contains("recursion limit"), "{e}");
    let e = vqclip::models::clip::PreprocessConfig::from_json(&inner, 224).unwrap_err();
    assert!(e.contains("recursion limit"), "{e}");

    // Through the CLI: a CLIP folder whose config.json is the deep one.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), &deep).unwrap();
    refused(
        &common::vqclip(&["embed", "--clip", s(dir.path()), "--text", "a cat"]),
        "recursion limit",
    );
}

#[test]
fn a_tokenizer_json_that_panicked_the_tokenizers_crate_is_an_error() {
    // Found by the tokenizer_load fuzz target: a lone-surrogate escape made tokenizers 0.23
    // panic (an `expect` in its decoders/mod.rs). The input's first byte is the target's
    // mode byte.
    for name in [
        "lone_surrogate_escape_panics_in_tokenizers",
        "lone_surrogate_escape_panics_in_tokenizers_2",
    ] {
        let bytes = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fuzz/regressions/tokenizer_load")
                .join(name),
        )
        .unwrap();
        let e = vqclip::models::clip::ClipTokenizer::from_tokenizer_json_bytes(
            &bytes[1..],
            77,
            Path::new("t.json"),
        )
        .unwrap_err()
        .to_string();
        // Refused by the JSON check, not merely caught after the crate panicked.
        assert!(
            e.contains("t.json") && e.contains("not valid JSON"),
            "{name}: {e}"
        );
    }
}
