//! Models built from [`crate::nn`] layers, one folder per model family mirroring its upstream
//! source. Each forward is written once over the autodiff tape: inference runs it on a tape
//! where nothing needs a gradient (fused kernels, nothing kept for a backward pass),
//! VQGAN+CLIP and training on one that records.

pub mod clip;
pub mod vqgan;
