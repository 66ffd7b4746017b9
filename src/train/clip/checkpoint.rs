//! The checkpoint of a `train clip` run: the resumable training state (weights, optimiser
//! moments, step) with the run's settings in its metadata, written beside the Hugging Face
//! folder, and read back to resume the same run.

use super::{AdvNorm, Adversarial, ClipTrainer};
use crate::models::clip::config::hf_config;
use crate::models::clip::ClipConfig;
use crate::train::{load_state, save_state};
use crate::{Error, Gpu, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// File name of the resumable training state inside a run's output folder.
pub const STATE_FILE: &str = "train_state.safetensors";

/// The resumable state of the run writing to `out`.
pub fn state_path(out: &Path) -> PathBuf {
    out.join(STATE_FILE)
}

/// What a checkpoint could not give back.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be read as a training state.
    #[error(transparent)]
    Read(#[from] Error),
    /// The file is a training state of another trainer.
    #[error("{0} is not a `train clip` checkpoint")]
    NotClip(String),
    /// The recorded architecture does not parse.
    #[error("checkpoint config: {0}")]
    Config(String),
    /// A setting is missing or does not parse.
    #[error("the checkpoint has no valid '{0}' (not a `train clip` state?)")]
    Setting(&'static str),
}

/// The settings of a `train clip` run, recorded in its checkpoint so that a resumed run
/// continues the same run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSettings {
    /// The architecture.
    pub config: ClipConfig,
    /// Image-caption pairs per step.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f32,
    /// Seed of the initial weights and of the augmentation.
    pub seed: u64,
    /// Seed of the shapes dataset.
    pub data_seed: u64,
    /// Optimiser steps in all (the schedule's length).
    pub steps: usize,
    /// Whether batches are augmented (crops and noise).
    pub augment: bool,
    /// Probability of the white-on-black recolouring curriculum.
    pub mask: f32,
    /// Whether shape hard-negative captions are added.
    pub shape_negatives: bool,
    /// Whether colour-role negative captions are added.
    pub swap_negatives: bool,
    /// The adversarial attack each batch gets before the step ([`Adversarial::OFF`]: none).
    pub adv: Adversarial,
    /// Seconds of training before this session.
    pub elapsed: f64,
}

fn setting<T: std::str::FromStr>(
    m: &HashMap<String, String>,
    k: &'static str,
) -> std::result::Result<T, CheckpointError> {
    m.get(k)
        .and_then(|v| v.parse().ok())
        .ok_or(CheckpointError::Setting(k))
}

impl RunSettings {
    /// The checkpoint metadata of these settings after `elapsed` seconds of training.
    pub fn metadata(&self, elapsed: f64) -> Vec<(&'static str, String)> {
        vec![
            ("kind", "clip".into()),
            ("config", hf_config(&self.config).to_string()),
            ("batch", self.batch.to_string()),
            ("lr", self.lr.to_string()),
            ("seed", self.seed.to_string()),
            ("data_seed", self.data_seed.to_string()),
            ("steps", self.steps.to_string()),
            ("augment", self.augment.to_string()),
            ("mask", self.mask.to_string()),
            ("shape_negatives", self.shape_negatives.to_string()),
            ("swap_negatives", self.swap_negatives.to_string()),
            ("adv_eps", self.adv.eps.to_string()),
            ("adv_steps", self.adv.steps.to_string()),
            ("adv_norm", self.adv.norm.to_string()),
            ("elapsed_s", format!("{elapsed:.1}")),
        ]
    }

    /// The settings recorded in the checkpoint at `path`. Settings that older checkpoints
    /// lack (`mask`, `shape_negatives`, `swap_negatives`, the adversarial attack) read as off.
    pub fn read(path: &Path) -> std::result::Result<RunSettings, CheckpointError> {
        let file = crate::weights::SafetensorsFile::open(path)?;
        let m = file.metadata();
        if m.get("kind").map(String::as_str) != Some("clip") {
            return Err(CheckpointError::NotClip(path.display().to_string()));
        }
        let config = ClipConfig::from_json(&setting::<String>(&m, "config")?)
            .map_err(CheckpointError::Config)?;
        Ok(RunSettings {
            batch: setting(&m, "batch")?,
            lr: setting(&m, "lr")?,
            seed: setting(&m, "seed")?,
            data_seed: setting(&m, "data_seed")?,
            augment: setting(&m, "augment")?,
            mask: setting(&m, "mask").unwrap_or(0.0),
            shape_negatives: setting(&m, "shape_negatives").unwrap_or(false),
            swap_negatives: setting(&m, "swap_negatives").unwrap_or(false),
            adv: Adversarial {
                eps: setting(&m, "adv_eps").unwrap_or(0.0),
                steps: setting(&m, "adv_steps").unwrap_or(0),
                norm: setting::<AdvNorm>(&m, "adv_norm").unwrap_or(AdvNorm::L2),
            },
            elapsed: setting(&m, "elapsed_s")?,
            steps: setting(&m, "steps")?,
            config,
        })
    }
}

/// Writes the checkpoint of the run in `out` after `step` steps: the training state at
/// [`state_path`] with `s` in its metadata, then the Hugging Face CLIP folder.
pub fn save(
    out: &Path,
    tr: &ClipTrainer,
    s: &RunSettings,
    step: usize,
    elapsed: f64,
) -> Result<()> {
    save_state(
        &state_path(out),
        &tr.params,
        &tr.adam,
        step,
        &s.metadata(elapsed),
    )?;
    tr.write_folder(out)
}

/// The trainer of a run with settings `s` restored from the state at `path`, and the steps
/// it had done.
pub fn resume(path: &Path, s: &RunSettings, gpu: &Gpu) -> Result<(ClipTrainer, usize)> {
    let mut tr = ClipTrainer::new(s.config.clone(), s.seed, s.lr, gpu)?;
    let st = load_state(path, &tr.params, &mut tr.adam)?;
    tr.model.logit_scale = tr.logit_scale.to_vec()?[0];
    Ok((tr, st.step))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::write_safetensors;

    fn settings() -> RunSettings {
        RunSettings {
            config: super::super::shapes_config(300),
            batch: 8,
            lr: 3e-4,
            seed: 5,
            data_seed: 6,
            steps: 70,
            augment: false,
            mask: 0.25,
            shape_negatives: true,
            swap_negatives: false,
            adv: Adversarial {
                eps: 0.5,
                steps: 2,
                norm: AdvNorm::Linf,
            },
            elapsed: 12.0,
        }
    }

    fn write(path: &Path, meta: &[(&str, String)]) {
        let t = vec![("w".to_string(), vec![1], vec![0.0f32])];
        write_safetensors(path, &t, meta).unwrap();
    }

    #[test]
    fn settings_round_trip_through_the_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(STATE_FILE);
        let s = settings();
        write(&p, &s.metadata(s.elapsed));
        assert_eq!(RunSettings::read(&p).unwrap(), s);
    }

    #[test]
    fn a_checkpoint_of_another_kind_or_without_a_setting_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(STATE_FILE);
        let meta = settings().metadata(1.0);
        let without = |key: &str| -> Vec<(&str, String)> {
            meta.iter().filter(|(k, _)| *k != key).cloned().collect()
        };
        write(&p, &without("lr"));
        let e = RunSettings::read(&p).unwrap_err().to_string();
        assert_eq!(
            e,
            "the checkpoint has no valid 'lr' (not a `train clip` state?)"
        );
        write(&p, &without("kind"));
        let e = RunSettings::read(&p).unwrap_err().to_string();
        assert!(e.ends_with("is not a `train clip` checkpoint"), "{e}");
        // Settings added later read as off in older checkpoints.
        write(&p, &without("swap_negatives"));
        assert!(!RunSettings::read(&p).unwrap().swap_negatives);
        let old: Vec<(&str, String)> = meta
            .iter()
            .filter(|(k, _)| !k.starts_with("adv_"))
            .cloned()
            .collect();
        write(&p, &old);
        assert_eq!(RunSettings::read(&p).unwrap().adv, Adversarial::OFF);
    }
}
