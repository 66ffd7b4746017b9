//! `vqclip search`: rank a folder's images against a text or an image.

use super::clip_args::{check_texts, warn_truncated, ClipArgs};
use super::{values, DeviceArgs};
use anyhow::{bail, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use vqclip::models::clip::load_image;
use vqclip::search::{is_image_path, model_fingerprint, ImageIndex};

#[derive(Args, Debug)]
pub struct SearchArgs {
    #[command(flatten)]
    clip: ClipArgs,
    /// The folder of images to search (indexed into FOLDER/.vqclip-index.sqlite, or into the
    /// per-user cache when the folder is read-only; only new or changed files are encoded on
    /// later runs).
    #[arg(long, value_name = "FOLDER")]
    dir: PathBuf,
    /// Keep the index in this file instead.
    #[arg(long, value_name = "PATH")]
    index: Option<PathBuf>,
    /// A text, or the path of an image to find similar images to.
    #[arg(value_name = "QUERY")]
    query: String,
    /// How many results to show.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Images per encoder batch while indexing.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(dev: &DeviceArgs, a: SearchArgs) -> Result<()> {
    check_texts(std::slice::from_ref(&a.query), "the query")?;
    if a.top == 0 {
        bail!("--top must be at least 1");
    }
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    values::at_most(
        "--batch",
        a.batch,
        values::MAX_BATCH,
        "a batch is encoded at once",
    )?;
    if !a.dir.is_dir() {
        bail!("--dir {}: not a folder", a.dir.display());
    }
    let query_path = PathBuf::from(&a.query);
    let image_query = query_path.is_file();
    if !image_query && is_image_path(&query_path) && a.query.len() < 4096 && !a.query.contains(' ')
    {
        // Looks like a file name but there is no such file: say so rather than search for the
        // text "cat.jpg".
        bail!(
            "query {:?} looks like an image path but there is no such file",
            a.query
        );
    }
    let model = a.clip.load(dev)?;
    let clip_dir = &a.clip.dir()?;
    // f16 gives (slightly) other embeddings: their index entries are their own, "-f16" for
    // f16 weights, "-f16a" for f16 weights and activations (the GPU default).
    let model_id = match (a.clip.precision, model.activations()) {
        (vqclip::Precision::F32, _) => model_fingerprint(clip_dir)?,
        (vqclip::Precision::F16, vqclip::DType::F16) => {
            format!("{}-f16a", model_fingerprint(clip_dir)?)
        }
        (vqclip::Precision::F16, _) => format!("{}-f16", model_fingerprint(clip_dir)?),
    };
    let dim = model.config.projection_dim;
    let mut index = match &a.index {
        Some(p) => ImageIndex::open_at(&a.dir, p, &model_id, dim)?,
        None => ImageIndex::open(&a.dir, &model_id, dim)?,
    };
    for note in index.notes() {
        eprintln!("warning: {note}");
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("indexing {bar:30} {pos}/{len} images ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let stats = index.update(&model, a.batch, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    for (path, why) in &stats.skipped {
        eprintln!("warning: skipped {}: {why}", a.dir.join(path).display());
    }
    if stats.model_changed {
        eprintln!("note: the index was made with another model; it was rebuilt");
    }
    eprintln!(
        "index {}: {} images ({} encoded now, {} removed, {} skipped)",
        index.db_path().display(),
        stats.indexed,
        stats.encoded,
        stats.removed,
        stats.skipped.len()
    );
    let q = if image_query {
        let img = load_image(&query_path)?;
        model.encode_image(&model.pixel_values(&[img])?)?
    } else {
        warn_truncated(&model, std::slice::from_ref(&a.query))?;
        model.encode_text(std::slice::from_ref(&a.query))?
    };
    let hits = index.search(&q, a.top)?;
    if a.json {
        #[derive(serde::Serialize)]
        struct Skipped<'a> {
            path: &'a str,
            error: &'a str,
        }
        #[derive(serde::Serialize)]
        struct Out<'a> {
            query: &'a str,
            query_kind: &'static str,
            results: &'a [vqclip::search::Hit],
            index: String,
            indexed: usize,
            encoded: usize,
            removed: usize,
            skipped: Vec<Skipped<'a>>,
        }
        let out = Out {
            query: &a.query,
            query_kind: if image_query { "image" } else { "text" },
            results: &hits,
            index: index.db_path().display().to_string(),
            indexed: stats.indexed,
            encoded: stats.encoded,
            removed: stats.removed,
            skipped: stats
                .skipped
                .iter()
                .map(|(path, error)| Skipped { path, error })
                .collect(),
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if hits.is_empty() {
        println!("no images indexed in {}", a.dir.display());
    }
    for (i, h) in hits.iter().enumerate() {
        println!(
            "{:3}. {:.4}  {}",
            i + 1,
            h.score,
            a.dir.join(&h.path).display()
        );
    }
    Ok(())
}
