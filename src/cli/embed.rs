//! `vqclip embed`: L2-normalised CLIP embeddings of texts and images.

use super::clip_args::{load_images, warn_truncated, ClipArgs};
use super::DeviceArgs;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct EmbedArgs {
    #[command(flatten)]
    clip: ClipArgs,
    /// A text to embed (repeatable; "" is embedded as transformers embeds it, from the
    /// start and end tokens alone).
    #[arg(long = "text", value_name = "TEXT")]
    texts: Vec<String>,
    /// An image file to embed (repeatable).
    #[arg(long = "image", value_name = "PATH")]
    images: Vec<PathBuf>,
    /// Print {"text_embeds": [[..]], "image_embeds": [[..]]}, each in argument order.
    #[arg(long)]
    json: bool,
}

pub fn run(dev: &DeviceArgs, a: EmbedArgs) -> Result<()> {
    if a.texts.is_empty() && a.images.is_empty() {
        bail!("nothing to embed: give --text TEXT and/or --image PATH (both repeatable)");
    }
    // No emptiness check: transformers embeds "" as <|startoftext|><|endoftext|>, and people
    // use it (a null prompt, an empty caption in a batch).
    let model = a.clip.load(dev)?;
    warn_truncated(&model, &a.texts)?;
    // Decode everything before any GPU work so that a bad file fails fast.
    let images = load_images(&a.images)?;
    let p = model.config.projection_dim;
    let rows = |v: Vec<f32>| -> Vec<Vec<f32>> { v.chunks(p).map(<[f32]>::to_vec).collect() };
    let text_embeds = if a.texts.is_empty() {
        vec![]
    } else {
        rows(model.encode_text(&a.texts)?.to_vec()?)
    };
    let image_embeds = if images.is_empty() {
        vec![]
    } else {
        rows(
            model
                .encode_image(&model.pixel_values(&images)?)?
                .to_vec()?,
        )
    };
    if a.json {
        // A struct rather than json!(): f32 values print with their own shortest digits.
        #[derive(serde::Serialize)]
        struct Out {
            text_embeds: Vec<Vec<f32>>,
            image_embeds: Vec<Vec<f32>>,
        }
        let out = Out {
            text_embeds,
            image_embeds,
        };
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    let show = |e: &[f32]| {
        let head: Vec<String> = e.iter().take(6).map(|x| format!("{x:+.4}")).collect();
        format!("[{}, … ] ({p} values, L2-normalised)", head.join(", "))
    };
    for (t, e) in a.texts.iter().zip(&text_embeds) {
        println!("text  {t:?}: {}", show(e));
    }
    for (path, e) in a.images.iter().zip(&image_embeds) {
        println!("image {}: {}", path.display(), show(e));
    }
    Ok(())
}
