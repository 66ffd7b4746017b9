use super::{values, DeviceArgs};

/// Parses `--size N` of the matmul bench: at least 1 and at most 65536, so that N² · 4 bytes
/// is far from overflowing (the device's buffer limit refuses sizes that do not fit).
fn matmul_size(s: &str) -> std::result::Result<usize, String> {
    let n = values::at_least_one(s)?;
    if n > 1 << 16 {
        return Err(format!("{n} is more than the 65536 allowed"));
    }
    Ok(n)
}
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use vqclip::ops::matmul::Variant;

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Square N×N matmul: every kernel variant, checked against the CPU, in GFLOP/s.
    Matmul(MatmulArgs),
    /// One VQGAN+CLIP optimisation step (random-weight ViT-B/32 and f16-16384 by default):
    /// ms per step and peak GPU memory.
    Generate(super::bench_generate::GenerateBenchArgs),
    /// The VQGAN's stages (encode, quantise, decode, decode + backward) on random f16-16384
    /// weights or a given model: min/median ms and GFLOP/s per stage.
    Vqgan(VqganArgs),
}

#[derive(Args, Debug)]
pub struct VqganArgs {
    /// Image size WxH (multiples of the VQGAN's downsampling factor).
    #[arg(long, default_value = "256x256")]
    size: String,
    /// Timed runs per stage, after one untimed warm-up run (1 to 1000).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=1000))]
    repeats: u16,
    /// taming VQGAN weights, .ckpt or .safetensors (default: random weights of the
    /// f16-16384 shape).
    #[arg(long, value_name = "FILE")]
    vqgan: Option<std::path::PathBuf>,
    /// The VQGAN's .yaml config (default: the .yaml beside --vqgan).
    #[arg(long, value_name = "YAML")]
    config: Option<std::path::PathBuf>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn run_vqgan(dev: &DeviceArgs, a: VqganArgs) -> Result<()> {
    use vqclip::models::vqgan::{config_beside, VqGan, VqGanConfig};
    let (w, h) = super::generate::parse_size(&a.size)?;
    let config = match (&a.vqgan, &a.config) {
        (None, Some(_)) => bail!("--config needs --vqgan FILE"),
        (None, None) => None,
        (Some(_), Some(c)) => Some(c.clone()),
        (Some(p), None) => match config_beside(p) {
            Some(c) => Some(c),
            None => bail!(
                "no config for {}: pass --config YAML (the taming .yaml the model was \
                 trained with)",
                p.display()
            ),
        },
    };
    let cfg = match &config {
        Some(c) => VqGanConfig::from_file(c)?,
        None => VqGanConfig::imagenet_f16(16384),
    };
    let f = cfg.downsampling_factor();
    if !w.is_multiple_of(f) || !h.is_multiple_of(f) {
        bail!("--size {w}x{h}: width and height must be multiples of the VQGAN factor {f}");
    }
    let gpu = dev.open()?;
    let (model, name) = match (&a.vqgan, config) {
        (Some(path), Some(c)) => (
            VqGan::load(path, &c, &gpu)
                .with_context(|| format!("cannot load the VQGAN {}", path.display()))?,
            path.display().to_string(),
        ),
        _ => {
            if !a.json {
                eprintln!("building a random-weight VQGAN f16-16384…");
            }
            let src = super::bench_generate::random_vqgan(&cfg, a.seed)?;
            (
                VqGan::from_source(&src, cfg, &gpu)?,
                "random f16-16384".to_string(),
            )
        }
    };
    let r = vqclip::bench::vqgan::vqgan_stages(&gpu, &model, w, h, a.repeats as usize)?;
    if a.json {
        #[derive(serde::Serialize)]
        struct Report<'a> {
            vqgan: &'a str,
            #[serde(flatten)]
            bench: &'a vqclip::bench::vqgan::VqganBench,
        }
        let rep = Report {
            vqgan: &name,
            bench: &r,
        };
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "vqgan {}x{} ({name}) on {} ({}), {} runs per stage",
            r.width, r.height, r.adapter, r.backend, r.repeats
        );
        for s in &r.stages {
            println!(
                "  {:<16} min {:>10.2} ms  median {:>10.2} ms  {:>8.2} GFLOP/s ({:.3} GFLOP)",
                s.stage, s.min_ms, s.median_ms, s.gflops, s.gflop
            );
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct MatmulArgs {
    /// Matrix size N, 1 to 65536.
    #[arg(long, default_value_t = 1024, value_parser = matmul_size)]
    size: usize,
    /// Only this variant (register4x4, shared64, vec4x4 or subgroup8); default: all.
    #[arg(long)]
    variant: Option<String>,
    /// Seconds to spend timing each variant (greater than 0, at most a week).
    #[arg(long, default_value_t = 2.0, value_parser = values::seconds)]
    seconds: f64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(dev: &DeviceArgs, cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Generate(a) => super::bench_generate::run(dev, a),
        BenchCmd::Vqgan(a) => run_vqgan(dev, a),
        BenchCmd::Matmul(a) => {
            let variants: Vec<Variant> = match &a.variant {
                None => Variant::ALL.to_vec(),
                Some(name) => match Variant::ALL.into_iter().find(|v| v.name() == name) {
                    Some(v) => vec![v],
                    None => bail!(
                        "unknown matmul variant '{name}': expected one of {}",
                        Variant::ALL.map(|v| v.name()).join(", ")
                    ),
                },
            };
            let gpu = dev.open()?;
            let r = vqclip::bench::matmul_square(&gpu, a.size, &variants, a.seconds)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "matmul {n}x{n}x{n} on {} ({})",
                    r.adapter,
                    r.backend,
                    n = r.size
                );
                for v in &r.variants {
                    println!(
                        "  {:<12} {:>9.2} ms  {:>8.2} GFLOP/s  (checked {} entries vs f64 CPU, worst {:.1} eps·Σ|ab|)",
                        v.name, v.ms, v.gflops, r.checked_entries, v.max_err
                    );
                }
                println!("best: {} at {:.2} GFLOP/s", r.best, r.gflops);
            }
            Ok(())
        }
    }
}
