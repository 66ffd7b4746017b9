//! The numbers of `summary.json`: per layer and input, activation statistics of the hidden
//! state (mean, std, max |x| and the channels that carry it), the entropy of each head's
//! attention, and a logit lens: each layer's pooled state (class token / end-of-text token)
//! put through the tower's final layer norm and projection, compared by cosine with every
//! other input's embedding.

use super::Inspection;
use crate::autodiff::Tape;
use crate::models::clip::ClipModel;
use crate::nn::{LayerNorm, Linear};
use crate::ops::Act;
use crate::{Result, Tensor};
use serde::Serialize;

/// Channels listed as carrying the largest |x| of a layer.
pub const TOP_CHANNELS: usize = 3;

/// The whole summary.
#[derive(Serialize, Debug)]
pub struct Summary {
    /// The architecture inspected.
    pub model: ModelInfo,
    /// One per `--text`, in order.
    pub texts: Vec<TextSummary>,
    /// One per `--image`, in order.
    pub images: Vec<ImageSummary>,
}

/// Tower sizes.
#[derive(Serialize, Debug)]
pub struct ModelInfo {
    /// Text layers, heads, width.
    pub text: TowerInfo,
    /// Vision layers, heads, width.
    pub vision: TowerInfo,
    /// Input side in pixels.
    pub image_size: usize,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Embedding width.
    pub projection_dim: usize,
}

/// One tower's sizes.
#[derive(Serialize, Debug)]
pub struct TowerInfo {
    /// Encoder layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Residual width.
    pub hidden: usize,
}

/// Statistics of one hidden state `[T, C]`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct LayerStats {
    /// `l` as in `hidden_states.{l}`.
    pub layer: usize,
    /// Mean over every value.
    pub mean: f32,
    /// Standard deviation over every value (population).
    pub std: f32,
    /// Largest |x|.
    pub max_abs: f32,
    /// The channels with the largest max |x| over positions, largest first.
    pub top_channels: Vec<Channel>,
}

/// A channel and its largest |x| over positions.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Channel {
    /// Index in the residual width.
    pub channel: usize,
    /// Its largest |x|.
    pub max_abs: f32,
}

/// One layer of the logit lens.
#[derive(Serialize, Debug)]
pub struct Lens {
    /// `l` as in `hidden_states.{l}`.
    pub layer: usize,
    /// Cosine of this layer's pooled state (normed, projected) with each other input's
    /// embedding.
    pub cosine: Vec<Against>,
}

/// A cosine with another input.
#[derive(Serialize, Debug)]
pub struct Against {
    /// `text K` or `image K`.
    pub input: String,
    /// The cosine similarity.
    pub cosine: f32,
}

/// One text.
#[derive(Serialize, Debug)]
pub struct TextSummary {
    /// The text.
    pub text: String,
    /// Token ids (BOS … EOS).
    pub ids: Vec<u32>,
    /// Tokens as text.
    pub tokens: Vec<String>,
    /// The pooled (end-of-text) position.
    pub pooled_position: usize,
    /// Per hidden state, `l = 0 ..= L`.
    pub hidden_states: Vec<LayerStats>,
    /// Per layer and head: the mean over queries of the attention entropy, in nats.
    pub attention_entropy: Vec<Vec<f32>>,
    /// Per hidden state, `l = 0 ..= L`.
    pub logit_lens: Vec<Lens>,
}

/// One image.
#[derive(Serialize, Debug)]
pub struct ImageSummary {
    /// Where it came from (the caller's name for it).
    pub source: String,
    /// Per hidden state, `l = 0 ..= L`.
    pub hidden_states: Vec<LayerStats>,
    /// Per layer and head: the mean over queries of the attention entropy, in nats.
    pub attention_entropy: Vec<Vec<f32>>,
    /// Per hidden state, `l = 0 ..= L`.
    pub logit_lens: Vec<Lens>,
    /// `[G][G]` the class token's attention rollout over the patches.
    pub rollout: Vec<Vec<f32>>,
    /// Per text: `[G][G]` its gradient-weighted relevance over the patches.
    pub relevance: Vec<Vec<Vec<f32>>>,
    /// With a VQGAN: `[h][w]` its code indices.
    pub vqgan_codes: Option<Vec<Vec<u32>>>,
}

