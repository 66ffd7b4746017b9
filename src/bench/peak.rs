//! `vqclip bench peak`: what the adapter itself can do, measured with microkernels
//! (`shaders/peak.wgsl`, `shaders/peak_f16.wgsl`): f32 (and, with SHADER_F16, f16) FMA
//! throughput and copy bandwidth. `bench all` states every kernel as a share of these.
//!
//! Each figure grows its dispatch (doubling the work) until one run takes at least
//! [`MIN_RUN_SECS`], so that submission overhead is small beside it, then repeats it and
//! keeps the best and the median run.

use crate::gpu::{Kernel, Shader};
use crate::tensor::DType;
use crate::{Error, Gpu, Result, Tensor};
use std::time::Instant;

pub(crate) static SHADER: Shader<Params> = crate::shader!("peak");
pub(crate) static F16_SHADER: Shader<Params> = crate::shader!("peak_f16");

crate::shader_params! {
    /// Mirrors `struct Params` in `shaders/peak.wgsl` and `shaders/peak_f16.wgsl`.
    pub(crate) struct Params {
        iters: u32,
        n: u32,
        row: u32,
        mul: f32,
        add: f32,
    }
}

/// Shortest run a figure is taken from.
pub const MIN_RUN_SECS: f64 = 0.03;
/// Loop trips per invocation of the FMA kernels: 256 FLOP each, and far under llvmpipe's
/// 65,535-iteration cap ([`crate::ops::CPU_LOOP_LIMIT`]) counting the inner loop's 4.
const FMA_ITERS: u32 = 256;
const FLOP_PER_INVOCATION: f64 = 256.0 * FMA_ITERS as f64;
/// Invocations per workgroup (`@workgroup_size(64)`).
const WG: usize = 64;
/// Most workgroups a figure grows to: 65,535 × 64 in a 2D grid.
const MAX_WORKGROUPS: usize = 65_535 * 64;
/// Invocations of the FMA kernels that store their sums.
const STORED: usize = 1 << 16;

/// One measured limit.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Figure {
    /// GFLOP/s (FMA figures) or GB/s (bandwidth) of the fastest run.
    pub best: f64,
    /// The same at the median run.
    pub median: f64,
    /// Milliseconds of the median run.
    pub ms: f64,
    /// Work in one run: FLOP, or bytes read plus written.
    pub work: f64,
    /// Runs timed.
    pub runs: usize,
}

/// What `bench peak` measured on one adapter.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeakBench {
    /// Adapter name.
    pub adapter: String,
    /// Backend name.
    pub backend: String,
    /// f32 FMA throughput, GFLOP/s (an FMA counts 2 FLOP).
    pub f32_fma: Figure,
    /// f16 FMA throughput, GFLOP/s; `None` where the adapter lacks SHADER_F16.
    pub f16_fma: Option<Figure>,
    /// Copy bandwidth, GB/s of bytes read plus written.
    pub copy: Figure,
    /// Bytes of each copy buffer.
    pub copy_bytes: u64,
}

/// A 2D grid of `wgs` workgroups: x up to 65,535, y as many rows as needed. Returns the
/// grid and the invocations per row.
fn grid(wgs: usize) -> ([u32; 3], u32) {
    let x = wgs.min(65_535);
    let y = wgs.div_ceil(x);
    ([x as u32, y as u32, 1], (x * WG) as u32)
}

/// Runs `dispatch(workgroups)` once and returns its wall time in seconds, GPU work included.
fn timed(gpu: &Gpu, dispatch: &dyn Fn(usize) -> Result<()>, wgs: usize) -> Result<f64> {
    gpu.sync()?;
    let t = Instant::now();
    dispatch(wgs)?;
    gpu.sync()?;
    Ok(t.elapsed().as_secs_f64())
}

/// Grows the dispatch from `start` workgroups until a run takes [`MIN_RUN_SECS`] (or the
/// grid is full), then times `runs` more. `work(wgs)` is one run's FLOP or bytes.
fn measure(
    gpu: &Gpu,
    dispatch: &dyn Fn(usize) -> Result<()>,
    work: &dyn Fn(usize) -> f64,
    start: usize,
    max: usize,
    runs: usize,
) -> Result<Figure> {
    let mut wgs = start.min(max);
    // The first run compiles the pipeline; it is not a figure.
    timed(gpu, dispatch, wgs)?;
    loop {
        let t = timed(gpu, dispatch, wgs)?;
        if t >= MIN_RUN_SECS || wgs >= max {
            break;
        }
        // Jump most of the way at once when far off, doubling near the end.
        let factor = (MIN_RUN_SECS / t.max(1e-6)).clamp(2.0, 64.0);
        wgs = ((wgs as f64 * factor) as usize).min(max);
    }
    let mut times = (0..runs.max(1))
        .map(|_| timed(gpu, dispatch, wgs))
        .collect::<Result<Vec<_>>>()?;
    times.sort_by(f64::total_cmp);
    let w = work(wgs);
    let med = times[times.len() / 2];
    Ok(Figure {
        best: w / times[0] / 1e9,
        median: w / med / 1e9,
        ms: med * 1e3,
        work: w,
        runs: times.len(),
    })
}

