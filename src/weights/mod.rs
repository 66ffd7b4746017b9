//! Checkpoint readers and the one loader every model uses.
//!
//! A reader ([`TensorSource`]) exposes named tensors of a file (safetensors, PyTorch zip
//! checkpoint) converted to f32. Models pull their weights through a [`Loader`], whose key
//! path mirrors the model's field path (`sub("encoder").sub("layers.0")`), and which fails
//! with the key and both shapes when a file disagrees with the config.

pub mod memory;
pub mod safetensors;
pub mod shipped;

pub use self::safetensors::SafetensorsFile;
pub use memory::MemorySource;

use crate::tensor::Precision;
use crate::{Error, Gpu, Result, Tensor};
use std::cell::RefCell;
use std::rc::Rc;

/// Every tensor a [`Loader`] uploaded, by full key, in load order: a model's parameters as
/// the training code and the checkpoint writers see them (the tensors share the model's
/// buffers, so optimiser updates show through).
pub type NamedParams = Vec<(String, Tensor)>;

pub mod pickle;
pub mod torch;

/// A file of named tensors.
pub trait TensorSource {
    /// The file's path, for error messages.
    fn path(&self) -> &str;
    /// Every tensor name in the file.
    fn keys(&self) -> Vec<String>;
    /// The shape of `key`, if present.
    fn shape(&self, key: &str) -> Option<Vec<usize>>;
    /// The values of `key` as f32 (converted from the stored dtype), row-major.
    fn read_f32(&self, key: &str) -> Result<Vec<f32>>;
}

/// Pulls tensors out of a [`TensorSource`] by field path, checking shapes.
pub struct Loader<'a> {
    src: &'a dyn TensorSource,
    gpu: &'a Gpu,
    prefix: String,
    record: Rc<RefCell<NamedParams>>,
    precision: Precision,
}

impl<'a> Loader<'a> {
    /// A loader at the root of `src`.
    pub fn new(src: &'a dyn TensorSource, gpu: &'a Gpu) -> Self {
        Loader {
            src,
            gpu,
            prefix: String::new(),
            record: Rc::default(),
            precision: Precision::F32,
        }
    }

    /// This loader (and those derived from it) uploading [`Loader::linear_weight`]s at
    /// `precision`; every other tensor stays f32.
    pub fn with_precision(self, precision: Precision) -> Self {
        Loader { precision, ..self }
    }

    /// Every tensor uploaded so far through this loader or any loader derived from it.
    pub fn uploaded(&self) -> NamedParams {
        self.record.borrow().clone()
    }

    /// A loader for the sub-module `name` (keys become `prefix.name.…`).
    pub fn sub(&self, name: impl std::fmt::Display) -> Loader<'a> {
        Loader {
            src: self.src,
            gpu: self.gpu,
            prefix: self.key(&name.to_string()),
            record: self.record.clone(),
            precision: self.precision,
        }
    }

    /// The full key of `name` under this loader's prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The device tensors are uploaded to.
    pub fn gpu(&self) -> &'a Gpu {
        self.gpu
    }

    /// True if `name` exists under this prefix.
    pub fn contains(&self, name: &str) -> bool {
        self.src.shape(&self.key(name)).is_some()
    }

    /// Reads `name` to the CPU, checking that its shape is `expect`.
    pub fn cpu(&self, name: &str, expect: &[usize]) -> Result<Vec<f32>> {
        let key = self.key(name);
        let shape = self.src.shape(&key).ok_or_else(|| Error::Format {
            path: self.src.path().to_string(),
            msg: format!("missing tensor '{key}' (expected shape {expect:?})"),
        })?;
        if shape != expect {
            return Err(Error::Format {
                path: self.src.path().to_string(),
                msg: format!(
                    "tensor '{key}' has shape {shape:?} but the config expects {expect:?}"
                ),
            });
        }
        self.src.read_f32(&key)
    }

    /// Uploads `name` to the GPU as f32, checking that its shape is `expect`.
    pub fn tensor(&self, name: &str, expect: &[usize]) -> Result<Tensor> {
        let data = self.cpu(name, expect)?;
        let t = Tensor::from_slice(self.gpu, &data, expect)?;
        self.record.borrow_mut().push((self.key(name), t.clone()));
        Ok(t)
    }

    /// Uploads the weight matrix of a linear layer, `name`, checking that its shape is
    /// `expect`: f32, or rounded to f16 under [`Precision::F16`] (exact for a checkpoint
    /// stored in f16), which only the matmul's B operand reads.
    pub fn linear_weight(&self, name: &str, expect: &[usize]) -> Result<Tensor> {
        if self.precision == Precision::F32 {
            return self.tensor(name, expect);
        }
        let data = self.cpu(name, expect)?;
        let t = Tensor::from_f32_as_f16(self.gpu, &data, expect)?;
        self.record.borrow_mut().push((self.key(name), t.clone()));
        Ok(t)
    }
}
