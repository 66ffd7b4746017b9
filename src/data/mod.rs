//! Training and evaluation data that vqclip makes itself.

pub mod shapes;
