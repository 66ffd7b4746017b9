//! The text tower, mirroring `CLIPTextTransformer` / `CLIPTextEmbeddings` in transformers'
//! `modeling_clip.py`: token + position embedding, causal encoder, final LayerNorm, the
//! hidden state at the end-of-text position.

use super::config::TextConfig;
use super::encoder::{ClipEncoder, EncoderDims, LayerNorm};
use crate::ops::concat::slice;
use crate::ops::elementwise::add;
use crate::ops::gather::{gather_rows_from_ids, RowTable};
use crate::weights::Loader;
use crate::{Error, Gpu, Result, Tensor};

/// `CLIPTextEmbeddings`.
pub struct ClipTextEmbeddings {
    /// `token_embedding.weight` `[vocab, D]`, in row chunks that each fit a storage binding
    /// (ViT-L's table is larger than lavapipe's 128 MiB limit).
    pub token_embedding: RowTable,
    /// `position_embedding.weight` `[context, D]`.
    pub position_embedding: Tensor,
}

impl ClipTextEmbeddings {
    fn load(l: &Loader, c: &TextConfig) -> Result<ClipTextEmbeddings> {
        let d = c.hidden_size;
        let lim = l.gpu().limits();
        let fits = (c.vocab_size * d * 4) as u64
            <= lim.max_storage_buffer_binding_size.min(lim.max_buffer_size);
        let tl = l.sub("token_embedding");
        // A table that fits one binding is uploaded through the loader, so it is one of the
        // model's `params` (training updates it in place); a larger one is chunked.
        let token_embedding = if fits {
            RowTable::from_tensor(&tl.tensor("weight", &[c.vocab_size, d])?)?
        } else {
            RowTable::from_slice(
                l.gpu(),
                &tl.cpu("weight", &[c.vocab_size, d])?,
                c.vocab_size,
                d,
            )?
        };
        Ok(ClipTextEmbeddings {
            token_embedding,
            position_embedding: l
                .sub("position_embedding")
                .tensor("weight", &[c.max_position_embeddings, d])?,
        })
    }

    /// `[N, T, D]` embeddings of `ids` (each row already padded to `T`): token rows plus
    /// the first `T` position rows.
    fn forward(&self, gpu: &Gpu, ids: &[Vec<u32>], t: usize) -> Result<Tensor> {
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let tok = gather_rows_from_ids(gpu, &self.token_embedding, &flat, &[ids.len(), t])?;
        add(&tok, &slice(&self.position_embedding, 0, 0, t)?)
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
    /// Sequences are padded with `pad_id` (any id of the vocabulary) to the longest one;
    /// under the causal mask the pooled position does not see the padding, so each result
    /// equals the unpadded run.
    pub fn forward(&self, gpu: &Gpu, ids: &[Vec<u32>], pad_id: u32) -> Result<Tensor> {
        let (vocab, context) = (self.config.vocab_size, self.config.max_position_embeddings);
        let t = ids.iter().map(Vec::len).max().unwrap_or(0);
        if ids.is_empty() || t == 0 {
            return Err(Error::invalid("text tower: no tokens to encode"));
        }
        if t > context {
            return Err(Error::invalid(format!(
                "text of {t} tokens is longer than the model's context of {context} tokens"
            )));
        }
        if let Some(&bad) = ids
            .iter()
            .flatten()
            .chain([&pad_id])
            .find(|&&id| id as usize >= vocab)
        {
            return Err(Error::invalid(format!(
                "token id {bad} is outside the vocabulary of {vocab} tokens (tokenizer and \
                 model do not match?)"
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
        let x = self.embeddings.forward(gpu, &padded, t)?;
        let h = self.encoder.forward(&x, true)?;
        // Pool first, then normalise: LayerNorm is per row, so this equals transformers'
        // final_layer_norm over every position followed by the pick.
        // The pooled position is chosen on each unpadded sequence, so that the padding value
        // cannot move it (with EOS padding, as transformers pads, the choice is the same).
        let rows: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(n, r)| (n * t + self.config.pool_index(r)) as u32)
            .collect();
        let flat = RowTable::from_tensor(&h.reshape(&[ids.len() * t, self.config.hidden_size])?)?;
        let pooled = gather_rows_from_ids(gpu, &flat, &rows, &[ids.len()])?;
        self.final_layer_norm.forward(&pooled)
    }
}
