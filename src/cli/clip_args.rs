//! What the CLIP subcommands share: the `--clip DIR` argument, loading, input checks.

use super::DeviceArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use vqclip::models::clip::{load_image, ClipModel};

/// `--clip DIR`.
#[derive(Args, Debug, Clone)]
pub struct ClipArgs {
    /// A Hugging Face CLIP folder: config.json, model.safetensors, and tokenizer.json (or
    /// vocab.json + merges.txt), e.g. a download of openai/clip-vit-base-patch32.
    #[arg(long, value_name = "DIR", env = "VQCLIP_CLIP")]
    pub clip: Option<PathBuf>,
}

impl ClipArgs {
    /// Opens the device and loads the model.
    pub fn load(&self, dev: &DeviceArgs) -> Result<ClipModel> {
        let Some(dir) = &self.clip else {
            bail!(
                "no CLIP model given: pass --clip DIR (or set VQCLIP_CLIP), where DIR is a \
                 Hugging Face CLIP folder with config.json, model.safetensors and \
                 tokenizer.json, such as openai/clip-vit-base-patch32 (see the README section \
                 \"CLIP with real weights\"); vqclip does not ship a CLIP model yet"
            );
        };
        let gpu = dev.open()?;
        ClipModel::load(dir, &gpu)
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

/// Decodes every image, failing on the first that cannot be read.
pub fn load_images(paths: &[PathBuf]) -> Result<Vec<image::RgbImage>> {
    paths.iter().map(|p| Ok(load_image(p)?)).collect()
}
