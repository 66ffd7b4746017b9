//! What a recorded forward collects: each layer's hidden state and attention probabilities,
//! taken inside the one model forward (`models::clip::encoder`) when it is handed a
//! [`Recorder`].

use crate::autodiff::{Tape, Var};
use crate::ops::matmul::MatmulOpts;
use crate::{Error, Result, Tensor};

/// Collects a tower's internals during [`crate::models::clip::encoder::ClipEncoder`]'s forward.
///
/// The fused attention kernel never materialises the probabilities, so a recorded layer runs
/// attention unfused on the tape (`q·kᵀ·scale (+ causal mask) → softmax → ·v`, the ops of
/// [`Tape::attention`]); everything else is the same forward. With probes on, a zero leaf
/// that needs a gradient is added to each layer's probabilities: its gradient after
/// [`Tape::backward`] is the gradient with respect to those probabilities, which
/// gradient-weighted relevance (Chefer et al. 2021) reads, and nothing upstream of the first
/// probe records a backward.
#[derive(Default)]
pub struct Recorder {
    /// `[B, T, C]`: the encoder input (`l = 0`), then each layer's output (`l = 1 ..= L`).
    pub hidden_states: Vec<Var>,
    /// `[B, H, Tq, Tk]` attention probabilities of each layer.
    pub attentions: Vec<Var>,
    /// `[B, H, Tq, Tk]` zero leaves added to each layer's probabilities (with probes on).
    pub probes: Vec<Var>,
    with_probes: bool,
}

impl Recorder {
    /// A recorder of hidden states and attention probabilities.
    pub fn new() -> Recorder {
        Recorder::default()
    }

    /// A recorder that also adds a gradient probe to every layer's probabilities.
    pub fn with_probes() -> Recorder {
        Recorder {
            with_probes: true,
            ..Recorder::default()
        }
    }

    /// Keeps a hidden state `[B, T, C]`.
    pub fn hidden(&mut self, h: &Var) {
        self.hidden_states.push(h.clone());
    }

    /// Multi-head attention on the `[B, T, H·D]` projections, unfused so that its
    /// probabilities are kept; returns `[B, Tq, H·D]` like [`crate::nn::attend`].
    pub fn attend(
        &mut self,
        tape: &Tape,
        q: &Var,
        k: &Var,
        v: &Var,
        heads: usize,
        causal: bool,
    ) -> Result<Var> {
        for (n, t) in [("q", q), ("k", k), ("v", v)] {
            if t.shape().len() != 3 || heads == 0 || t.shape()[2] % heads != 0 {
                return Err(Error::shape(format!(
                    "recorded attention: {n} must be [B, T, H*D] with {heads} heads, got {:?}",
                    t.shape()
                )));
            }
        }
        let (b, tq, hd) = (q.shape()[0], q.shape()[1], q.shape()[2]);
        let d = hd / heads;
        let split = |x: &Var| -> Result<Var> {
            let t = x.shape()[1];
            tape.permute(&tape.reshape(x, &[b, t, heads, d])?, &[0, 2, 1, 3])
        };
        let (qh, kh, vh) = (split(q)?, split(k)?, split(v)?);
        let tk = kh.shape()[2];
        // [B, H, Tq, D] · [B, H, Tk, D]ᵀ → [B, H, Tq, Tk]
        let scores = tape.matmul(
            &qh,
            &kh,
            None,
            &MatmulOpts {
                trans_b: true,
                alpha: Some((d as f32).powf(-0.5)),
                ..Default::default()
            },
        )?;
        let scores = if causal {
            tape.add(&scores, &tape.leaf(causal_mask(q, tq, tk)?, false))?
        } else {
            scores
        };
        let mut p = tape.softmax(&scores, 1.0)?;
        self.attentions.push(p.clone());
        if self.with_probes {
            let probe = tape.leaf(Tensor::zeros(q.value().gpu(), p.shape())?, true);
            p = tape.add(&p, &probe)?;
            self.probes.push(probe);
        }
        // [B, H, Tq, Tk] · [B, H, Tk, D] → [B, H, Tq, D] → [B, Tq, H·D]
        let o = tape.matmul(&p, &vh, None, &MatmulOpts::default())?;
        tape.reshape(&tape.permute(&o, &[0, 2, 1, 3])?, &[b, tq, hd])
    }
}

/// `[Tq, Tk]`: 0 where a query may see a key, -inf after it (transformers' causal mask).
fn causal_mask(like: &Var, tq: usize, tk: usize) -> Result<Tensor> {
    let mut m = vec![0.0f32; tq * tk];
    for i in 0..tq {
        for j in (i + 1)..tk {
            m[i * tk + j] = f32::NEG_INFINITY;
        }
    }
    Tensor::from_slice(like.value().gpu(), &m, &[tq, tk])
}
