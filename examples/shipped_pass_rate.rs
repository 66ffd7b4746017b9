//! Pass rate of the shipped models over seeds: seeds 1..=N of every case of
//! tests/shipped_models.rs, generated with a preset (the default preset unless `--preset`
//! names one; `--steps` overrides its steps) and judged by the strict pixel judge of
//! tests/support/shipped_judge.rs; prints each result, the pass count per prompt, the pass
//! rate and how many runs have the right colours alone (the figures in docs/generation_recipe.md), and with `VQCLIP_SWEEP_DIR` set writes each
//! image there. A measurement, not a gate (minutes on lavapipe); the asserted threshold is in
//! tests/shipped_models.rs.
//!
//! Run: `cargo run --release --example shipped_pass_rate -- [--preset NAME] [--steps N]
//! [--seeds N] [--sheet PNG]` (`--seeds` defaults to `VQCLIP_SEEDS` or 8; `--sheet` writes a
//! contact sheet of every image, one row per prompt, seeds left to right, upscaled ×2).
//! `--judge DIR` judges the images an earlier run wrote to `VQCLIP_SWEEP_DIR=DIR` instead of
//! generating them (seconds: to rejudge after a change of the judge).

#[path = "../tests/support/shipped_judge.rs"]
mod judge;

use anyhow::{bail, Context, Result};
use judge::{colours_pass, generate, judge_image, shipped, CASES};
use vqclip::generate::Preset;
use vqclip::{DeviceOptions, Gpu};

fn main() -> Result<()> {
    let mut seeds: u64 = std::env::var("VQCLIP_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let (mut preset, mut steps, mut sheet) = (None, None, None::<std::path::PathBuf>);
    let mut saved = None::<std::path::PathBuf>;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--preset" => preset = Some(value()?.parse::<Preset>()?),
            "--steps" => steps = Some(value()?.parse::<usize>().context("--steps")?),
            "--seeds" => seeds = value()?.parse().context("--seeds")?,
            "--sheet" => sheet = Some(value()?.into()),
            "--judge" => saved = Some(value()?.into()),
            o => bail!(
                "unknown argument {o}: expected --preset NAME, --steps N, --seeds N, --sheet PNG \
                 or --judge DIR"
            ),
        }
    }
    let gpu = Gpu::new(&DeviceOptions::default())?;
    let (clip, vq) = shipped(&gpu);
    let name = preset.unwrap_or(Preset::default_for(true)).name();
    println!("preset {name}, steps {steps:?} (None: the preset's), seeds 1-{seeds}");
    let (mut total, mut colours) = (0, 0);
    let mut images = Vec::new();
    for case in CASES {
        let mut passed = 0;
        for seed in 1..=seeds {
            let t = std::time::Instant::now();
            let (rgb, size) = match &saved {
                None => generate(&gpu, &clip, &vq, case.0, seed, preset, steps),
                Some(dir) => {
                    let name = format!("{}_seed{seed}.png", case.0.replace(' ', "_"));
                    let img = image::open(dir.join(&name))
                        .with_context(|| format!("cannot read {name} in {}", dir.display()))?
                        .to_rgb8();
                    let size = img.width() as usize;
                    (img.into_raw(), size)
                }
            };
            let secs = t.elapsed().as_secs_f32();
            colours += usize::from(colours_pass(&rgb, size, case));
            images.push((rgb.clone(), size));
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
    if let Some(path) = sheet {
        contact_sheet(&images, seeds as usize, &path)?;
        println!("contact sheet: {}", path.display());
    }
    let runs = seeds * CASES.len() as u64;
    println!(
        "all: {total}/{runs} = {:.0}% (preset {name}, steps {steps:?}); colours alone (border \
         and interior, shape not judged): {colours}/{runs}",
        100.0 * total as f64 / runs.max(1) as f64
    );
    Ok(())
}

/// Writes `images` (row-major: `per_row` a row) as one PNG, each pixel doubled.
fn contact_sheet(
    images: &[(Vec<u8>, usize)],
    per_row: usize,
    path: &std::path::Path,
) -> Result<()> {
    let size = images.first().map_or(0, |i| i.1);
    let rows = images.len().div_ceil(per_row.max(1));
    let (w, h) = (per_row * size * 2, rows * size * 2);
    let mut sheet = image::RgbImage::new(w as u32, h as u32);
    for (k, (rgb, _)) in images.iter().enumerate() {
        let (ox, oy) = ((k % per_row) * size * 2, (k / per_row) * size * 2);
        for y in 0..size * 2 {
            for x in 0..size * 2 {
                let p = ((y / 2) * size + x / 2) * 3;
                let px = image::Rgb([rgb[p], rgb[p + 1], rgb[p + 2]]);
                sheet.put_pixel((ox + x) as u32, (oy + y) as u32, px);
            }
        }
    }
    sheet
        .save(path)
        .with_context(|| format!("cannot write {}", path.display()))
}
