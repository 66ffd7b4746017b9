//! Buffer pool keyed by size class.
//!
//! Classes step by quarter-octaves (1, 1.25, 1.5, 1.75 × 2^k bytes) so a tensor wastes at most
//! a quarter of its buffer. A dropped tensor's buffer goes back to its class's free list and
//! is handed to the next allocation of that class; reuse is safe because every later use is
//! recorded after the earlier ones in the same queue.

use super::{lock, Gpu, GpuInner};
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
}

impl Pool {
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

pub(crate) fn alloc(gpu: &Gpu, bytes: u64) -> PooledBuffer {
    let class = size_class(bytes);
    let reused = {
        let mut p = lock(&gpu.0.pool);
        let b = p.free.get_mut(&class).and_then(|v| v.pop());
        if b.is_some() {
            p.stats.idle -= class;
        }
        p.stats.live += class;
        p.stats.peak = p.stats.peak.max(p.stats.live);
        b
    };
    let buffer = reused.unwrap_or_else(|| {
        gpu.0.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: class,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    });
    PooledBuffer {
        buffer: Some(buffer),
        class,
        gpu: Arc::downgrade(&gpu.0),
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

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
