//! Writes training batches and the held-out evaluation set of the shapes world as raw bytes
//! for a peer trainer (tools/clip_shapes_peer.py).
//!
//! Run: `EXPORT_DIR=/tmp/shapes STEPS=600 BATCH=32 cargo run --release --example
//! export_shapes_pairs` (also `SIZE`, default 64; `SEED`, default 0; `NO_AUGMENT=1`).
//! Files: `train.u8` `[STEPS·BATCH, S, S, 3]` (the augmented pixels, de-normalised to bytes),
//! `train.txt` (one caption a line), `eval.u8` `[400, S, S, 3]`, `eval.json` (per image the
//! candidate captions of `evaluate` and the right index).

use anyhow::{Context, Result};
use vqclip::data::shapes::{Colour, ShapeKind, ShapesDataset, Split};
use vqclip::train::clip::{batch, Augment, MEAN, STD};
use vqclip::{DeviceOptions, Gpu};

fn main() -> Result<()> {
    let g = Gpu::new(&DeviceOptions::from_env()?)?;
    let dir = std::path::PathBuf::from(
        std::env::var("EXPORT_DIR").context("set EXPORT_DIR to the output folder")?,
    );
    let env = |k: &str, d: usize| -> usize {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (steps, b, size) = (env("STEPS", 600), env("BATCH", 32), env("SIZE", 64));
    let seed = env("SEED", 0) as u64;
    let aug = if env("NO_AUGMENT", 0) == 1 {
        Augment::none()
    } else {
        Augment::default()
    };
    std::fs::create_dir_all(&dir)?;
    let to_bytes = |chw: &[f32], out: &mut Vec<u8>| {
        for p in 0..size * size {
            for c in 0..3 {
                let v = chw[c * size * size + p] * STD[c] + MEAN[c];
                out.push((v * 255.0).round().clamp(0.0, 255.0) as u8);
            }
        }
    };
    let mut bytes = Vec::new();
    let mut caps = String::new();
    for s in 0..steps {
        let (px, cs) = batch(&g, 0, seed, s, b, size, &aug)?;
        let px = px.to_vec()?;
        for i in 0..b {
            to_bytes(
                &px[i * 3 * size * size..(i + 1) * 3 * size * size],
                &mut bytes,
            );
            caps.push_str(&cs[i]);
            caps.push('\n');
        }
    }
    std::fs::write(dir.join("train.u8"), &bytes)?;
    std::fs::write(dir.join("train.txt"), caps)?;
    // The held-out set exactly as `evaluate` builds it.
    let ds = ShapesDataset::new(0, Split::HeldOut);
    let (mut i, mut bytes, mut items) = (0u64, Vec::new(), Vec::new());
    while items.len() < 400 {
        let (scene, _) = ds.sample(i);
        let v = (i % 4) as usize;
        i += 1;
        if scene.shapes.len() != 1 {
            continue;
        }
        bytes.extend(scene.render(size));
        let sh = scene.shapes[0];
        let with = |colour: Colour, kind: ShapeKind| {
            let mut s = scene.clone();
            s.shapes[0].colour = colour;
            s.shapes[0].kind = kind;
            s.caption(v)
        };
        items.push(serde_json::json!({
            "colour": Colour::ALL.iter().map(|&c| with(c, sh.kind)).collect::<Vec<_>>(),
            "colour_idx": Colour::ALL.iter().position(|&c| c == sh.colour),
            "shape": ShapeKind::ALL.iter().map(|&k| with(sh.colour, k)).collect::<Vec<_>>(),
            "shape_idx": ShapeKind::ALL.iter().position(|&k| k == sh.kind),
        }));
    }
    std::fs::write(dir.join("eval.u8"), &bytes)?;
    std::fs::write(dir.join("eval.json"), serde_json::to_string(&items)?)?;
    Ok(())
}
