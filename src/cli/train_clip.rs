//! `vqclip train clip` and `vqclip eval clip`.

use super::{values, DeviceArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use vqclip::models::clip::ClipModel;
use vqclip::train::clip::checkpoint::{self, RunSettings};
use vqclip::train::clip::{
    batch, batch_negatives, evaluate, longest_caption_tokens, run_config, schedule,
    shapes_tokenizer, AdvNorm, Adversarial, Augment, ClipTrainer,
};

/// Options of `vqclip train clip`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Folder for checkpoints and the finished Hugging Face CLIP folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Optimiser steps in all.
    #[arg(long, default_value_t = 3000)]
    pub steps: usize,
    /// Image-caption pairs per step.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Peak learning rate (AdamW, linear warm-up over 5% of the steps, cosine to 5%).
    #[arg(long, default_value_t = 1e-3, value_parser = values::positive_f32)]
    pub lr: f32,
    /// Seed of the initial weights and of the augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Seed of the shapes dataset (training uses its train split).
    #[arg(long, default_value_t = 0)]
    pub data_seed: u64,
    /// Write a checkpoint (and the Hugging Face folder) every N steps (0: only at the end).
    #[arg(long, default_value_t = 250)]
    pub save_every: usize,
    /// Continue from the checkpoint in --out (its model, optimiser, step and settings).
    #[arg(long)]
    pub resume: bool,
    /// A CLIP config.json giving the architecture (vocab_size and token ids are set to the
    /// shapes tokenizer's); default: the built-in small one.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Train without crops and noise.
    #[arg(long)]
    pub no_augment: bool,
    /// Probability that a pair is recoloured to white shapes on black (caption included), a
    /// shape curriculum; with --resume it replaces the checkpoint's value [default: 0].
    #[arg(long, value_name = "P", value_parser = values::unit_interval)]
    pub mask_prob: Option<f32>,
    /// Add hard-negative captions for shape (NegCLIP-style): each image must also beat its
    /// own caption with the shape word swapped for each other shape, which teaches the towers
    /// shape far sooner than in-batch negatives alone (swapped captions that are themselves
    /// captions of the batch are left out); with --resume it replaces the checkpoint's setting.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub shape_negatives: Option<bool>,
    /// Add colour-role negative captions: each one-shape image must also beat its caption
    /// with the shape colour and the background colour exchanged ("a blue circle on a red
    /// background" for "a red circle on a blue background"); with --resume it replaces the
    /// checkpoint's setting.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub swap_negatives: Option<bool>,
    /// Start from the weights of this Hugging Face CLIP folder (a fine-tune, e.g. of the
    /// shipped weights/clip) instead of random ones; its config.json gives the architecture
    /// and the optimiser starts fresh. Not with --resume or --config.
    #[arg(long, value_name = "DIR")]
    pub init_from: Option<PathBuf>,
    /// Fit the run into this many seconds of training: after the first 25 steps the step
    /// count is cut to what fits (the learning-rate schedule follows), and the run ends at
    /// the limit in any case.
    #[arg(long, value_name = "SECONDS", value_parser = values::seconds)]
    pub time_limit: Option<f64>,
    /// Adversarial training: before each step, move the batch's images by PGD within a
    /// ball of this radius (pixels in [0, 1]; see --adv-norm) to raise the loss, and train on
    /// the moved images (TeCoA-style; a robust CLIP's gradients draw what it names). 0: off;
    /// with --resume it replaces the checkpoint's value [default: 0].
    #[arg(long, value_name = "EPS", value_parser = values::non_negative_f32)]
    pub adv_eps: Option<f32>,
    /// Gradient steps of the adversarial attack (each costs about one forward and backward
    /// of the batch); with --resume it replaces the checkpoint's value [default: 3].
    #[arg(long, value_name = "N")]
    pub adv_steps: Option<usize>,
    /// Norm of the adversarial ball: l2 (of the whole image's change) or linf (of each
    /// pixel channel's); with --resume it replaces the checkpoint's value [default: l2].
    #[arg(long, value_name = "l2|linf")]
    pub adv_norm: Option<AdvNorm>,
    /// Stop after this step (checkpointed), keeping the schedule of --steps: a later
    /// --resume continues exactly as an unbroken run would, so a run can change settings
    /// (--mask-prob, --shape-negatives) at a given step.
    #[arg(long, value_name = "STEP")]
    pub stop_after: Option<usize>,
}

/// Options of `vqclip eval clip`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Hugging Face CLIP folder to measure [default: the shipped weights/clip].
    #[arg(long)]
    pub clip: Option<PathBuf>,
    /// Held-out single-shape images to score.
    #[arg(long, default_value_t = 400)]
    pub n: usize,
    /// Seed of the shapes dataset (its held-out split is used).
    #[arg(long, default_value_t = 0)]
    pub data_seed: u64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `vqclip train clip`.
