//! Training a taming-style VQGAN on the autodiff tape.
//!
//! The encoder and decoder are the model's own forwards ([`VqGan::encode_on`],
//! [`VqGan::decode_on`]) on a training tape. The objective is taming's `VQModel` without the GAN and LPIPS terms:
//!
//! `loss = mse(x, x̂) + ‖sg[z] − z_q‖² + β·‖z − sg[z_q]‖²` (means over elements, β = 0.25),
//!
//! with `z_q` the nearest codebook rows and the straight-through estimator carrying the
//! decoder's gradient to `z`; the codebook term reaches the codebook through
//! [`Tape::gather_rows`]. Codebook entries unused for [`Trainer::restart_after`] steps are
//! re-seeded from random encoder outputs of the current batch (dead-code restart).

use super::{default_init, init_weights, Init, Schedule};
use crate::autodiff::{Tape, Var};
use crate::data::shapes::{ShapesDataset, Split};
use crate::models::vqgan::config::{DdConfig, QuantizerKind, VqGanConfig};
use crate::models::vqgan::{rgb8_to_input, VqGan};
use crate::ops::vq;
use crate::optim::{Adam, AdamConfig};
use crate::{Error, Gpu, Result, Tensor};
use rand::{Rng, SeedableRng};

/// The commitment weight β of taming's `VectorQuantizer2`.
pub const BETA: f32 = 0.25;

/// The dataset seed for training (its `Train` split) and evaluation (its `HeldOut` split).
pub const DATA_SEED: u64 = 0;

/// The shipped layout: 64x64 images, f = 4 (16x16 latents), width 32 at every level (the
/// narrowest taming allows: GroupNorm's 32 groups), one residual block per level, no
/// attention outside the middle blocks, 256 codes of 32 channels.
pub fn small_config() -> VqGanConfig {
    VqGanConfig {
        dd: DdConfig {
            ch: 32,
            ch_mult: vec![1, 1, 1],
            num_res_blocks: 1,
            attn_resolutions: vec![],
            z_channels: 32,
            resolution: 64,
            in_channels: 3,
            out_ch: 3,
            double_z: false,
            dropout: 0.0,
        },
        embed_dim: 32,
        n_embed: 256,
        quantizer: QuantizerKind::NearestNeighbour,
    }
}

/// A tiny layout for tests: 16x16 images, f = 2, width 32, 8-channel codes, 16 of them.
pub fn tiny_config() -> VqGanConfig {
    VqGanConfig {
        dd: DdConfig {
            ch: 32,
            ch_mult: vec![1, 1],
            num_res_blocks: 1,
            attn_resolutions: vec![],
            z_channels: 8,
            resolution: 16,
            in_channels: 3,
            out_ch: 3,
            double_z: false,
            dropout: 0.0,
        },
        embed_dim: 8,
        n_embed: 16,
        quantizer: QuantizerKind::NearestNeighbour,
    }
}

/// The initial value rule: GroupNorm scales 1, every bias 0, the codebook uniform in
/// `±1/n_embed` (taming's `VectorQuantizer2`), conv weights PyTorch's default.
pub fn init_rule(n_embed: usize) -> impl Fn(&str, &[usize]) -> Init {
    move |key: &str, shape: &[usize]| {
        if key == "quantize.embedding.weight" {
            Init::Uniform(1.0 / n_embed as f32)
        } else if key.ends_with(".bias") {
            Init::Const(0.0)
        } else if shape.len() == 1 {
            Init::Const(1.0)
        } else {
            default_init(shape)
        }
    }
}

/// A freshly initialised model (nearest-neighbour quantiser only).
pub fn new_model(cfg: &VqGanConfig, seed: u64, gpu: &Gpu) -> Result<VqGan> {
    if cfg.quantizer != QuantizerKind::NearestNeighbour {
        return Err(Error::invalid(
            "training supports the nearest-neighbour quantiser (VQModel) only",
        ));
    }
    let src = init_weights(&cfg.tensor_shapes(), seed, init_rule(cfg.n_embed))?;
    VqGan::from_source(&src, cfg.clone(), gpu)
}

