//! The real models behind [`Perceptor`] and [`Generator`]: CLIP's image tower and the VQGAN
//! decoder re-expressed on the autodiff tape, reading the loaded models' weights.
//!
//! The structure follows `models::clip::vision` / `encoder` and `models::vqgan::blocks` /
//! `decoder` exactly (those run inference with fused kernels); tests check that both paths
//! give the same values.

use super::{Generator, Perceptor};
use crate::autodiff::{Tape, Var};
use crate::models::clip::encoder::{ClipEncoder, LayerNorm, Linear};
use crate::models::clip::ClipModel;
use crate::models::vqgan::blocks::{AttnBlock, Conv, Level, Mid, Norm, ResnetBlock, EPS, GROUPS};
use crate::models::vqgan::VqGan;
use crate::ops::conv2d::Conv2dOpts;
use crate::ops::Act;
use crate::{Result, Tensor};

/// A CLIP `Linear` on the tape.
pub(crate) fn linear(tape: &Tape, l: &Linear, x: &Var, act: Act) -> Result<Var> {
    let w = tape.param(&l.weight);
    let b = l.bias.as_ref().map(|b| tape.param(b));
    tape.linear(x, &w, b.as_ref(), act)
}

/// A CLIP `LayerNorm` on the tape.
pub(crate) fn layer_norm(tape: &Tape, l: &LayerNorm, x: &Var) -> Result<Var> {
    tape.layer_norm(x, &tape.param(&l.weight), &tape.param(&l.bias), l.eps)
}

/// `x`: `[N, T, D]` through CLIP's pre-LN blocks (`causal`: the text tower's mask; the
/// image tower has none).
pub(crate) fn clip_encoder(
    tape: &Tape,
    enc: &ClipEncoder,
    x: &Var,
    heads: usize,
    act: Act,
    causal: bool,
) -> Result<Var> {
    let (n, t, d) = (x.shape()[0], x.shape()[1], x.shape()[2]);
    let hd = d / heads;
    let split = |v: &Var| -> Result<Var> {
        tape.permute(&tape.reshape(v, &[n, t, heads, hd])?, &[0, 2, 1, 3])
    };
    let mut x = x.clone();
    for layer in &enc.layers {
        let h = layer_norm(tape, &layer.layer_norm1, &x)?;
        let a = &layer.self_attn;
        let q = split(&linear(tape, &a.q_proj, &h, Act::None)?)?;
        let k = split(&linear(tape, &a.k_proj, &h, Act::None)?)?;
        let v = split(&linear(tape, &a.v_proj, &h, Act::None)?)?;
        let o = tape.attention(&q, &k, &v, causal, (hd as f32).powf(-0.5))?;
        let o = tape.reshape(&tape.permute(&o, &[0, 2, 1, 3])?, &[n, t, d])?;
        x = tape.add(&x, &linear(tape, &a.out_proj, &o, Act::None)?)?;
        let h = layer_norm(tape, &layer.layer_norm2, &x)?;
        let m = linear(tape, &layer.mlp.fc1, &h, act)?;
        x = tape.add(&x, &linear(tape, &layer.mlp.fc2, &m, Act::None)?)?;
    }
    Ok(x)
}

