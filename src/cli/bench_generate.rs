//! `vqclip bench generate`: time VQGAN+CLIP optimisation steps, on random-weight models of
//! the real shapes (CLIP ViT-B/32, VQGAN f16-16384) or on given models.

use super::generate::{check_fits, cutn_value, largest_tensor, parse_size};
use super::DeviceArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;
use vqclip::generate::{Options, Prompt};
use vqclip::models::clip::{self, ClipConfig, ClipModel};
use vqclip::models::vqgan::{config_beside, VqGan, VqGanConfig};

#[derive(Args, Debug)]
pub struct GenerateBenchArgs {
    /// Image size WxH (multiples of the VQGAN's downsampling factor).
    #[arg(long, default_value = "256x256")]
    size: String,
    /// Cutouts per step (1 to 4096).
    #[arg(long, default_value_t = 32, value_parser = cutn_value)]
    cutn: usize,
    /// Timed steps, after one untimed warm-up step.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// A Hugging Face CLIP folder (default: random weights of ViT-B/32's shape).
    #[arg(long, value_name = "DIR")]
    clip: Option<PathBuf>,
    /// taming VQGAN weights, .ckpt or .safetensors (default: random weights of the
    /// f16-16384 shape).
    #[arg(long, value_name = "FILE")]
    vqgan: Option<PathBuf>,
    /// The VQGAN's .yaml config (default: the .yaml beside --vqgan).
    #[arg(long, value_name = "YAML")]
    config: Option<PathBuf>,
    /// Text prompt, used when the CLIP model has a tokenizer (random weights have none:
    /// they aim at a random embedding, a noise prompt).
    #[arg(long, default_value = "a watercolour of a lighthouse at dawn")]
    prompt: String,
    /// Recompute the VQGAN's and CLIP's blocks in the backward pass instead of keeping their
    /// activations (less memory, more time), as `generate --recompute`.
    #[arg(long)]
    recompute: bool,
    /// Storage of CLIP's linear-layer weights, as `generate --precision` (f16 needs
    /// SHADER_F16; activations and accumulation stay f32).
    #[arg(long, value_enum, value_name = "PRECISION", default_value_t = vqclip::Precision::F32)]
    precision: vqclip::Precision,
    /// Seed of the random weights and of the generation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// What `--json` prints: the models, the setup time and the library's measurements.
#[derive(serde::Serialize)]
struct Report {
    /// A CLIP folder, or "random ViT-B/32".
    clip: String,
    /// A VQGAN file, or "random f16-16384".
    vqgan: String,
    /// Milliseconds to build or load both models and upload their weights.
    setup_ms: f64,
    /// `--precision` of CLIP's linear-layer weights: "f32" or "f16".
    clip_precision: String,
    /// Bytes of GPU memory CLIP's weights occupy at that precision.
    clip_weight_bytes: u64,
    #[serde(flatten)]
    bench: vqclip::bench::GenerateBench,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

pub fn run(dev: &DeviceArgs, a: GenerateBenchArgs) -> Result<()> {
    let (w, h) = parse_size(&a.size)?;
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if a.config.is_some() && a.vqgan.is_none() {
        bail!("--config needs --vqgan FILE");
    }
    // The VQGAN's shape first: the size checks need it, and they should fail before
    // minutes of building or loading weights.
    let vq_config_path = match &a.vqgan {
        Some(path) => Some(match (&a.config, config_beside(path)) {
            (Some(c), _) => c.clone(),
            (None, Some(c)) => c,
            (None, None) => bail!(
                "no config for {}: pass --config YAML (the taming .yaml the model was \
                 trained with)",
                path.display()
            ),
        }),
        None => None,
    };
    let vq_config = match &vq_config_path {
        Some(c) => VqGanConfig::from_file(c)?,
        None => VqGanConfig::imagenet_f16(16384),
    };
    let f = vq_config.downsampling_factor();
    if !w.is_multiple_of(f) || !h.is_multiple_of(f) {
        bail!("--size {w}x{h}: width and height must be multiples of the VQGAN factor {f}");
    }
    let gpu = dev.open()?;
    let limit = gpu
        .limits()
        .max_storage_buffer_binding_size
        .min(gpu.limits().max_buffer_size);
    let need = largest_tensor(&vq_config, w, h);
    if need > limit {
        bail!(
            "{w}x{h} needs a {need}-byte tensor but this device allows {limit} bytes per buffer \
             binding"
        );
    }
    let progress = |what: &str| {
        if !a.json {
            eprintln!("{what}…");
        }
    };
    let setup = Instant::now();
    let (clip, clip_name) = match &a.clip {
        Some(dir) => (
            ClipModel::load_with(dir, &gpu, a.precision)
                .with_context(|| format!("cannot load the CLIP model in {}", dir.display()))?,
            dir.display().to_string(),
        ),
        None => {
            progress("building a random-weight CLIP ViT-B/32");
            let cfg = ClipConfig::vit_base_patch32();
            let src = clip::random_weights(&cfg, a.seed)?;
            (
                ClipModel::from_source_with(cfg, &src, &gpu, a.precision)?,
                "random ViT-B/32".to_string(),
            )
        }
    };
    let (vqgan, vqgan_name) = match (&a.vqgan, &vq_config_path) {
        (Some(path), Some(config)) => (
            VqGan::load(path, config, &gpu)
                .with_context(|| format!("cannot load the VQGAN {}", path.display()))?,
            path.display().to_string(),
        ),
        _ => {
            progress("building a random-weight VQGAN f16-16384");
            let src = vqclip::bench::random_vqgan(&vq_config, a.seed.wrapping_add(1))?;
            (
                VqGan::from_source(&src, vq_config, &gpu)?,
                "random f16-16384".to_string(),
            )
        }
    };
    gpu.sync()?;
    check_fits(
        &gpu,
        &vqgan.config,
        &clip.config.vision,
        (w, h),
        a.cutn,
        a.recompute,
    )?;
    let setup_ms = setup.elapsed().as_secs_f64() * 1e3;
    progress(&format!(
        "timing {} steps after a warm-up step at {w}x{h}, cutn {}",
        a.steps, a.cutn
    ));
    let mut opts = Options::new(vec![], w, h);
    if clip.tokenizer.is_some() {
        opts.prompts = vec![Prompt::parse(&a.prompt)?];
    } else {
        opts.noise_prompts = vec![(a.seed, 1.0)];
    }
    opts.cutn = a.cutn;
    opts.seed = a.seed;
    opts.recompute = a.recompute;
    let r = Report {
        clip: clip_name,
        vqgan: vqgan_name,
        setup_ms,
        clip_precision: format!("{:?}", a.precision).to_lowercase(),
        clip_weight_bytes: clip.weight_bytes(),
        bench: vqclip::bench::generate_steps(&gpu, &clip, &vqgan, opts, a.steps)?,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        let (clip_name, vqgan_name, clip_bytes, precision) =
            (&r.clip, &r.vqgan, r.clip_weight_bytes, &r.clip_precision);
        let r = &r.bench;
        println!(
            "generate step {}x{}, cutn {}{} on {} ({})",
            r.width,
            r.height,
            r.cutn,
            if r.recompute { ", recompute" } else { "" },
            r.adapter,
            r.backend
        );
        println!("  clip: {clip_name}; vqgan: {vqgan_name} (set up in {setup_ms:.0} ms)");
        println!(
            "  clip weights: {:.1} MiB ({} linear layers)",
            mib(clip_bytes),
            precision
        );
        println!("  warm-up step: {:.1} ms", r.warmup_ms);
        let each: Vec<String> = r.step_ms.iter().map(|t| format!("{t:.1}")).collect();
        println!(
            "  {:.1} ms/step (mean of {} steps: {} ms)",
            r.mean_ms,
            r.step_ms.len(),
            each.join(", ")
        );
        println!(
            "  memory: weights+latent {:.1} MiB, peak {:.1} MiB (a step adds {:.1} MiB), \
             pool holds {:.1} MiB",
            mib(r.base_bytes),
            mib(r.peak_bytes),
            mib(r.step_peak_bytes),
            mib(r.resident_bytes)
        );
    }
    Ok(())
}