/// Images `[start, start + n)` of a split, rendered at `size` and scaled to [-1, 1]:
/// `[n, 3, size, size]`, plus the RGB8 pixels (HWC per image).
pub fn batch(
    gpu: &Gpu,
    data: &ShapesDataset,
    start: u64,
    n: usize,
    size: usize,
) -> Result<(Tensor, Vec<Vec<u8>>)> {
    let mut x = Vec::with_capacity(n * 3 * size * size);
    let mut rgb = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let px = data.sample(start + i).0.render(size);
        x.extend(rgb8_to_input(&px, size, size));
        rgb.push(px);
    }
    Ok((Tensor::from_slice(gpu, &x, &[n, 3, size, size])?, rgb))
}

/// PSNR in dB of a mean squared error on a signal of peak-to-peak range `peak`.
pub fn psnr(mse: f64, peak: f64) -> f64 {
    10.0 * (peak * peak / mse.max(1e-12)).log10()
}

/// What one training step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// The total loss.
    pub loss: f32,
    /// Reconstruction MSE (images in [-1, 1], decoder output unclamped).
    pub rec: f32,
    /// `‖sg[z] − z_q‖²` (mean).
    pub codebook: f32,
    /// `‖z − sg[z_q]‖²` (mean, before β).
    pub commit: f32,
    /// PSNR of the batch from `rec` (peak-to-peak 2).
    pub psnr: f32,
    /// Distinct codes used in the batch.
    pub codes_used: usize,
    /// Codebook entries re-seeded after this step.
    pub restarted: usize,
    /// The learning rate of the step.
    pub lr: f32,
}

/// A VQGAN, its optimiser and schedule, and the dead-code bookkeeping.
pub struct Trainer {
    /// The model being trained (its `params` are updated in place).
    pub model: VqGan,
    /// Adam over `model.params`, in that order.
    pub adam: Adam,
    /// The learning rate per step.
    pub schedule: Schedule,
    /// Training seed (restart sampling derives from it and the step).
    pub seed: u64,
    /// Steps done.
    pub step: usize,
    /// Per code, the step count when it was last used or re-seeded (0 = never: re-seeded after
    /// the next step).
    pub last_used: Vec<usize>,
    /// Re-seed a code unused for this many steps (0 disables restarts).
    pub restart_after: usize,
}

impl Trainer {
    /// A trainer for `model` with Adam at the schedule's rates.
    pub fn new(model: VqGan, schedule: Schedule, seed: u64) -> Result<Trainer> {
        let tensors = model.params.iter().map(|(_, t)| t.clone()).collect();
        let adam = Adam::new(tensors, AdamConfig::adam(schedule.lr))?;
        let k = model.config.n_embed;
        Ok(Trainer {
            model,
            adam,
            schedule,
            seed,
            step: 0,
            last_used: vec![0; k],
            restart_after: 100,
        })
    }

    /// One optimiser step on `x` `[N, 3, H, W]` in [-1, 1].
    pub fn step(&mut self, x: &Tensor) -> Result<StepStats> {
        let lr = self.schedule.at(self.step);
        self.adam.config.lr = lr;
        let tape = Tape::training();
        let vq = &self.model;
        let codebook = vq.quantize.codebook();
        let (k, d) = (codebook.dim(0), codebook.dim(1));
        let xin = tape.leaf(x.clone(), false);
        let z = vq.encode_on(&tape, &xin)?; // [N, D, h, w]
        let (n, h, w) = (z.shape()[0], z.shape()[2], z.shape()[3]);
        let m = n * h * w;
        let codes_t = vq::nearest_codes(z.value(), codebook)?; // [N, h, w]
        let zq = vq::gather(&codes_t, codebook)?; // [N, D, h, w]
        let codes = codes_t.to_vec_u32()?;
        // z_q as rows of the codebook, differentiable in the codebook.
        let emb = tape.param(codebook);
        let zq_rows = tape.gather_rows(&emb, &codes_t.reshape(&[m])?)?; // [M, D]
        let z_rows = tape.reshape(&tape.permute(&z, &[0, 2, 3, 1])?, &[m, d])?; // [M, D]
        let sg_z = tape.leaf(z_rows.value().clone(), false);
        let sg_zq = tape.leaf(zq_rows.value().clone(), false);
        let cb = tape.mean(&tape.square(&tape.sub(&zq_rows, &sg_z)?)?)?;
        let commit = tape.mean(&tape.square(&tape.sub(&z_rows, &sg_zq)?)?)?;
        let zq_st = tape.straight_through(zq, &z)?;
        let xr = vq.decode_on(&tape, &zq_st, false)?;
        let rec = tape.mean(&tape.square(&tape.sub(&xr, &xin)?)?)?;
        let loss = tape.add(&tape.add(&rec, &cb)?, &tape.affine(&commit, BETA, 0.0)?)?;
        let grads = tape.backward(&loss)?;
        let gs: Vec<Option<&Tensor>> = vq
            .params
            .iter()
            .map(|(_, t)| grads.param(&tape, t))
            .collect();
        self.adam.step(&gs)?;
        drop(grads);
        let read = |v: &Var| -> Result<f32> { Ok(v.value().to_vec()?[0]) };
        let (loss, rec, cb, commit) = (read(&loss)?, read(&rec)?, read(&cb)?, read(&commit)?);
        self.step += 1;
        let mut used = vec![false; k];
        for &c in &codes {
            used[c as usize] = true;
            self.last_used[c as usize] = self.step;
        }
        let restarted = if self.restart_after > 0 {
            self.restart_dead(&z_rows, m, d)?
        } else {
            0
        };
        Ok(StepStats {
            loss,
            rec,
            codebook: cb,
            commit,
            psnr: psnr(rec as f64, 2.0) as f32,
            codes_used: used.iter().filter(|&&u| u).count(),
            restarted,
            lr,
        })
    }