impl Perceptor for ClipModel {
    fn image_size(&self) -> usize {
        self.config.vision.image_size
    }
    fn embed_dim(&self) -> usize {
        self.config.projection_dim
    }
    fn mean_std(&self) -> ([f32; 3], [f32; 3]) {
        self.preprocess.normalize.unwrap_or((
            [0.481_454_66, 0.457_827_5, 0.408_210_73],
            [0.268_629_54, 0.261_302_6, 0.275_777_1],
        ))
    }
    fn encode_text(&self, texts: &[String]) -> Result<Tensor> {
        self.text_features(texts)
    }
    fn encode_image(&self, tape: &Tape, pixels: &Var) -> Result<Var> {
        let c = &self.config.vision;
        let (s, p, g, ch, d) = (
            c.image_size,
            c.patch_size,
            c.grid(),
            c.num_channels,
            c.hidden_size,
        );
        let n = pixels.shape()[0];
        let e = &self.vision_model.embeddings;
        // The stride-P patch conv as one product: patches [N·G², C·P·P] @ Wᵀ.
        let x = tape.reshape(pixels, &[n, ch, g, p, g, p])?;
        let x = tape.reshape(
            &tape.permute(&x, &[0, 2, 4, 1, 3, 5])?,
            &[n * g * g, ch * p * p],
        )?;
        let w = tape.param(&e.patch_embedding);
        let x = tape.reshape(&tape.linear(&x, &w, None, Act::None)?, &[n, g * g, d])?;
        debug_assert_eq!(s, g * p);
        let zeros = tape.leaf(Tensor::zeros(pixels.value().gpu(), &[n, 1, d])?, false);
        let cls = tape.add(&zeros, &tape.param(&e.class_embedding))?;
        let x = tape.concat(&[&cls, &x], 1)?;
        let x = tape.add(&x, &tape.param(&e.position_embedding))?;
        let x = layer_norm(tape, &self.vision_model.pre_layrnorm, &x)?;
        let h = clip_encoder(
            tape,
            &self.vision_model.encoder,
            &x,
            c.num_attention_heads,
            c.hidden_act,
            false,
        )?;
        let cls = tape.reshape(&tape.slice(&h, 1, 0, 1)?, &[n, d])?;
        let pooled = layer_norm(tape, &self.vision_model.post_layernorm, &cls)?;
        linear(tape, &self.visual_projection, &pooled, Act::None)
    }
}

fn conv(tape: &Tape, c: &Conv, x: &Var, residual: Option<&Var>) -> Result<Var> {
    let opts = Conv2dOpts {
        pad: [c.weight.dim(2) / 2; 4],
        ..Default::default()
    };
    let y = tape.conv2d(x, &tape.param(&c.weight), Some(&tape.param(&c.bias)), &opts)?;
    match residual {
        Some(r) => tape.add(&y, r),
        None => Ok(y),
    }
}

fn norm(tape: &Tape, n: &Norm, x: &Var, act: Act) -> Result<Var> {
    tape.group_norm(
        x,
        GROUPS,
        &tape.param(&n.weight),
        &tape.param(&n.bias),
        EPS,
        act,
    )
}

fn resnet(tape: &Tape, b: &ResnetBlock, x: &Var) -> Result<Var> {
    let h = conv(tape, &b.conv1, &norm(tape, &b.norm1, x, Act::Silu)?, None)?;
    let h = norm(tape, &b.norm2, &h, Act::Silu)?;
    let skip = match &b.nin_shortcut {
        Some(nin) => conv(tape, nin, x, None)?,
        None => x.clone(),
    };
    conv(tape, &b.conv2, &h, Some(&skip))
}

