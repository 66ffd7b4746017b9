//! Models built on the ops: one folder per model, mirroring upstream structure and names.

pub mod vqgan;
