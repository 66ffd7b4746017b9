//! The taming-transformers VQGAN (`taming/models/vqgan.py`, `VQModel` and `GumbelVQ`):
//! `encode` = `quant_conv(encoder(x))`, `quantize` = nearest codebook entry (or the Gumbel
//! quantiser's most likely code), `decode` = `decoder(post_quant_conv(z_q))`. Images are in
//! [-1, 1] (`image / 127.5 − 1`) in and out; the decoder output is not clamped.
//!
//! Field path = checkpoint key: `encoder.down.0.block.1.conv2.weight` is
//! `self.encoder.down[0].level.block[1].conv2.weight`. `loss.*` keys are ignored.

pub mod blocks;
pub mod config;
pub mod decoder;
pub mod encoder;
pub mod quantize;

pub use config::{DdConfig, QuantizerKind, VqGanConfig};

use crate::autodiff::{Tape, Var};
use crate::nn::Conv2d;
use crate::ops::vq;
use crate::weights::torch::TorchCheckpoint;
use crate::weights::{Loader, SafetensorsFile, TensorSource};
use crate::{Error, Gpu, Result, Tensor};
use std::path::Path;

/// A loaded VQGAN.
pub struct VqGan {
    /// The config it was built from.
    pub config: VqGanConfig,
    /// `encoder.*`
    pub encoder: encoder::Encoder,
    /// `decoder.*`
    pub decoder: decoder::Decoder,
    /// `quant_conv`: 1x1, z_channels -> embed_dim.
    pub quant_conv: Conv2d,
    /// `post_quant_conv`: 1x1, embed_dim -> z_channels.
    pub post_quant_conv: Conv2d,
    /// `quantize.*`
    pub quantize: quantize::Quantize,
    /// Every weight by checkpoint key, sharing buffers with the fields above (what training
    /// updates and the writers save).
    pub params: crate::weights::NamedParams,
    gpu: Gpu,
}

/// Opens a weights file as a [`TensorSource`]: a PyTorch zip checkpoint (`.ckpt`, `.pt`,
/// `.pth`) or `.safetensors`, told apart by content.
pub fn open_weights(path: &Path) -> Result<Box<dyn TensorSource>> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
    let is_safetensors = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if is_safetensors && (n < 4 || &magic != b"PK\x03\x04") {
        return open_safetensors(path);
    }
    Ok(Box::new(TorchCheckpoint::open(path)?))
}

fn open_safetensors(path: &Path) -> Result<Box<dyn TensorSource>> {
    Ok(Box::new(SafetensorsFile::open(path)?))
}

/// The config beside a weights file: the same stem with `.yaml`
/// (`vqgan_imagenet_f16_16384.ckpt` -> `vqgan_imagenet_f16_16384.yaml`, the names the
/// VQGAN+CLIP download scripts use), if it exists.
pub fn config_beside(weights: &Path) -> Option<std::path::PathBuf> {
    let same = weights.with_extension("yaml");
    same.is_file().then_some(same)
}

impl VqGan {
    /// Loads weights (`.ckpt` or `.safetensors` with taming's keys) and the taming `.yaml`
    /// config. A tensor whose shape disagrees with the config fails with its key and both
    /// shapes.
    pub fn load(weights: impl AsRef<Path>, config: impl AsRef<Path>, gpu: &Gpu) -> Result<VqGan> {
        let cfg = VqGanConfig::from_file(config)?;
        let src = open_weights(weights.as_ref())?;
        Self::from_source(src.as_ref(), cfg, gpu)
    }

    /// Builds the model from any tensor source.
    pub fn from_source(src: &dyn TensorSource, config: VqGanConfig, gpu: &Gpu) -> Result<VqGan> {
        let l = Loader::new(src, gpu);
        let (z, e) = (config.dd.z_channels, config.embed_dim);
        let encoder = encoder::Encoder::load(&l.sub("encoder"), &config)?;
        let decoder = decoder::Decoder::load(&l.sub("decoder"), &config)?;
        let quant_conv = Conv2d::load(&l.sub("quant_conv"), z, e, 1)?;
        let post_quant_conv = Conv2d::load(&l.sub("post_quant_conv"), e, z, 1)?;
        let quantize = quantize::Quantize::load(&l.sub("quantize"), &config)?;
        Ok(VqGan {
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            quantize,
            params: l.uploaded(),
            config,
            gpu: gpu.clone(),
        })
    }

    /// The device the weights live on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Spatial downsampling factor f: image sides must be multiples of it.
    pub fn downsampling_factor(&self) -> usize {
        self.config.downsampling_factor()
    }

