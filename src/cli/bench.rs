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
use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use vqclip::ops::matmul::Variant;

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Square N×N matmul: every kernel variant, checked against the CPU, in GFLOP/s.
    Matmul(MatmulArgs),
    /// One VQGAN+CLIP optimisation step (random-weight ViT-B/32 and f16-16384 by default):
    /// ms per step and peak GPU memory.
    Generate(super::bench_generate::GenerateBenchArgs),
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
