//! vqclip: a GPU compute engine on wgpu with hand-written WGSL kernels, implementing OpenAI
//! CLIP and the taming-transformers VQGAN, with an autodiff tape for VQGAN+CLIP generation.
//!
//! Layers, bottom up: [`gpu`] (device, pool, pipelines, batched dispatch), [`tensor`]
//! (GPU tensors), [`ops`] (one file per kernel family, each with a CPU reference),
//! [`autodiff`] (the tape: ops that record their backward rules, and take the fused
//! inference kernels when nothing needs a gradient), [`nn`] (layers holding their weights,
//! forward over the tape), [`models`] (CLIP and VQGAN, each tower and block written once
//! over [`nn`]: `embed`, `reconstruct`, [`generate`] and [`train`] run the same forward),
//! [`weights`] (checkpoint readers), [`generate`] (the VQGAN+CLIP loop, no model code of its
//! own), [`train`] (the trainers of the shipped models, on [`data`]'s shapes world).
#![warn(missing_docs)]

pub mod atomic;
pub mod autodiff;
pub mod bench;
pub mod data;
pub mod error;
pub mod generate;
pub mod gpu;
pub mod inspect;
pub mod models;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod search;
pub mod tensor;
pub mod train;
pub mod weights;

pub use error::{Error, Result};
pub use gpu::{DeviceOptions, Gpu};
pub use tensor::{DType, Precision, Tensor};

/// The crate version, as written into output metadata.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
