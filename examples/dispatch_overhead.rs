//! Host cost of recording dispatches: 20,000 tiny adds recorded back to back (each on the
//! previous result), timed while recording (wall, and the recording thread's own CPU time)
//! and again until the device is idle; three rounds. `bench all`'s "dispatch overhead" item
//! times the same chain with a PyTorch peer; this splits out the host's share.
//!
//! Run: `cargo run --release --example dispatch_overhead` (device from `VQCLIP_BACKEND` /
//! `VQCLIP_ADAPTER`).

use anyhow::Result;
use vqclip::{DeviceOptions, Gpu, Tensor};

fn main() -> Result<()> {
    let g = Gpu::new(&DeviceOptions::from_env()?)?;
    let n = 20_000;
    let a = Tensor::from_slice(&g, &[1.0f32; 64], &[64])?;
    for round in 0..3 {
        let t = std::time::Instant::now();
        let cpu0 = thread_cpu();
        let mut x = a.clone();
        for _ in 0..n {
            x = vqclip::ops::elementwise::add(&x, &a)?;
        }
        let rec = t.elapsed().as_secs_f64();
        let cpu = thread_cpu() - cpu0;
        g.sync()?;
        let all = t.elapsed().as_secs_f64();
        println!(
            "round {round}: record {:.2} us/dispatch (recording thread's CPU {:.2} us), \
             record+run {:.2} us/dispatch",
            rec * 1e6 / n as f64,
            cpu * 1e6 / n as f64,
            all * 1e6 / n as f64
        );
    }
    Ok(())
}

/// CPU seconds (user + system) of the calling thread.
fn thread_cpu() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}
