//! Host cost of recording dispatches: N tiny adds recorded back to back (each on the
//! previous result), timed while recording and again until the device is idle.
use anyhow::Result;
use vqclip::{DeviceOptions, Gpu, Tensor};

fn main() -> Result<()> {
    let g = Gpu::new(&DeviceOptions::from_env()?)?;
    let n = 20_000;
    let a = Tensor::from_slice(&g, &[1.0f32; 64], &[64])?;
    for round in 0..3 {
        let t = std::time::Instant::now();
        let mut x = a.clone();
        for _ in 0..n {
            x = vqclip::ops::elementwise::add(&x, &a)?;
        }
        let rec = t.elapsed().as_secs_f64();
        g.sync()?;
        let all = t.elapsed().as_secs_f64();
        println!(
            "round {round}: record {:.2} us/dispatch, record+run {:.2} us/dispatch",
            rec * 1e6 / n as f64,
            all * 1e6 / n as f64
        );
    }
    Ok(())
}
