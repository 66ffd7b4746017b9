//! VQGAN+CLIP text-to-image: prompts, cutouts, losses and the optimisation loop.

pub mod cutouts;
pub mod prompt;
