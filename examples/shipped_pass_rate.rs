//! Pass rate of the shipped models over seeds: seeds 1..=N of every case of
//! tests/shipped_models.rs, generated with a preset (the default preset unless `--preset`
//! names one; `--steps` overrides its steps) and judged by the strict pixel judge of
//! tests/support/shipped_judge.rs; prints each result, the pass count per prompt and the pass
//! rate (the figures in docs/generation_recipe.md), and with `VQCLIP_SWEEP_DIR` set writes each
//! image there. A measurement, not a gate (minutes on lavapipe); the asserted threshold is in
//! tests/shipped_models.rs.
//!
//! Run: `cargo run --release --example shipped_pass_rate -- [--preset NAME] [--steps N]
//! [--seeds N]` (`--seeds` defaults to `VQCLIP_SEEDS` or 8).

#[path = "../tests/support/shipped_judge.rs"]
mod judge;

use anyhow::{bail, Context, Result};
use judge::{generate, judge_image, shipped, CASES};
use vqclip::generate::Preset;
use vqclip::{DeviceOptions, Gpu};

fn main() -> Result<()> {
    let mut seeds: u64 = std::env::var("VQCLIP_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let (mut preset, mut steps) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--preset" => preset = Some(value()?.parse::<Preset>()?),
            "--steps" => steps = Some(value()?.parse::<usize>().context("--steps")?),
            "--seeds" => seeds = value()?.parse().context("--seeds")?,
            o => bail!("unknown argument {o}: expected --preset NAME, --steps N or --seeds N"),
        }
    }
    let gpu = Gpu::new(&DeviceOptions::default())?;
    let (clip, vq) = shipped(&gpu);
    let name = preset.unwrap_or(Preset::default_for(true)).name();
    println!("preset {name}, steps {steps:?} (None: the preset's), seeds 1-{seeds}");
    let mut total = 0;
    for case in CASES {
        let mut passed = 0;
        for seed in 1..=seeds {
            let t = std::time::Instant::now();
            let (rgb, size) = generate(&gpu, &clip, &vq, case.0, seed, preset, steps);
            let secs = t.elapsed().as_secs_f32();
            match judge_image(&rgb, size, case) {
                Ok(s) => {
                    passed += 1;
                    println!("pass seed {seed} ({secs:.0} s): {s}");
                }
                Err(e) => println!("FAIL seed {seed} ({secs:.0} s): {e}"),
            }
        }
        println!("{}: {passed}/{seeds}", case.0);
        total += passed;
    }
    let runs = seeds * CASES.len() as u64;
    println!(
        "all: {total}/{runs} = {:.0}% (preset {name}, steps {steps:?})",
        100.0 * total as f64 / runs.max(1) as f64
    );
    Ok(())
}
