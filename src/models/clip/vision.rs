//! The vision tower, mirroring `CLIPVisionTransformer` / `CLIPVisionEmbeddings` in
//! transformers' `modeling_clip.py`: patch embedding, class token, position embedding,
//! `pre_layrnorm` (the checkpoint's spelling), encoder, `post_layernorm` on the class token.

use super::config::VisionConfig;
use super::encoder::{ClipEncoder, EncoderDims, LayerNorm};
use super::pending;
use crate::ops::elementwise::add;
use crate::ops::matmul::{matmul, MatmulOpts};
use crate::ops::permute::permute;
use crate::weights::Loader;
use crate::{Error, Result, Tensor};

/// `CLIPVisionEmbeddings`.
pub struct ClipVisionEmbeddings {
    /// `class_embedding` `[1, D]`.
    pub class_embedding: Tensor,
    /// `patch_embedding.weight`, the conv kernel `[D, C, P, P]` viewed as `[D, C·P·P]`
    /// (the conv has no bias).
    pub patch_embedding: Tensor,
    /// `position_embedding.weight` `[patches + 1, D]`.
    pub position_embedding: Tensor,
    config: VisionConfig,
}

impl ClipVisionEmbeddings {
    fn load(l: &Loader, c: &VisionConfig) -> Result<ClipVisionEmbeddings> {
        let (d, p, ch) = (c.hidden_size, c.patch_size, c.num_channels);
        Ok(ClipVisionEmbeddings {
            class_embedding: l.tensor("class_embedding", &[d])?.reshape(&[1, d])?,
            patch_embedding: l
                .sub("patch_embedding")
                .tensor("weight", &[d, ch, p, p])?
                .reshape(&[d, ch * p * p])?,
            position_embedding: l
                .sub("position_embedding")
                .tensor("weight", &[c.num_positions(), d])?,
            config: c.clone(),
        })
    }

    /// `pixels`: `[N, C, S, S]` → `[N, G² + 1, D]`.
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (s, p, g, ch) = (c.image_size, c.patch_size, c.grid(), c.num_channels);
        if pixels.rank() != 4 || pixels.shape()[1..] != [ch, s, s] {
            return Err(Error::shape(format!(
                "pixel values must be [N, {ch}, {s}, {s}] for this model, got {:?}",
                pixels.shape()
            )));
        }
        let n = pixels.dim(0);
        // The stride-P conv as one matmul: gather each patch's C·P·P values into a row
        // (a permute), then multiply by the kernel viewed as [D, C·P·P].
        let patches = permute(&pixels.reshape(&[n, ch, g, p, g, p])?, &[0, 2, 4, 1, 3, 5])?
            .reshape(&[n * g * g, ch * p * p])?;
        let x = matmul(&patches, &self.patch_embedding, &MatmulOpts::linear(None))?;
        let d = c.hidden_size;
        let cls = pending::gather_rows(&self.class_embedding, &vec![0; n])?;
        let x = pending::concat(&[&cls.reshape(&[n, 1, d])?, &x.reshape(&[n, g * g, d])?], 1)?;
        add(&x, &self.position_embedding)
    }
}

/// `CLIPVisionTransformer` (`vision_model` in a `CLIPModel` checkpoint).
pub struct ClipVisionTransformer {
    /// `embeddings`.
    pub embeddings: ClipVisionEmbeddings,
    /// `pre_layrnorm`.
    pub pre_layrnorm: LayerNorm,
    /// `encoder`.
    pub encoder: ClipEncoder,
    /// `post_layernorm`.
    pub post_layernorm: LayerNorm,
    /// The config it was built from.
    pub config: VisionConfig,
}

impl ClipVisionTransformer {
    /// Loads from `l` positioned at `vision_model`.
    pub fn load(l: &Loader, c: &VisionConfig) -> Result<ClipVisionTransformer> {
        let dims = EncoderDims {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            layers: c.num_hidden_layers,
            act: c.hidden_act,
            eps: c.layer_norm_eps,
        };
        let d = c.hidden_size;
        Ok(ClipVisionTransformer {
            embeddings: ClipVisionEmbeddings::load(&l.sub("embeddings"), c)?,
            pre_layrnorm: LayerNorm::load(&l.sub("pre_layrnorm"), d, c.layer_norm_eps)?,
            encoder: ClipEncoder::load(&l.sub("encoder"), &dims)?,
            post_layernorm: LayerNorm::load(&l.sub("post_layernorm"), d, c.layer_norm_eps)?,
            config: c.clone(),
        })
    }

    /// Pooled output `[N, D]` (`post_layernorm` of the class token) of `pixels`
    /// `[N, C, S, S]`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = self
            .pre_layrnorm
            .forward(&self.embeddings.forward(pixels)?)?;
        let h = self.encoder.forward(&x, false)?;
        let (n, t, d) = (h.dim(0), h.dim(1), h.dim(2));
        let rows: Vec<u32> = (0..n).map(|i| (i * t) as u32).collect();
        let cls = pending::gather_rows(&h.reshape(&[n * t, d])?, &rows)?;
        self.post_layernorm.forward(&cls)
    }
}
