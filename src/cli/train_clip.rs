//! `vqclip train clip` and `vqclip eval clip`.

use super::DeviceArgs;
use anyhow::{bail, Result};
use clap::Args;

/// Options of `vqclip train clip`.
#[derive(Args, Debug)]
pub struct TrainArgs {}

/// Options of `vqclip eval clip`.
#[derive(Args, Debug)]
pub struct EvalArgs {}

/// Runs `vqclip train clip`.
pub fn train(_device: &DeviceArgs, _args: TrainArgs) -> Result<()> {
    bail!("vqclip train clip is not built yet")
}

/// Runs `vqclip eval clip`.
pub fn eval(_device: &DeviceArgs, _args: EvalArgs) -> Result<()> {
    bail!("vqclip eval clip is not built yet")
}
