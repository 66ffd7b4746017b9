//! `vqclip train vqgan` and `vqclip eval vqgan`.

use super::{values, DeviceArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;
use vqclip::models::vqgan::config::VqGanConfig;
use vqclip::models::vqgan::{config_beside, VqGan};
use vqclip::train::vqgan::{evaluate, small_config, taming_yaml, tiny_config, RunConfig, Trainer};
use vqclip::train::{download, write_atomic, write_safetensors};

/// Options of `vqclip train vqgan`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Output folder: checkpoints (state.safetensors) and the final NAME.safetensors + .yaml.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Total optimiser steps [default: 300].
    #[arg(long)]
    steps: Option<u32>,
    /// Images per step [default: 2].
    #[arg(long)]
    batch: Option<u32>,
    /// Peak learning rate (Adam; warm-up then cosine to 5%) [default: 0.002].
    #[arg(long, value_parser = values::positive_f32)]
    lr: Option<f32>,
    /// Seed of the initial weights and code restarts [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Model layout: "small" (the shipped f4 model), "tiny", or a taming .yaml file
    /// [default: small].
    #[arg(long, value_name = "small|tiny|YAML")]
    config: Option<String>,
    /// Warm-up steps [default: 20].
    #[arg(long)]
    warmup: Option<u32>,
    /// Re-seed codebook entries unused for this many steps (0: never) [default: 100].
    #[arg(long)]
    restart_after: Option<u32>,
    /// Train on random crops of this side (0: whole images) [default: 0]. Whole images
    /// train better: with one channel per GroupNorm group, colour reaches the output through
    /// the zero-padding border patterns, which crops change.
    #[arg(long)]
    crop: Option<u32>,
    /// Save a resumable checkpoint (DIR/state.safetensors) every N steps (0: only at the end).
    #[arg(long, default_value_t = 250)]
    save_every: usize,
    /// Continue from DIR/state.safetensors (its config, batch, lr and seed; --steps may
    /// extend the run, which then differs from an uninterrupted one).
    #[arg(long)]
    resume: bool,
    /// Append one JSON line per step (step, loss, rec, codebook, commit, psnr, codes_used,
    /// restarted, lr, seconds) to this file.
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// Base name of the final files [default: shapes_f<factor>].
    #[arg(long)]
    name: Option<String>,
    /// Held-out images measured at the end (0: skip).
    #[arg(long, default_value_t = 256)]
    eval_images: usize,
    /// Fit the run into this many seconds of training: after the first 25 steps the step
    /// count is cut to what fits (the learning-rate schedule follows), and the run ends at
    /// the limit in any case.
    #[arg(long, value_name = "SECONDS", value_parser = values::seconds)]
    time_limit: Option<f64>,
}

/// Options of `vqclip eval vqgan`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// VQGAN weights (.safetensors or .ckpt) [default: the shipped weights/vqgan/shapes.safetensors].
    #[arg(long, value_name = "FILE", env = "VQCLIP_VQGAN")]
    vqgan: Option<PathBuf>,
    /// The model's .yaml config (default: the .yaml beside the weights).
    #[arg(long, value_name = "YAML")]
    config: Option<PathBuf>,
    /// Held-out images to measure.
    #[arg(long, default_value_t = 256)]
    n: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn model_config(spec: &str) -> Result<VqGanConfig> {
    Ok(match spec {
        "small" => small_config(),
        "tiny" => tiny_config(),
        path => VqGanConfig::from_file(path).with_context(|| {
            format!("--config '{path}' is neither small, tiny nor a taming .yaml")
        })?,
    })
}

fn positive(v: Option<u32>, what: &str) -> Result<()> {
    if v == Some(0) {
        bail!("--{what} must be at least 1");
    }
    Ok(())
}

