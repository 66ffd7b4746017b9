//! The taming-transformers model config: the `.yaml` next to a checkpoint
//! (`model.params.{embed_dim, n_embed, ddconfig}`, `model.target`), parsed with serde_yaml.
//!
//! Mirrors `taming/models/vqgan.py` (`VQModel.__init__`, `GumbelVQ.__init__`) and the
//! `ddconfig` arguments of `taming/modules/diffusionmodules/model.py` (`Encoder`, `Decoder`).

use crate::{Error, Result};
use serde::Deserialize;

/// Encoder/decoder hyper-parameters (`model.params.ddconfig`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DdConfig {
    /// Base channel count (`ch`).
    pub ch: usize,
    /// Channel multiplier per resolution level (`ch_mult`); the downsampling factor is
    /// `2^(len - 1)`.
    pub ch_mult: Vec<usize>,
    /// Residual blocks per encoder level (decoder levels have one more).
    pub num_res_blocks: usize,
    /// Nominal resolutions at which attention blocks follow the residual blocks. Placement
    /// comes from `resolution`, not from the actual input size.
    pub attn_resolutions: Vec<usize>,
    /// Channels of the latent before `quant_conv`.
    pub z_channels: usize,
    /// Nominal training resolution.
    pub resolution: usize,
    /// Image channels in.
    #[serde(default = "three")]
    pub in_channels: usize,
    /// Image channels out.
    #[serde(default = "three")]
    pub out_ch: usize,
    /// Encoder outputs `2 * z_channels` (a KL autoencoder, not a VQGAN) when true. taming's
    /// `Encoder` defaults it to true; every VQGAN config sets it to false.
    #[serde(default = "yes")]
    pub double_z: bool,
    /// Training-only dropout (ignored).
    #[serde(default)]
    pub dropout: f64,
}

fn three() -> usize {
    3
}
fn yes() -> bool {
    true
}

/// Which quantiser follows `quant_conv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantizerKind {
    /// `VectorQuantizer2` (`VQModel`): nearest codebook entry, key `quantize.embedding.weight`.
    NearestNeighbour,
    /// `GumbelQuantize` (`GumbelVQ`): a 1x1 `quantize.proj` to `n_embed` logits, the most
    /// likely code (its eval path without Gumbel noise), key `quantize.embed.weight`.
    Gumbel,
}

/// A VQGAN: autoencoder layout plus quantiser.
#[derive(Debug, Clone, PartialEq)]
pub struct VqGanConfig {
    /// Encoder/decoder layout.
    pub dd: DdConfig,
    /// Codebook vector length (channels after `quant_conv`).
    pub embed_dim: usize,
    /// Codebook entries.
    pub n_embed: usize,
    /// The quantiser.
    pub quantizer: QuantizerKind,
}

#[derive(Deserialize)]
struct Root {
    model: Model,
}

#[derive(Deserialize)]
struct Model {
    #[serde(default)]
    target: Option<String>,
    params: Params,
}

#[derive(Deserialize)]
struct Params {
    embed_dim: usize,
    n_embed: usize,
    ddconfig: DdConfig,
    #[serde(default)]
    temperature_scheduler_config: Option<serde_yaml::Value>,
}

/// Largest config file read (a taming config is about 2 KB).
pub const MAX_YAML_BYTES: u64 = 1 << 20;

/// Deepest `[`/`{` nesting accepted in a config. serde_yaml refuses values nested past 128,
/// but only after its parser has spent time quadratic in the depth (50,000 levels take
/// seconds), so flow nesting is measured first; taming configs use at most one level.
pub const MAX_YAML_FLOW_NESTING: usize = 64;

