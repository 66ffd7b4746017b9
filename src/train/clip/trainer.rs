//! One training step of the shapes CLIP: both towers on a training tape, the symmetric
//! contrastive loss with a learned temperature and optional hard-negative captions, and the
//! optimiser update.

use super::{init_rule, shapes_tokenizer, MAX_LOGIT_SCALE, MEAN, STD};
use crate::autodiff::{Tape, Var};
use crate::models::clip::ClipConfig;
use crate::models::clip::ClipModel;
use crate::ops::matmul::MatmulOpts;
use crate::optim::{Adam, AdamConfig};
use crate::train::init_weights;
use crate::weights::NamedParams;
use crate::{Error, Gpu, Result, Tensor};

/// A CLIP being trained: the model (with the shapes tokenizer), its learned log temperature
/// as a `[1]` tensor, and every trained tensor by checkpoint key.
pub struct ClipTrainer {
    /// The model; its weights are updated in place.
    pub model: ClipModel,
    /// `logit_scale` `[1]`.
    pub logit_scale: Tensor,
    /// `model.params` plus `("logit_scale", logit_scale)`.
    pub params: NamedParams,
    /// The optimiser over `params` (same order).
    pub adam: Adam,
}

/// What one step measured.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Contrastive loss.
    pub loss: f32,
    /// Fraction of the batch matched to its own caption (both directions averaged).
    pub accuracy: f32,
    /// `exp(logit_scale)` after the step.
    pub temperature: f32,
}

impl ClipTrainer {
    /// A fresh model of `config` (its vocabulary must be the shapes tokenizer's) with weights
    /// from `seed`, and AdamW at `lr`.
    pub fn new(config: ClipConfig, seed: u64, lr: f32, gpu: &Gpu) -> Result<ClipTrainer> {
        let tok = shapes_tokenizer(config.text.max_position_embeddings)?;
        if tok.vocab_size() != config.text.vocab_size
            || config.text.eos_token_id != tok.eos_id() as i64
        {
            return Err(Error::invalid(format!(
                "the config's vocab_size {} / eos_token_id {} do not match the shapes \
                 tokenizer ({} tokens, end-of-text id {})",
                config.text.vocab_size,
                config.text.eos_token_id,
                tok.vocab_size(),
                tok.eos_id()
            )));
        }
        let src = init_weights(&config.tensor_shapes(), seed, init_rule(&config))?;
        let mut model = ClipModel::from_source(config, &src, gpu)?;
        model.tokenizer = Some(tok);
        model.preprocess.normalize = Some((MEAN, STD));
        ClipTrainer::from_model(model, lr)
    }

    /// Wraps a loaded model for training (its `logit_scale` becomes a trained tensor).
    pub fn from_model(model: ClipModel, lr: f32) -> Result<ClipTrainer> {
        if model
            .text_model
            .embeddings
            .token_embedding
            .table
            .chunks()
            .len()
            != 1
        {
            return Err(Error::invalid(
                "the token embedding is too large for one binding; training needs it whole",
            ));
        }
        let logit_scale = Tensor::from_slice(model.gpu(), &[model.logit_scale], &[1])?;
        let mut params = model.params.clone();
        params.push(("logit_scale".into(), logit_scale.clone()));
        let adam = Adam::new(
            params.iter().map(|(_, t)| t.clone()).collect(),
            AdamConfig::adamw(lr),
        )?;
        Ok(ClipTrainer {
            model,
            logit_scale,
            params,
            adam,
        })
    }

    /// The contrastive loss of a batch (`pixels` `[N, 3, S, S]` preprocessed, one caption
    /// per image, plus `negatives`: extra captions that match no image, see
    /// [`contrastive_loss`]) on `tape`, and the logits `[N, N + negatives]` (image rows,
    /// text columns).
    pub fn loss(
        &self,
        tape: &Tape,
        pixels: &Tensor,
        captions: &[String],
        negatives: &[String],
    ) -> Result<(Var, Var)> {
        self.loss_on(tape, &tape.leaf(pixels.clone(), false), captions, negatives)
    }

    /// [`ClipTrainer::loss`] of pixels already on the tape (a leaf that needs a gradient
    /// gives d loss / d pixels, as the adversarial attack needs).
    pub fn loss_on(
        &self,
        tape: &Tape,
        pixels: &Var,
        captions: &[String],
        negatives: &[String],
    ) -> Result<(Var, Var)> {
        let texts: Vec<String> = captions.iter().chain(negatives).cloned().collect();
        let ids = self.model.tokenize(&texts)?;
        let img = self.model.image_features_on(tape, pixels, false)?;
        let txt = text_features(tape, &self.model, &ids)?;
        contrastive_loss(tape, &img, &txt, &tape.param(&self.logit_scale))
    }

