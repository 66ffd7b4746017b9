//! Looking inside CLIP (and VQGAN): every layer's attention probabilities and hidden states,
//! exactly as transformers returns them with `output_attentions=True,
//! output_hidden_states=True`, taken from the one model forward through a [`Recorder`]; the
//! attention rollout of each image and the gradient-weighted relevance of each text over each
//! image, computed on our tape; activation statistics, attention entropy and a logit lens
//! ([`summary`]); pictures ([`picture`]) and a self-contained HTML report ([`report`]),
//! written into one folder ([`folder`]).

pub mod folder;
pub mod picture;
pub mod record;
pub mod report;
pub mod rollout;
pub mod summary;

pub use record::Recorder;

use crate::autodiff::Tape;
use crate::models::clip::{l2_normalize, ClipModel};
use crate::models::vqgan::{self, VqGan};
use crate::ops::Act;
use crate::{Error, Result, Tensor};
use image::RgbImage;

/// One text's internals (the text alone, unpadded: BOS … EOS).
pub struct TextTrace {
    /// The text as given.
    pub text: String,
    /// Its token ids.
    pub ids: Vec<u32>,
    /// Each token as text (`<bos>`, `<eos>` for the special tokens).
    pub tokens: Vec<String>,
    /// The position whose state is pooled (the end-of-text token).
    pub pool: usize,
    /// `[T, hidden]` per layer: `l = 0` the embeddings, `l = L` the last layer's output
    /// (before `final_layer_norm`).
    pub hidden_states: Vec<Tensor>,
    /// `[heads, T, T]` attention probabilities per layer.
    pub attentions: Vec<Tensor>,
    /// `[P]` the L2-normalised projected embedding (`text_embeds`).
    pub embeds: Vec<f32>,
}

/// What a VQGAN makes of an image: its codes and its reconstruction.
pub struct VqView {
    /// `[h, w]` code indices, row-major.
    pub codes: Vec<u32>,
    /// Code grid height and width.
    pub grid: (usize, usize),
    /// The decoded image (the same size as the input it was given).
    pub reconstruction: RgbImage,
    /// The image it encoded (the model's view, cropped to the VQGAN's factor).
    pub input: RgbImage,
}

/// One image's internals.
pub struct ImageTrace {
    /// The image as the model sees it (after resize, crop; normalisation undone).
    pub view: RgbImage,
    /// `[P+1, hidden]` per layer: `l = 0` after `pre_layrnorm`, `l = L` the last layer's
    /// output (before `post_layernorm`).
    pub hidden_states: Vec<Tensor>,
    /// `[heads, P+1, P+1]` attention probabilities per layer.
    pub attentions: Vec<Tensor>,
    /// `[P]` the L2-normalised projected embedding (`image_embeds`).
    pub embeds: Vec<f32>,
    /// `[G, G]` the class token's attention rollout over the patches.
    pub rollout: Vec<f32>,
    /// `[G, G]` per text: the class token's gradient-weighted relevance over the patches for
    /// that text's cosine similarity with the image.
    pub relevance: Vec<Vec<f32>>,
    /// With a VQGAN: its codes and reconstruction.
    pub vq: Option<VqView>,
}

/// Everything `inspect` found, in argument order.
pub struct Inspection {
    /// One per text.
    pub texts: Vec<TextTrace>,
    /// One per image.
    pub images: Vec<ImageTrace>,
    /// Patches per side of the vision tower.
    pub grid: usize,
}

/// Units of work [`inspect`] reports to its progress callback, for a progress bar.
pub fn work_units(texts: usize, images: usize) -> u64 {
    (texts + images + images * texts) as u64
}

