//! `vqclip classify`: zero-shot classification of images against text labels.

use super::clip_args::{check_texts, load_images, ClipArgs};
use super::DeviceArgs;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ClassifyArgs {
    #[command(flatten)]
    clip: ClipArgs,
    /// Comma-separated labels, e.g. "a photo of a cat,a photo of a dog".
    #[arg(long, value_name = "LABELS")]
    labels: String,
    /// Images to classify.
    #[arg(value_name = "IMAGE", required = true)]
    images: Vec<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Splits the `--labels` list; empty entries are an error.
fn parse_labels(s: &str) -> Result<Vec<String>> {
    if s.trim().is_empty() {
        bail!("--labels is empty: give comma-separated labels, e.g. --labels \"a cat,a dog\"");
    }
    let labels: Vec<String> = s.split(',').map(|l| l.trim().to_string()).collect();
    if labels.iter().any(String::is_empty) {
        bail!("--labels {s:?} has an empty label (two commas in a row, or a comma at an end)");
    }
    check_texts(&labels, "a label")?;
    Ok(labels)
}

pub fn run(dev: &DeviceArgs, a: ClassifyArgs) -> Result<()> {
    let labels = parse_labels(&a.labels)?;
    let model = a.clip.load(dev)?;
    let images = load_images(&a.images)?;
    let text = model.encode_text(&labels)?;
    let img = model.encode_image(&model.pixel_values(&images)?)?;
    // Softmax over labels of logit_scale · cosine, as CLIPModel's logits_per_image.
    let logits = model.logits_per_image(&img, &text)?;
    let probs = vqclip::ops::softmax(&logits)?.to_vec()?;
    let logits = logits.to_vec()?;
    let n = labels.len();
    #[derive(serde::Serialize)]
    struct Scored<'a> {
        label: &'a str,
        probability: f32,
        logit: f32,
    }
    #[derive(serde::Serialize)]
    struct PerImage<'a> {
        image: String,
        labels: Vec<Scored<'a>>,
    }
    let results: Vec<PerImage> = a
        .images
        .iter()
        .enumerate()
        .map(|(i, path)| {
            let mut ranked: Vec<Scored> = (0..n)
                .map(|j| Scored {
                    label: &labels[j],
                    probability: probs[i * n + j],
                    logit: logits[i * n + j],
                })
                .collect();
            ranked.sort_by(|x, y| y.probability.total_cmp(&x.probability));
            PerImage {
                image: path.display().to_string(),
                labels: ranked,
            }
        })
        .collect();
    if a.json {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            results: Vec<PerImage<'a>>,
        }
        println!("{}", serde_json::to_string_pretty(&Out { results })?);
        return Ok(());
    }
    for r in &results {
        println!("{}", r.image);
        for s in &r.labels {
            println!("  {:6.2}%  {}", s.probability * 100.0, s.label);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_labels;

    #[test]
    fn labels_are_split_and_checked() {
        assert_eq!(parse_labels(" a cat , a dog").unwrap(), ["a cat", "a dog"]);
        assert_eq!(parse_labels("one").unwrap(), ["one"]);
        for bad in ["", "  ", "a,,b", "a,", ",a"] {
            assert!(parse_labels(bad).is_err(), "{bad:?}");
        }
    }
}
