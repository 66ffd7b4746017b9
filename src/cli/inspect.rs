//! `vqclip inspect`: every layer's attention and hidden states of CLIP for some texts and
//! images, rollout and relevance maps, statistics, a logit lens, and (with `--vqgan`) the
//! images' code maps, written into one folder.

use super::clip_args::{load_images, warn_truncated, ClipArgs};
use super::reconstruct::resolve_config;
use super::DeviceArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use vqclip::inspect::{self, folder, summary};
use vqclip::models::vqgan::VqGan;

#[derive(Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    clip: ClipArgs,
    /// Also show each image's VQGAN code map (one colour per code) beside its
    /// reconstruction: taming .ckpt or .safetensors weights, with the .yaml config beside
    /// them (e.g. the shipped weights/vqgan/shapes.safetensors).
    #[arg(long, value_name = "FILE")]
    vqgan: Option<PathBuf>,
    /// A text to inspect, run alone and unpadded (repeatable).
    #[arg(long = "text", value_name = "TEXT")]
    texts: Vec<String>,
    /// An image file to inspect (repeatable).
    #[arg(long = "image", value_name = "PATH")]
    images: Vec<PathBuf>,
    /// The folder to write: tensors.safetensors, summary.json, PNGs, report.html. It must
    /// not exist, be empty, or hold an earlier inspect output (replaced whole).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Also print summary.json to stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(dev: &DeviceArgs, a: InspectArgs) -> Result<()> {
    if a.texts.is_empty() && a.images.is_empty() {
        bail!("nothing to inspect: give --text TEXT and/or --image PATH (both repeatable)");
    }
    folder::check_destination(&a.out)?;
    // Decode everything before any GPU work so that a bad file fails fast.
    let images = load_images(&a.images)?;
    let model = a.clip.load(dev)?;
    warn_truncated(&model, &a.texts)?;
    let vq = match &a.vqgan {
        Some(w) => {
            let config = resolve_config(w, None)?;
            Some(
                VqGan::load(w, &config, model.gpu())
                    .with_context(|| format!("cannot load the VQGAN {}", w.display()))?,
            )
        }
        None => None,
    };
    let bar = indicatif::ProgressBar::new(inspect::work_units(a.texts.len(), images.len()));
    bar.set_style(
        indicatif::ProgressStyle::with_template("inspect {bar:30} {pos}/{len} {msg} ({elapsed})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let ins = inspect::inspect(&model, &a.texts, &images, vq.as_ref(), &mut |what| {
        bar.set_message(what.to_string());
        bar.inc(1);
    });
    bar.finish_and_clear();
    let ins = ins?;
    let sources: Vec<String> = a.images.iter().map(|p| p.display().to_string()).collect();
    let summary = summary::summarize(&model, &ins, &sources)?;
    let pictures = folder::pictures(&ins)?;
    let title = format!("vqclip inspect: {}", a.clip.dir()?.display());
    folder::write(&a.out, &ins, &summary, &pictures, &title)
        .with_context(|| format!("writing {}", a.out.display()))?;
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    }
    eprintln!(
        "wrote {}: tensors.safetensors, summary.json, report.html and {} pictures",
        a.out.display(),
        pictures.len()
    );
    Ok(())
}