    /// Re-seeds codes unused for `restart_after` steps from random rows of `z_rows`
    /// (`[M, D]`) plus a little noise, so that re-seeded twins do not tie.
    fn restart_dead(&mut self, z_rows: &Var, m: usize, d: usize) -> Result<usize> {
        // Never-used codes (the initial codebook) are re-seeded at once: a data-dependent
        // initialisation from the first batch's encoder outputs.
        let dead: Vec<usize> = (0..self.last_used.len())
            .filter(|&c| {
                self.last_used[c] == 0 || self.step - self.last_used[c] >= self.restart_after
            })
            .collect();
        if dead.is_empty() {
            return Ok(0);
        }
        let z = z_rows.value().to_vec()?;
        let codebook = self.model.quantize.codebook();
        let mut e = codebook.to_vec()?;
        let mut rng =
            rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ (self.step as u64).rotate_left(32));
        let scale = (z.iter().map(|v| v * v).sum::<f32>() / z.len().max(1) as f32).sqrt();
        for &c in &dead {
            let r = rng.random_range(0..m);
            for j in 0..d {
                let noise: f32 = rng.random_range(-1.0..1.0);
                e[c * d + j] = z[r * d + j] + 0.01 * scale * noise;
            }
            self.last_used[c] = self.step;
        }
        codebook.assign(&Tensor::from_slice(codebook.gpu(), &e, codebook.shape())?)?;
        Ok(dead.len())
    }
}

/// Everything that fixes a training run (saved in checkpoints so a resumed run continues
/// exactly).
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// The model layout.
    pub model: VqGanConfig,
    /// Total optimiser steps.
    pub steps: usize,
    /// Images per step.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f32,
    /// Seed of the initial weights and of code restarts.
    pub seed: u64,
    /// Warm-up steps.
    pub warmup: usize,
    /// Re-seed codes unused for this many steps (0: never).
    pub restart_after: usize,
    /// Train on random square crops of this side (a multiple of the downsampling factor,
    /// at most the resolution) of the full-resolution renders; `None`: whole images.
    pub crop: Option<usize>,
}

