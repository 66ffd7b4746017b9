//! Timing of the parts of one CLIP training step on the shapes world at the default size
//! (vision forward, text forward, loss + backward, full step), three times.
//!
//! Run: `cargo run --release --example clip_step_timing` (batch size from `B`, default 64;
//! device from `VQCLIP_BACKEND` / `VQCLIP_ADAPTER`).

use anyhow::{Context, Result};
use vqclip::autodiff::Tape;
use vqclip::generate::Perceptor;
use vqclip::train::clip::{
    batch, contrastive_loss, shapes_config, shapes_tokenizer, text_features, Augment, ClipTrainer,
};
use vqclip::{DeviceOptions, Gpu};

fn main() -> Result<()> {
    let vocab_size = shapes_tokenizer(16)?.vocab_size();
    let g = Gpu::new(&DeviceOptions::from_env()?)?;
    let cfg = shapes_config(vocab_size);
    let b: usize = std::env::var("B")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let mut tr = ClipTrainer::new(cfg.clone(), 1, 1e-3, &g)?;
    let t = std::time::Instant::now();
    let (px, caps) = batch(&g, 0, 1, 0, b, cfg.vision.image_size, &Augment::default())?;
    eprintln!("batch {:.3}s", t.elapsed().as_secs_f64());
    for _ in 0..3 {
        let tape = Tape::training();
        let t = std::time::Instant::now();
        let img = Perceptor::encode_image(&tr.model, &tape, &tape.leaf(px.clone(), false))?;
        img.value().to_vec()?;
        let t1 = t.elapsed().as_secs_f64();
        let ids = tr.model.tokenize(&caps)?;
        let txt = text_features(&tape, &tr.model, &ids)?;
        txt.value().to_vec()?;
        let t2 = t.elapsed().as_secs_f64();
        let (loss, _) = contrastive_loss(&tape, &img, &txt, &tape.param(&tr.logit_scale))?;
        let grads = tape.backward(&loss)?;
        grads
            .param(&tape, &tr.logit_scale)
            .context("no gradient for logit_scale")?
            .to_vec()?;
        let t3 = t.elapsed().as_secs_f64();
        drop(grads);
        let t = std::time::Instant::now();
        tr.step(&px, &caps, &[], 1e-3)?;
        eprintln!(
            "vision fwd {t1:.3}s text fwd {:.3}s loss+backward {:.3}s | full step {:.3}s",
            t2 - t1,
            t3 - t2,
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
