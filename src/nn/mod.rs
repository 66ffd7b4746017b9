//! Layers that hold their weights and run over the autodiff tape.
//!
//! Each layer's `forward(&self, tape, x, ..)` records on a [`Tape`](crate::autodiff::Tape):
//! one model code serves inference and training. On a tape where nothing needs a gradient
//! (inference, `Tape::new()` with constant inputs) the tape records nothing to replay and
//! takes the fused inference kernels (bias, activation and residual in the matmul or
//! convolution epilogue, attention on the `[B, T, H·D]` layout); on a training tape, or
//! with an input that needs a gradient, the same call records the unfused ops whose
//! backward rules it knows.
//!
//! Loading: field path = checkpoint key, through [`crate::weights::Loader`], which fails
//! with the key and both shapes when a tensor disagrees with the config.

pub mod attention;
pub mod conv2d;
pub mod embedding;
pub mod group_norm;
pub mod layer_norm;
pub mod linear;

pub use attention::{attend, attend_qkv};
pub use conv2d::Conv2d;
pub use embedding::Embedding;
pub use group_norm::GroupNorm;
pub use layer_norm::LayerNorm;
pub use linear::Linear;