fn attn(tape: &Tape, a: &AttnBlock, x: &Var) -> Result<Var> {
    let (n, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let hn = norm(tape, &a.norm, x, Act::None)?;
    let t = tape.permute(&tape.reshape(&hn, &[n, c, h * w])?, &[0, 2, 1])?; // [N, HW, C]
    let proj = |p: &Conv| -> Result<Var> {
        let wt = tape.reshape(&tape.param(&p.weight), &[c, c])?;
        let y = tape.linear(&t, &wt, Some(&tape.param(&p.bias)), Act::None)?;
        tape.reshape(&y, &[n, 1, h * w, c])
    };
    let (q, k, v) = (proj(&a.q)?, proj(&a.k)?, proj(&a.v)?);
    let o = tape.attention(&q, &k, &v, false, (c as f32).powf(-0.5))?;
    let o = tape.permute(&tape.reshape(&o, &[n, h * w, c])?, &[0, 2, 1])?;
    let o = tape.reshape(&o, &[n, c, h, w])?;
    conv(tape, &a.proj_out, &o, Some(x))
}

fn mid(tape: &Tape, m: &Mid, x: &Var) -> Result<Var> {
    let h = resnet(tape, &m.block_1, x)?;
    let h = attn(tape, &m.attn_1, &h)?;
    resnet(tape, &m.block_2, &h)
}

fn level(tape: &Tape, l: &Level, x: &Var) -> Result<Var> {
    let mut h = x.clone();
    for (i, b) in l.block.iter().enumerate() {
        h = resnet(tape, b, &h)?;
        if let Some(a) = l.attn.get(i) {
            h = attn(tape, a, &h)?;
        }
    }
    Ok(h)
}

impl Generator for VqGan {
    fn factor(&self) -> usize {
        self.downsampling_factor()
    }
    fn codebook(&self) -> &Tensor {
        self.quantize.codebook()
    }
    fn quantize(&self, z: &Tensor) -> Result<Tensor> {
        Ok(VqGan::quantize(self, z)?.0)
    }
    fn decode(&self, tape: &Tape, z_q: &Var) -> Result<Var> {
        let d = &self.decoder;
        let h = conv(tape, &self.post_quant_conv, z_q, None)?;
        let h = conv(tape, &d.conv_in, &h, None)?;
        let mut h = mid(tape, &d.mid, &h)?;
        for lvl in d.up.iter().rev() {
            h = level(tape, &lvl.level, &h)?;
            if let Some(us) = &lvl.upsample {
                let opts = Conv2dOpts {
                    pad: [1; 4],
                    upsample: true,
                    ..Default::default()
                };
                h = tape.conv2d(
                    &h,
                    &tape.param(&us.weight),
                    Some(&tape.param(&us.bias)),
                    &opts,
                )?;
            }
        }
        let h = norm(tape, &d.norm_out, &h, Act::Silu)?;
        conv(tape, &d.conv_out, &h, None)
    }
    fn encode(&self, image: &Tensor) -> Result<Tensor> {
        VqGan::encode(self, image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};

    fn fixture(p: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(p)
    }

    #[test]
    fn tape_forwards_match_the_inference_models() {
        let g = gpu();
        let clip = ClipModel::load(fixture("clip/tiny_quickgelu"), &g).unwrap();
        let s = clip.config.vision.image_size;
        let px = Tensor::from_slice(&g, &rand_vec(2 * 3 * s * s, 5), &[2, 3, s, s]).unwrap();
        let want = clip.image_features(&px).unwrap().to_vec().unwrap();
        for needs in [false, true] {
            let tape = Tape::new();
            let x = tape.leaf(px.clone(), needs);
            let got = Perceptor::encode_image(&clip, &tape, &x)
                .unwrap()
                .value()
                .to_vec()
                .unwrap();
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    (a - b).abs() < 1e-4,
                    "clip image features needs_grad={needs}: {a} vs {b}"
                );
            }
        }
        let vq = VqGan::load(
            fixture("vqgan/tiny_f4.ckpt"),
            fixture("vqgan/tiny_f4.yaml"),
            &g,
        )
        .unwrap();
        let e = vq.config.embed_dim;
        let z = Tensor::from_slice(&g, &rand_vec(e * 8 * 8, 6), &[1, e, 8, 8]).unwrap();
        let want = vq.decode(&z).unwrap().to_vec().unwrap();
        for needs in [false, true] {
            let tape = Tape::new();
            let x = tape.leaf(z.clone(), needs);
            let got = Generator::decode(&vq, &tape, &x)
                .unwrap()
                .value()
                .to_vec()
                .unwrap();
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                worst < 1e-4,
                "vqgan decode needs_grad={needs}: worst {worst}"
            );
        }
    }

    #[test]
    fn generation_with_the_fixture_models_lowers_the_loss() {
        let g = gpu();
        let clip = ClipModel::load(fixture("clip/tiny_quickgelu"), &g).unwrap();
        let vq = VqGan::load(
            fixture("vqgan/tiny_f4.ckpt"),
            fixture("vqgan/tiny_f4.yaml"),
            &g,
        )
        .unwrap();
        let mut o = super::super::Options::new(
            super::super::Prompt::parse_list("a red circle").unwrap(),
            32,
            32,
        );
        o.cutn = 4;
        o.seed = 3;
        let mut gen = super::super::Generation::new(&g, &clip, &vq, o).unwrap();
        let logs: Vec<f32> = (0..30).map(|_| gen.step().unwrap().loss).collect();
        let first = logs[..5].iter().sum::<f32>() / 5.0;
        let last = logs[25..].iter().sum::<f32>() / 5.0;
        assert!(
            last < first,
            "loss should fall: {first} -> {last} ({logs:?})"
        );
    }
}
