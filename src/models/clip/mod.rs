//! OpenAI CLIP as Hugging Face transformers implements it (`models/clip/modeling_clip.py`):
//! config, tokenizer, image preprocessing, text and vision towers, and [`ClipModel`], which
//! loads a Hugging Face CLIP folder and produces the same `text_embeds`, `image_embeds` and
//! logits as `CLIPModel`.

pub mod config;
pub mod encoder;
pub mod preprocess;
pub mod text;
pub mod tokenizer;
pub mod vision;
pub mod vocab;

pub use config::{ClipConfig, TextConfig, VisionConfig};
pub use preprocess::{load_image, PreprocessConfig};
pub use text::ClipTextTransformer;
pub use tokenizer::ClipTokenizer;
pub use vision::ClipVisionTransformer;

use crate::autodiff::{Tape, Var};
use crate::nn::Linear;
use crate::ops::concat::{concat, slice};
use crate::ops::elementwise::{mul, unary, UnaryOp};
use crate::ops::matmul::{matmul, MatmulOpts};
use crate::ops::reduce::{reduce, ReduceOp};
use crate::ops::Act;
use crate::tensor::Precision;
use crate::weights::{Loader, SafetensorsFile, TensorSource};
use crate::{Error, Gpu, Result, Tensor};
use std::path::Path;

/// Batches larger than this are encoded in chunks (bounds the peak memory of activations).
const MAX_CHUNK: usize = 64;

/// A CLIP model: both towers, their projections and the learned temperature, plus the
/// tokenizer and image preprocessing of its folder.
pub struct ClipModel {
    /// The architecture.
    pub config: ClipConfig,
    /// `text_model`.
    pub text_model: ClipTextTransformer,
    /// `vision_model`.
    pub vision_model: ClipVisionTransformer,
    /// `visual_projection` `[P, D_vision]`, no bias.
    pub visual_projection: Linear,
    /// `text_projection` `[P, D_text]`, no bias.
    pub text_projection: Linear,
    /// `logit_scale`: the log of the similarity multiplier.
    pub logit_scale: f32,
    /// The folder's tokenizer, if it has one.
    pub tokenizer: Option<ClipTokenizer>,
    /// The folder's `preprocessor_config.json`, or the `CLIPImageProcessor` defaults.
    pub preprocess: PreprocessConfig,
    /// Every weight uploaded to the GPU by checkpoint key, sharing buffers with the fields
    /// above (what training updates and the writers save; `logit_scale` is a plain number
    /// and not in it).
    pub params: crate::weights::NamedParams,
    /// Precision of the linear-layer weights ([`ClipModel::load_with`]).
    pub precision: Precision,
    gpu: Gpu,
}

impl std::fmt::Debug for ClipModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ClipModel(text {}x{}, vision {}x{} @{}px/{}, projection {})",
            self.config.text.num_hidden_layers,
            self.config.text.hidden_size,
            self.config.vision.num_hidden_layers,
            self.config.vision.hidden_size,
            self.config.vision.image_size,
            self.config.vision.patch_size,
            self.config.projection_dim
        )
    }
}

impl ClipModel {
    /// Loads a Hugging Face CLIP folder: `config.json`, `model.safetensors` (memory-mapped),
    /// `tokenizer.json` or `vocab.json` + `merges.txt` (optional: without them only images
    /// can be encoded), `preprocessor_config.json` (optional). Weights in f32.
    pub fn load(dir: impl AsRef<Path>, gpu: &Gpu) -> Result<ClipModel> {
        ClipModel::load_with(dir, gpu, Precision::F32)
    }

