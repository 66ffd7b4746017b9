//! The transformer shared by both towers, mirroring `CLIPEncoder`, `CLIPEncoderLayer`,
//! `CLIPAttention` and `CLIPMLP` in transformers' `modeling_clip.py`. Field paths equal
//! checkpoint keys (`encoder.layers.3.self_attn.q_proj.weight`).
//!
//! Pre-norm residual blocks: `x = x + out_proj(attn(layer_norm1(x)))`,
//! `x = x + fc2(act(fc1(layer_norm2(x))))`, written once over the tape (`nn`). Without
//! gradients biases, activations and residual additions run in the matmul epilogue, so a
//! layer is 2 norms, 6 matmuls and one fused attention; on a gradient tape the same code
//! records the unfused ops.

use crate::autodiff::{Tape, Var};
use crate::inspect::Recorder;
use crate::nn::{attend, LayerNorm, Linear};
use crate::ops::Act;
use crate::weights::Loader;
use crate::Result;

/// Sizes of one tower's encoder.
#[derive(Debug, Clone, Copy)]
pub struct EncoderDims {
    /// Residual width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Attention heads.
    pub heads: usize,
    /// Layers.
    pub layers: usize,
    /// MLP activation.
    pub act: Act,
    /// LayerNorm epsilon.
    pub eps: f32,
}

/// `CLIPAttention`: multi-head self-attention with biased q/k/v/out projections.
#[derive(Clone)]
pub struct ClipAttention {
    /// `q_proj`.
    pub q_proj: Linear,
    /// `k_proj`.
    pub k_proj: Linear,
    /// `v_proj`.
    pub v_proj: Linear,
    /// `out_proj`.
    pub out_proj: Linear,
    heads: usize,
}

impl ClipAttention {
    fn load(l: &Loader, d: &EncoderDims) -> Result<ClipAttention> {
        let h = d.hidden;
        Ok(ClipAttention {
            q_proj: Linear::load(&l.sub("q_proj"), h, h, true)?,
            k_proj: Linear::load(&l.sub("k_proj"), h, h, true)?,
            v_proj: Linear::load(&l.sub("v_proj"), h, h, true)?,
            out_proj: Linear::load(&l.sub("out_proj"), h, h, true)?,
            heads: d.heads,
        })
    }

    /// `residual + out_proj(attention(x))`. `x`, `residual`: `[B, T, C]`. A recorder
    /// takes the unfused attention that keeps the probabilities.
    fn forward(
        &self,
        tape: &Tape,
        x: &Var,
        causal: bool,
        residual: &Var,
        rec: Option<&mut Recorder>,
    ) -> Result<Var> {
        let q = self.q_proj.forward(tape, x, Act::None)?;
        let k = self.k_proj.forward(tape, x, Act::None)?;
        let v = self.v_proj.forward(tape, x, Act::None)?;
        // [B, T, H·D] in and out: no permutes around the fused kernel.
        let o = match rec {
            Some(r) => r.attend(tape, &q, &k, &v, self.heads, causal)?,
            None => attend(tape, &q, &k, &v, self.heads, causal)?,
        };
        self.out_proj
            .forward_residual(tape, &o, Act::None, residual)
    }
}

/// `CLIPMLP`: `fc2(act(fc1(x)))`.
#[derive(Clone)]
pub struct ClipMlp {
    /// `fc1` `[intermediate, hidden]`.
    pub fc1: Linear,
    /// `fc2` `[hidden, intermediate]`.
    pub fc2: Linear,
    act: Act,
}

impl ClipMlp {
    fn load(l: &Loader, d: &EncoderDims) -> Result<ClipMlp> {
        Ok(ClipMlp {
            fc1: Linear::load(&l.sub("fc1"), d.intermediate, d.hidden, true)?,
            fc2: Linear::load(&l.sub("fc2"), d.hidden, d.intermediate, true)?,
            act: d.act,
        })
    }