/// Statistics of a row-major `[T, C]` hidden state.
pub fn layer_stats(layer: usize, x: &[f32], c: usize) -> LayerStats {
    let n = x.len().max(1) as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let mut per_channel = vec![0.0f32; c];
    for row in x.chunks(c.max(1)) {
        for (m, v) in per_channel.iter_mut().zip(row) {
            *m = m.max(v.abs());
        }
    }
    let mut order: Vec<usize> = (0..c).collect();
    order.sort_by(|&a, &b| per_channel[b].total_cmp(&per_channel[a]).then(a.cmp(&b)));
    LayerStats {
        layer,
        mean: mean as f32,
        std: var.sqrt() as f32,
        max_abs: per_channel.iter().copied().fold(0.0, f32::max),
        top_channels: order
            .into_iter()
            .take(TOP_CHANNELS)
            .map(|channel| Channel {
                channel,
                max_abs: per_channel[channel],
            })
            .collect(),
    }
}

/// Per head of `[H, T, T]` probabilities: the mean over query rows of `−Σ p·ln p` (nats;
/// 0 for a row that looks at one token, `ln n` for one spread evenly over `n`).
pub fn entropy(p: &[f32], heads: usize, t: usize) -> Vec<f32> {
    (0..heads)
        .map(|h| {
            let rows = &p[h * t * t..(h + 1) * t * t];
            let total: f64 = rows
                .chunks(t)
                .map(|r| {
                    r.iter()
                        .filter(|&&x| x > 0.0)
                        .map(|&x| -(x as f64) * (x as f64).ln())
                        .sum::<f64>()
                })
                .sum();
            (total / t as f64) as f32
        })
        .collect()
}

/// Builds the summary; `sources` names the images (e.g. their paths).
pub fn summarize(model: &ClipModel, ins: &Inspection, sources: &[String]) -> Result<Summary> {
    let c = &model.config;
    let tower = |layers, heads, hidden| TowerInfo {
        layers,
        heads,
        hidden,
    };
    let info = ModelInfo {
        text: tower(
            c.text.num_hidden_layers,
            c.text.num_attention_heads,
            c.text.hidden_size,
        ),
        vision: tower(
            c.vision.num_hidden_layers,
            c.vision.num_attention_heads,
            c.vision.hidden_size,
        ),
        image_size: c.vision.image_size,
        patch_size: c.vision.patch_size,
        projection_dim: c.projection_dim,
    };
    // Every input's final embedding, labelled, for the lens.
    let all: Vec<(String, &[f32])> = ins
        .texts
        .iter()
        .enumerate()
        .map(|(k, t)| (format!("text {k}"), t.embeds.as_slice()))
        .chain(
            ins.images
                .iter()
                .enumerate()
                .map(|(k, i)| (format!("image {k}"), i.embeds.as_slice())),
        )
        .collect();
    let mut texts = Vec::new();
    for (k, t) in ins.texts.iter().enumerate() {
        let (stats, pooled) = tower_stats(&t.hidden_states, t.pool)?;
        let lens = lens(
            model,
            &model.text_model.final_layer_norm,
            &model.text_projection,
            &pooled,
            &all,
            &format!("text {k}"),
        )?;
        texts.push(TextSummary {
            text: t.text.clone(),
            ids: t.ids.clone(),
            tokens: t.tokens.clone(),
            pooled_position: t.pool,
            hidden_states: stats,
            attention_entropy: entropies(&t.attentions)?,
            logit_lens: lens,
        });
    }
    let g = ins.grid;
    let grid = |m: &[f32]| -> Vec<Vec<f32>> { m.chunks(g.max(1)).map(<[f32]>::to_vec).collect() };
    let mut images = Vec::new();
    for (k, im) in ins.images.iter().enumerate() {
        let (stats, pooled) = tower_stats(&im.hidden_states, 0)?;
        let lens = lens(
            model,
            &model.vision_model.post_layernorm,
            &model.visual_projection,
            &pooled,
            &all,
            &format!("image {k}"),
        )?;
        images.push(ImageSummary {
            source: sources
                .get(k)
                .cloned()
                .unwrap_or_else(|| format!("image {k}")),
            hidden_states: stats,
            attention_entropy: entropies(&im.attentions)?,
            logit_lens: lens,
            rollout: grid(&im.rollout),
            relevance: im.relevance.iter().map(|r| grid(r)).collect(),
            vqgan_codes: im.vq.as_ref().map(|v| {
                v.codes
                    .chunks(v.grid.1.max(1))
                    .map(<[u32]>::to_vec)
                    .collect()
            }),
        });
    }
    Ok(Summary {
        model: info,
        texts,
        images,
    })
}

