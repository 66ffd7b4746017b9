//! `vqclip train` and `vqclip eval`: vqclip's own models on the synthetic shapes world.

use super::{train_clip, train_vqgan, DeviceArgs};
use anyhow::Result;
use clap::Subcommand;

/// Which model to train.
#[derive(Subcommand, Debug)]
pub enum TrainCmd {
    /// Train a taming-style VQGAN on synthetic shapes images (reconstruction + codebook loss).
    Vqgan(train_vqgan::TrainArgs),
    /// Train a CLIP on synthetic shapes images and captions (symmetric contrastive loss).
    Clip(train_clip::TrainArgs),
}

/// Which model to measure.
#[derive(Subcommand, Debug)]
pub enum EvalCmd {
    /// Reconstruction PSNR of a VQGAN on held-out shapes images.
    Vqgan(train_vqgan::EvalArgs),
    /// Zero-shot colour and shape accuracy of a CLIP on held-out shapes images.
    Clip(train_clip::EvalArgs),
}

/// Runs `vqclip train ...`.
pub fn run_train(device: &DeviceArgs, cmd: TrainCmd) -> Result<()> {
    match cmd {
        TrainCmd::Vqgan(a) => train_vqgan::train(device, a),
        TrainCmd::Clip(a) => train_clip::train(device, a),
    }
}

/// Runs `vqclip eval ...`.
pub fn run_eval(device: &DeviceArgs, cmd: EvalCmd) -> Result<()> {
    match cmd {
        EvalCmd::Vqgan(a) => train_vqgan::eval(device, a),
        EvalCmd::Clip(a) => train_clip::eval(device, a),
    }
}