/// Runs `vqclip train vqgan`.
pub fn train(device: &DeviceArgs, a: TrainArgs) -> Result<()> {
    let us = |v: Option<u32>| v.map(|v| v as usize);
    positive(a.steps, "steps")?;
    positive(a.batch, "batch")?;
    let batch = a.batch.map_or(0, |b| b as usize);
    values::at_most(
        "--batch",
        batch,
        values::MAX_BATCH,
        "a batch trains at once",
    )?;
    if a.out.exists() && !a.out.is_dir() {
        bail!("--out {} exists and is not a folder", a.out.display());
    }
    let state = a.out.join("state.safetensors");
    let gpu = device.open()?;
    let (mut trainer, mut run, mut seconds) = if a.resume {
        if !state.is_file() {
            bail!(
                "--resume: no checkpoint at {} (train without --resume first)",
                state.display()
            );
        }
        let (mut t, mut run, secs) = Trainer::resume(&state, &gpu)
            .with_context(|| format!("resuming from {}", state.display()))?;
        if let Some(c) = &a.config {
            if model_config(c)? != run.model {
                bail!("--config differs from the checkpoint's model; resume without --config");
            }
        }
        for (given, stored, what) in [
            (us(a.batch), run.batch, "batch"),
            (us(a.warmup), run.warmup, "warmup"),
            (us(a.restart_after), run.restart_after, "restart-after"),
        ] {
            if given.is_some_and(|g| g != stored) {
                bail!("--{what} differs from the checkpoint's ({stored}); resume without it");
            }
        }
        if us(a.crop).is_some_and(|c| Some(c).filter(|&c| c > 0) != run.crop) {
            bail!("--crop differs from the checkpoint's; resume without it");
        }
        if a.seed.is_some_and(|s| s != run.seed) {
            bail!(
                "--seed differs from the checkpoint's ({}); resume without it",
                run.seed
            );
        }
        if let Some(s) = us(a.steps) {
            run.steps = s;
        }
        if let Some(lr) = a.lr {
            run.lr = lr;
        }
        t.schedule = run.schedule();
        eprintln!(
            "resumed at step {}/{} ({:.0} s trained so far)",
            t.step, run.steps, secs
        );
        (t, run, secs)
    } else {
        if state.exists() {
            bail!(
                "{} exists: pass --resume to continue it, or choose another --out",
                state.display()
            );
        }
        let run = RunConfig {
            model: model_config(a.config.as_deref().unwrap_or("small"))?,
            steps: us(a.steps).unwrap_or(300),
            batch: us(a.batch).unwrap_or(2),
            lr: a.lr.unwrap_or(2e-3),
            seed: a.seed.unwrap_or(0),
            warmup: us(a.warmup).unwrap_or(20),
            restart_after: us(a.restart_after).unwrap_or(100),
            crop: us(a.crop).filter(|&c| c > 0),
        };
        let t = run.start(&gpu)?;
        std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
        (t, run, 0.0)
    };
    let cfg = run.model.clone();
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| format!("shapes_f{}", cfg.downsampling_factor()));
    eprintln!(
        "training VQGAN: {} parameters, {}x{} images, batch {}, {} steps, lr {}",
        trainer
            .model
            .params
            .iter()
            .map(|(_, t)| t.numel())
            .sum::<usize>(),
        cfg.dd.resolution,
        cfg.dd.resolution,
        run.batch,
        run.steps,
        run.lr
    );
    let bar = indicatif::ProgressBar::new(run.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len}  {msg}  {per_sec}  eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(trainer.step as u64);
    let mut log = match &a.log {
        Some(p) => Some(
            vqclip::train::open_log_resumed(p, trainer.step)
                .with_context(|| format!("opening --log {}", p.display()))?,
        ),
        None => None,
    };
    let mut since = Instant::now();
    let mut ema: Option<f32> = None;
    let mut budget = a
        .time_limit
        .map(|t| vqclip::train::TimeBudget::new(t, trainer.step));
    while trainer.step < run.steps {
        let x = run.images(&gpu, trainer.step)?;
        let s = trainer.step(&x)?;
        if let Some(total) = budget
            .as_mut()
            .and_then(|b| b.observe(trainer.step, run.steps))
        {
            bar.suspend(|| {
                eprintln!(
                    "--time-limit: the run ends at step {total} instead of {}",
                    run.steps
                )
            });
            run.steps = total;
            trainer.schedule = run.schedule();
            bar.set_length(total as u64);
        }
        if !s.loss.is_finite() {
            bar.abandon();
            bail!(
                "the loss became {} at step {}: lower --lr and resume from the last checkpoint",
                s.loss,
                trainer.step
            );
        }
        let p = ema.map_or(s.psnr, |e| 0.95 * e + 0.05 * s.psnr);
        ema = Some(p);
        let live = trainer
            .last_used
            .iter()
            .filter(|&&u| u + 50 > trainer.step && u > 0)
            .count();
        bar.set_message(format!(
            "loss {:.4}  rec {:.4}  psnr {:.1} dB  codes {}/{} (batch {})  lr {:.2e}",
            s.loss, s.rec, p, live, cfg.n_embed, s.codes_used, s.lr
        ));
        bar.inc(1);
        let done = trainer.step;
        if let Some(f) = log.as_mut() {
            use std::io::Write;
            let line = serde_json::json!({
                "step": done, "loss": s.loss, "rec": s.rec, "codebook": s.codebook,
                "commit": s.commit, "psnr": s.psnr, "codes_used": s.codes_used,
                "live_codes": live, "restarted": s.restarted, "lr": s.lr,
                "seconds": seconds + since.elapsed().as_secs_f64(),
            });
            writeln!(f, "{line}").with_context(|| "writing --log")?;
        }
        if (a.save_every > 0 && done % a.save_every == 0) || done == run.steps {
            seconds += since.elapsed().as_secs_f64();
            since = Instant::now();
            trainer
                .save(&state, &run, seconds)
                .with_context(|| format!("writing {}", state.display()))?;
        }
    }
    bar.finish();
    seconds += since.elapsed().as_secs_f64();
    let weights = a.out.join(format!("{name}.safetensors"));
    let yaml = a.out.join(format!("{name}.yaml"));
    let meta = vec![
        ("format", "pt".to_string()),
        (
            "source",
            format!(
                "vqclip train vqgan: {} steps, batch {}, lr {}, seed {}, {:.0} s",
                run.steps, run.batch, run.lr, run.seed, seconds
            ),
        ),
    ];
    write_safetensors(&weights, &download(&trainer.model.params)?, &meta)?;
    write_atomic(&yaml, taming_yaml(&cfg, run.lr).as_bytes())?;
    println!(
        "wrote {} and {} ({} steps, {:.0} s of training)",
        weights.display(),
        yaml.display(),
        run.steps,
        seconds
    );
    if a.eval_images > 0 {
        let e = evaluate(&trainer.model, a.eval_images, 16)?;
        println!(
            "held-out PSNR {:.2} dB over {} images (mean per image {:.2}, worst {:.2}); {} of {} codes used",
            e.psnr, e.images, e.psnr_mean_per_image, e.psnr_min, e.codes_used, cfg.n_embed
        );
    }
    Ok(())
}