/// Runs every text and image through `model` with a [`Recorder`] and, per image and text,
/// one more forward and backward for the relevance map; with `vq`, encodes and decodes each
/// image's model view. `progress` is called once per unit of [`work_units`] with what was
/// just done.
pub fn inspect(
    model: &ClipModel,
    texts: &[String],
    images: &[RgbImage],
    vq: Option<&VqGan>,
    progress: &mut dyn FnMut(&str),
) -> Result<Inspection> {
    if texts.is_empty() && images.is_empty() {
        return Err(Error::invalid(
            "nothing to inspect: give at least one text or image",
        ));
    }
    let mut text_traces = Vec::with_capacity(texts.len());
    for (k, text) in texts.iter().enumerate() {
        text_traces.push(trace_text(model, text)?);
        progress(&format!("text {k}"));
    }
    let mut image_traces = Vec::with_capacity(images.len());
    for (k, img) in images.iter().enumerate() {
        let pixels = model.pixel_values(std::slice::from_ref(img))?;
        let mut trace = trace_image(model, &pixels)?;
        progress(&format!("image {k}"));
        for (j, t) in text_traces.iter().enumerate() {
            trace.relevance.push(relevance(model, &pixels, &t.embeds)?);
            progress(&format!("relevance image {k} / text {j}"));
        }
        if let Some(vq) = vq {
            trace.vq = Some(vq_view(vq, &trace.view)?);
        }
        image_traces.push(trace);
    }
    Ok(Inspection {
        texts: text_traces,
        images: image_traces,
        grid: model.config.vision.grid(),
    })
}