    /// `x`: `[N, in_channels, H, W]` in [-1, 1], H and W multiples of
    /// [`Self::downsampling_factor`] -> `z` `[N, embed_dim, H/f, W/f]` (after `quant_conv`,
    /// before quantisation).
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let tape = Tape::new();
        Ok(self
            .encode_on(&tape, &tape.leaf(x.clone(), false))?
            .value()
            .clone())
    }

    /// [`VqGan::encode`] on `tape`: the one encoder forward, for inference (nothing needs a
    /// gradient: fused kernels) and training.
    pub fn encode_on(&self, tape: &Tape, x: &Var) -> Result<Var> {
        let f = self.downsampling_factor();
        let c = self.config.dd.in_channels;
        let s = x.shape();
        if s.len() != 4 || s[1] != c {
            return Err(Error::shape(format!(
                "VQGAN input must be [N, {c}, H, W], got {s:?}"
            )));
        }
        let (h, w) = (s[2], s[3]);
        if h == 0 || w == 0 || h % f != 0 || w % f != 0 {
            return Err(Error::shape(format!(
                "image size {w}x{h} is not a multiple of the VQGAN's downsampling factor {f} \
                 (resize or crop to e.g. {}x{})",
                (w / f).max(1) * f,
                (h / f).max(1) * f
            )));
        }
        let h = self.encoder.forward(tape, x)?;
        self.quant_conv.forward(tape, &h, None)
    }

    /// `z`: `[N, embed_dim, h, w]` -> `(z_q [N, embed_dim, h, w], codes [N, h, w] u32)`.
    pub fn quantize(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        self.quantize.forward(z)
    }

    /// `z_q`: `[N, embed_dim, h, w]` -> image `[N, out_ch, h·f, w·f]` in about [-1, 1].
    pub fn decode(&self, zq: &Tensor) -> Result<Tensor> {
        let tape = Tape::new();
        Ok(self
            .decode_on(&tape, &tape.leaf(zq.clone(), false), false)?
            .value()
            .clone())
    }

    /// [`VqGan::decode`] on `tape`: the one decoder forward, for inference, VQGAN+CLIP and
    /// training. With `recompute` the middle blocks and each level's blocks are
    /// [`Tape::checkpoint`]s (less memory held for the backward pass, one more forward).
    pub fn decode_on(&self, tape: &Tape, zq: &Var, recompute: bool) -> Result<Var> {
        let e = self.config.embed_dim;
        let s = zq.shape();
        if s.len() != 4 || s[1] != e {
            return Err(Error::shape(format!(
                "VQGAN latent must be [N, {e}, h, w], got {s:?}"
            )));
        }
        let h = self.post_quant_conv.forward(tape, zq, None)?;
        self.decoder.forward(tape, &h, recompute)
    }

    /// Decodes a grid of codes `[N, h, w]` (u32, each below `n_embed`).
    pub fn decode_codes(&self, codes: &Tensor) -> Result<Tensor> {
        let zq = vq::gather(codes, self.quantize.codebook())?;
        self.decode(&zq)
    }
}

/// RGB8 pixels (row-major `[H, W, 3]`) to the model's input `[1, 3, H, W]` in [-1, 1]
/// (`p / 127.5 − 1`, taming's data scaling).
pub fn rgb8_to_input(rgb: &[u8], width: usize, height: usize) -> Vec<f32> {
    let hw = width * height;
    let mut x = vec![0.0f32; 3 * hw];
    for (i, px) in rgb.chunks_exact(3).take(hw).enumerate() {
        for c in 0..3 {
            x[c * hw + i] = px[c] as f32 / 127.5 - 1.0;
        }
    }
    x
}

/// The decoder's `[1, 3, H, W]` output to RGB8 pixels: `round(clamp((x + 1) / 2, 0, 1) · 255)`.
pub fn output_to_rgb8(x: &[f32], width: usize, height: usize) -> Vec<u8> {
    let hw = width * height;
    let mut rgb = vec![0u8; 3 * hw];
    for i in 0..hw {
        for c in 0..3 {
            let v = ((x[c * hw + i] + 1.0) / 2.0).clamp(0.0, 1.0);
            rgb[3 * i + c] = (v * 255.0).round() as u8;
        }
    }
    rgb
}

/// Writes the model tensors of `src` (every key except the training-only `loss.*`) to a
/// `.safetensors` file at `out`, as f32 with the same keys, written atomically (a unique
/// temporary file renamed into place). Returns the number of tensors.
pub fn write_safetensors(src: &dyn TensorSource, out: &Path) -> Result<usize> {
    let keys: Vec<String> = src
        .keys()
        .into_iter()
        .filter(|k| !k.starts_with("loss."))
        .collect();
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(keys.len());
    for k in keys {
        let shape = src.shape(&k).unwrap_or_default();
        let v = src.read_f32(&k)?;
        data.push((k, shape, bytemuck::cast_slice(&v).to_vec()));
    }
    let views = data
        .iter()
        .map(|(k, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::Format {
                    path: src.path().to_string(),
                    msg: format!("tensor '{k}': {e}"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = std::collections::HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "source".to_string(),
            format!("vqclip convert {}", src.path()),
        ),
    ]);
    let n = views.len();
    let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| Error::Format {
        path: out.display().to_string(),
        msg: format!("writing safetensors: {e}"),
    })?;
    // A unique temporary file, synced and renamed: a failure never leaves a partial file.
    crate::atomic::write(out, &bytes)?;
    Ok(n)
}
