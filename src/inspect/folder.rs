//! The output folder of `inspect`: `tensors.safetensors`, `summary.json`, the PNGs and
//! `report.html`, built in a hidden temporary folder beside the destination and renamed into
//! place at the end, so that a failure never leaves a folder that looks complete.

use super::summary::Summary;
use super::{picture, report, Inspection};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Files every complete output folder holds; a non-empty folder is only replaced when it
/// has them (an earlier `inspect` output), never an unrelated folder.
const MARKERS: [&str; 2] = ["summary.json", "tensors.safetensors"];

/// A picture of the report: file name, caption, PNG bytes.
pub struct Picture {
    /// File name in the folder.
    pub name: String,
    /// What it shows.
    pub caption: String,
    /// PNG bytes.
    pub png: Vec<u8>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Checks that `out` can become the output folder: it does not exist, or is an empty
/// folder, or an earlier `inspect` output (which is replaced whole).
pub fn check_destination(out: &Path) -> Result<()> {
    if out.as_os_str().is_empty() {
        return Err(Error::invalid("--out is empty: name the folder to write"));
    }
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        return Err(Error::invalid(format!(
            "{} exists and is not a folder; --out names a folder to create",
            out.display()
        )));
    }
    let empty = std::fs::read_dir(out).map_err(io(out))?.next().is_none();
    if empty || MARKERS.iter().all(|m| out.join(m).is_file()) {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{} is a folder that holds other files (not an earlier inspect output); choose a new \
         folder",
        out.display()
    )))
}

/// The pictures of `ins`: per image its rollout, per text its relevance, its heads' grid
/// and its VQGAN view; per text its last layer's token-to-token attention.
pub fn pictures(ins: &Inspection) -> Result<Vec<Picture>> {
    let g = ins.grid;
    let mut out = Vec::new();
    let mut add = |name: String, caption: String, img: image::RgbImage| -> Result<()> {
        out.push(Picture {
            name,
            caption,
            png: picture::png(&img)?,
        });
        Ok(())
    };
    for (k, im) in ins.images.iter().enumerate() {
        add(
            format!("image{k}_rollout.png"),
            format!("image {k}: attention rollout of the class token over the patches"),
            picture::overlay(&im.view, &im.rollout, g)?,
        )?;
        for (j, r) in im.relevance.iter().enumerate() {
            add(
                format!("image{k}_relevance_text{j}.png"),
                format!(
                    "image {k}: gradient-weighted relevance for text {j} ({:?})",
                    ins.texts.get(j).map_or("", |t| t.text.as_str())
                ),
                picture::overlay(&im.view, r, g)?,
            )?;
        }
        let probs = im
            .attentions
            .iter()
            .map(crate::Tensor::to_vec)
            .collect::<Result<Vec<_>>>()?;
        add(
            format!("image{k}_heads.png"),
            format!(
                "image {k}: class-token attention over the patches, one row per layer (first \
                 at the top), one column per head"
            ),
            picture::head_grid(&probs, im.attentions.first().map_or(1, |a| a.dim(0)), g)?,
        )?;
        if let Some(vq) = &im.vq {
            let big = picture::enlarge(&vq.input);
            let (w, h) = big.dimensions();
            let codes = picture::code_map(&vq.codes, vq.grid, w, h)?;
            let recon = image::imageops::resize(
                &vq.reconstruction,
                w,
                h,
                image::imageops::FilterType::Nearest,
            );
            add(
                format!("image{k}_vqgan.png"),
                format!(
                    "image {k}: the VQGAN's input, its {}x{} code map (one colour per code) and \
                     its reconstruction",
                    vq.grid.1, vq.grid.0
                ),
                picture::tile(&[big, codes, recon], 3),
            )?;
        }
    }
    for (k, t) in ins.texts.iter().enumerate() {
        if let Some(last) = t.attentions.last() {
            let n = t.ids.len();
            add(
                format!("text{k}_attention.png"),
                format!(
                    "text {k} ({:?}): last layer's token-to-token attention (rows: queries, \
                     columns: keys), one square per head",
                    t.text
                ),
                picture::token_attention(&last.to_vec()?, last.dim(0), n)?,
            )?;
        }
    }
    Ok(out)
}

