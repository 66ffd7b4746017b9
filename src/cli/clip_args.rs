//! What the CLIP subcommands share: the `--clip DIR` argument, loading, input checks.

use super::DeviceArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use vqclip::models::clip::{load_image, ClipModel};
use vqclip::Precision;

/// `--clip DIR`.
#[derive(Args, Debug, Clone)]
pub struct ClipArgs {
    /// A Hugging Face CLIP folder: config.json, model.safetensors, and tokenizer.json (or
    /// vocab.json + merges.txt), e.g. a download of openai/clip-vit-base-patch32 [default:
    /// the shipped weights/clip, trained by vqclip on its shapes world].
    #[arg(long, value_name = "DIR", env = "VQCLIP_CLIP")]
    pub clip: Option<PathBuf>,
    /// Storage precision of CLIP: f32, or f16 (needs an adapter with SHADER_F16, see
    /// `vqclip info`). f16 stores the linear-layer weights (attention projections, MLPs,
    /// the two output projections) in f16, half their memory and weight traffic; on GPUs,
    /// when no gradient is needed (embed, classify, search), the encoder's activations
    /// between kernels are f16 too (CPU adapters keep them f32, which is faster there;
    /// VQCLIP_F16_ACTIVATIONS=on|off overrides). Kernels widen f16 to f32 as they read it: arithmetic,
    /// accumulation, biases, norms and embeddings stay f32, so this saves memory and
    /// memory traffic, not arithmetic. On the test checkpoints embeddings stay within a
    /// cosine of 0.999 of f32. Inference and generation only (no training).
    #[arg(long, value_enum, value_name = "PRECISION", default_value_t = Precision::F32)]
    pub precision: Precision,
}

impl ClipArgs {
    /// `--clip`, else the shipped model's folder.
    pub fn dir(&self) -> Result<PathBuf> {
        Ok(vqclip::weights::shipped::clip_dir_or(self.clip.as_deref())?)
    }

    /// Opens the device and loads the model at `--precision`.
    pub fn load(&self, dev: &DeviceArgs) -> Result<ClipModel> {
        let dir = self.dir()?;
        let gpu = dev.open()?;
        ClipModel::load_with(&dir, &gpu, self.precision)
            .with_context(|| format!("cannot load the CLIP model in {}", dir.display()))
    }
}

/// The texts, each checked to hold something to encode.
pub fn check_texts(texts: &[String], what: &str) -> Result<()> {
    for t in texts {
        if t.trim().is_empty() {
            bail!("{what} is empty: give some text to encode");
        }
    }
    Ok(())
}

/// Warns (on stderr) about each text longer than the model's context, which is truncated
/// as transformers truncates it.
pub fn warn_truncated(model: &ClipModel, texts: &[String]) -> Result<()> {
    if texts.is_empty() {
        return Ok(());
    }
    let tok = model.tokenizer()?;
    for t in texts {
        if tok.encode_checked(t)?.1 {
            let short: String = t.chars().take(40).collect();
            eprintln!(
                "warning: \"{short}…\" is longer than the model's {} tokens; the rest is \
                 dropped",
                tok.context_length()
            );
        }
    }
    Ok(())
}

/// Decodes every image, failing on the first that cannot be read.
pub fn load_images(paths: &[PathBuf]) -> Result<Vec<image::RgbImage>> {
    paths.iter().map(|p| Ok(load_image(p)?)).collect()
}