    /// `residual + fc2(act(fc1(x)))`.
    fn forward(&self, tape: &Tape, x: &Var, residual: &Var) -> Result<Var> {
        let h = self.fc1.forward(tape, x, self.act)?;
        self.fc2.forward_residual(tape, &h, Act::None, residual)
    }
}

/// `CLIPEncoderLayer`.
#[derive(Clone)]
pub struct ClipEncoderLayer {
    /// `layer_norm1`.
    pub layer_norm1: LayerNorm,
    /// `self_attn`.
    pub self_attn: ClipAttention,
    /// `layer_norm2`.
    pub layer_norm2: LayerNorm,
    /// `mlp`.
    pub mlp: ClipMlp,
}

impl ClipEncoderLayer {
    fn load(l: &Loader, d: &EncoderDims) -> Result<ClipEncoderLayer> {
        Ok(ClipEncoderLayer {
            layer_norm1: LayerNorm::load(&l.sub("layer_norm1"), d.hidden, d.eps)?,
            self_attn: ClipAttention::load(&l.sub("self_attn"), d)?,
            layer_norm2: LayerNorm::load(&l.sub("layer_norm2"), d.hidden, d.eps)?,
            mlp: ClipMlp::load(&l.sub("mlp"), d)?,
        })
    }

    /// `x`: `[B, T, C]`.
    fn forward(
        &self,
        tape: &Tape,
        x: &Var,
        causal: bool,
        rec: Option<&mut Recorder>,
    ) -> Result<Var> {
        let h =
            self.self_attn
                .forward(tape, &self.layer_norm1.forward(tape, x)?, causal, x, rec)?;
        self.mlp
            .forward(tape, &self.layer_norm2.forward(tape, &h)?, &h)
    }
}

/// `CLIPEncoder`: the stack of layers.
#[derive(Clone)]
pub struct ClipEncoder {
    /// `layers.{i}`.
    pub layers: Vec<ClipEncoderLayer>,
}

impl ClipEncoder {
    /// Loads `layers.0 ..` under `l` (`…encoder`).
    pub fn load(l: &Loader, d: &EncoderDims) -> Result<ClipEncoder> {
        let layers = (0..d.layers)
            .map(|i| ClipEncoderLayer::load(&l.sub("layers").sub(i), d))
            .collect::<Result<_>>()?;
        Ok(ClipEncoder { layers })
    }

    /// `x`: `[B, T, C]`; `causal` masks keys after each query (text tower). With
    /// `recompute` each layer is a [`Tape::checkpoint`]: its activations are not kept for
    /// the backward pass but computed again there (frozen weights only).
    pub fn forward(&self, tape: &Tape, x: &Var, causal: bool, recompute: bool) -> Result<Var> {
        self.forward_recorded(tape, x, causal, recompute, None)
    }

    /// [`ClipEncoder::forward`], handing each layer's hidden state (`x` first, as
    /// transformers' `encoder_states`) and attention probabilities to `rec` when given.
    /// Recording keeps every activation, so it cannot be combined with `recompute`.
    pub fn forward_recorded(
        &self,
        tape: &Tape,
        x: &Var,
        causal: bool,
        recompute: bool,
        mut rec: Option<&mut Recorder>,
    ) -> Result<Var> {
        if recompute && rec.is_some() {
            return Err(crate::Error::invalid(
                "a recorded forward keeps every layer's activations; it cannot recompute them",
            ));
        }
        let mut h = x.clone();
        if let Some(r) = rec.as_deref_mut() {
            r.hidden(&h);
        }
        for layer in &self.layers {
            h = if recompute {
                let layer = layer.clone();
                tape.checkpoint(&[&h], move |t, xs| layer.forward(t, &xs[0], causal, None))?
            } else {
                layer.forward(tape, &h, causal, rec.as_deref_mut())?
            };
            if let Some(r) = rec.as_deref_mut() {
                r.hidden(&h);
            }
        }
        Ok(h)
    }
}