impl RunConfig {
    /// Warm-up, then a cosine down to 5% of the peak at `steps`.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            lr: self.lr,
            warmup: self.warmup,
            total: self.steps,
            floor: 0.05,
        }
    }

    /// The checkpoint metadata entries describing the run.
    pub fn metadata(&self) -> Vec<(&'static str, String)> {
        vec![
            ("kind", "vqclip vqgan training state".into()),
            ("config", taming_yaml(&self.model, self.lr)),
            ("steps", self.steps.to_string()),
            ("batch", self.batch.to_string()),
            ("lr", self.lr.to_string()),
            ("seed", self.seed.to_string()),
            ("warmup", self.warmup.to_string()),
            ("restart_after", self.restart_after.to_string()),
            ("crop", self.crop.map_or("none".into(), |c| c.to_string())),
        ]
    }

    /// Reads back [`RunConfig::metadata`]; `path` names the file in errors.
    pub fn from_metadata(
        meta: &std::collections::HashMap<String, String>,
        path: &str,
    ) -> Result<RunConfig> {
        let get = |k: &str| -> Result<&String> {
            meta.get(k).ok_or_else(|| Error::Format {
                path: path.to_string(),
                msg: format!("not a vqclip VQGAN training state (no '{k}' in its metadata)"),
            })
        };
        fn num<T: std::str::FromStr>(v: &str, k: &str, path: &str) -> Result<T> {
            v.parse().map_err(|_| Error::Format {
                path: path.to_string(),
                msg: format!("metadata '{k}' = '{v}' is not a number"),
            })
        }
        Ok(RunConfig {
            model: VqGanConfig::from_yaml(get("config")?, path)?,
            steps: num(get("steps")?, "steps", path)?,
            batch: num(get("batch")?, "batch", path)?,
            lr: num(get("lr")?, "lr", path)?,
            seed: num(get("seed")?, "seed", path)?,
            warmup: num(get("warmup")?, "warmup", path)?,
            restart_after: num(get("restart_after")?, "restart_after", path)?,
            crop: match get("crop")?.as_str() {
                "none" => None,
                c => Some(num(c, "crop", path)?),
            },
        })
    }

    /// The model and trainer at step 0.
    pub fn start(&self, gpu: &Gpu) -> Result<Trainer> {
        if self.steps == 0 || self.batch == 0 {
            return Err(Error::invalid("steps and batch must be at least 1"));
        }
        if let Some(c) = self.crop {
            let f = self.model.downsampling_factor();
            if c == 0 || c > self.model.dd.resolution || c % f != 0 {
                return Err(Error::invalid(format!(
                    "crop {c} must be a positive multiple of the downsampling factor {f} and at \
                     most the resolution {}",
                    self.model.dd.resolution
                )));
            }
        }
        let vq = new_model(&self.model, self.seed, gpu)?;
        let mut t = Trainer::new(vq, self.schedule(), self.seed)?;
        t.restart_after = self.restart_after;
        Ok(t)
    }

    /// The training images of step `step`: samples `step·batch ..` of the `Train` split,
    /// `[batch, 3, s, s]` with `s` the crop (random offsets from the seed and step) or the
    /// resolution.
    pub fn images(&self, gpu: &Gpu, step: usize) -> Result<Tensor> {
        let data = ShapesDataset::new(DATA_SEED, Split::Train);
        let size = self.model.dd.resolution;
        let (full, _) = batch(gpu, &data, (step * self.batch) as u64, self.batch, size)?;
        let Some(c) = self.crop.filter(|&c| c < size) else {
            return Ok(full);
        };
        let x = full.to_vec()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(1 + step as u64);
        let mut out = Vec::with_capacity(self.batch * 3 * c * c);
        for i in 0..self.batch {
            let (ox, oy) = (
                rng.random_range(0..=size - c),
                rng.random_range(0..=size - c),
            );
            for ch in 0..3 {
                for y in 0..c {
                    let row = ((i * 3 + ch) * size + oy + y) * size + ox;
                    out.extend_from_slice(&x[row..row + c]);
                }
            }
        }
        Tensor::from_slice(gpu, &out, &[self.batch, 3, c, c])
    }
}

impl Trainer {
    /// Saves a resumable state (parameters, Adam moments, step, the run config, the
    /// dead-code clock and `seconds` of training so far) to `path`.
    pub fn save(&self, path: &std::path::Path, run: &RunConfig, seconds: f64) -> Result<()> {
        let mut extra = run.metadata();
        extra.push((
            "last_used",
            self.last_used
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(","),
        ));
        extra.push(("train_seconds", format!("{seconds:.1}")));
        super::save_state(path, &self.model.params, &self.adam, self.step, &extra)
    }

