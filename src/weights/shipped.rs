//! The models that ship with vqclip (under `weights/` in the repository, trained by vqclip
//! itself on its synthetic shapes world): where they are found when a command is given no
//! `--clip` / `--vqgan`.
//!
//! The folder is, in order: `$VQCLIP_WEIGHTS`; `weights/` in the current directory; a
//! `weights/` beside the executable or in one of its parent folders (a clone's
//! `target/release/vqclip` finds the clone's `weights/`); the source tree it was built from.

use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The shipped CLIP's folder name under the weights folder.
pub const CLIP_DIR: &str = "clip";
/// The shipped VQGAN's weights, relative to the weights folder (its `.yaml` sits beside it).
pub const VQGAN_FILE: &str = "vqgan/shapes.safetensors";

fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(dir) = std::env::var_os("VQCLIP_WEIGHTS").filter(|d| !d.is_empty()) {
        out.push(PathBuf::from(dir));
        return out;
    }
    if let Ok(cwd) = std::env::current_dir() {
        out.push(cwd.join("weights"));
    }
    if let Ok(exe) = std::env::current_exe() {
        out.extend(exe.ancestors().skip(1).take(4).map(|d| d.join("weights")));
    }
    out.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("weights"));
    out
}

fn find(rel: &str, what: &str, flag: &str) -> Result<PathBuf> {
    let tried = candidates();
    for dir in &tried {
        let p = dir.join(rel);
        if p.exists() {
            return Ok(p);
        }
    }
    let list = tried
        .iter()
        .map(|d| d.join(rel).display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    Err(Error::invalid(format!(
        "no {what} given and the shipped one was not found (looked at {list}); pass {flag} or \
         set VQCLIP_WEIGHTS to the repository's weights/ folder"
    )))
}

/// The shipped CLIP folder (a Hugging Face CLIP folder).
pub fn clip_dir() -> Result<PathBuf> {
    find(CLIP_DIR, "CLIP model", "--clip DIR")
}

/// The shipped VQGAN's `.safetensors` (its `.yaml` config is beside it).
pub fn vqgan_file() -> Result<PathBuf> {
    find(VQGAN_FILE, "VQGAN", "--vqgan FILE")
}

/// `given` (a `--clip` argument), else the shipped CLIP folder.
pub fn clip_dir_or(given: Option<&Path>) -> Result<PathBuf> {
    given.map_or_else(clip_dir, |p| Ok(p.to_path_buf()))
}

/// `given` (a `--vqgan` argument), else the shipped VQGAN.
pub fn vqgan_file_or(given: Option<&Path>) -> Result<PathBuf> {
    given.map_or_else(vqgan_file, |p| Ok(p.to_path_buf()))
}
