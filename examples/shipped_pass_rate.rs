//! Pass rate of the shipped models over seeds: seeds 1..=N (N from `VQCLIP_SEEDS`, default 8)
//! of every case of tests/shipped_models.rs, judged the same way; prints each result and the
//! pass count (the figures in docs/generation_recipe.md), and with `VQCLIP_SWEEP_DIR` set
//! writes each image there. A measurement, not a gate (minutes on lavapipe).
//!
//! Run: `VQCLIP_SEEDS=8 cargo run --release --example shipped_pass_rate`.

#[path = "../tests/support/shipped_judge.rs"]
mod judge;

use judge::{generate_and_judge, shipped, CASES};
use vqclip::{DeviceOptions, Gpu};

fn main() {
    let n: u64 = std::env::var("VQCLIP_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let gpu = Gpu::new(&DeviceOptions::default()).unwrap();
    let (clip, vq) = shipped(&gpu);
    let mut total = 0;
    for case in CASES {
        let mut passed = 0;
        for seed in 1..=n {
            match generate_and_judge(&gpu, &clip, &vq, case, seed) {
                Ok(s) => {
                    passed += 1;
                    println!("pass {s}");
                }
                Err(e) => println!("FAIL {e}"),
            }
        }
        println!("{}: {passed}/{n}", case.0);
        total += passed;
    }
    println!("all: {total}/{}", n * CASES.len() as u64);
}