/// Statistics of each hidden state `[T, C]`, and the rows at `pool` stacked `[L + 1, C]`.
fn tower_stats(hidden: &[Tensor], pool: usize) -> Result<(Vec<LayerStats>, Vec<f32>)> {
    let mut stats = Vec::with_capacity(hidden.len());
    let mut pooled = Vec::new();
    for (l, h) in hidden.iter().enumerate() {
        let c = h.dim(-1);
        let x = h.to_vec()?;
        stats.push(layer_stats(l, &x, c));
        pooled.extend_from_slice(&x[pool * c..(pool + 1) * c]);
    }
    Ok((stats, pooled))
}

fn entropies(attn: &[Tensor]) -> Result<Vec<Vec<f32>>> {
    attn.iter()
        .map(|a| Ok(entropy(&a.to_vec()?, a.dim(0), a.dim(-1))))
        .collect()
}

/// The logit lens of one input: its pooled states `[L + 1, C]` through `norm` and `proj`,
/// normalised, against every input in `all` but `me`.
fn lens(
    model: &ClipModel,
    norm: &LayerNorm,
    proj: &Linear,
    pooled: &[f32],
    all: &[(String, &[f32])],
    me: &str,
) -> Result<Vec<Lens>> {
    let c = norm.weight.dim(0);
    let layers = pooled.len() / c.max(1);
    let tape = Tape::new();
    let x = tape.leaf(
        Tensor::from_slice(model.gpu(), pooled, &[layers, c])?,
        false,
    );
    let y = proj.forward(&tape, &norm.forward(&tape, &x)?, Act::None)?;
    let p = y.shape()[1];
    let y = y.value().to_vec()?;
    Ok(y.chunks(p)
        .enumerate()
        .map(|(layer, row)| Lens {
            layer,
            cosine: all
                .iter()
                .filter(|(name, _)| name != me)
                .map(|(name, e)| Against {
                    input: name.clone(),
                    cosine: cosine(row, e),
                })
                .collect(),
        })
        .collect())
}

/// The cosine similarity of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        (dot / (na * nb)) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_stats_find_the_channel_that_carries_the_largest_value() {
        // [T = 2, C = 3]: channel 2 holds -9, channel 0 holds 4.
        let s = layer_stats(1, &[1.0, 0.0, -9.0, 4.0, 2.0, 2.0], 3);
        assert_eq!(s.layer, 1);
        assert!((s.mean - 0.0).abs() < 1e-6);
        let want_std = ((1.0 + 81.0 + 16.0 + 4.0 + 4.0) / 6.0f32).sqrt();
        assert!((s.std - want_std).abs() < 1e-5);
        assert_eq!(s.max_abs, 9.0);
        let ch: Vec<usize> = s.top_channels.iter().map(|c| c.channel).collect();
        assert_eq!(ch, vec![2, 0, 1]);
    }

    #[test]
    fn entropy_is_zero_for_one_hot_rows_and_ln_n_for_uniform_rows() {
        let t = 4;
        let one_hot: Vec<f32> = (0..t * t).map(|i| f32::from(i % t == 0)).collect();
        let uniform = vec![0.25f32; t * t];
        let e = entropy(&[one_hot, uniform].concat(), 2, t);
        assert!(e[0].abs() < 1e-7);
        assert!((e[1] - 4f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn cosine_of_parallel_opposite_and_zero_vectors() {
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-6);
        assert!((cosine(&[1.0, 2.0], &[-1.0, -2.0]) + 1.0).abs() < 1e-6);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }
}