    /// One optimiser step on a batch (with optional hard-negative captions, see
    /// [`ClipTrainer::loss`]) at learning rate `lr`; clamps `logit_scale` to `[0, ln 100]`
    /// afterwards as CLIP does.
    pub fn step(
        &mut self,
        pixels: &Tensor,
        captions: &[String],
        negatives: &[String],
        lr: f32,
    ) -> Result<StepStats> {
        let tape = Tape::training();
        let (loss, logits) = self.loss(&tape, pixels, captions, negatives)?;
        let grads = tape.backward(&loss)?;
        // A parameter used under another view (the class embedding as [1, D]) gets its
        // gradient in that shape.
        let g: Vec<Option<Tensor>> = self
            .params
            .iter()
            .map(|(_, t)| {
                grads
                    .param(&tape, t)
                    .map(|g| g.reshape(t.shape()))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let g: Vec<Option<&Tensor>> = g.iter().map(Option::as_ref).collect();
        self.adam.config.lr = lr;
        self.adam.step(&g)?;
        drop(grads);
        let loss = loss.value().to_vec()?[0];
        let accuracy = in_batch_accuracy(
            &logits.value().to_vec()?,
            captions.len(),
            captions.len() + negatives.len(),
        );
        let mut s = self.logit_scale.to_vec()?[0];
        if !(0.0..=MAX_LOGIT_SCALE).contains(&s) {
            s = s.clamp(0.0, MAX_LOGIT_SCALE);
            self.logit_scale
                .assign(&Tensor::from_slice(self.model.gpu(), &[s], &[1])?)?;
        }
        self.model.logit_scale = s;
        if !loss.is_finite() {
            return Err(Error::invalid(format!(
                "the loss became {loss}; try a lower learning rate"
            )));
        }
        Ok(StepStats {
            loss,
            accuracy,
            temperature: s.exp(),
        })
    }
}

/// Image-to-text and text-to-image top-1 accuracy of `[N, M]` logits (M ≥ N; columns past
/// N are negative captions, which count against the images), averaged.
fn in_batch_accuracy(logits: &[f32], n: usize, m: usize) -> f32 {
    let mut hits = 0;
    for i in 0..n {
        let row = (0..m).max_by(|&a, &b| logits[i * m + a].total_cmp(&logits[i * m + b]));
        let col = (0..n).max_by(|&a, &b| logits[a * m + i].total_cmp(&logits[b * m + i]));
        hits += usize::from(row == Some(i)) + usize::from(col == Some(i));
    }
    hits as f32 / (2 * n.max(1)) as f32
}

/// CLIP's text tower and projection on the tape: projected, unnormalised features `[N, P]`
/// of token id sequences (padded with the end-of-text id to the longest; pooled at
/// [`TextConfig::pool_index`] of each unpadded sequence): [`ClipModel::text_features_on`],
/// the forward behind [`ClipModel::text_features_ids`], with its input checks.
///
/// [`TextConfig::pool_index`]: crate::models::clip::TextConfig::pool_index
pub fn text_features(tape: &Tape, model: &ClipModel, ids: &[Vec<u32>]) -> Result<Var> {
    let vocab = model.config.text.vocab_size;
    let pad = model.config.text.eos_token_id.clamp(0, vocab as i64 - 1) as u32;
    model.text_features_on(tape, ids, pad)
}

/// CLIP's symmetric contrastive loss of image features `[N, P]` and text features `[M, P]`
/// (row i < N of each is a pair; text rows from N on are hard-negative captions that match
/// no image, as in NegCLIP) with the learned log temperature `logit_scale` `[1]`:
/// `logits = exp(logit_scale) · norm(img) · norm(txt)ᵀ` `[N, M]`,
/// `loss = (CE(logits, diag) + CE(logits[:, :N]ᵀ, diag)) / 2`: each image picks its caption
/// among all M texts, each caption its image among the N images. With M = N this is CLIP's
/// loss. Returns `(loss, logits)`.
pub fn contrastive_loss(
    tape: &Tape,
    img: &Var,
    txt: &Var,
    logit_scale: &Var,
) -> Result<(Var, Var)> {
    let n = img.shape()[0];
    let m = txt.shape()[0];
    if m < n {
        return Err(Error::shape(format!(
            "contrastive loss: {n} images but only {m} texts"
        )));
    }
    let (i, t) = (tape.l2_normalize(img)?, tape.l2_normalize(txt)?);
    let sim = tape.matmul(
        &i,
        &t,
        None,
        &MatmulOpts {
            trans_b: true,
            ..Default::default()
        },
    )?;
    let logits = tape.mul_scalar(&sim, &tape.exp(logit_scale)?)?;
    let diag: Vec<u32> = (0..n as u32).collect();
    let a = tape.cross_entropy(&logits, &diag)?;
    let pairs = if m == n {
        logits.clone()
    } else {
        tape.slice(&logits, 1, 0, n)?
    };
    let b = tape.cross_entropy(&tape.permute(&pairs, &[1, 0])?, &diag)?;
    let loss = tape.affine(&tape.add(&a, &b)?, 0.5, 0.0)?;
    Ok((loss, logits))
}