/// `tensors.safetensors` of `ins`, with transformers' names (see the crate README).
pub fn tensors(ins: &Inspection) -> Result<Vec<u8>> {
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut put = |name: String, t: &crate::Tensor| -> Result<()> {
        data.push((
            name,
            t.shape().to_vec(),
            bytemuck::cast_slice(&t.to_vec()?).to_vec(),
        ));
        Ok(())
    };
    let mut embeds: Vec<(String, Vec<f32>)> = Vec::new();
    for (k, t) in ins.texts.iter().enumerate() {
        for (l, a) in t.attentions.iter().enumerate() {
            put(format!("text.{k}.attentions.{l}"), a)?;
        }
        for (l, h) in t.hidden_states.iter().enumerate() {
            put(format!("text.{k}.hidden_states.{l}"), h)?;
        }
        embeds.push((format!("text.{k}.embeds"), t.embeds.clone()));
    }
    for (k, im) in ins.images.iter().enumerate() {
        for (l, a) in im.attentions.iter().enumerate() {
            put(format!("image.{k}.attentions.{l}"), a)?;
        }
        for (l, h) in im.hidden_states.iter().enumerate() {
            put(format!("image.{k}.hidden_states.{l}"), h)?;
        }
        embeds.push((format!("image.{k}.embeds"), im.embeds.clone()));
    }
    for (name, e) in embeds {
        data.push((name, vec![e.len()], bytemuck::cast_slice(&e).to_vec()));
    }
    let views = data
        .iter()
        .map(|(k, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::invalid(format!("tensor '{k}': {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = std::collections::HashMap::from([(
        "generator".to_string(),
        format!("vqclip {} inspect", crate::VERSION),
    )]);
    safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::invalid(format!("writing tensors.safetensors: {e}")))
}

/// Writes the whole output folder `out` (see the module doc): tensors, summary, pictures,
/// report. `title` heads the report.
pub fn write(
    out: &Path,
    ins: &Inspection,
    summary: &Summary,
    pictures: &[Picture],
    title: &str,
) -> Result<()> {
    check_destination(out)?;
    let json = serde_json::to_vec_pretty(summary)
        .map_err(|e| Error::invalid(format!("summary.json: {e}")))?;
    let html = report::html(title, summary, pictures);
    let mut files: Vec<(&str, &[u8])> =
        vec![("summary.json", &json), ("report.html", html.as_bytes())];
    let tensors = tensors(ins)?;
    files.push(("tensors.safetensors", &tensors));
    for p in pictures {
        files.push((&p.name, &p.png));
    }
    write_folder(out, &files)
}

/// Writes `files` into a new folder `out`, atomically (a complete folder or none).
pub fn write_folder(out: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    use std::io::Write;
    check_destination(out)?;
    let name = out
        .file_name()
        .ok_or_else(|| Error::invalid(format!("{} is not a folder name", out.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempdir_in(&parent)
        .map_err(io(&parent))?;
    for (file, bytes) in files {
        let path = tmp.path().join(file);
        let mut f = std::fs::File::create(&path).map_err(io(&path))?;
        f.write_all(bytes).map_err(io(&path))?;
        f.sync_all().map_err(io(&path))?;
    }
    // An earlier output moves aside first (rename cannot replace a non-empty folder) and is
    // removed once the new one is in place.
    let old = if out.is_dir() && std::fs::read_dir(out).map_err(io(out))?.next().is_some() {
        let aside = tempfile::Builder::new()
            .prefix(&format!(".{name}.old."))
            .suffix(".tmp")
            .tempdir_in(&parent)
            .map_err(io(&parent))?
            .keep();
        std::fs::rename(out, &aside).map_err(io(out))?;
        Some(aside)
    } else {
        None
    };
    let built = tmp.keep();
    if let Err(e) = std::fs::rename(&built, out) {
        let _ = std::fs::remove_dir_all(&built);
        if let Some(old) = &old {
            let _ = std::fs::rename(old, out);
        }
        return Err(io(out)(e));
    }
    if let Some(old) = old {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_appears_whole_and_replaces_only_an_earlier_output() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        let a: &[u8] = b"{}";
        write_folder(&out, &[("summary.json", a), ("tensors.safetensors", a)]).unwrap();
        assert!(out.join("summary.json").is_file());
        // Replaced whole: the file the new output lacks is gone.
        write_folder(
            &out,
            &[("summary.json", a), ("tensors.safetensors", a), ("x", a)],
        )
        .unwrap();
        write_folder(&out, &[("summary.json", a), ("tensors.safetensors", a)]).unwrap();
        assert!(!out.join("x").exists());
        // Only the output folder is left beside it: no temporary folders.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        // A folder of other files, and a file, are refused and left alone.
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("keep.txt"), "mine").unwrap();
        assert!(write_folder(&other, &[("summary.json", a)]).is_err());
        assert_eq!(
            std::fs::read_to_string(other.join("keep.txt")).unwrap(),
            "mine"
        );
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let e = write_folder(&file, &[("summary.json", a)]).unwrap_err();
        assert!(e.to_string().contains("not a folder"), "{e}");
    }
}