    /// Restores a state written by [`Trainer::save`]: the trainer, its run config and the
    /// training seconds so far.
    pub fn resume(path: &std::path::Path, gpu: &Gpu) -> Result<(Trainer, RunConfig, f64)> {
        let shown = path.display().to_string();
        let meta = crate::weights::SafetensorsFile::open(path)?.metadata();
        let run = RunConfig::from_metadata(&meta, &shown)?;
        let mut t = run.start(gpu)?;
        let st = super::load_state(path, &t.model.params, &mut t.adam)?;
        t.step = st.step;
        let bad = |msg: String| Error::Format {
            path: shown.clone(),
            msg,
        };
        let last: Vec<usize> = meta
            .get("last_used")
            .ok_or_else(|| bad("no 'last_used' in its metadata".into()))?
            .split(',')
            .map(|v| {
                v.parse()
                    .map_err(|_| bad(format!("bad last_used entry '{v}'")))
            })
            .collect::<Result<_>>()?;
        if last.len() != t.last_used.len() {
            return Err(bad(format!(
                "last_used has {} entries for {} codes",
                last.len(),
                t.last_used.len()
            )));
        }
        t.last_used = last;
        let secs = meta
            .get("train_seconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Ok((t, run, secs))
    }
}

/// Reconstruction quality over images: pooled and per-image PSNR on 8-bit outputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalStats {
    /// Images measured.
    pub images: usize,
    /// PSNR (dB, peak 255) of the mean squared error over every pixel of every image.
    pub psnr: f64,
    /// Mean of the per-image PSNRs (each capped at 100 dB).
    pub psnr_mean_per_image: f64,
    /// The worst image's PSNR.
    pub psnr_min: f64,
    /// Distinct codes used over all images.
    pub codes_used: usize,
}

/// Encodes, quantises and decodes `n` held-out images (`ShapesDataset::new(DATA_SEED,
/// HeldOut)`, from index 0) at the model's resolution, comparing the 8-bit outputs (as
/// `vqclip reconstruct` writes them) with the 8-bit inputs.
pub fn evaluate(vq: &VqGan, n: usize, batch_size: usize) -> Result<EvalStats> {
    if n == 0 || batch_size == 0 {
        return Err(Error::invalid("evaluation needs at least one image"));
    }
    let size = vq.config.dd.resolution;
    let data = ShapesDataset::new(DATA_SEED, Split::HeldOut);
    let mut used = vec![false; vq.config.n_embed];
    let (mut se_total, mut per) = (0.0f64, Vec::with_capacity(n));
    let mut start = 0;
    while start < n {
        let b = batch_size.min(n - start);
        let (x, rgb) = batch(vq.gpu(), &data, start as u64, b, size)?;
        let z = vq.encode(&x)?;
        let (zq, codes) = vq.quantize(&z)?;
        let out = vq.decode(&zq)?.to_vec()?;
        for c in codes.to_vec_u32()? {
            if let Some(u) = used.get_mut(c as usize) {
                *u = true;
            }
        }
        let hw3 = 3 * size * size;
        for (i, want) in rgb.iter().enumerate() {
            let got =
                crate::models::vqgan::output_to_rgb8(&out[i * hw3..(i + 1) * hw3], size, size);
            let se: f64 = got
                .iter()
                .zip(want)
                .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                .sum();
            se_total += se;
            per.push(psnr(se / hw3 as f64, 255.0).min(100.0));
        }
        start += b;
    }
    let pixels = (n * 3 * size * size) as f64;
    Ok(EvalStats {
        images: n,
        psnr: psnr(se_total / pixels, 255.0),
        psnr_mean_per_image: per.iter().sum::<f64>() / n as f64,
        psnr_min: per.iter().cloned().fold(f64::INFINITY, f64::min),
        codes_used: used.iter().filter(|&&u| u).count(),
    })
}

