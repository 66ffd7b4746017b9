//! The text tower, mirroring `CLIPTextTransformer` / `CLIPTextEmbeddings` in transformers'
//! `modeling_clip.py`: token + position embedding, causal encoder, final LayerNorm, the
//! hidden state at the end-of-text position.

use super::config::TextConfig;
use super::encoder::{ClipEncoder, EncoderDims};
use crate::autodiff::{Tape, Var};
use crate::inspect::Recorder;
use crate::nn::{Embedding, LayerNorm};
use crate::weights::Loader;
use crate::{Error, Gpu, Result, Tensor};

/// `CLIPTextEmbeddings`.
pub struct ClipTextEmbeddings {
    /// `token_embedding` `[vocab, D]`.
    pub token_embedding: Embedding,
    /// `position_embedding.weight` `[context, D]`.
    pub position_embedding: Tensor,
}

impl ClipTextEmbeddings {
    fn load(l: &Loader, c: &TextConfig) -> Result<ClipTextEmbeddings> {
        let d = c.hidden_size;
        Ok(ClipTextEmbeddings {
            token_embedding: Embedding::load(&l.sub("token_embedding"), c.vocab_size, d)?,
            position_embedding: l
                .sub("position_embedding")
                .tensor("weight", &[c.max_position_embeddings, d])?,
        })
    }

    /// `[N, T, D]` embeddings of `ids` (`N·T` ids, each row already padded to `T`): token
    /// rows plus the first `T` position rows.
    fn forward(&self, tape: &Tape, gpu: &Gpu, ids: &[u32], n: usize, t: usize) -> Result<Var> {
        let tok = self.token_embedding.forward(tape, gpu, ids, &[n, t])?;
        let pos = tape.slice(&tape.param(&self.position_embedding), 0, 0, t)?;
        tape.add(&tok, &pos)
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
    /// equals the unpadded run. Fails with a clear error on no tokens, a text longer than
    /// the context, or an id outside the vocabulary.
    pub fn forward(&self, tape: &Tape, gpu: &Gpu, ids: &[Vec<u32>], pad_id: u32) -> Result<Var> {
        self.forward_recorded(tape, gpu, ids, pad_id, None)
    }

    /// [`ClipTextTransformer::forward`], handing the encoder's hidden states and attention
    /// probabilities to `rec` when given (see [`ClipEncoder::forward_recorded`]).
    pub fn forward_recorded(
        &self,
        tape: &Tape,
        gpu: &Gpu,
        ids: &[Vec<u32>],
        pad_id: u32,
        rec: Option<&mut Recorder>,
    ) -> Result<Var> {
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
        let n = ids.len();
        let padded: Vec<u32> = ids
            .iter()
            .flat_map(|r| {
                r.iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad_id, t - r.len()))
            })
            .collect();
        let x = self.embeddings.forward(tape, gpu, &padded, n, t)?;
        let h = self.encoder.forward_recorded(tape, &x, true, false, rec)?;
        // Pool first, then normalise: LayerNorm is per row, so this equals transformers'
        // final_layer_norm over every position followed by the pick.
        // The pooled position is chosen on each unpadded sequence, so that the padding value
        // cannot move it (with EOS padding, as transformers pads, the choice is the same).
        let rows: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(i, r)| (i * t + self.config.pool_index(r)) as u32)
            .collect();
        let pooled = tape.gather_rows(
            &tape.reshape(&h, &[n * t, self.config.hidden_size])?,
            &Tensor::from_u32(gpu, &rows, &[n])?,
        )?;
        self.final_layer_norm.forward(tape, &pooled)
    }
}