/// FMA throughput of `shader`'s `entry` (f32 or f16), GFLOP/s.
fn fma(
    gpu: &Gpu,
    shader: &'static Shader<Params>,
    entry: &'static str,
    runs: usize,
) -> Result<Figure> {
    // The first STORED invocations store their sums (the rest compute the same chains:
    // `n` is a runtime value, so no compiler can skip them).
    let out = Tensor::zeros(gpu, &[STORED * 4])?;
    let stored = STORED as u32;
    let kernel = Kernel::new(shader, entry);
    let dispatch = |wgs: usize| -> Result<()> {
        let (g, row) = grid(wgs);
        let p = Params {
            iters: FMA_ITERS,
            n: stored,
            row,
            mul: 0.999,
            add: 0.001,
        };
        gpu.dispatch(&kernel, &p, &[out.binding()], g);
        Ok(())
    };
    let work = |wgs: usize| wgs as f64 * WG as f64 * FLOP_PER_INVOCATION;
    let fig = measure(gpu, &dispatch, &work, 4, MAX_WORKGROUPS, runs)?;
    // The chains climb from near 0 towards add / (1 - mul) = 1: the first workgroup's
    // lanes (always run) must hold positive finite sums, or the kernel did not run as written.
    let head = out.to_vec()?;
    if let Some(bad) = head
        .iter()
        .take(WG * 4)
        .find(|v| !v.is_finite() || **v <= 0.0)
    {
        return Err(Error::invalid(format!(
            "peak {entry} stored {bad}, not a positive finite sum"
        )));
    }
    Ok(fig)
}

/// Copy bandwidth over two buffers of `bytes` each (rounded down to whole vec4s and to the
/// device's binding limit), GB/s of bytes read plus written.
fn copy(gpu: &Gpu, bytes: u64, runs: usize) -> Result<(Figure, u64)> {
    let limit = gpu
        .limits()
        .max_storage_buffer_binding_size
        .min(gpu.limits().max_buffer_size);
    let bytes = bytes.min(limit) / 16 * 16;
    let n = (bytes / 4) as usize;
    let src = Tensor::full(gpu, &[n], 1.5)?;
    let dst = Tensor::empty(gpu, &[n], DType::F32)?;
    let vec4s = n / 4;
    let kernel = Kernel::new(&SHADER, "copy");
    // One dispatch copies the whole buffer; a run repeats it `reps` times, so the growth
    // in `measure` counts repetitions of the full copy.
    let dispatch = |reps: usize| -> Result<()> {
        let (g, row) = grid(vec4s.div_ceil(WG));
        let p = Params {
            iters: 0,
            n: vec4s as u32,
            row,
            mul: 0.0,
            add: 0.0,
        };
        for _ in 0..reps {
            gpu.dispatch(&kernel, &p, &[dst.binding(), src.binding()], g);
        }
        Ok(())
    };
    let work = |reps: usize| reps as f64 * 2.0 * (vec4s * 16) as f64;
    let fig = measure(gpu, &dispatch, &work, 1, 256, runs)?;
    let got = dst.to_vec()?;
    if let Some((i, v)) = got.iter().enumerate().find(|(_, v)| **v != 1.5) {
        return Err(Error::invalid(format!(
            "peak copy left {v} at element {i} instead of 1.5"
        )));
    }
    Ok((fig, (vec4s * 16) as u64))
}

/// Measures the adapter's limits: f32 and (where supported) f16 FMA throughput, and copy
/// bandwidth over buffers of `copy_bytes` (64 MiB is past every CPU cache and most GPU
/// L2s; 256 MiB and more for GPUs with large L2). `runs` timed runs per figure.
pub fn peak(gpu: &Gpu, copy_bytes: u64, runs: usize) -> Result<PeakBench> {
    if copy_bytes < 16 {
        return Err(Error::invalid("the copy buffers need at least 16 bytes"));
    }
    let f32_fma = fma(gpu, &SHADER, "fma_f32", runs)?;
    let f16_fma = if gpu.features().contains(wgpu::Features::SHADER_F16) {
        Some(fma(gpu, &F16_SHADER, "fma_f16", runs)?)
    } else {
        None
    };
    let (copy, copy_bytes) = copy(gpu, copy_bytes, runs)?;
    Ok(PeakBench {
        adapter: gpu.info().name.clone(),
        backend: format!("{:?}", gpu.info().backend),
        f32_fma,
        f16_fma,
        copy,
        copy_bytes,
    })
}

/// The copy buffer size `bench peak` uses by default on this device: 64 MiB on CPU
/// adapters, 512 MiB (or the binding limit) on GPUs, whose L2 can reach 100+ MB.
pub fn default_copy_bytes(gpu: &Gpu) -> u64 {
    if gpu.is_cpu() {
        64 << 20
    } else {
        512 << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::gpu;

    #[test]
    fn peak_figures_are_positive_and_finite() {
        let g = gpu();
        // Small copy buffers keep the test quick; the figures need only be sane.
        let r = peak(&g, 1 << 20, 1).unwrap();
        let mut figs = vec![("f32", &r.f32_fma), ("copy", &r.copy)];
        if let Some(f) = &r.f16_fma {
            figs.push(("f16", f));
        }
        assert_eq!(
            r.f16_fma.is_some(),
            g.features().contains(wgpu::Features::SHADER_F16)
        );
        for (name, f) in figs {
            assert!(f.best.is_finite() && f.best > 0.0, "{name}: {f:?}");
            assert!(
                f.median.is_finite() && f.median > 0.0 && f.median <= f.best,
                "{name}: {f:?}"
            );
            assert!(f.work > 0.0 && f.ms > 0.0, "{name}: {f:?}");
        }
        assert_eq!(r.copy_bytes, 1 << 20);
    }

    #[test]
    fn a_copy_buffer_under_one_vec4_is_refused() {
        let e = peak(&gpu(), 8, 1).unwrap_err().to_string();
        assert!(e.contains("16 bytes"), "{e}");
    }
}
