//! The transformer shared by both towers, mirroring `CLIPEncoder`, `CLIPEncoderLayer`,
//! `CLIPAttention` and `CLIPMLP` in transformers' `modeling_clip.py`. Field paths equal
//! checkpoint keys (`encoder.layers.3.self_attn.q_proj.weight`).
//!
//! Pre-norm residual blocks: `x = x + out_proj(attn(layer_norm1(x)))`,
//! `x = x + fc2(act(fc1(layer_norm2(x))))`, written once over the tape (`nn`). Without
//! gradients biases, activations and residual additions run in the matmul epilogue, and
//! q/k/v are one product with the packed `[3C, C]` weight whose output the fused attention
//! reads in place, so a layer is 2 norms, 4 matmuls and one attention. With frozen weights
//! (VQGAN+CLIP) the packed projection stays and its input gradient is one product; on a
//! training tape the same code records the three projections and the unfused ops.

use crate::autodiff::{Tape, Var};
use crate::inspect::Recorder;
use crate::nn::{attend, attend_qkv, LayerNorm, Linear};
use crate::ops::{cast, Act};
use crate::weights::Loader;
use crate::{DType, Result, Tensor};

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

    /// The packed projection `W_qkv = [W_q; W_k; W_v]` `[3C, C]` and `b_qkv` `[3C]`, made
    /// once per weight set and kept in the device's derived-tensor cache, keyed on the six
    /// tensors so that writing any of them in place drops it. `None` when a projection has
    /// no bias, or for f16 weights of an odd element count (their rows cannot be copied as
    /// whole 4-byte words: the three projections run instead). f16 weights pack to an f16
    /// `W_qkv`.
    pub fn packed_qkv(&self) -> Result<Option<(Tensor, Tensor)>> {
        use crate::ops::concat::concat;
        let (wq, wk, wv) = (
            &self.q_proj.weight,
            &self.k_proj.weight,
            &self.v_proj.weight,
        );
        if wq.dtype() == crate::DType::F16 && wq.numel() % 2 == 1 {
            return Ok(None);
        }
        let (Some(bq), Some(bk), Some(bv)) = (
            self.q_proj.bias.as_ref(),
            self.k_proj.bias.as_ref(),
            self.v_proj.bias.as_ref(),
        ) else {
            return Ok(None);
        };
        let gpu = wq.gpu();
        let w = gpu.derived("clip_qkv_weight", &[wq, wk, wv, bq, bk, bv], || {
            concat(&[wq, wk, wv], 0)
        })?;
        let b = gpu.derived("clip_qkv_bias", &[wq, wk, wv, bq, bk, bv], || {
            concat(&[bq, bk, bv], 0)
        })?;
        Ok(Some((w, b)))
    }

    /// `residual + out_proj(attention(x))`. `x`, `residual`: `[B, T, C]`. A recorder
    /// takes the unfused attention that keeps the probabilities.
    ///
    /// Where q/k/v weights need no gradient (inference, VQGAN+CLIP) the projections are one
    /// `[B·T, C] @ [C, 3C]` product, whose `[B, T, 3C]` output attention reads in place: one
    /// pass over x instead of three, larger tiles, and with a gradient for `x` one
    /// `dQKV @ W_qkv` product instead of three plus two additions.
    fn forward(
        &self,
        tape: &Tape,
        x: &Var,
        causal: bool,
        residual: &Var,
        rec: Option<&mut Recorder>,
    ) -> Result<Var> {
        let frozen = ![&self.q_proj, &self.k_proj, &self.v_proj]
            .iter()
            .any(|l| tape.param(&l.weight).needs_grad());
        if rec.is_none() && frozen {
            if let Some((w, b)) = self.packed_qkv()? {
                let (w, b) = (tape.leaf(w, false), tape.leaf(b, false));
                let qkv = tape.linear(x, &w, Some(&b), Act::None)?;
                let o = attend_qkv(tape, &qkv, self.heads, causal)?;
                return self
                    .out_proj
                    .forward_residual(tape, &o, Act::None, residual);
            }
        }
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

/// How `--precision f16` inference stores the encoder's activations on `gpu` by default:
/// f16 on GPUs (half the memory traffic of every norm, product and attention; not yet
/// measured on one), f32 on CPU adapters, where converting every f16 load and store costs
/// more than the traffic saves (lavapipe: text and image encode about 15% slower, see
/// docs/perf.md). `VQCLIP_F16_ACTIVATIONS=on|off` overrides.
pub fn f16_activations_default(gpu: &crate::Gpu) -> DType {
    match crate::ops::env::F16_ACTIVATIONS.get().as_deref() {
        Some("on") => DType::F16,
        Some("off") => DType::F32,
        _ if gpu.is_cpu() => DType::F32,
        _ => DType::F16,
    }
}

/// `CLIPEncoder`: the stack of layers.
#[derive(Clone)]
pub struct ClipEncoder {
    /// `layers.{i}`.
    pub layers: Vec<ClipEncoderLayer>,
    /// How activations are stored between the layers' kernels when nothing needs a
    /// gradient: f32, or f16 (only with f16 weights).
    activations: DType,
}

impl ClipEncoder {
    /// Loads `layers.0 ..` under `l` (`…encoder`). With f16 weights (`--precision f16`)
    /// inference stores activations as [`f16_activations_default`] says.
    pub fn load(l: &Loader, d: &EncoderDims) -> Result<ClipEncoder> {
        let layers: Vec<ClipEncoderLayer> = (0..d.layers)
            .map(|i| ClipEncoderLayer::load(&l.sub("layers").sub(i), d))
            .collect::<Result<_>>()?;
        let mut enc = ClipEncoder {
            layers,
            activations: DType::F32,
        };
        if enc.f16_weights() {
            enc.activations = f16_activations_default(l.gpu());
        }
        Ok(enc)
    }

    /// How inference stores activations between the layers' kernels.
    pub fn activations(&self) -> DType {
        self.activations
    }

    /// Stores inference activations as `dt`: f32, or f16 where the weights are f16
    /// (`--precision f16`). Gradient paths always run on f32 activations.
    pub fn set_activations(&mut self, dt: DType) -> Result<()> {
        match dt {
            DType::F32 => {}
            DType::F16 if self.f16_weights() => {}
            DType::F16 => {
                return Err(crate::Error::invalid(
                    "f16 activations need f16 weights (--precision f16)",
                ))
            }
            DType::U32 => {
                return Err(crate::Error::invalid(
                    "encoder activations are f32 or f16, not u32",
                ))
            }
        }
        self.activations = dt;
        Ok(())
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
        // `--precision f16` inference with f16 activations (see f16_activations_default;
        // nothing needing a gradient, nothing recorded): the activations between the
        // layers' kernels are stored in f16, half the memory traffic of every norm,
        // product and attention; their arithmetic stays f32. Gradients (VQGAN+CLIP,
        // training) keep f32 activations.
        let half = self.activations == DType::F16
            && !tape.is_training()
            && !x.needs_grad()
            && !recompute
            && rec.is_none();
        let mut h = if half {
            tape.leaf(cast(x.value(), DType::F16)?, false)
        } else {
            x.clone()
        };
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
        if half {
            h = tape.leaf(cast(h.value(), DType::F32)?, false);
        }
        Ok(h)
    }

    /// Whether the layers' linear weights are f16 (`--precision f16`).
    fn f16_weights(&self) -> bool {
        self.layers
            .first()
            .is_some_and(|l| l.mlp.fc1.weight.dtype() == DType::F16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};
    use crate::weights::MemorySource;

    /// Random encoder weights (uniform ±√(3/fan-in), LayerNorm gains near 1) under
    /// `layers.{i}` for `d`.
    fn random_encoder(d: &EncoderDims, seed: u64) -> MemorySource {
        let mut src = MemorySource::new("random encoder");
        let (c, m) = (d.hidden, d.intermediate);
        let mut s = seed;
        let mut put = |key: String, shape: &[usize], fan_in: usize, base: f32| {
            s += 1;
            let a = (3.0 / fan_in as f32).sqrt();
            let n = shape.iter().product();
            let v = rand_vec(n, s).iter().map(|x| base + a * x).collect();
            src.insert(key, shape, v).unwrap();
        };
        for i in 0..d.layers {
            let p = format!("layers.{i}");
            for ln in ["layer_norm1", "layer_norm2"] {
                put(format!("{p}.{ln}.weight"), &[c], 300, 1.0);
                put(format!("{p}.{ln}.bias"), &[c], 300, 0.0);
            }
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                put(format!("{p}.self_attn.{proj}.weight"), &[c, c], c, 0.0);
                put(format!("{p}.self_attn.{proj}.bias"), &[c], c, 0.0);
            }
            put(format!("{p}.mlp.fc1.weight"), &[m, c], c, 0.0);
            put(format!("{p}.mlp.fc1.bias"), &[m], c, 0.0);
            put(format!("{p}.mlp.fc2.weight"), &[c, m], m, 0.0);
            put(format!("{p}.mlp.fc2.bias"), &[c], m, 0.0);
        }
        src
    }

    /// cos(a, b) and max|a − b| / max|b|.
    fn compare(a: &[f32], b: &[f32]) -> (f64, f64) {
        let (mut ab, mut aa, mut bb, mut err, mut mb) = (0.0, 0.0, 0.0, 0.0f64, 0.0f64);
        for (&x, &y) in a.iter().zip(b) {
            let (x, y) = (x as f64, y as f64);
            ab += x * y;
            aa += x * x;
            bb += y * y;
            err = err.max((x - y).abs());
            mb = mb.max(y.abs());
        }
        (ab / (aa.sqrt() * bb.sqrt()), err / mb.max(1e-30))
    }

    #[test]
    fn packed_qkv_encoder_matches_the_three_projections() {
        // The encoder on an inference tape (packed QKV, in-place attention) and on a tape
        // where only x needs a gradient (packed QKV with its one-product backward) against
        // a training tape (three projections, unfused ops): outputs and x-gradients, on a
        // small random config (causal and not) and CLIP-B/32 shapes (vision: 768 wide,
        // 12 heads, 50 tokens; text: 512 wide, 8 heads, 77 causal tokens), one layer each.
        let g = gpu();
        let small = |causal| {
            let d = EncoderDims {
                hidden: 24,
                intermediate: 40,
                heads: 3,
                layers: 2,
                act: Act::QuickGelu,
                eps: 1e-5,
            };
            (d, 3, 7, causal)
        };
        let b32 = |c: usize, heads, t, causal| {
            let d = EncoderDims {
                hidden: c,
                intermediate: 4 * c,
                heads,
                layers: 1,
                act: Act::QuickGelu,
                eps: 1e-5,
            };
            (d, 2, t, causal)
        };
        let cases = [
            small(false),
            small(true),
            b32(768, 12, 50, false),
            b32(512, 8, 77, true),
        ];
        for (ci, (d, b, t, causal)) in cases.into_iter().enumerate() {
            let src = random_encoder(&d, 100 * ci as u64);
            let enc = ClipEncoder::load(&Loader::new(&src, &g), &d).unwrap();
            let c = d.hidden;
            let (xv, wv) = (rand_vec(b * t * c, 7 + ci as u64), rand_vec(b * t * c, 9));
            // (output, x-gradient) on `tape`, the gradient when x needs one.
            let run = |tape: &Tape, grad: bool| -> (Vec<f32>, Option<Vec<f32>>) {
                let x = tape.leaf(Tensor::from_slice(&g, &xv, &[b, t, c]).unwrap(), grad);
                let y = enc.forward(tape, &x, causal, false).unwrap();
                let out = y.value().to_vec().unwrap();
                if !grad {
                    return (out, None);
                }
                let w = tape.leaf(Tensor::from_slice(&g, &wv, &[b, t, c]).unwrap(), false);
                let loss = tape.sum(&tape.mul(&y, &w).unwrap()).unwrap();
                let dx = tape.backward(&loss).unwrap().get(&x).unwrap().to_vec();
                (out, Some(dx.unwrap()))
            };
            let (want, want_dx) = run(&Tape::training(), true);
            let want_dx = want_dx.unwrap();
            let infer = Tape::new();
            let (got, _) = run(&infer, false);
            let (cos, err) = compare(&got, &want);
            assert!(
                cos >= 0.9999 && err < 1e-4,
                "case {ci} inference: cos {cos} err {err}"
            );
            let (got, got_dx) = run(&Tape::new(), true);
            let (cos, err) = compare(&got, &want);
            assert!(
                cos >= 0.9999 && err < 1e-4,
                "case {ci} frozen: cos {cos} err {err}"
            );
            let (cos, err) = compare(&got_dx.unwrap(), &want_dx);
            assert!(
                cos >= 0.9999 && err < 1e-4,
                "case {ci} dx: cos {cos} err {err}"
            );
        }
        // The packed weight is made once per weight set and dropped when one is written.
        let d = small(false).0;
        let src = random_encoder(&d, 1);
        let enc = ClipEncoder::load(&Loader::new(&src, &g), &d).unwrap();
        let attn = &enc.layers[0].self_attn;
        let (w1, _) = attn.packed_qkv().unwrap().unwrap();
        let (w2, _) = attn.packed_qkv().unwrap().unwrap();
        assert_eq!(w1.buffer_id(), w2.buffer_id(), "cached");
        let wk = &attn.k_proj.weight;
        let new_k = rand_vec(wk.numel(), 5);
        wk.assign(&Tensor::from_slice(&g, &new_k, wk.shape()).unwrap())
            .unwrap();
        let (w3, _) = attn.packed_qkv().unwrap().unwrap();
        let c = d.hidden;
        assert_eq!(
            w3.to_vec().unwrap()[c * c..2 * c * c],
            new_k,
            "rebuilt after the write"
        );
    }
}
