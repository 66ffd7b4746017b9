//! Tensors derived from weights and kept across calls: the convolution's packed weight
//! matrix (bias column and zero padding appended) and the flipped, channel-swapped copy its
//! input gradient multiplies with. Building them costs a pass over the weight (on lavapipe
//! 8-15% of a VQGAN decode with its backward when redone per call), and the weights of a
//! frozen model never change.
//!
//! Entries are keyed by what they are and by the identity of the buffers they were made
//! from. They hold only weak references to those buffers, so a dropped weight's entry is
//! never returned (its address cannot be reused while a weak reference lives) and is
//! pruned. Code that overwrites a tensor in place (`Tensor::assign`, the optimiser) calls
//! [`Gpu::invalidate_derived`] for it. Entries are not made beyond [`DERIVED_BUDGET`] bytes.

use super::pool::PooledBuffer;
use super::{lock, Gpu};
use crate::tensor::{DType, Tensor};
use crate::Result;
use std::collections::HashMap;
use std::sync::{Arc, Weak};

/// Most bytes of derived tensors kept per device.
pub const DERIVED_BUDGET: u64 = 1 << 30;

/// One derived tensor and the buffers it was made from.
pub(crate) struct Entry {
    sources: Vec<Weak<PooledBuffer>>,
    buf: Arc<PooledBuffer>,
    shape: Vec<usize>,
    dtype: DType,
    bytes: u64,
}

impl Entry {
    fn live(&self) -> bool {
        self.sources.iter().all(|s| s.strong_count() > 0)
    }
}

/// What an entry was made by and from: the derivation's name, then each source's buffer
/// identity and shape (reshapes of one buffer share its identity).
type Key = (&'static str, Vec<(usize, Vec<usize>)>);

/// The cache: key -> entry.
#[derive(Default)]
pub(crate) struct Derived {
    map: HashMap<Key, Entry>,
    bytes: u64,
}

impl Derived {
    fn prune(&mut self) {
        let mut freed = 0;
        self.map.retain(|_, e| {
            let keep = e.live();
            if !keep {
                freed += e.bytes;
            }
            keep
        });
        self.bytes -= freed;
    }
}

impl Gpu {
    /// The tensor `make` derives from `sources`, made once and kept until a source is
    /// dropped or overwritten ([`Gpu::invalidate_derived`]). `kind` names the derivation
    /// (one kind, one function of the sources).
    pub fn derived(
        &self,
        kind: &'static str,
        sources: &[&Tensor],
        make: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let key: Key = (
            kind,
            sources
                .iter()
                .map(|t| (t.buffer_id(), t.shape().to_vec()))
                .collect::<Vec<_>>(),
        );
        {
            let d = lock(&self.0.derived);
            if let Some(e) = d.map.get(&key) {
                if e.live() {
                    return Ok(Tensor::from_parts(self, e.buf.clone(), &e.shape, e.dtype));
                }
            }
        }
        let t = make()?;
        let mut d = lock(&self.0.derived);
        d.prune();
        if d.bytes + t.bytes() <= DERIVED_BUDGET {
            d.bytes += t.bytes();
            d.map.insert(
                key,
                Entry {
                    sources: sources
                        .iter()
                        .map(|s| Arc::downgrade(s.buffer_arc()))
                        .collect(),
                    buf: t.buffer_arc().clone(),
                    shape: t.shape().to_vec(),
                    dtype: t.dtype(),
                    bytes: t.bytes(),
                },
            );
        }
        Ok(t)
    }

    /// Forgets every derived tensor made from `t`'s buffer: call it after writing into `t`
    /// in place.
    pub fn invalidate_derived(&self, t: &Tensor) {
        let mut d = lock(&self.0.derived);
        if d.map.is_empty() {
            return;
        }
        let id = t.buffer_id();
        let mut freed = 0;
        d.map.retain(|(_, ids), e| {
            let keep = !ids.iter().any(|(i, _)| *i == id) && e.live();
            if !keep {
                freed += e.bytes;
            }
            keep
        });
        d.bytes -= freed;
    }

    /// Bytes held by derived tensors (tests).
    pub fn derived_bytes(&self) -> u64 {
        lock(&self.0.derived).bytes
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::testutil::gpu;
    use crate::Tensor;

    #[test]
    fn derived_tensors_are_reused_and_forgotten_when_the_source_changes() {
        let g = gpu();
        let w = Tensor::from_slice(&g, &[1.0, 2.0, 3.0], &[3]).unwrap();
        let calls = std::cell::Cell::new(0);
        let double = |src: &Tensor| {
            calls.set(calls.get() + 1);
            crate::ops::elementwise::scale(src, 2.0)
        };
        let a = g.derived("test_double", &[&w], || double(&w)).unwrap();
        let b = g.derived("test_double", &[&w], || double(&w)).unwrap();
        assert_eq!(calls.get(), 1, "the second call reuses the first result");
        assert_eq!(a.buffer_id(), b.buffer_id());
        assert_eq!(b.to_vec().unwrap(), vec![2.0, 4.0, 6.0]);
        // An in-place write must not leave a stale derived copy behind.
        w.assign(&Tensor::from_slice(&g, &[5.0, 6.0, 7.0], &[3]).unwrap())
            .unwrap();
        let c = g.derived("test_double", &[&w], || double(&w)).unwrap();
        assert_eq!(calls.get(), 2);
        assert_eq!(c.to_vec().unwrap(), vec![10.0, 12.0, 14.0]);
        // A dropped source's entry is never returned: a new tensor gets its own.
        drop(w);
        let w2 = Tensor::from_slice(&g, &[1.0, 1.0, 1.0], &[3]).unwrap();
        let d = g.derived("test_double", &[&w2], || double(&w2)).unwrap();
        assert_eq!(d.to_vec().unwrap(), vec![2.0, 2.0, 2.0]);
    }
}
