//! Models built from the ops, one folder per model family mirroring its upstream source.

pub mod clip;
pub mod vqgan;
