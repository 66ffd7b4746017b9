//! Buffer pool keyed by size class.
//!
//! Classes step by quarter-octaves (1, 1.25, 1.5, 1.75 × 2^k bytes) so a tensor wastes at most
//! a quarter of its buffer. A dropped tensor's buffer goes back to its class's free list and
//! is handed to the next allocation of that class; reuse is safe because every later use is
//! recorded after the earlier ones in the same queue.
//!
//! An optional budget bounds the bytes the pool holds (live and idle): a new buffer that
//! would pass it first releases the idle buffers, then fails with an error naming the budget.

use super::{lock, Gpu, GpuInner};
use crate::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Weak};

const MIN_CLASS: u64 = 256;

/// Rounds `bytes` up to its size class.
pub(crate) fn size_class(bytes: u64) -> u64 {
    let b = bytes.max(MIN_CLASS);
    let octave = 63 - b.leading_zeros() as u64; // floor(log2 b)
    let base = 1u64 << octave;
    if base == b {
        return b;
    }
    let quarter = (base / 4).max(1);
    b.div_ceil(quarter) * quarter
}

/// Memory figures of the pool, in bytes.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PoolStats {
    /// Bytes in buffers owned by live tensors.
    pub live: u64,
    /// Highest `live` seen since the last reset.
    pub peak: u64,
    /// Bytes in idle buffers kept for reuse.
    pub idle: u64,
}

#[derive(Default)]
pub(crate) struct Pool {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    stats: PoolStats,
    budget: Option<u64>,
}

/// `b` bytes in KiB, MiB or GiB, whichever reads best.
pub fn human_bytes(b: u64) -> String {
    let f = b as f64;
    match b {
        0..0x10_0000 => format!("{:.0} KiB", f / 1024.0),
        0x10_0000..0x4000_0000 => format!("{:.1} MiB", f / (1u64 << 20) as f64),
        _ => format!("{:.2} GiB", f / (1u64 << 30) as f64),
    }
}

impl Pool {
    pub(crate) fn with_budget(budget: Option<u64>) -> Pool {
        Pool {
            budget,
            ..Pool::default()
        }
    }
    pub(crate) fn budget(&self) -> Option<u64> {
        self.budget
    }
    pub(crate) fn stats(&self) -> PoolStats {
        self.stats
    }
    pub(crate) fn reset_peak(&mut self) {
        self.stats.peak = self.stats.live;
    }
    pub(crate) fn trim(&mut self) {
        self.free.clear();
        self.stats.idle = 0;
    }
}

/// A buffer owned by one tensor; returns to the pool when dropped.
pub(crate) struct PooledBuffer {
    pub(crate) buffer: Option<wgpu::Buffer>,
    pub(crate) class: u64,
    gpu: Weak<GpuInner>,
}

impl PooledBuffer {
    pub(crate) fn raw(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("buffer present until drop")
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let (Some(buf), Some(g)) = (self.buffer.take(), self.gpu.upgrade()) {
            let mut p = lock(&g.pool);
            p.stats.live -= self.class;
            p.stats.idle += self.class;
            p.free.entry(self.class).or_default().push(buf);
        }
    }
}

pub(crate) fn alloc(gpu: &Gpu, bytes: u64) -> Result<PooledBuffer> {
    let class = size_class(bytes);
    let reused = {
        let mut p = lock(&gpu.0.pool);
        let b = p.free.get_mut(&class).and_then(|v| v.pop());
        if b.is_some() {
            p.stats.idle -= class;
        } else if let Some(budget) = p.budget {
            if p.stats.live + p.stats.idle + class > budget {
                p.trim();
                // Cached bind groups would keep the released buffers alive.
                lock(&gpu.0.bind_groups).clear();
            }
            if p.stats.live + class > budget {
                return Err(Error::Gpu(format!(
                    "over the GPU memory budget: a {} buffer on top of the {} in use needs {}, \
                     more than the budget of {} (--max-memory); try a smaller image size, \
                     fewer cutouts, --recompute, or a larger --max-memory if the device has \
                     the memory",
                    human_bytes(class),
                    human_bytes(p.stats.live),
                    human_bytes(p.stats.live + class),
                    human_bytes(budget)
                )));
            }
        }
        p.stats.live += class;
        p.stats.peak = p.stats.peak.max(p.stats.live);
        b
    };
    let buffer = match reused {
        Some(b) => b,
        None => {
            let usage = wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST;
            match gpu.create_buffer("a tensor", class, usage) {
                Ok(b) => b,
                Err(e) => {
                    lock(&gpu.0.pool).stats.live -= class;
                    return Err(e);
                }
            }
        }
    };
    Ok(PooledBuffer {
        buffer: Some(buffer),
        class,
        gpu: Arc::downgrade(&gpu.0),
    })
}

#[cfg(test)]
mod tests {
    use super::size_class;
    use crate::{DeviceOptions, Gpu, Tensor};

    /// A device of its own, so that the budget does not touch the shared test device.
    fn budgeted(bytes: u64) -> Gpu {
        let mut opts = DeviceOptions::from_env().unwrap();
        opts.max_memory = Some(bytes);
        Gpu::new(&opts).unwrap()
    }

    #[test]
    fn the_budget_refuses_what_would_pass_it_and_idle_buffers_give_way() {
        let gpu = budgeted(1 << 20);
        assert_eq!(gpu.memory_budget(), Some(1 << 20));
        let a = Tensor::zeros(&gpu, &[128 * 1024]).unwrap(); // 512 KiB
        let e = Tensor::zeros(&gpu, &[160 * 1024]).unwrap_err().to_string(); // 640 KiB
        assert!(
            e.contains("640 KiB buffer") && e.contains("budget of 1.0 MiB"),
            "{e}"
        );
        assert_eq!(
            gpu.memory().live,
            512 << 10,
            "a refused buffer is not counted"
        );
        // Once the first tensor is dropped its idle buffer is released to make room.
        drop(a);
        let b = Tensor::zeros(&gpu, &[160 * 1024]).unwrap();
        assert_eq!(gpu.memory().live, 640 << 10);
        assert!(gpu.memory().live + gpu.memory().idle <= 1 << 20);
        drop(b);
    }

    #[test]
    fn classes_bound_waste() {
        for b in [
            1u64,
            255,
            256,
            257,
            1000,
            4096,
            5000,
            1 << 20,
            (1 << 20) + 1,
            123_456_789,
        ] {
            let c = size_class(b);
            assert!(c >= b.max(256), "{b} -> {c}");
            assert!(c as f64 <= b.max(256) as f64 * 1.25 + 1.0, "{b} -> {c}");
            assert_eq!(c % 4, 0);
        }
    }
}