    /// [`ClipModel::load`] with the linear-layer weights of both towers and both
    /// projections (the fused q/k/v weight included) at `precision`. Under
    /// [`Precision::F16`] they are rounded to f16 on the CPU as they are uploaded (exact
    /// for an f16 checkpoint) and the matmul kernels widen them to f32 as they read them:
    /// half the memory and weight traffic of those layers; embeddings, the patch
    /// embedding, norms, biases, activations and accumulation stay f32, and such weights
    /// are frozen (no gradients for them: inference and VQGAN+CLIP only). Fails on an
    /// adapter without `SHADER_F16`.
    pub fn load_with(dir: impl AsRef<Path>, gpu: &Gpu, precision: Precision) -> Result<ClipModel> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::Format {
                path: dir.display().to_string(),
                msg: format!(
                    "{} (expected a Hugging Face CLIP folder with config.json and \
                     model.safetensors)",
                    if dir.exists() {
                        "not a folder"
                    } else {
                        "no such folder"
                    }
                ),
            });
        }
        let config = ClipConfig::from_file(dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() && dir.join("pytorch_model.bin").is_file() {
            return Err(Error::Format {
                path: dir.display().to_string(),
                msg: "has pytorch_model.bin but no model.safetensors; only safetensors weights \
                      are read (the hub folder of openai/clip-vit-base-patch32 has both)"
                    .into(),
            });
        }
        let src = SafetensorsFile::open(&weights)?;
        let mut model = ClipModel::from_source_with(config, &src, gpu, precision)?;
        let has_tokenizer = dir.join("tokenizer.json").is_file()
            || (dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file());
        if has_tokenizer {
            model.tokenizer = Some(ClipTokenizer::from_dir(
                dir,
                model.config.text.max_position_embeddings,
            )?);
        }
        let pp = dir.join("preprocessor_config.json");
        if pp.is_file() {
            model.preprocess =
                PreprocessConfig::from_file(&pp, model.config.vision.image_size as u32)?;
        }
        Ok(model)
    }

    /// Builds the model from any tensor source with Hugging Face key names (no tokenizer;
    /// default preprocessing).
    pub fn from_source(config: ClipConfig, src: &dyn TensorSource, gpu: &Gpu) -> Result<ClipModel> {
        ClipModel::from_source_with(config, src, gpu, Precision::F32)
    }

    /// [`ClipModel::from_source`] with linear-layer weights at `precision` (see
    /// [`ClipModel::load_with`]).
    pub fn from_source_with(
        config: ClipConfig,
        src: &dyn TensorSource,
        gpu: &Gpu,
        precision: Precision,
    ) -> Result<ClipModel> {
        if precision == Precision::F16 {
            gpu.require_f16("CLIP with --precision f16")?;
        }
        config.validate().map_err(|msg| Error::Format {
            path: src.path().to_string(),
            msg,
        })?;
        let l = Loader::new(src, gpu).with_precision(precision);
        let p = config.projection_dim;
        let text_model = ClipTextTransformer::load(&l.sub("text_model"), &config.text)?;
        let vision_model = ClipVisionTransformer::load(&l.sub("vision_model"), &config.vision)?;
        let visual_projection = Linear::load(
            &l.sub("visual_projection"),
            p,
            config.vision.hidden_size,
            false,
        )?;
        let text_projection =
            Linear::load(&l.sub("text_projection"), p, config.text.hidden_size, false)?;
        let logit_scale = l.cpu("logit_scale", &[])?[0];
        Ok(ClipModel {
            preprocess: PreprocessConfig::for_size(config.vision.image_size as u32),
            config,
            text_model,
            vision_model,
            visual_projection,
            text_projection,
            logit_scale,
            tokenizer: None,
            params: l.uploaded(),
            precision,
            gpu: gpu.clone(),
        })
    }

    /// How inference stores the encoders' activations between kernels: f32, or f16 under
    /// `--precision f16` (see [`encoder::f16_activations_default`]).
    pub fn activations(&self) -> crate::DType {
        self.vision_model.encoder.activations()
    }

    /// Stores both encoders' inference activations as `dt` (f16 needs f16 weights; see
    /// [`encoder::ClipEncoder::set_activations`]).
    pub fn set_activations(&mut self, dt: crate::DType) -> Result<()> {
        self.vision_model.encoder.set_activations(dt)?;
        self.text_model.encoder.set_activations(dt)
    }

    /// Bytes of GPU memory the weights occupy (every tensor of [`ClipModel::params`], as
    /// stored: 2 per f16 element, 4 per f32 one).
    pub fn weight_bytes(&self) -> u64 {
        self.params.iter().map(|(_, t)| t.bytes()).sum()
    }

    /// The device the weights live on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The tokenizer, or an error saying the folder has none.
    pub fn tokenizer(&self) -> Result<&ClipTokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::invalid(
                "this CLIP model has no tokenizer (its folder needs tokenizer.json, or \
                 vocab.json and merges.txt)",
            )
        })
    }

    /// Token ids of each text (truncated to the context length).
    pub fn tokenize(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        self.tokenizer()?.encode_all(texts)
    }

    /// Projected, unnormalised text features `[N, P]` of token ids (transformers'
    /// `get_text_features`).
    pub fn text_features_ids(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        if ids.is_empty() {
            return Err(Error::invalid("no texts to encode"));
        }
        // Padding with EOS as transformers does; any id would give the same results.
        let pad = self.tokenizer.as_ref().map_or(0, ClipTokenizer::eos_id);
        let per_text = self.config.text.max_position_embeddings
            * self
                .config
                .text
                .intermediate_size
                .max(self.config.text.hidden_size * 3);
        let chunks = ids
            .chunks(self.chunk(per_text))
            .map(|c| {
                // Inference: a tape where nothing needs a gradient takes the fused kernels.
                let tape = Tape::new();
                Ok(self.text_features_on(&tape, c, pad)?.value().clone())
            })
            .collect::<Result<Vec<_>>>()?;
        cat_rows(chunks)
    }

    /// The text tower and projection on `tape`: projected, unnormalised features `[N, P]`
    /// of token id sequences padded with `pad_id` (see [`ClipTextTransformer::forward`]).
    /// The one forward behind [`ClipModel::text_features_ids`] (no gradients) and training.
    pub fn text_features_on(&self, tape: &Tape, ids: &[Vec<u32>], pad_id: u32) -> Result<Var> {
        let pooled = self.text_model.forward(tape, &self.gpu, ids, pad_id)?;
        self.text_projection.forward(tape, &pooled, Act::None)
    }

    /// The image tower and projection on `tape`: projected, unnormalised features `[N, P]`
    /// of `pixels` `[N, C, S, S]`; with `recompute` the encoder layers are
    /// [`Tape::checkpoint`]s. The one forward behind [`ClipModel::image_features`],
    /// VQGAN+CLIP's perceptor and training.
    pub fn image_features_on(&self, tape: &Tape, pixels: &Var, recompute: bool) -> Result<Var> {
        let pooled = self.vision_model.forward(tape, pixels, recompute)?;
        self.visual_projection.forward(tape, &pooled, Act::None)
    }

    /// Projected, unnormalised text features `[N, P]` of texts.
    pub fn text_features(&self, texts: &[String]) -> Result<Tensor> {
        self.text_features_ids(&self.tokenize(texts)?)
    }

    /// L2-normalised text embeddings `[N, P]` (transformers' `text_embeds`).
    pub fn encode_text(&self, texts: &[String]) -> Result<Tensor> {
        l2_normalize(&self.text_features(texts)?)
    }

    /// Projected, unnormalised image features `[N, P]` of `pixels` `[N, C, S, S]`
    /// (transformers' `get_image_features`).
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let v = &self.config.vision;
        let n = pixels.dim(0);
        if pixels.rank() != 4 || n == 0 {
            return Err(Error::shape(format!(
                "pixel values must be [N, {c}, {s}, {s}] with N >= 1, got {:?}",
                pixels.shape(),
                c = v.num_channels,
                s = v.image_size
            )));
        }
        let per_image = v.num_positions()
            * v.intermediate_size
                .max(v.hidden_size * 3)
                .max(v.num_channels * v.patch_size * v.patch_size);
        let chunk = self.chunk(per_image);
        let mut outs = Vec::new();
        for start in (0..n).step_by(chunk) {
            let m = chunk.min(n - start);
            let part = if m == n {
                pixels.clone()
            } else {
                slice(pixels, 0, start, m)?
            };
            let tape = Tape::new();
            let x = tape.leaf(part, false);
            outs.push(self.image_features_on(&tape, &x, false)?.value().clone());
        }
        cat_rows(outs)
    }

    /// L2-normalised image embeddings `[N, P]` (transformers' `image_embeds`).
    pub fn encode_image(&self, pixels: &Tensor) -> Result<Tensor> {
        l2_normalize(&self.image_features(pixels)?)
    }

    /// Preprocesses images into the `[N, 3, S, S]` tensor [`Self::encode_image`] takes.
    pub fn pixel_values(&self, images: &[image::RgbImage]) -> Result<Tensor> {
        let s = self.config.vision.image_size;
        if self.preprocess.crop.is_none() && self.preprocess.resize.is_none() {
            return Err(Error::invalid(
                "preprocessor_config.json turns off both resize and crop; images would not \
                 match the model size",
            ));
        }
        let mut data = Vec::with_capacity(images.len() * 3 * s * s);
        for img in images {
            let (h, w) = self.preprocess.output_size(img.height(), img.width());
            if (h as usize, w as usize) != (s, s) {
                return Err(Error::invalid(format!(
                    "preprocessing gives {h}x{w} images but the model takes {s}x{s}; check \
                     crop_size in preprocessor_config.json"
                )));
            }
            data.extend(self.preprocess.apply(img)?);
        }
        Tensor::from_slice(&self.gpu, &data, &[images.len(), 3, s, s])
    }

    /// `exp(logit_scale)`: the multiplier of cosine similarities.
    pub fn logit_scale_exp(&self) -> f32 {
        self.logit_scale.exp()
    }

    /// `logits_per_image` `[Ni, Nt]` = `exp(logit_scale) · image_embeds @ text_embedsᵀ`
    /// (both normalised).
    pub fn logits_per_image(&self, image_embeds: &Tensor, text_embeds: &Tensor) -> Result<Tensor> {
        matmul(
            image_embeds,
            text_embeds,
            &MatmulOpts {
                trans_b: true,
                alpha: Some(self.logit_scale_exp()),
                ..Default::default()
            },
        )
    }

    /// Items per chunk so that the largest activation (`per_item` floats each) stays within
    /// one storage binding.
    fn chunk(&self, per_item: usize) -> usize {
        let limit = self.gpu.limits().max_storage_buffer_binding_size as usize / 4;
        (limit / per_item.max(1)).clamp(1, MAX_CHUNK)
    }
}

