//! `vqclip convert`: a taming VQGAN `.ckpt` to `.safetensors`, with its `.yaml` beside it.

use super::reconstruct::{resolve_config, write_atomic};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use vqclip::models::vqgan::{self, VqGanConfig};
use vqclip::weights::torch::TorchCheckpoint;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The taming-transformers checkpoint (.ckpt).
    input: PathBuf,
    /// Its taming .yaml config (default: the .yaml next to the checkpoint, same name).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output .safetensors; the config is copied next to it with the same name and .yaml.
    #[arg(short, long)]
    output: PathBuf,
}

pub fn run(a: ConvertArgs) -> Result<()> {
    if a.output
        .extension()
        .is_none_or(|e| !e.eq_ignore_ascii_case("safetensors"))
    {
        bail!(
            "the output {} should end in .safetensors",
            a.output.display()
        );
    }
    let config = resolve_config(&a.input, a.config.as_deref())?;
    // Parse it first: a config that is not a VQGAN config is an error before any writing.
    VqGanConfig::from_file(&config)?;
    let ck = TorchCheckpoint::open(&a.input)?;
    let yaml_out = a.output.with_extension("yaml");
    let n = vqgan::write_safetensors(&ck, &a.output)?;
    let same = std::fs::canonicalize(&config).ok() == std::fs::canonicalize(&yaml_out).ok();
    if !same {
        write_atomic(&yaml_out, |tmp| {
            std::fs::copy(&config, tmp)
                .map(|_| ())
                .with_context(|| format!("copying {}", config.display()))
        })?;
    }
    eprintln!(
        "wrote {} ({} tensors) and {}",
        a.output.display(),
        n,
        yaml_out.display()
    );
    Ok(())
}
