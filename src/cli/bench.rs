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
    /// The adapter's own limits, from microkernels: f32 (and f16 with SHADER_F16) FMA
    /// throughput in GFLOP/s and copy bandwidth in GB/s.
    Peak(PeakArgs),
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