/// The recorded text forward of one text, alone.
fn trace_text(model: &ClipModel, text: &str) -> Result<TextTrace> {
    let tok = model.tokenizer()?;
    let ids = tok.encode(text)?;
    let tape = Tape::new();
    let mut rec = Recorder::new();
    let pooled = model.text_model.forward_recorded(
        &tape,
        model.gpu(),
        std::slice::from_ref(&ids),
        0,
        Some(&mut rec),
    )?;
    let features = model.text_projection.forward(&tape, &pooled, Act::None)?;
    let embeds = l2_normalize(features.value())?.to_vec()?;
    let tokens = ids
        .iter()
        .map(|&id| {
            Ok(if id == tok.bos_id() {
                "<bos>".to_string()
            } else if id == tok.eos_id() {
                "<eos>".to_string()
            } else {
                tok.decode(&[id])?
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let (hidden_states, attentions) = unbatch(&rec)?;
    Ok(TextTrace {
        text: text.to_string(),
        pool: model.config.text.pool_index(&ids),
        ids,
        tokens,
        hidden_states,
        attentions,
        embeds,
    })
}

/// The recorded vision forward of one image's `pixels` `[1, 3, S, S]`, and its rollout.
fn trace_image(model: &ClipModel, pixels: &Tensor) -> Result<ImageTrace> {
    let tape = Tape::new();
    let mut rec = Recorder::new();
    let x = tape.leaf(pixels.clone(), false);
    let pooled = model
        .vision_model
        .forward_recorded(&tape, &x, false, Some(&mut rec))?;
    let features = model.visual_projection.forward(&tape, &pooled, Act::None)?;
    let embeds = l2_normalize(features.value())?.to_vec()?;
    let (hidden_states, attentions) = unbatch(&rec)?;
    let v = &model.config.vision;
    let (heads, t) = (v.num_attention_heads, v.num_positions());
    let probs = attentions
        .iter()
        .map(Tensor::to_vec)
        .collect::<Result<Vec<_>>>()?;
    let rollout = class_row(&rollout::rollout(&probs, heads, t)?, t);
    Ok(ImageTrace {
        view: model_view(model, pixels)?,
        hidden_states,
        attentions,
        embeds,
        rollout,
        relevance: vec![],
        vq: None,
    })
}

/// The class token's relevance `[G, G]` for the cosine between the image and `text_embeds`:
/// a recorded forward with gradient probes, the cosine, one backward, then
/// [`rollout::relevance`].
fn relevance(model: &ClipModel, pixels: &Tensor, text_embeds: &[f32]) -> Result<Vec<f32>> {
    let tape = Tape::new();
    let mut rec = Recorder::with_probes();
    let x = tape.leaf(pixels.clone(), false);
    let pooled = model
        .vision_model
        .forward_recorded(&tape, &x, false, Some(&mut rec))?;
    let features = model.visual_projection.forward(&tape, &pooled, Act::None)?;
    let image = tape.l2_normalize(&features)?;
    let text = tape.leaf(
        Tensor::from_slice(model.gpu(), text_embeds, &[1, text_embeds.len()])?,
        false,
    );
    let cosine = tape.sum(&tape.mul(&image, &text)?)?;
    let grads = tape.backward(&cosine)?;
    let mut attn = Vec::with_capacity(rec.probes.len());
    let mut grad = Vec::with_capacity(rec.probes.len());
    for (a, p) in rec.attentions.iter().zip(&rec.probes) {
        attn.push(a.value().to_vec()?);
        grad.push(match grads.get(p) {
            Some(g) => g.to_vec()?,
            // Not reached: this layer's attention does not change the score.
            None => vec![0.0; a.value().numel()],
        });
    }
    let v = &model.config.vision;
    let t = v.num_positions();
    Ok(class_row(
        &rollout::relevance(&attn, &grad, v.num_attention_heads, t)?,
        t,
    ))
}

/// Row 0 (the class token) of a `[T, T]` matrix without its first column: `[T - 1]`, the
/// patches in raster order.
fn class_row(m: &[f32], t: usize) -> Vec<f32> {
    m[1..t].to_vec()
}

/// The recorder's tensors without their batch dimension of 1.
fn unbatch(rec: &Recorder) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let drop_batch = |v: &crate::autodiff::Var| v.value().reshape(&v.shape()[1..]);
    Ok((
        rec.hidden_states
            .iter()
            .map(drop_batch)
            .collect::<Result<_>>()?,
        rec.attentions
            .iter()
            .map(drop_batch)
            .collect::<Result<_>>()?,
    ))
}

/// `pixels` `[1, 3, S, S]` back to RGB8, undoing the model's normalisation and rescale.
fn model_view(model: &ClipModel, pixels: &Tensor) -> Result<RgbImage> {
    let s = pixels.dim(-1);
    let data = pixels.to_vec()?;
    let p = &model.preprocess;
    let (mean, std) = p.normalize.unwrap_or(([0.0; 3], [1.0; 3]));
    let scale = p.rescale_factor.unwrap_or(1.0) as f32;
    let mut img = RgbImage::new(s as u32, s as u32);
    for (i, px) in img.pixels_mut().enumerate() {
        for c in 0..3 {
            let v = (data[c * s * s + i] * std[c] + mean[c]) / scale;
            px.0[c] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    Ok(img)
}

/// Encodes, quantises and decodes `img` (cropped to a multiple of the VQGAN's factor).
fn vq_view(vq: &VqGan, img: &RgbImage) -> Result<VqView> {
    let f = vq.downsampling_factor() as u32;
    let (w, h) = ((img.width() / f) * f, (img.height() / f) * f);
    if w == 0 || h == 0 {
        return Err(Error::invalid(format!(
            "the model's {}x{} image is smaller than the VQGAN's downsampling factor {f}",
            img.width(),
            img.height()
        )));
    }
    let input = image::imageops::crop_imm(img, 0, 0, w, h).to_image();
    let (wu, hu) = (w as usize, h as usize);
    let x = Tensor::from_slice(
        vq.gpu(),
        &vqgan::rgb8_to_input(input.as_raw(), wu, hu),
        &[1, 3, hu, wu],
    )?;
    let (zq, codes) = vq.quantize(&vq.encode(&x)?)?;
    let y = vq.decode(&zq)?;
    if y.dim(1) != 3 {
        return Err(Error::invalid(format!(
            "the VQGAN outputs {} channels, not RGB",
            y.dim(1)
        )));
    }
    let rgb = vqgan::output_to_rgb8(&y.to_vec()?, wu, hu);
    let reconstruction = RgbImage::from_raw(w, h, rgb)
        .ok_or_else(|| Error::invalid("VQGAN output has the wrong size"))?;
    Ok(VqView {
        grid: (codes.dim(1), codes.dim(2)),
        codes: codes.to_vec_u32()?,
        reconstruction,
        input,
    })
}
