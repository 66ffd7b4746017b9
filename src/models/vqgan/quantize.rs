//! The quantiser after `quant_conv`, mirroring `taming/modules/vqvae/quantize.py`.
//!
//! `VectorQuantizer2` (what `VQModel` builds): per position the nearest codebook entry by
//! `||z||² + ||e||² − 2 z·e`, first index on ties (`torch.argmin`). At inference the
//! straight-through `z + (z_q − z).detach()` is just `z_q`.
//!
//! `GumbelQuantize` (`GumbelVQ`): a 1x1 `proj` to `n_embed` logits and a codebook `embed`.
//! taming's forward samples `gumbel_softmax(logits, hard=True)` even in eval mode, so its
//! codes are random; this takes the noise-free mode, `argmax(logits)` (first index on ties),
//! and the matching `embed` row.

use super::config::{QuantizerKind, VqGanConfig};
use crate::nn::Conv2d;
use crate::ops::vq;
use crate::weights::Loader;
use crate::{Result, Tensor};

/// `quantize.*`
pub enum Quantize {
    /// `VectorQuantizer2`.
    NearestNeighbour {
        /// `quantize.embedding.weight` `[n_embed, embed_dim]`.
        embedding: Tensor,
    },
    /// `GumbelQuantize`.
    Gumbel {
        /// `quantize.proj`: 1x1, z_channels -> n_embed logits.
        proj: Conv2d,
        /// `quantize.embed.weight` `[n_embed, embed_dim]`.
        embed: Tensor,
    },
}

impl Quantize {
    /// Loads the quantiser under `l` (`quantize`).
    pub fn load(l: &Loader, cfg: &VqGanConfig) -> Result<Quantize> {
        let (n, d) = (cfg.n_embed, cfg.embed_dim);
        Ok(match cfg.quantizer {
            QuantizerKind::NearestNeighbour => Quantize::NearestNeighbour {
                embedding: l.sub("embedding").tensor("weight", &[n, d])?,
            },
            QuantizerKind::Gumbel => Quantize::Gumbel {
                proj: Conv2d::load(&l.sub("proj"), cfg.dd.z_channels, n, 1)?,
                embed: l.sub("embed").tensor("weight", &[n, d])?,
            },
        })
    }

    /// The codebook `[n_embed, embed_dim]`.
    pub fn codebook(&self) -> &Tensor {
        match self {
            Quantize::NearestNeighbour { embedding } => embedding,
            Quantize::Gumbel { embed, .. } => embed,
        }
    }

    /// `z`: `[N, embed_dim, h, w]` -> `(z_q [N, embed_dim, h, w], codes [N, h, w] u32)`.
    pub fn forward(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        let codes = match self {
            Quantize::NearestNeighbour { embedding } => vq::nearest_codes(z, embedding)?,
            Quantize::Gumbel { proj, .. } => {
                let tape = crate::autodiff::Tape::new();
                let logits = proj.forward(&tape, &tape.leaf(z.clone(), false), None)?;
                vq::argmax_channels(logits.value())?
            }
        };
        let zq = vq::gather(&codes, self.codebook())?;
        Ok((zq, codes))
    }
}