/// The deepest flow-collection nesting of `text`, not counting brackets inside quoted
/// scalars or comments (a bracket in a plain scalar counts, which can only over-estimate).
fn flow_nesting(text: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let mut chars = text.chars().peekable();
    // The previous character, to tell a quote that opens a scalar from an apostrophe.
    let mut prev = '\n';
    while let Some(c) = chars.next() {
        match c {
            '[' | '{' => {
                depth += 1;
                max = max.max(depth);
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            '#' if prev.is_whitespace() => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '"' | '\'' if prev.is_whitespace() || "[{,:-?".contains(prev) => {
                while let Some(q) = chars.next() {
                    if q == '\\' && c == '"' {
                        chars.next();
                    } else if q == c {
                        // '' inside a single-quoted scalar is an escaped quote.
                        if c == '\'' && chars.peek() == Some(&'\'') {
                            chars.next();
                            continue;
                        }
                        break;
                    }
                }
            }
            _ => {}
        }
        prev = c;
    }
    max
}

/// Most resolution levels (`ch_mult` entries); the downsampling factor is `2^(levels-1)`.
pub const MAX_LEVELS: usize = 8;
/// Most residual blocks per level.
pub const MAX_RES_BLOCKS: usize = 64;
/// Widest channel count, latent width or resolution a config may name.
pub const MAX_WIDTH: usize = 1 << 16;
/// Most codebook entries (`n_embed`).
pub const MAX_CODEBOOK: usize = 1 << 22;

impl VqGanConfig {
    /// Parses a taming `.yaml` config; `path` names the file in errors.
    pub fn from_yaml(text: &str, path: &str) -> Result<VqGanConfig> {
        let nesting = flow_nesting(text);
        if nesting > MAX_YAML_FLOW_NESTING {
            return Err(Error::Format {
                path: path.to_string(),
                msg: format!(
                    "[ ] / {{ }} collections nest {nesting} deep, beyond the limit \
                     MAX_YAML_FLOW_NESTING ({MAX_YAML_FLOW_NESTING}); not a taming config"
                ),
            });
        }
        let root: Root = serde_yaml::from_str(text).map_err(|e| Error::Format {
            path: path.to_string(),
            msg: format!(
                "not a taming VQGAN config (expected model.params.{{embed_dim, n_embed, \
                 ddconfig}}): {e}"
            ),
        })?;
        let m = root.model;
        let gumbel = match m.target.as_deref() {
            Some(t) if t.ends_with("GumbelVQ") => true,
            Some(t) if t.ends_with("VQModel") || t.ends_with("VQModelInterface") => false,
            Some(t) => {
                return Err(Error::Format {
                    path: path.to_string(),
                    msg: format!(
                        "model.target '{t}' is not a VQGAN (taming.models.vqgan.VQModel or \
                         GumbelVQ)"
                    ),
                })
            }
            None => m.params.temperature_scheduler_config.is_some(),
        };
        let cfg = VqGanConfig {
            dd: m.params.ddconfig,
            embed_dim: m.params.embed_dim,
            n_embed: m.params.n_embed,
            quantizer: if gumbel {
                QuantizerKind::Gumbel
            } else {
                QuantizerKind::NearestNeighbour
            },
        };
        cfg.validate().map_err(|msg| Error::Format {
            path: path.to_string(),
            msg,
        })?;
        Ok(cfg)
    }

    /// Reads and parses a config file.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<VqGanConfig> {
        let p = path.as_ref();
        let io = |source| Error::Io {
            path: p.display().to_string(),
            source,
        };
        let size = std::fs::metadata(p).map_err(io)?.len();
        if size > MAX_YAML_BYTES {
            return Err(Error::Format {
                path: p.display().to_string(),
                msg: format!(
                    "{size} bytes is beyond the limit MAX_YAML_BYTES ({MAX_YAML_BYTES}) for a \
                     taming config (about 2 KB); is this the checkpoint instead?"
                ),
            });
        }
        let text = std::fs::read_to_string(p).map_err(io)?;
        Self::from_yaml(&text, &p.display().to_string())
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let d = &self.dd;
        // Plausibility bounds first, so that nothing below (channel products, the tensor
        // list, the downsampling shift) can overflow or loop for ages on a hostile file.
        if d.ch_mult.len() > MAX_LEVELS {
            return Err(format!(
                "ddconfig.ch_mult has {} levels, beyond the limit MAX_LEVELS ({MAX_LEVELS}); \
                 taming models have 4 or 5",
                d.ch_mult.len()
            ));
        }
        if d.num_res_blocks > MAX_RES_BLOCKS {
            return Err(format!(
                "ddconfig.num_res_blocks {} is beyond the limit MAX_RES_BLOCKS \
                 ({MAX_RES_BLOCKS})",
                d.num_res_blocks
            ));
        }
        let widths = [
            (
                "ddconfig.ch x ch_mult",
                d.ch_mult.iter().map(|m| m.saturating_mul(d.ch)).max(),
            ),
            ("ddconfig.ch", Some(d.ch)),
            ("ddconfig.z_channels", Some(d.z_channels)),
            ("ddconfig.in_channels", Some(d.in_channels)),
            ("ddconfig.out_ch", Some(d.out_ch)),
            ("ddconfig.resolution", Some(d.resolution)),
            ("embed_dim", Some(self.embed_dim)),
        ];
        for (name, w) in widths {
            if let Some(w) = w.filter(|&w| w > MAX_WIDTH) {
                return Err(format!(
                    "{name} is {w}, beyond the limit MAX_WIDTH ({MAX_WIDTH})"
                ));
            }
        }
        if self.n_embed > MAX_CODEBOOK {
            return Err(format!(
                "n_embed {} is beyond the limit MAX_CODEBOOK ({MAX_CODEBOOK}); taming \
                 codebooks have 1024 to 16384 entries",
                self.n_embed
            ));
        }
        if d.double_z {
            return Err(
                "ddconfig.double_z is true (a KL autoencoder); VQGAN configs set it to false"
                    .into(),
            );
        }
        if d.ch == 0 || d.ch_mult.is_empty() || d.ch_mult.contains(&0) {
            return Err(format!(
                "ddconfig.ch {} / ch_mult {:?} must be positive",
                d.ch, d.ch_mult
            ));
        }
        for c in self.channels() {
            if c % 32 != 0 {
                return Err(format!(
                    "channel count {c} (ch {} x ch_mult {:?}) is not a multiple of the 32 \
                     GroupNorm groups",
                    d.ch, d.ch_mult
                ));
            }
        }
        if d.num_res_blocks == 0 || d.z_channels == 0 || self.embed_dim == 0 || self.n_embed == 0 {
            return Err(
                "num_res_blocks, z_channels, embed_dim and n_embed must be positive".into(),
            );
        }
        if d.in_channels == 0 || d.out_ch == 0 || d.resolution == 0 {
            return Err("in_channels, out_ch and resolution must be positive".into());
        }
        if self.quantizer == QuantizerKind::Gumbel && d.z_channels != self.embed_dim {
            // taming's GumbelQuantize projects quant_conv's embed_dim output with a conv
            // built for z_channels inputs.
            return Err(format!(
                "GumbelVQ needs z_channels ({}) == embed_dim ({})",
                d.z_channels, self.embed_dim
            ));
        }
        Ok(())
    }

    /// Every block width: `ch * m` for each multiplier, and `ch` itself.
    fn channels(&self) -> Vec<usize> {
        let mut c: Vec<usize> = self.dd.ch_mult.iter().map(|m| m * self.dd.ch).collect();
        c.push(self.dd.ch);
        c
    }

    /// Spatial downsampling factor `2^(len(ch_mult) - 1)`: image sides must be multiples.
    pub fn downsampling_factor(&self) -> usize {
        1 << (self.dd.ch_mult.len() - 1)
    }

    /// Every tensor the model reads, with its shape, in taming's module order (the keys of
    /// a checkpoint's state dict without `loss.*`).
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let d = &self.dd;
        let mut out: Vec<(String, Vec<usize>)> = Vec::new();
        let conv = |out: &mut Vec<_>, k: &str, cin: usize, cout: usize, ks: usize| {
            out.push((format!("{k}.weight"), vec![cout, cin, ks, ks]));
            out.push((format!("{k}.bias"), vec![cout]));
        };
        let norm = |out: &mut Vec<(String, Vec<usize>)>, k: &str, c: usize| {
            out.push((format!("{k}.weight"), vec![c]));
            out.push((format!("{k}.bias"), vec![c]));
        };
        let resnet = |out: &mut Vec<_>, k: &str, cin: usize, cout: usize| {
            let conv = |out: &mut Vec<_>, n: &str, a, b, ks| {
                out.push((format!("{k}.{n}.weight"), vec![b, a, ks, ks]));
                out.push((format!("{k}.{n}.bias"), vec![b]));
            };
            norm(out, &format!("{k}.norm1"), cin);
            conv(out, "conv1", cin, cout, 3);
            norm(out, &format!("{k}.norm2"), cout);
            conv(out, "conv2", cout, cout, 3);
            if cin != cout {
                conv(out, "nin_shortcut", cin, cout, 1);
            }
        };
        let attn = |out: &mut Vec<(String, Vec<usize>)>, k: &str, c: usize| {
            norm(out, &format!("{k}.norm"), c);
            for n in ["q", "k", "v", "proj_out"] {
                out.push((format!("{k}.{n}.weight"), vec![c, c, 1, 1]));
                out.push((format!("{k}.{n}.bias"), vec![c]));
            }
        };
        let mid = |out: &mut Vec<_>, k: &str, c: usize| {
            resnet(out, &format!("{k}.block_1"), c, c);
            attn(out, &format!("{k}.attn_1"), c);
            resnet(out, &format!("{k}.block_2"), c, c);
        };
        // encoder
        conv(&mut out, "encoder.conv_in", d.in_channels, d.ch, 3);
        let (mut res, mut cin) = (d.resolution, d.ch);
        for (i, m) in d.ch_mult.iter().enumerate() {
            for j in 0..d.num_res_blocks {
                resnet(
                    &mut out,
                    &format!("encoder.down.{i}.block.{j}"),
                    cin,
                    d.ch * m,
                );
                cin = d.ch * m;
            }
            if d.attn_resolutions.contains(&res) {
                for j in 0..d.num_res_blocks {
                    attn(&mut out, &format!("encoder.down.{i}.attn.{j}"), cin);
                }
            }
            if i + 1 != d.ch_mult.len() {
                conv(
                    &mut out,
                    &format!("encoder.down.{i}.downsample.conv"),
                    cin,
                    cin,
                    3,
                );
                res /= 2;
            }
        }
        mid(&mut out, "encoder.mid", cin);
        norm(&mut out, "encoder.norm_out", cin);
        conv(&mut out, "encoder.conv_out", cin, d.z_channels, 3);
        // decoder
        let levels = d.ch_mult.len();
        let mut cin = d.ch * d.ch_mult[levels - 1];
        let mut res = d.resolution >> (levels - 1);
        conv(&mut out, "decoder.conv_in", d.z_channels, cin, 3);
        mid(&mut out, "decoder.mid", cin);
        let mut up = Vec::new();
        for i in (0..levels).rev() {
            let mut lv = Vec::new();
            let cout = d.ch * d.ch_mult[i];
            for j in 0..=d.num_res_blocks {
                resnet(&mut lv, &format!("decoder.up.{i}.block.{j}"), cin, cout);
                cin = cout;
            }
            if d.attn_resolutions.contains(&res) {
                for j in 0..=d.num_res_blocks {
                    attn(&mut lv, &format!("decoder.up.{i}.attn.{j}"), cin);
                }
            }
            if i != 0 {
                conv(
                    &mut lv,
                    &format!("decoder.up.{i}.upsample.conv"),
                    cin,
                    cin,
                    3,
                );
                res *= 2;
            }
            up.insert(0, lv);
        }
        out.extend(up.into_iter().flatten());
        norm(&mut out, "decoder.norm_out", cin);
        conv(&mut out, "decoder.conv_out", cin, d.out_ch, 3);
        // quantiser and the 1x1 convs around it
        match self.quantizer {
            QuantizerKind::NearestNeighbour => out.push((
                "quantize.embedding.weight".into(),
                vec![self.n_embed, self.embed_dim],
            )),
            QuantizerKind::Gumbel => {
                conv(&mut out, "quantize.proj", d.z_channels, self.n_embed, 1);
                out.push((
                    "quantize.embed.weight".into(),
                    vec![self.n_embed, self.embed_dim],
                ));
            }
        }
        conv(&mut out, "quant_conv", d.z_channels, self.embed_dim, 1);
        conv(&mut out, "post_quant_conv", self.embed_dim, d.z_channels, 1);
        out
    }

    /// The ImageNet VQGAN layout (`vqgan_imagenet_f16_*`, also the WikiArt f16 models) with
    /// `n_embed` codes (1024 or 16384).
    pub fn imagenet_f16(n_embed: usize) -> VqGanConfig {
        VqGanConfig {
            dd: DdConfig {
                ch: 128,
                ch_mult: vec![1, 1, 2, 2, 4],
                num_res_blocks: 2,
                attn_resolutions: vec![16],
                z_channels: 256,
                resolution: 256,
                in_channels: 3,
                out_ch: 3,
                double_z: false,
                dropout: 0.0,
            },
            embed_dim: 256,
            n_embed,
            quantizer: QuantizerKind::NearestNeighbour,
        }
    }

    /// `vqgan_gumbel_f8_8192` (GumbelVQ, attention at 32).
    pub fn gumbel_f8_8192() -> VqGanConfig {
        VqGanConfig {
            dd: DdConfig {
                ch: 128,
                ch_mult: vec![1, 1, 2, 4],
                num_res_blocks: 2,
                attn_resolutions: vec![32],
                z_channels: 256,
                resolution: 256,
                in_channels: 3,
                out_ch: 3,
                double_z: false,
                dropout: 0.0,
            },
            embed_dim: 256,
            n_embed: 8192,
            quantizer: QuantizerKind::Gumbel,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_nesting_skips_quotes_and_comments() {
        assert_eq!(flow_nesting("a: [1, [2, {b: 3}]]\n"), 3);
        assert_eq!(flow_nesting("a: '[[[' # [[[[\nb: \"{{\\\"[\"\n"), 0);
        assert_eq!(flow_nesting("a: 'it''s [' \nb: don't [x]\n"), 1);
        let real = include_str!("../../../tests/fixtures/vqgan/tiny_gumbel_f8.yaml");
        assert!(flow_nesting(real) <= 1);
    }

    const F16: &str = "model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 256
    n_embed: 16384
    monitor: val/rec_loss
    ddconfig:
      double_z: false
      z_channels: 256
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult:
      - 1
      - 1
      - 2
      - 2
      - 4
      num_res_blocks: 2
      attn_resolutions:
      - 16
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_conditional: false
        disc_in_channels: 3
        disc_start: 0
        disc_weight: 0.75
        disc_num_layers: 2
        codebook_weight: 1.0
";

    #[test]
    fn parses_the_imagenet_f16_16384_config() {
        let c = VqGanConfig::from_yaml(F16, "f16.yaml").unwrap();
        assert_eq!(c, VqGanConfig::imagenet_f16(16384));
        assert_eq!(c.downsampling_factor(), 16);
    }

    #[test]
    fn f16_16384_has_the_343_documented_tensors() {
        let t = VqGanConfig::imagenet_f16(16384).tensor_shapes();
        assert_eq!(t.len(), 343);
        let find = |k: &str| t.iter().find(|(n, _)| n == k).map(|(_, s)| s.clone());
        assert_eq!(
            find("encoder.down.2.block.0.nin_shortcut.weight"),
            Some(vec![256, 128, 1, 1])
        );
        assert_eq!(
            find("decoder.up.4.attn.2.q.weight"),
            Some(vec![512, 512, 1, 1])
        );
        assert_eq!(find("encoder.conv_out.weight"), Some(vec![256, 512, 3, 3]));
        assert_eq!(
            find("decoder.up.1.block.0.nin_shortcut.weight"),
            Some(vec![128, 256, 1, 1])
        );
        assert_eq!(find("quantize.embedding.weight"), Some(vec![16384, 256]));
        let params: usize = t.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        // MODEL_FACTS B7: 76,073,859 parameters without the loss.
        assert_eq!(params, 76_073_859);
    }

    #[test]
    fn gumbel_is_detected_from_the_target() {
        let y = F16.replace("vqgan.VQModel", "vqgan.GumbelVQ");
        let c = VqGanConfig::from_yaml(&y, "g.yaml").unwrap();
        assert_eq!(c.quantizer, QuantizerKind::Gumbel);
    }

    #[test]
    fn bad_configs_are_clear_errors() {
        let e = VqGanConfig::from_yaml("model: {params: {embed_dim: 3}}", "x.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.yaml") && e.contains("n_embed"), "{e}");
        let e = VqGanConfig::from_yaml(&F16.replace("double_z: false", "double_z: true"), "y")
            .unwrap_err()
            .to_string();
        assert!(e.contains("double_z"), "{e}");
        let e = VqGanConfig::from_yaml(&F16.replace("ch: 128", "ch: 100"), "y")
            .unwrap_err()
            .to_string();
        assert!(e.contains("32 GroupNorm groups"), "{e}");
        let e = VqGanConfig::from_yaml(&F16.replace("vqgan.VQModel", "diffusion.LDM"), "y")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a VQGAN"), "{e}");
        // Sizes that would overflow, or make the tensor list endless, are refused by name.
        for (from, to, limit) in [
            (
                "num_res_blocks: 2",
                "num_res_blocks: 1000000000000",
                "MAX_RES_BLOCKS",
            ),
            ("n_embed: 16384", "n_embed: 100000000000", "MAX_CODEBOOK"),
            ("z_channels: 256", "z_channels: 1000000", "MAX_WIDTH"),
            ("ch: 128", "ch: 4611686018427387904", "MAX_WIDTH"),
            (
                "      - 4\n",
                "      - 4\n      - 4\n      - 4\n      - 4\n      - 4\n",
                "MAX_LEVELS",
            ),
        ] {
            let text = F16.replacen(from, to, 1);
            assert_ne!(text, F16, "{from}");
            let e = VqGanConfig::from_yaml(&text, "y").unwrap_err().to_string();
            assert!(e.contains(limit), "{from}: {e}");
        }
        let e = VqGanConfig::from_file("/nonexistent/model.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/model.yaml"), "{e}");
    }
}
