//! `vqclip train vqgan` and `vqclip eval vqgan`.

use super::DeviceArgs;
use anyhow::{bail, Result};
use clap::Args;

/// Options of `vqclip train vqgan`.
#[derive(Args, Debug)]
pub struct TrainArgs {}

/// Options of `vqclip eval vqgan`.
#[derive(Args, Debug)]
pub struct EvalArgs {}

/// Runs `vqclip train vqgan`.
pub fn train(_device: &DeviceArgs, _args: TrainArgs) -> Result<()> {
    bail!("vqclip train vqgan is not built yet")
}

/// Runs `vqclip eval vqgan`.
pub fn eval(_device: &DeviceArgs, _args: EvalArgs) -> Result<()> {
    bail!("vqclip eval vqgan is not built yet")
}
