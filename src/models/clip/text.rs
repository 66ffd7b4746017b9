//! The text tower, mirroring `CLIPTextTransformer` / `CLIPTextEmbeddings` in transformers'
//! `modeling_clip.py`: token + position embedding, causal encoder, final LayerNorm, the
//! hidden state at the end-of-text position.

use super::config::TextConfig;
use super::encoder::{ClipEncoder, EncoderDims, LayerNorm};
use super::pending;
use crate::weights::Loader;
use crate::{Error, Gpu, Result, Tensor};

/// `CLIPTextEmbeddings`. The tables stay in host memory: a batch needs only its own
/// `N × T` rows, and the token table (100-150 MB) can exceed one storage binding on some
/// adapters. Token and position rows are summed here, in f32 as PyTorch does, and uploaded.
pub struct ClipTextEmbeddings {
    /// `token_embedding.weight` `[vocab, D]`, row-major.
    pub token_embedding: Vec<f32>,
    /// `position_embedding.weight` `[context, D]`, row-major.
    pub position_embedding: Vec<f32>,
    dim: usize,
    vocab: usize,
    context: usize,
}

impl ClipTextEmbeddings {
    fn load(l: &Loader, c: &TextConfig) -> Result<ClipTextEmbeddings> {
        let d = c.hidden_size;
        Ok(ClipTextEmbeddings {
            token_embedding: l.sub("token_embedding").cpu("weight", &[c.vocab_size, d])?,
            position_embedding: l
                .sub("position_embedding")
                .cpu("weight", &[c.max_position_embeddings, d])?,
            dim: d,
            vocab: c.vocab_size,
            context: c.max_position_embeddings,
        })
    }

    /// `[N, T, D]` embeddings of `ids` (each row already padded to `T`).
    fn forward(&self, gpu: &Gpu, ids: &[Vec<u32>], t: usize) -> Result<Tensor> {
        let d = self.dim;
        let mut out = vec![0f32; ids.len() * t * d];
        for (n, row) in ids.iter().enumerate() {
            for (i, &id) in row.iter().enumerate() {
                let tok = &self.token_embedding[id as usize * d..(id as usize + 1) * d];
                let pos = &self.position_embedding[i * d..(i + 1) * d];
                let o = &mut out[(n * t + i) * d..(n * t + i + 1) * d];
                for ((o, a), b) in o.iter_mut().zip(tok).zip(pos) {
                    *o = a + b;
                }
            }
        }
        Tensor::from_slice(gpu, &out, &[ids.len(), t, d])
    }
}

/// `CLIPTextTransformer` (`text_model` in a `CLIPModel` checkpoint).
pub struct ClipTextTransformer {
    /// `embeddings`.
    pub embeddings: ClipTextEmbeddings,
    /// `encoder`.
    pub encoder: ClipEncoder,
    /// `final_layer_norm`.
    pub final_layer_norm: LayerNorm,
    /// The config it was built from.
    pub config: TextConfig,
}

impl ClipTextTransformer {
    /// Loads from `l` positioned at `text_model`.
    pub fn load(l: &Loader, c: &TextConfig) -> Result<ClipTextTransformer> {
        let dims = EncoderDims {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            layers: c.num_hidden_layers,
            act: c.hidden_act,
            eps: c.layer_norm_eps,
        };
        Ok(ClipTextTransformer {
            embeddings: ClipTextEmbeddings::load(&l.sub("embeddings"), c)?,
            encoder: ClipEncoder::load(&l.sub("encoder"), &dims)?,
            final_layer_norm: LayerNorm::load(
                &l.sub("final_layer_norm"),
                c.hidden_size,
                c.layer_norm_eps,
            )?,
            config: c.clone(),
        })
    }

    /// Pooled output `[N, D]` (transformers' `pooler_output`) of token id sequences.
    /// Sequences are padded with `pad_id` to the longest one; under the causal mask the
    /// pooled position does not see the padding, so each result equals the unpadded run.
    pub fn forward(&self, gpu: &Gpu, ids: &[Vec<u32>], pad_id: u32) -> Result<Tensor> {
        let e = &self.embeddings;
        let t = ids.iter().map(Vec::len).max().unwrap_or(0);
        if ids.is_empty() || t == 0 {
            return Err(Error::invalid("text tower: no tokens to encode"));
        }
        if t > e.context {
            return Err(Error::invalid(format!(
                "text of {t} tokens is longer than the model's context of {} tokens",
                e.context
            )));
        }
        if let Some(&bad) = ids
            .iter()
            .flatten()
            .chain([&pad_id])
            .find(|&&id| id as usize >= e.vocab)
        {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary of {} tokens (tokenizer and model \
                 do not match?)",
                e.vocab
            )));
        }
        let padded: Vec<Vec<u32>> = ids
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.resize(t, pad_id);
                r
            })
            .collect();
        let x = e.forward(gpu, &padded, t)?;
        let h = self.encoder.forward(&x, true)?;
        // Pool first, then normalise: LayerNorm is per row, so this equals transformers'
        // final_layer_norm over every position followed by the pick.
        let rows: Vec<u32> = padded
            .iter()
            .enumerate()
            .map(|(n, r)| (n * t + self.config.pool_index(r)) as u32)
            .collect();
        let d = e.dim;
        let pooled = pending::gather_rows(&h.reshape(&[ids.len() * t, d])?, &rows)?;
        self.final_layer_norm.forward(&pooled)
    }
}