/// Random weights for every tensor of `config` (uniform, scaled by 1/√fan-in; LayerNorm
/// gains near 1): a model of the real size and cost without a checkpoint, for benches.
pub fn random_weights(config: &ClipConfig, seed: u64) -> Result<crate::weights::MemorySource> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut src = crate::weights::MemorySource::new(format!("random weights (seed {seed})"));
    for (key, shape) in config.tensor_shapes() {
        let n: usize = shape.iter().product();
        let fan_in = shape.iter().skip(1).product::<usize>().max(1) as f32;
        let norm_gain = shape.len() == 1 && key.contains("norm") && key.ends_with("weight");
        let a = if shape.len() >= 2 && !key.contains("embedding") {
            (3.0 / fan_in).sqrt()
        } else {
            0.1
        };
        let data: Vec<f32> = if key == "logit_scale" {
            vec![config.logit_scale_init_value]
        } else {
            (0..n)
                .map(|_| rng.random_range(-a..a) + if norm_gain { 1.0 } else { 0.0 })
                .collect()
        };
        src.insert(key, &shape, data)?;
    }
    Ok(src)
}

/// Rows of `x` `[N, P]` divided by their L2 norm.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    if x.rank() != 2 {
        return Err(Error::shape(format!(
            "l2_normalize takes [N, P], got {:?}",
            x.shape()
        )));
    }
    let sq = reduce(&unary(x, UnaryOp::Square)?, 1, ReduceOp::Sum, true)?;
    mul(x, &unary(&sq, UnaryOp::Rsqrt)?)
}

fn cat_rows(mut parts: Vec<Tensor>) -> Result<Tensor> {
    if parts.len() == 1 {
        return Ok(parts.remove(0));
    }
    let refs: Vec<&Tensor> = parts.iter().collect();
    concat(&refs, 0)
}
