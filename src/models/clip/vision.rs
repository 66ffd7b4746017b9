//! The vision tower, mirroring `CLIPVisionTransformer` / `CLIPVisionEmbeddings` in
//! transformers' `modeling_clip.py`: patch embedding, class token, position embedding,
//! `pre_layrnorm` (the checkpoint's spelling), encoder, `post_layernorm` on the class token.

use super::config::VisionConfig;
use super::encoder::{ClipEncoder, EncoderDims};
use crate::autodiff::{Tape, Var};
use crate::inspect::Recorder;
use crate::nn::LayerNorm;
use crate::ops::Act;
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
    fn forward(&self, tape: &Tape, pixels: &Var) -> Result<Var> {
        let c = &self.config;
        let (s, p, g, ch, d) = (
            c.image_size,
            c.patch_size,
            c.grid(),
            c.num_channels,
            c.hidden_size,
        );
        if pixels.shape().len() != 4 || pixels.shape()[1..] != [ch, s, s] {
            return Err(Error::shape(format!(
                "pixel values must be [N, {ch}, {s}, {s}] for this model, got {:?}",
                pixels.shape()
            )));
        }
        let n = pixels.shape()[0];
        // The stride-P conv as one matmul: gather each patch's C·P·P values into a row
        // (a permute), then multiply by the kernel viewed as [D, C·P·P].
        let x = tape.reshape(pixels, &[n, ch, g, p, g, p])?;
        let x = tape.reshape(
            &tape.permute(&x, &[0, 2, 4, 1, 3, 5])?,
            &[n * g * g, ch * p * p],
        )?;
        let w = tape.param(&self.patch_embedding);
        let x = tape.reshape(&tape.linear(&x, &w, None, Act::None)?, &[n, g * g, d])?;
        // The class token, repeated per image (0 + row: exact), in front of the patches.
        let zeros = tape.leaf(Tensor::zeros(pixels.value().gpu(), &[n, 1, d])?, false);
        let cls = tape.add(&zeros, &tape.param(&self.class_embedding))?;
        let x = tape.concat(&[&cls, &x], 1)?;
        tape.add(&x, &tape.param(&self.position_embedding))
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
    /// `[N, C, S, S]`; with `recompute` the encoder layers are [`Tape::checkpoint`]s.
    pub fn forward(&self, tape: &Tape, pixels: &Var, recompute: bool) -> Result<Var> {
        self.forward_recorded(tape, pixels, recompute, None)
    }

    /// [`ClipVisionTransformer::forward`], handing the encoder's hidden states (the first
    /// after `pre_layrnorm`) and attention probabilities to `rec` when given (see
    /// [`ClipEncoder::forward_recorded`]).
    pub fn forward_recorded(
        &self,
        tape: &Tape,
        pixels: &Var,
        recompute: bool,
        rec: Option<&mut Recorder>,
    ) -> Result<Var> {
        let x = self.embeddings.forward(tape, pixels)?;
        let x = self.pre_layrnorm.forward(tape, &x)?;
        let h = self
            .encoder
            .forward_recorded(tape, &x, false, recompute, rec)?;
        let (n, d) = (h.shape()[0], h.shape()[2]);
        let cls = tape.reshape(&tape.slice(&h, 1, 0, 1)?, &[n, d])?;
        self.post_layernorm.forward(tape, &cls)
    }
}
