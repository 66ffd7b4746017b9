//! Subcommands. Each lives in its own file and only parses, calls the library and prints.

mod bench;
mod bench_generate;
mod classify;
mod clip_args;
mod convert;
mod embed;
mod generate;
mod info;
mod inspect;
mod reconstruct;
mod search;
mod train;
mod train_clip;
mod train_vqgan;
mod values;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use vqclip::{DeviceOptions, Gpu};

/// vqclip: CLIP and VQGAN on any GPU through wgpu, with no ML framework.
#[derive(Parser, Debug)]
#[command(name = "vqclip", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(subcommand)]
    pub cmd: Command,
}

/// Device selection, shared by every subcommand.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Graphics API to run on: vulkan, metal, dx12 or gl.
    #[arg(long, global = true, env = "VQCLIP_BACKEND")]
    pub backend: Option<String>,
    /// Use the adapter whose name contains this text (case-insensitive).
    #[arg(long, global = true, env = "VQCLIP_ADAPTER")]
    pub adapter: Option<String>,
    /// Most GPU memory vqclip may use, e.g. 512MiB or 8GiB: work that would need more is
    /// refused before it starts, with the largest size that fits [default: three quarters of
    /// the machine's memory on a CPU adapter such as lavapipe; no budget on a GPU, whose
    /// memory size wgpu does not report].
    #[arg(long, global = true, env = "VQCLIP_MAX_MEMORY", value_name = "BYTES",
          value_parser = values::byte_size)]
    pub max_memory: Option<u64>,
}

impl DeviceArgs {
    /// The library's device options, with the backend name checked.
    pub fn options(&self) -> Result<DeviceOptions> {
        Ok(DeviceOptions {
            backend: match &self.backend {
                Some(b) if !b.trim().is_empty() => Some(b.parse()?),
                _ => None,
            },
            adapter: self.adapter.clone().filter(|s| !s.trim().is_empty()),
            max_memory: self.max_memory,
        })
    }
    /// Opens the chosen device.
    pub fn open(&self) -> Result<Gpu> {
        Ok(Gpu::new(&self.options()?)?)
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List adapters, the chosen device and the limits that matter to vqclip.
    Info(info::InfoArgs),
    /// Measure kernels (checked against CPU references first).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// CLIP embeddings (L2-normalised) of texts and images, in argument order.
    Embed(embed::EmbedArgs),
    /// Zero-shot classification: each image's probability for each label.
    Classify(classify::ClassifyArgs),
    /// Search a folder of images with a text or an image (the folder is indexed first).
    Search(search::SearchArgs),
    /// VQGAN+CLIP text-to-image: optimise a VQGAN latent so CLIP sees the prompts.
    Generate(Box<generate::GenerateArgs>),
    /// Look inside CLIP: every layer's attention and hidden states, rollout and relevance
    /// maps, statistics and a logit lens, as tensors, pictures and an HTML report.
    Inspect(Box<inspect::InspectArgs>),
    /// Encode, quantise and decode an image with a VQGAN (taming .ckpt or .safetensors).
    Reconstruct(reconstruct::ReconstructArgs),
    /// Convert a taming VQGAN .ckpt to .safetensors (+ its .yaml config beside it).
    Convert(convert::ConvertArgs),
    /// Train vqclip's own small models on the synthetic shapes world.
    #[command(subcommand)]
    Train(train::TrainCmd),
    /// Measure a trained model on held-out synthetic images.
    #[command(subcommand)]
    Eval(train::EvalCmd),
}

pub fn run(cli: Cli) -> Result<()> {
    // A misspelt kernel override (VQCLIP_CONV=implict) stops here, before any work, rather
    // than timing or running the default in its place.
    vqclip::ops::env::check_all()?;
    match cli.cmd {
        Command::Info(a) => info::run(&cli.device, a),
        Command::Bench(b) => bench::run(&cli.device, b),
        Command::Embed(a) => embed::run(&cli.device, a),
        Command::Classify(a) => classify::run(&cli.device, a),
        Command::Search(a) => search::run(&cli.device, a),
        Command::Generate(a) => generate::run(&cli.device, *a),
        Command::Inspect(a) => inspect::run(&cli.device, *a),
        Command::Reconstruct(a) => reconstruct::run(&cli.device, a),
        Command::Convert(a) => convert::run(a),
        Command::Train(c) => train::run_train(&cli.device, c),
        Command::Eval(c) => train::run_eval(&cli.device, c),
    }
}
