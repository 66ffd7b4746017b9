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
    /// The adapter's own limits, from microkernels: f32 (and f16 with SHADER_F16) FMA
    /// throughput in GFLOP/s and copy bandwidth in GB/s.
    Peak(PeakArgs),
    /// Every kernel family and model stage, with ms, GFLOP/s or GB/s and % of the measured
    /// peak; writes report.json, report.md and roofline.svg with --report DIR.
    All(AllArgs),
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

#[derive(Args, Debug)]
pub struct AllArgs {
    /// Folder for report.json, report.md and roofline.svg.
    #[arg(long, value_name = "DIR")]
    report: std::path::PathBuf,
    /// The short list (every family and stage at sizes a CPU adapter runs in minutes).
    #[arg(long)]
    quick: bool,
    /// Seconds to spend timing each item (at least 3 runs each).
    #[arg(long, default_value_t = 1.0, value_parser = values::seconds)]
    seconds: f64,
    /// Only items whose name contains this (repeatable).
    #[arg(long, value_name = "TEXT")]
    only: Vec<String>,
    /// First time the matmul variants per shape class, the convolution variants and the
    /// attention paths (with gradients, and the forward kernel), and remember each winner
    /// for this adapter (else the remembered choices, or the defaults, are used).
    #[arg(long)]
    tune: bool,
    /// Measure nothing: add the figures of tools/peer_bench_all.py's output FILE as a
    /// column to DIR/report.json and rewrite the report.
    #[arg(long, value_name = "FILE")]
    merge_peer: Option<std::path::PathBuf>,
    /// Print the report as JSON too.
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
            let src = vqclip::bench::random_vqgan(&cfg, a.seed)?;
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
pub struct PeakArgs {
    /// Bytes of each copy buffer in MiB (default: 64 on CPU adapters, 512 on GPUs; capped
    /// at the device's binding limit).
    #[arg(long, value_parser = values::at_least_one)]
    copy_mib: Option<usize>,
    /// Timed runs per figure, after the runs that size it.
    #[arg(long, default_value_t = 5, value_parser = values::at_least_one)]
    runs: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct MatmulArgs {
    /// Matrix size N, 1 to 65536.
    #[arg(long, default_value_t = 1024, value_parser = matmul_size)]
    size: usize,
    /// Only this variant (register4x4, shared64, vec4x4, subgroup8, subgroup16, subgroup32, subgroup32w or tile128);
    /// default: all.
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
        BenchCmd::All(a) => run_all(dev, a),
        BenchCmd::Peak(a) => {
            let gpu = dev.open()?;
            let bytes = match a.copy_mib {
                Some(m) => (m as u64).saturating_mul(1 << 20),
                None => vqclip::bench::peak::default_copy_bytes(&gpu),
            };
            let r = vqclip::bench::peak::peak(&gpu, bytes, a.runs)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("peak of {} ({})", r.adapter, r.backend);
                let line = |what: &str, f: &vqclip::bench::peak::Figure, unit: &str| {
                    println!(
                        "  {what:<10} {:>10.2} {unit} best, {:>10.2} median ({} runs of {:.1} ms)",
                        f.best, f.median, f.runs, f.ms
                    )
                };
                line("f32 FMA", &r.f32_fma, "GFLOP/s");
                match &r.f16_fma {
                    Some(f) => line("f16 FMA", f, "GFLOP/s"),
                    None => println!("  f16 FMA    (no SHADER_F16 on this adapter)"),
                }
                line("copy", &r.copy, "GB/s   ");
                println!(
                    "  (copy: read + write of {} per run)",
                    vqclip::gpu::human_bytes(r.copy_bytes)
                );
            }
            Ok(())
        }
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

fn run_all(dev: &DeviceArgs, a: AllArgs) -> Result<()> {
    use anyhow::Context;
    use vqclip::bench::all;
    let report = match &a.merge_peer {
        Some(peer_path) => {
            let path = a.report.join("report.json");
            let mut r: all::Report = serde_json::from_slice(
                &std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
            )
            .with_context(|| format!("{} is not a bench all report", path.display()))?;
            let peer: all::PeerFile = serde_json::from_slice(
                &std::fs::read(peer_path)
                    .with_context(|| format!("cannot read {}", peer_path.display()))?,
            )
            .with_context(|| {
                format!("{} is not a peer_bench_all.py output", peer_path.display())
            })?;
            let n = all::merge_peer(&mut r, &peer)?;
            eprintln!("merged {n} of {} peer items", peer.items.len());
            r
        }
        None => {
            let gpu = dev.open()?;
            let o = all::AllOptions {
                quick: a.quick,
                seconds: a.seconds,
                only: a.only.clone(),
                tune: a.tune,
            };
            all::run(&gpu, &o, &|what| eprintln!("{what}…"))?
        }
    };
    all::write_report(&report, &a.report)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", all::markdown(&report));
        println!("\nwritten to {}", a.report.display());
    }
    Ok(())
}
