//! The transformer shared by both towers, mirroring `CLIPEncoder`, `CLIPEncoderLayer`,
//! `CLIPAttention` and `CLIPMLP` in transformers' `modeling_clip.py`. Field paths equal
//! checkpoint keys (`encoder.layers.3.self_attn.q_proj.weight`).
//!
//! Pre-norm residual blocks: `x = x + out_proj(attn(layer_norm1(x)))`,
//! `x = x + fc2(act(fc1(layer_norm2(x))))`. Biases, activations and residual additions run in
//! the matmul epilogue, so a layer is 2 norms, 6 matmuls and one fused attention.

use crate::ops::attention::attention_bthd;
use crate::ops::matmul::{matmul, MatmulOpts};
use crate::ops::{layer_norm, Act};
use crate::weights::Loader;
use crate::{Result, Tensor};

/// `nn.Linear`: `weight` `[out, in]`, optional `bias` `[out]`.
#[derive(Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` (and `bias` if `bias`) under `l`.
    pub fn load(l: &Loader, out_dim: usize, in_dim: usize, bias: bool) -> Result<Linear> {
        Ok(Linear {
            weight: l.tensor("weight", &[out_dim, in_dim])?,
            bias: if bias {
                Some(l.tensor("bias", &[out_dim])?)
            } else {
                None
            },
        })
    }

    /// `act(x @ Wᵀ + b) + residual`. `x`: `[.., in]`; `residual`: `[.., out]`.
    pub fn forward(&self, x: &Tensor, act: Act, residual: Option<&Tensor>) -> Result<Tensor> {
        matmul(
            x,
            &self.weight,
            &MatmulOpts {
                act,
                residual,
                ..MatmulOpts::linear(self.bias.as_ref())
            },
        )
    }
}

/// `nn.LayerNorm` over the last axis.
#[derive(Clone)]
pub struct LayerNorm {
    /// Gain `[C]`.
    pub weight: Tensor,
    /// Shift `[C]`.
    pub bias: Tensor,
    /// Added to the variance.
    pub eps: f32,
}

impl LayerNorm {
    /// Loads `weight` and `bias` `[dim]` under `l`.
    pub fn load(l: &Loader, dim: usize, eps: f32) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: l.tensor("weight", &[dim])?,
            bias: l.tensor("bias", &[dim])?,
            eps,
        })
    }

    /// `x`: `[.., C]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, Some(&self.weight), Some(&self.bias), self.eps)
    }
}

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

    /// `residual + out_proj(attention(x))`. `x`, `residual`: `[B, T, C]`.
    fn forward(&self, x: &Tensor, causal: bool, residual: &Tensor) -> Result<Tensor> {
        let q = self.q_proj.forward(x, Act::None, None)?;
        let k = self.k_proj.forward(x, Act::None, None)?;
        let v = self.v_proj.forward(x, Act::None, None)?;
        let head_dim = x.dim(-1) / self.heads;
        let scale = (head_dim as f32).powf(-0.5);
        // [B, T, H·D] in and out: no permutes around the fused kernel.
        let o = attention_bthd(&q, &k, &v, self.heads, causal, scale)?;
        self.out_proj.forward(&o, Act::None, Some(residual))
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
    fn forward(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward(x, self.act, None)?;
        self.fc2.forward(&h, Act::None, Some(residual))
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
    fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, causal, x)?;
        self.mlp.forward(&self.layer_norm2.forward(&h)?, &h)
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

    /// `x`: `[B, T, C]`; `causal` masks keys after each query (text tower).
    pub fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        let mut h = x.clone();
        for layer in &self.layers {
            h = layer.forward(&h, causal)?;
        }
        Ok(h)
    }
}
