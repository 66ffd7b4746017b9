//! The bodies of the fuzz targets: one function per parser a stranger's file or argument
//! reaches, each calling the library entry point the CLI uses. A body may return early on an
//! error (that is the parser doing its job); it must never panic, abort or hang.
//!
//! `fuzz/fuzz_targets/<name>.rs` hands libFuzzer's input to `<name>`; `tests/fuzz_corpus.rs`
//! compiles this same file on stable and replays every committed seed and regression input
//! through it, so a crash found once stays fixed.

use std::path::Path;
use vqclip::generate::prompt::{parse_noise, Prompt};
use vqclip::models::clip::{load_image, ClipConfig, ClipTokenizer, PreprocessConfig};
use vqclip::models::vqgan::VqGanConfig;
use vqclip::weights::safetensors::SafetensorsFile;
use vqclip::weights::torch::TorchCheckpoint;
use vqclip::weights::{pickle, TensorSource};

/// A target body: one input in, and it must not panic.
pub type Target = fn(&[u8]);

/// Every target, by name, for the replay test.
pub const TARGETS: &[(&str, Target)] = &[
    ("safetensors", safetensors),
    ("pickle", pickle),
    ("torch_zip", torch_zip),
    ("taming_yaml", taming_yaml),
    ("clip_config", clip_config),
    ("preprocessor_config", preprocessor_config),
    ("tokenizer_load", tokenizer_load),
    ("tokenizer_encode", tokenizer_encode),
    ("prompt", prompt),
    ("image", image),
];

/// Reads every tensor of a source, as a model load does once shapes match its config.
fn read_all(src: &dyn TensorSource) {
    for k in src.keys() {
        let shape = src.shape(&k);
        if let Ok(v) = src.read_f32(&k) {
            let numel = shape.map(|s| s.iter().product::<usize>());
            assert_eq!(Some(v.len()), numel, "{k}: values and shape disagree");
        }
    }
}

/// A `.safetensors` file: header, offsets, dtypes, then every tensor view.
pub fn safetensors(data: &[u8]) {
    if let Ok(f) = SafetensorsFile::from_bytes("fuzz.safetensors", data.to_vec()) {
        read_all(&f);
    }
}

/// A `data.pkl`: the pickle reader, then the state-dict walk.
pub fn pickle(data: &[u8]) {
    if let Ok(root) = pickle::parse(data) {
        let _ = pickle::state_dict_tensors(&root);
    }
}

/// A PyTorch zip checkpoint (`.ckpt`, `.pt`): the zip layer, its pickle, every tensor.
pub fn torch_zip(data: &[u8]) {
    if let Ok(ck) = TorchCheckpoint::from_bytes("fuzz.ckpt", data.to_vec()) {
        read_all(&ck);
    }
}

/// A taming `.yaml` config, and the tensor list a config implies.
pub fn taming_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = VqGanConfig::from_yaml(text, "fuzz.yaml") {
        let _ = cfg.downsampling_factor();
        let _ = cfg.tensor_shapes();
    }
}

/// A Hugging Face CLIP `config.json`, and the tensor list of a valid one.
pub fn clip_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = ClipConfig::from_json(text) {
        if cfg.validate().is_ok() {
            let _ = cfg.tensor_shapes();
        }
    }
}

/// A `preprocessor_config.json`, and the output size it gives at a few input sizes.
pub fn preprocessor_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = PreprocessConfig::from_json(text, 224) {
        for (h, w) in [(1, 1), (224, 224), (1, 4096), (4096, 1), (333, 17)] {
            let _ = cfg.output_size(h, w);
        }
    }
}

/// Tokenizer files: the first byte picks `tokenizer.json` (even) or `vocab.json` and
/// `merges.txt` (odd, split at the first NUL byte); a loaded tokenizer encodes a text.
pub fn tokenizer_load(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let tok = if mode % 2 == 0 {
        ClipTokenizer::from_tokenizer_json_bytes(rest, 77, Path::new("tokenizer.json"))
    } else {
        let cut = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        let (vocab, merges) = (&rest[..cut], rest.get(cut + 1..).unwrap_or_default());
        let (Ok(vocab), Ok(merges)) = (std::str::from_utf8(vocab), std::str::from_utf8(merges))
        else {
            return;
        };
        ClipTokenizer::from_vocab_merges_text(
            vocab,
            merges,
            77,
            Path::new("vocab.json"),
            Path::new("merges.txt"),
        )
    };
    if let Ok(tok) = tok {
        if let Ok(ids) = tok.encode("a photo of a cat") {
            let _ = tok.decode(&ids);
        }
    }
}