/// The taming `.yaml` for a config (`taming.models.vqgan.VQModel`, a `DummyLoss` loss so
/// that taming builds it without LPIPS weights), readable by [`VqGanConfig::from_yaml`].
pub fn taming_yaml(cfg: &VqGanConfig, lr: f32) -> String {
    let d = &cfg.dd;
    let list = |v: &[usize]| {
        if v.is_empty() {
            "[]".to_string()
        } else {
            format!(
                "[{}]",
                v.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    };
    // PyYAML reads `2e-3` as a string: keep a point in the mantissa (`2.0e-3`).
    let lr = format!("{lr:e}");
    let lr = match lr.split_once('e') {
        Some((m, e)) if !m.contains('.') => format!("{m}.0e{e}"),
        _ => lr,
    };
    format!(
        "model:
  base_learning_rate: {lr}
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: {}
    n_embed: {}
    ddconfig:
      double_z: false
      z_channels: {}
      resolution: {}
      in_channels: {}
      out_ch: {}
      ch: {}
      ch_mult: {}
      num_res_blocks: {}
      attn_resolutions: {}
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.DummyLoss
",
        cfg.embed_dim,
        cfg.n_embed,
        d.z_channels,
        d.resolution,
        d.in_channels,
        d.out_ch,
        d.ch,
        list(&d.ch_mult),
        d.num_res_blocks,
        list(&d.attn_resolutions),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{assert_close, gpu, rand_vec};

    #[test]
    fn tape_encoder_matches_the_inference_encoder() {
        let g = gpu();
        let mut cfg = tiny_config();
        cfg.dd.ch_mult = vec![1, 2];
        cfg.dd.attn_resolutions = vec![8];
        let vq = new_model(&cfg, 3, &g).unwrap();
        let x = Tensor::from_slice(&g, &rand_vec(2 * 3 * 16 * 16, 4), &[2, 3, 16, 16]).unwrap();
        let want = vq.encode(&x).unwrap().to_vec().unwrap();
        for training in [false, true] {
            let tape = if training {
                Tape::training()
            } else {
                Tape::new()
            };
            let got = vq.encode_on(&tape, &tape.leaf(x.clone(), false)).unwrap();
            assert_eq!(got.shape(), &[2, 8, 8, 8]);
            let got = got.value().to_vec().unwrap();
            let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
            assert_close(&got, &want, 1e-4, 0.0, &format!("training={training}"));
        }
    }

    #[test]
    fn yaml_round_trips_through_the_config_parser() {
        for cfg in [small_config(), tiny_config()] {
            let y = taming_yaml(&cfg, 1e-3);
            assert_eq!(VqGanConfig::from_yaml(&y, "t.yaml").unwrap(), cfg);
            assert!(y.contains("base_learning_rate: 1.0e-3"), "{y}");
        }
    }

    #[test]
    fn a_few_steps_lower_the_loss_and_restarts_revive_codes() {
        let g = gpu();
        let cfg = tiny_config();
        let vq = new_model(&cfg, 1, &g).unwrap();
        let sched = Schedule {
            lr: 2e-3,
            warmup: 1,
            total: 40,
            floor: 1.0,
        };
        let mut t = Trainer::new(vq, sched, 1).unwrap();
        t.restart_after = 5;
        let data = ShapesDataset::new(DATA_SEED, Split::Train);
        // The same 4 images each step: the loss must fall.
        let (x, _) = batch(&g, &data, 0, 4, 16).unwrap();
        let stats: Vec<StepStats> = (0..40).map(|_| t.step(&x).unwrap()).collect();
        let first = stats[..5].iter().map(|s| s.rec).sum::<f32>() / 5.0;
        let last = stats[35..].iter().map(|s| s.rec).sum::<f32>() / 5.0;
        assert!(last < 0.7 * first, "rec {first} -> {last}");
        assert!(stats.iter().all(|s| s.loss.is_finite()));
        assert!(stats[0].restarted > 0, "unused initial codes re-seeded");
        assert!(
            stats[1..].iter().any(|s| s.restarted > 0),
            "codes unused for 5 steps re-seeded"
        );
        let ev = evaluate(&t.model, 3, 2).unwrap();
        assert_eq!(ev.images, 3);
        assert!(ev.psnr.is_finite() && ev.psnr_min <= ev.psnr_mean_per_image);
    }

    #[test]
    fn a_resumed_run_continues_exactly() {
        let g = gpu();
        let run = RunConfig {
            model: tiny_config(),
            steps: 4,
            batch: 2,
            lr: 1e-3,
            seed: 5,
            warmup: 1,
            restart_after: 2,
            crop: Some(8),
        };
        let mut a = run.start(&g).unwrap();
        for s in 0..4 {
            a.step(&run.images(&g, s).unwrap()).unwrap();
        }
        let mut b = run.start(&g).unwrap();
        for s in 0..2 {
            b.step(&run.images(&g, s).unwrap()).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.safetensors");
        b.save(&path, &run, 1.5).unwrap();
        drop(b);
        let (mut c, run2, secs) = Trainer::resume(&path, &g).unwrap();
        assert_eq!(run2, run);
        assert_eq!((c.step, secs), (2, 1.5));
        for s in 2..4 {
            c.step(&run.images(&g, s).unwrap()).unwrap();
        }
        assert_eq!(c.last_used, a.last_used);
        for ((k, x), (_, y)) in a.model.params.iter().zip(&c.model.params) {
            assert_eq!(x.to_vec().unwrap(), y.to_vec().unwrap(), "{k}");
        }
    }
}