pub fn train(device: &DeviceArgs, args: TrainArgs) -> Result<()> {
    if args.batch < 2 {
        bail!("--batch must be at least 2 (the loss contrasts pairs within a batch)");
    }
    values::at_most(
        "--batch",
        args.batch,
        values::MAX_BATCH,
        "a batch trains at once",
    )?;
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if args.stop_after == Some(0) {
        bail!("--stop-after must be at least 1 (the step after which the run stops)");
    }
    if args.out.exists() && !args.out.is_dir() {
        bail!("--out {} exists and is not a folder", args.out.display());
    }
    if args.init_from.is_some() && (args.resume || args.config.is_some()) {
        bail!("--init-from starts a new run from a CLIP folder: it cannot be combined with --resume or --config");
    }
    let state_path = checkpoint::state_path(&args.out);
    if !args.resume && state_path.exists() {
        bail!(
            "{} already holds a training state; pass --resume to continue it or choose \
             another --out",
            args.out.display()
        );
    }
    let gpu = device.open()?;
    let (mut tr, mut s, start) = if args.resume {
        if !state_path.is_file() {
            bail!("--resume: no checkpoint at {}", state_path.display());
        }
        let saved = RunSettings::read(&state_path)?;
        let total = saved.steps;
        let s = RunSettings {
            steps: args.steps,
            mask: args.mask_prob.unwrap_or(saved.mask),
            shape_negatives: args.shape_negatives.unwrap_or(saved.shape_negatives),
            swap_negatives: args.swap_negatives.unwrap_or(saved.swap_negatives),
            adv: Adversarial {
                eps: args.adv_eps.unwrap_or(saved.adv.eps),
                steps: args.adv_steps.unwrap_or(saved.adv.steps),
                norm: args.adv_norm.unwrap_or(saved.adv.norm),
            },
            ..saved
        };
        if total != args.steps {
            eprintln!(
                "note: the checkpoint was for {total} steps; continuing to {} (the learning \
                 rate schedule follows the new total)",
                args.steps
            );
        }
        let (tr, step) = checkpoint::resume(&state_path, &s, &gpu)?;
        eprintln!("resuming at step {step} of {}", s.steps);
        (tr, s, step)
    } else {
        let (config, tr) = match &args.init_from {
            None => {
                let config = run_config(args.config.as_deref())?;
                let tr = ClipTrainer::new(config.clone(), args.seed, args.lr, &gpu)?;
                (config, tr)
            }
            Some(dir) => {
                let model = ClipModel::load(dir, &gpu)
                    .with_context(|| format!("--init-from {}", dir.display()))?;
                let vocab = shapes_tokenizer(77)?.vocab_size();
                if model.config.text.vocab_size != vocab {
                    bail!(
                        "--init-from {}: its vocabulary has {} tokens, the shapes tokenizer {vocab}; \
                         only CLIPs trained by `vqclip train clip` can be fine-tuned here",
                        dir.display(),
                        model.config.text.vocab_size
                    );
                }
                let config = model.config.clone();
                (config, ClipTrainer::from_model(model, args.lr)?)
            }
        };
        let s = RunSettings {
            config,
            batch: args.batch,
            lr: args.lr,
            seed: args.seed,
            data_seed: args.data_seed,
            steps: args.steps,
            augment: !args.no_augment,
            mask: args.mask_prob.unwrap_or(0.0),
            shape_negatives: args.shape_negatives.unwrap_or(false),
            swap_negatives: args.swap_negatives.unwrap_or(false),
            adv: Adversarial {
                eps: args.adv_eps.unwrap_or(0.0),
                steps: args.adv_steps.unwrap_or(3),
                norm: args.adv_norm.unwrap_or(AdvNorm::L2),
            },
            elapsed: 0.0,
        };
        (tr, s, 0)
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let aug = Augment {
        mask: s.mask,
        ..if s.augment {
            Augment::default()
        } else {
            Augment::none()
        }
    };
    let longest = longest_caption_tokens()?;
    if longest > s.config.text.max_position_embeddings {
        eprintln!(
            "warning: the longest caption has {longest} tokens but the context is {}; longer \
             captions lose their last words",
            s.config.text.max_position_embeddings
        );
    }
    let size = s.config.vision.image_size;
    let mut sched = schedule(s.lr, s.steps);
    let n_params: usize = tr.params.iter().map(|(_, t)| t.numel()).sum();
    eprintln!(
        "CLIP {n_params} parameters; vision {}x{} @{}px/{}, text {}x{} ctx {}, batch {}, lr {}",
        s.config.vision.num_hidden_layers,
        s.config.vision.hidden_size,
        size,
        s.config.vision.patch_size,
        s.config.text.num_hidden_layers,
        s.config.text.hidden_size,
        s.config.text.max_position_embeddings,
        s.batch,
        s.lr
    );
    if s.adv.is_on() {
        eprintln!(
            "adversarial training: {} PGD steps within an {} ball of radius {} (pixels in [0, 1])",
            s.adv.steps, s.adv.norm, s.adv.eps
        );
    }
    let mut log = vqclip::train::open_log_resumed(&args.out.join("train_log.jsonl"), start)
        .context("cannot open train_log.jsonl")?;
    let bar = indicatif::ProgressBar::new(s.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  {per_sec}  eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(start as u64);
    let t0 = Instant::now();
    let base_elapsed = s.elapsed;
    let (mut ema_loss, mut ema_acc) = (None::<f32>, None::<f32>);
    let mut budget = args
        .time_limit
        .map(|t| vqclip::train::TimeBudget::new(t, start));
    let mut step = start;
    let stop = args.stop_after.unwrap_or(usize::MAX);
    while step < s.steps && step < stop {
        let (px, caps) = batch(&gpu, s.data_seed, s.seed, step, s.batch, size, &aug)?;
        let lr = sched.at(step);
        let negatives = batch_negatives(&caps, s.shape_negatives, s.swap_negatives);
        let px = tr.attack(&px, &caps, &negatives, &s.adv)?;
        let st = tr.step(&px, &caps, &negatives, lr)?;
        let ema = |e: Option<f32>, v: f32| Some(e.map_or(v, |e| 0.95 * e + 0.05 * v));
        ema_loss = ema(ema_loss, st.loss);
        ema_acc = ema(ema_acc, st.accuracy);
        let elapsed = base_elapsed + t0.elapsed().as_secs_f64();
        writeln!(
            log,
            "{{\"step\":{},\"loss\":{},\"accuracy\":{},\"temperature\":{},\"lr\":{},\"elapsed_s\":{:.2}}}",
            step + 1,
            st.loss,
            st.accuracy,
            st.temperature,
            lr,
            elapsed
        )
        .context("cannot write train_log.jsonl")?;
        bar.set_message(format!(
            "loss {:.3}  acc {:.0}%  T {:.1}",
            ema_loss.unwrap_or(st.loss),
            100.0 * ema_acc.unwrap_or(st.accuracy),
            st.temperature
        ));
        bar.inc(1);
        let done = step + 1;
        step = done;
        if let Some(total) = budget.as_mut().and_then(|b| b.observe(done, s.steps)) {
            bar.suspend(|| {
                eprintln!(
                    "--time-limit: the run ends at step {total} instead of {}",
                    s.steps
                )
            });
            s.steps = total;
            sched = schedule(s.lr, total);
            bar.set_length(total as u64);
        }
        if (args.save_every > 0 && done % args.save_every == 0) || done == s.steps || done == stop {
            checkpoint::save(&args.out, &tr, &s, done, elapsed)?;
        }
    }
    s.elapsed = base_elapsed + t0.elapsed().as_secs_f64();
    if start >= s.steps {
        checkpoint::save(&args.out, &tr, &s, start, s.elapsed)?;
    }
    bar.finish();
    if step < s.steps {
        eprintln!(
            "stopped after step {step} of {} (--stop-after); continue with --resume. \
             Checkpoint and Hugging Face CLIP folder in {}",
            s.steps,
            args.out.display()
        );
    } else {
        eprintln!(
            "done: {} steps, {:.0} s of training in all; Hugging Face CLIP folder in {}",
            s.steps,
            s.elapsed,
            args.out.display()
        );
    }
    Ok(())
}

fn pct(k: usize, n: usize) -> f64 {
    100.0 * k as f64 / n.max(1) as f64
}

/// Runs `vqclip eval clip`.
pub fn eval(device: &DeviceArgs, args: EvalArgs) -> Result<()> {
    if args.n == 0 {
        bail!("--n must be at least 1");
    }
    values::at_most(
        "--n",
        args.n,
        values::MAX_EVAL_IMAGES,
        "each image is rendered and scored",
    )?;
    let dir: &Path = &vqclip::weights::shipped::clip_dir_or(args.clip.as_deref())?;
    let gpu = device.open()?;
    let model = ClipModel::load(dir, &gpu)?;
    model.tokenizer()?;
    let r = evaluate(&model, args.data_seed, args.n)?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "clip": dir.display().to_string(),
                "n": r.n,
                "colour_correct": r.colour_correct,
                "colour_accuracy": r.colour_correct as f64 / r.n as f64,
                "shape_correct": r.shape_correct,
                "shape_accuracy": r.shape_correct as f64 / r.n as f64,
                "free_correct": r.free_correct,
                "free_accuracy": r.free_correct as f64 / r.n as f64,
            })
        );
    } else {
        println!(
            "zero-shot on {} held-out single-shape images ({}):",
            r.n,
            dir.display()
        );
        println!(
            "  colour  {}/{} = {:.1}%  (8 captions differing only in the shape colour)",
            r.colour_correct,
            r.n,
            pct(r.colour_correct, r.n)
        );
        println!(
            "  shape   {}/{} = {:.1}%  (4 captions differing only in the shape kind)",
            r.shape_correct,
            r.n,
            pct(r.shape_correct, r.n)
        );
        println!(
            "  free    {}/{} = {:.1}%  (224 captions 'a <colour> <shape> on a <colour> background')",
            r.free_correct,
            r.n,
            pct(r.free_correct, r.n)
        );
    }
    Ok(())
}