/// Runs `vqclip eval vqgan`.
pub fn eval(device: &DeviceArgs, a: EvalArgs) -> Result<()> {
    if a.n == 0 {
        bail!("--n must be at least 1");
    }
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    values::at_most(
        "--n",
        a.n,
        values::MAX_EVAL_IMAGES,
        "each image is rendered and scored",
    )?;
    values::at_most(
        "--batch",
        a.batch,
        values::MAX_BATCH,
        "a batch is decoded at once",
    )?;
    let weights = vqclip::weights::shipped::vqgan_file_or(a.vqgan.as_deref())?;
    if !weights.is_file() {
        bail!(
            "VQGAN weights {} not found (pass --vqgan FILE)",
            weights.display()
        );
    }
    let config = match &a.config {
        Some(c) => c.clone(),
        None => config_beside(&weights).with_context(|| {
            format!(
                "no config for {}: pass --config MODEL.yaml or put it beside the weights",
                weights.display()
            )
        })?,
    };
    let gpu = device.open()?;
    let vq = VqGan::load(&weights, &config, &gpu)
        .with_context(|| format!("loading {}", weights.display()))?;
    let t = Instant::now();
    let e = evaluate(&vq, a.n, a.batch)?;
    let secs = t.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "weights": weights.display().to_string(),
                "images": e.images,
                "resolution": vq.config.dd.resolution,
                "psnr_db": e.psnr,
                "psnr_mean_per_image_db": e.psnr_mean_per_image,
                "psnr_min_db": e.psnr_min,
                "codes_used": e.codes_used,
                "n_embed": vq.config.n_embed,
                "seconds": secs,
            })
        );
    } else {
        println!(
            "PSNR {:.2} dB over {} held-out {}x{} images (mean per image {:.2} dB, worst {:.2} dB); \
             {} of {} codes used; {:.1} s",
            e.psnr,
            e.images,
            vq.config.dd.resolution,
            vq.config.dd.resolution,
            e.psnr_mean_per_image,
            e.psnr_min,
            e.codes_used,
            vq.config.n_embed,
            secs
        );
    }
    Ok(())
}
