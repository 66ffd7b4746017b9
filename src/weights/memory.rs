//! A [`TensorSource`] held in memory: for models built from a config plus generated weights
//! (benches, tests) rather than read from a file.

use super::TensorSource;
use crate::tensor::numel;
use crate::{Error, Result};
use std::collections::BTreeMap;

/// Named f32 tensors in memory.
#[derive(Debug, Default, Clone)]
pub struct MemorySource {
    name: String,
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl MemorySource {
    /// An empty source; `name` stands in for a file path in error messages.
    pub fn new(name: impl Into<String>) -> Self {
        MemorySource {
            name: name.into(),
            tensors: BTreeMap::new(),
        }
    }

    /// Adds (or replaces) `key` with `data` of `shape`.
    pub fn insert(
        &mut self,
        key: impl Into<String>,
        shape: &[usize],
        data: Vec<f32>,
    ) -> Result<()> {
        let key = key.into();
        if data.len() != numel(shape) {
            return Err(Error::shape(format!(
                "tensor '{key}': {} values do not fill shape {shape:?}",
                data.len()
            )));
        }
        self.tensors.insert(key, (shape.to_vec(), data));
        Ok(())
    }
}

impl TensorSource for MemorySource {
    fn path(&self) -> &str {
        &self.name
    }
    fn keys(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.tensors.get(key).map(|t| t.0.clone())
    }
    fn read_f32(&self, key: &str) -> Result<Vec<f32>> {
        self.tensors
            .get(key)
            .map(|t| t.1.clone())
            .ok_or_else(|| Error::Format {
                path: self.name.clone(),
                msg: format!("missing tensor '{key}'"),
            })
    }
}