fn fixture(rel: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(if Path::new(env!("CARGO_MANIFEST_DIR")).ends_with("fuzz") {
            "../tests/fixtures"
        } else {
            "tests/fixtures"
        })
        .join(rel)
}

/// The fixtures' two tokenizers (a `tokenizer.json` and a vocab + merges pair), loaded once.
fn fixture_tokenizers() -> &'static [ClipTokenizer] {
    static TOKS: std::sync::OnceLock<Vec<ClipTokenizer>> = std::sync::OnceLock::new();
    TOKS.get_or_init(|| {
        let json = fixture("clip/sparse_bf16/tokenizer.json");
        let dir = fixture("clip/small_gelu");
        vec![
            ClipTokenizer::from_tokenizer_json(&json, 77).expect("fixture tokenizer.json"),
            ClipTokenizer::from_dir(dir, 77).expect("fixture vocab.json + merges.txt"),
        ]
    })
}

/// Arbitrary text (lossily made UTF-8) through both fixture tokenizers: ids start with
/// `<|startoftext|>`, end with `<|endoftext|>` and fit the context.
pub fn tokenizer_encode(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for tok in fixture_tokenizers() {
        if let Ok(ids) = tok.encode(&text) {
            assert!(
                ids.len() >= 2 && ids.len() <= tok.context_length(),
                "{ids:?}"
            );
            assert_eq!(ids.first(), Some(&tok.bos_id()));
            assert_eq!(ids.last(), Some(&tok.eos_id()));
            let _ = tok.decode(&ids);
        }
    }
}

/// The prompt syntax: `text[:weight[:stop]]|...` (text and image prompts) and noise
/// prompts `SEED[:weight]`.
pub fn prompt(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(list) = Prompt::parse_list(s) {
        for p in list {
            assert!(!p.text.trim().is_empty());
            assert!(p.weight.is_finite() && p.weight != 0.0, "{p:?}");
        }
    }
    let _ = Prompt::parse(s);
    let _ = parse_noise(s);
}

/// Largest image the target decodes, in pixels, and its most extreme aspect ratio: bounding
/// what the decoder and the resize may allocate is `load_image`'s own job (another part of
/// the hardening issue); the filter keeps the fuzzer on the parsers rather than on
/// legitimately huge allocations.
const MAX_FUZZ_PIXELS: u64 = 1 << 20;
const MAX_FUZZ_ASPECT: u64 = 32;

/// An image file decoded as `vqclip` reads prompts and CLIP inputs, then preprocessed to a
/// square size chosen by the input's first byte (odd sizes included).
pub fn image(data: &[u8]) {
    let Some((&size, bytes)) = data.split_first() else {
        return;
    };
    let dims = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .ok()
        .and_then(|r| r.into_dimensions().ok());
    match dims {
        Some((w, h))
            if (w as u64) * (h as u64) <= MAX_FUZZ_PIXELS
                && (w.max(h) as u64) <= MAX_FUZZ_ASPECT * (w.min(h).max(1) as u64) => {}
        _ => return,
    }
    // load_image reads a path, as the CLI does; a per-thread file keeps parallel replays apart.
    let path = std::env::temp_dir().join(format!(
        "vqclip-fuzz-image-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    if std::fs::write(&path, bytes).is_err() {
        return;
    }
    let img = load_image(&path);
    let _ = std::fs::remove_file(&path);
    if let Ok(img) = img {
        let cfg = PreprocessConfig::for_size(1 + size as u32 % 64);
        if let Ok(px) = cfg.apply(&img) {
            let (h, w) = cfg.output_size(img.height(), img.width());
            assert_eq!(px.len(), 3 * h as usize * w as usize);
        }
    }
}
