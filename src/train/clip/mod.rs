//! Training a small CLIP on the shapes world ([`crate::data::shapes`]): a byte-level BPE
//! vocabulary whose merges spell every caption word as one token, the text tower on the
//! autodiff tape (both towers are [`ClipModel`]'s own forwards on a training tape), the
//! symmetric contrastive loss with a learned temperature, augmented batches, one optimiser
//! step, and the Hugging Face folder that transformers' `CLIPModel` and [`ClipModel::load`]
//! both read.
//!
//! [`ClipModel`]: crate::models::clip::ClipModel
//! [`ClipModel::load`]: crate::models::clip::ClipModel::load

mod adversarial;
mod batches;
pub mod checkpoint;
mod eval;
mod folder;
mod negatives;
mod trainer;

pub use self::adversarial::{AdvNorm, Adversarial};
pub use self::batches::{augmented_pair, batch, normalise, Augment};
pub use self::eval::{evaluate, EvalResult};
pub use self::negatives::{batch_negatives, batch_shape_negatives, shape_negatives, swap_negative};
pub use self::trainer::{contrastive_loss, text_features, ClipTrainer, StepStats};
pub use crate::data::shapes::grammar_words;
pub use crate::models::clip::config::hf_config;
pub use crate::models::clip::vocab::bytes_to_unicode;

use super::{Init, Schedule};
use crate::data::shapes::{Colour, Position, Scene, ShapeKind, ShapesDataset, Split};
use crate::models::clip::vocab::word_vocab_files;
use crate::models::clip::{ClipConfig, ClipTokenizer, TextConfig, VisionConfig};
use crate::ops::Act;
use crate::Result;
use std::path::Path;

/// Per-channel mean of the preprocessing (OpenAI CLIP's, written to
/// `preprocessor_config.json`).
pub const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// Per-channel standard deviation of the preprocessing.
pub const STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];
/// Upper clamp of `logit_scale` (CLIP's `ln 100`).
pub const MAX_LOGIT_SCALE: f32 = 4.605_170_2;

/// The shapes world's tokenizer files, `(vocab.json, merges.txt)`: [`word_vocab_files`] of
/// the caption grammar's [`grammar_words`], so every caption word is one token.
pub fn shapes_tokenizer_files() -> (String, String) {
    word_vocab_files(&grammar_words())
}

/// The shapes tokenizer with a context of `context` tokens.
pub fn shapes_tokenizer(context: usize) -> Result<ClipTokenizer> {
    let (v, m) = shapes_tokenizer_files();
    ClipTokenizer::from_vocab_merges_text(
        &v,
        &m,
        context,
        Path::new("<shapes vocab.json>"),
        Path::new("<shapes merges.txt>"),
    )
}

/// The longest caption of the grammar in tokens, with the start and end tokens (17:
/// two shapes with positions). Captions longer than a model's context are truncated.
pub fn longest_caption_tokens() -> Result<usize> {
    let tok = shapes_tokenizer(1024)?;
    // The longest phrasing: two shapes with positions ("... at the bottom right and ...").
    let mut longest = 0;
    let ds = ShapesDataset::new(0, Split::Train);
    for i in 0..64 {
        let (scene, _) = ds.sample(i);
        for v in 0..4 {
            longest = longest.max(tok.encode_checked(&scene.caption(v))?.0.len());
        }
    }
    let worst = Scene {
        background: Colour::Purple,
        shapes: vec![
            crate::data::shapes::Shape {
                kind: ShapeKind::Triangle,
                colour: Colour::Yellow,
                large: false,
                position: Position::BottomRight,
            },
            crate::data::shapes::Shape {
                kind: ShapeKind::Triangle,
                colour: Colour::Yellow,
                large: false,
                position: Position::BottomLeft,
            },
        ],
    };
    for v in 0..4 {
        longest = longest.max(tok.encode_checked(&worst.caption(v))?.0.len());
    }
    Ok(longest)
}

/// The default architecture of the shapes CLIP for a vocabulary of `vocab_size` tokens
/// (`eos_token_id` is the last id): 64×64 images in 8×8 patches, width 64 in both towers,
/// quick-GELU, a 20-token context (the longest caption has 17).
pub fn shapes_config(vocab_size: usize) -> ClipConfig {
    ClipConfig {
        text: TextConfig {
            vocab_size,
            hidden_size: 64,
            intermediate_size: 256,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            max_position_embeddings: 20,
            hidden_act: Act::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_id: vocab_size as i64 - 1,
        },
        vision: VisionConfig {
            hidden_size: 64,
            intermediate_size: 256,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_channels: 3,
            image_size: 64,
            patch_size: 8,
            hidden_act: Act::QuickGelu,
            layer_norm_eps: 1e-5,
        },
        projection_dim: 64,
        logit_scale_init_value: 2.6592,
    }
}

/// The architecture of a new run: the config.json at `file` or else [`shapes_config`], with
/// `vocab_size` and `eos_token_id` set to the shapes tokenizer's.
pub fn run_config(file: Option<&Path>) -> Result<ClipConfig> {
    let vocab = shapes_tokenizer(77)?.vocab_size();
    let mut c = match file {
        None => shapes_config(vocab),
        Some(p) => ClipConfig::from_file(p)?,
    };
    c.text.vocab_size = vocab;
    c.text.eos_token_id = vocab as i64 - 1;
    Ok(c)
}

/// How each weight of a fresh model starts: LayerNorm gains 1 and shifts 0, biases 0,
/// embeddings N(0, 0.02) (class embedding N(0, D^-½)), projections N(0, D^-½), other
/// linear layers PyTorch's default, `logit_scale` its config value.
pub fn init_rule(config: &ClipConfig) -> impl Fn(&str, &[usize]) -> Init {
    let ls = config.logit_scale_init_value;
    move |key: &str, shape: &[usize]| {
        let norm = key.contains("layer_norm")
            || key.contains("layernorm")
            || key.contains("layrnorm")
            || key.contains("final_layer_norm");
        if key == "logit_scale" {
            Init::Const(ls)
        } else if norm {
            Init::Const(if key.ends_with("weight") { 1.0 } else { 0.0 })
        } else if key.ends_with("bias") {
            Init::Const(0.0)
        } else if key.ends_with("class_embedding") {
            Init::Normal((shape[0] as f32).powf(-0.5))
        } else if key.contains("embedding") && !key.contains("patch_embedding") {
            Init::Normal(0.02)
        } else if key.contains("projection") {
            Init::Normal((shape[1] as f32).powf(-0.5))
        } else {
            super::default_init(shape)
        }
    }
}

/// A learning-rate schedule for `total` steps: warm-up over 5% (at least 1 step), cosine to
/// 5% of `lr`.
pub fn schedule(lr: f32, total: usize) -> Schedule {
    Schedule {
        lr,
        warmup: (total / 20).max(1),
        total,
        floor: 0.05,
    }
}

#[cfg(test)]
mod tests;
