//! `CLIPConfig` as Hugging Face writes it in `config.json`
//! (transformers `models/clip/configuration_clip.py`): a text tower config, a vision tower
//! config and the shared projection size. Fields absent from the file take the class defaults,
//! which are the ViT-B/32 values.

use crate::ops::Act;
use crate::{Error, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// The text tower (`CLIPTextConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// Token embedding rows (49408 for OpenAI's vocabulary).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// MLP hidden width.
    pub intermediate_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Context length (rows of the position embedding), 77 for OpenAI CLIP.
    pub max_position_embeddings: usize,
    /// MLP activation.
    pub hidden_act: Act,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f32,
    /// End-of-text id from the config. The value 2 is the legacy hub value, which makes the
    /// model pool at the largest token id instead (see [`TextConfig::pool_index`]).
    pub eos_token_id: i64,
}

/// The vision tower (`CLIPVisionConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// MLP hidden width.
    pub intermediate_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Input channels (3).
    pub num_channels: usize,
    /// Input height and width in pixels.
    pub image_size: usize,
    /// Patch height and width in pixels.
    pub patch_size: usize,
    /// MLP activation.
    pub hidden_act: Act,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f32,
}

/// A whole CLIP model (`CLIPConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    /// Text tower.
    pub text: TextConfig,
    /// Vision tower.
    pub vision: VisionConfig,
    /// Size of the shared embedding space.
    pub projection_dim: usize,
    /// Initial value of the learned log temperature (the checkpoint's `logit_scale` wins).
    pub logit_scale_init_value: f32,
}

// Raw forms with the transformers class defaults; converted and checked below.
#[derive(Deserialize)]
#[serde(default)]
struct RawText {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    hidden_act: String,
    layer_norm_eps: f32,
    eos_token_id: Value,
}

impl Default for RawText {
    fn default() -> Self {
        RawText {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            eos_token_id: Value::from(49407),
        }
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawVision {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_channels: usize,
    image_size: Value,
    patch_size: Value,
    hidden_act: String,
    layer_norm_eps: f32,
}

impl Default for RawVision {
    fn default() -> Self {
        RawVision {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: Value::from(224),
            patch_size: Value::from(32),
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

/// Merges `dict_key` (the old `text_config_dict` form, which wins when present) over `key`.
fn sub_config(top: &Value, key: &str, dict_key: &str) -> Value {
    let mut base = match top.get(key) {
        Some(Value::Object(m)) => m.clone(),
        _ => Default::default(),
    };
    if let Some(Value::Object(over)) = top.get(dict_key) {
        for (k, v) in over {
            base.insert(k.clone(), v.clone());
        }
    }
    Value::Object(base)
}

/// A square size given as an int or as an `[h, w]` pair with h == w.
fn square(v: &Value, what: &str) -> std::result::Result<usize, String> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .map(|x| x as usize)
            .ok_or_else(|| format!("{what} must be a positive integer, got {n}")),
        Value::Array(a) if a.len() == 2 && a[0] == a[1] => square(&a[0], what),
        other => Err(format!("{what} must be one integer (square), got {other}")),
    }
}

/// Most transformer layers per tower.
pub const MAX_LAYERS: usize = 256;
/// Widest hidden, MLP, projection or channel size.
pub const MAX_WIDTH: usize = 1 << 16;
/// Largest vocabulary.
pub const MAX_VOCAB: usize = 1 << 22;
/// Most text or image positions (and the largest image side).
pub const MAX_POSITIONS: usize = 1 << 16;

impl ClipConfig {
    /// Reads `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<ClipConfig> {
        let p = path.as_ref();
        let text = std::fs::read_to_string(p).map_err(|source| Error::Io {
            path: p.display().to_string(),
            source,
        })?;
        ClipConfig::from_json(&text).map_err(|msg| Error::Format {
            path: p.display().to_string(),
            msg,
        })
    }

    /// Parses the text of a `config.json` (errors are plain messages; [`Self::from_file`]
    /// adds the path).
    pub fn from_json(text: &str) -> std::result::Result<ClipConfig, String> {
        let top: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        if !top.is_object() {
            return Err("expected a JSON object".into());
        }
        if let Some(t) = top.get("model_type").and_then(Value::as_str) {
            if t != "clip" {
                return Err(format!(
                    "model_type is '{t}', expected 'clip' (a CLIPModel config.json)"
                ));
            }
        }
        let rt: RawText =
            serde_json::from_value(sub_config(&top, "text_config", "text_config_dict"))
                .map_err(|e| format!("text_config: {e}"))?;
        let rv: RawVision =
            serde_json::from_value(sub_config(&top, "vision_config", "vision_config_dict"))
                .map_err(|e| format!("vision_config: {e}"))?;
        let projection_dim = match top.get("projection_dim") {
            None | Some(Value::Null) => 512,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| format!("projection_dim must be a positive integer, got {v}"))?
                as usize,
        };
        let logit_scale_init_value = top
            .get("logit_scale_init_value")
            .and_then(Value::as_f64)
            .unwrap_or(2.6592) as f32;
        let eos_token_id = match &rt.eos_token_id {
            Value::Number(n) => n
                .as_i64()
                .ok_or_else(|| format!("text_config.eos_token_id must be an integer, got {n}"))?,
            Value::Null => 49407,
            other => {
                return Err(format!(
                    "text_config.eos_token_id must be one integer, got {other}"
                ))
            }
        };
        let act = |s: &str, tower: &str| {
            Act::from_hf(s).map_err(|_| {
                format!("{tower}.hidden_act '{s}' is not supported (expected quick_gelu or gelu)")
            })
        };
        let cfg = ClipConfig {
            text: TextConfig {
                vocab_size: rt.vocab_size,
                hidden_size: rt.hidden_size,
                intermediate_size: rt.intermediate_size,
                num_hidden_layers: rt.num_hidden_layers,
                num_attention_heads: rt.num_attention_heads,
                max_position_embeddings: rt.max_position_embeddings,
                hidden_act: act(&rt.hidden_act, "text_config")?,
                layer_norm_eps: rt.layer_norm_eps,
                eos_token_id,
            },
            vision: VisionConfig {
                hidden_size: rv.hidden_size,
                intermediate_size: rv.intermediate_size,
                num_hidden_layers: rv.num_hidden_layers,
                num_attention_heads: rv.num_attention_heads,
                num_channels: rv.num_channels,
                image_size: square(&rv.image_size, "vision_config.image_size")?,
                patch_size: square(&rv.patch_size, "vision_config.patch_size")?,
                hidden_act: act(&rv.hidden_act, "vision_config")?,
                layer_norm_eps: rv.layer_norm_eps,
            },
            projection_dim,
            logit_scale_init_value,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the sizes that the towers rely on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let (t, v) = (&self.text, &self.vision);
        let positive = [
            ("text_config.vocab_size", t.vocab_size),
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.intermediate_size", t.intermediate_size),
            ("text_config.num_attention_heads", t.num_attention_heads),
            (
                "text_config.max_position_embeddings",
                t.max_position_embeddings,
            ),
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.num_channels", v.num_channels),
            ("vision_config.image_size", v.image_size),
            ("vision_config.patch_size", v.patch_size),
            ("projection_dim", self.projection_dim),
        ];
        for (name, x) in positive {
            if x == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        // Plausibility bounds, so that a hostile config cannot make the tensor list endless
        // or a size product overflow (ViT-L/14 at 336 px is 24 layers, 1024 wide, 577
        // positions).
        let bounded = [
            (
                "text_config.num_hidden_layers",
                t.num_hidden_layers,
                MAX_LAYERS,
                "MAX_LAYERS",
            ),
            (
                "vision_config.num_hidden_layers",
                v.num_hidden_layers,
                MAX_LAYERS,
                "MAX_LAYERS",
            ),
            (
                "text_config.vocab_size",
                t.vocab_size,
                MAX_VOCAB,
                "MAX_VOCAB",
            ),
            (
                "text_config.max_position_embeddings",
                t.max_position_embeddings,
                MAX_POSITIONS,
                "MAX_POSITIONS",
            ),
            (
                "vision_config.image_size",
                v.image_size,
                MAX_POSITIONS,
                "MAX_POSITIONS",
            ),
            (
                "text_config.hidden_size",
                t.hidden_size,
                MAX_WIDTH,
                "MAX_WIDTH",
            ),
            (
                "text_config.intermediate_size",
                t.intermediate_size,
                MAX_WIDTH,
                "MAX_WIDTH",
            ),
            (
                "vision_config.hidden_size",
                v.hidden_size,
                MAX_WIDTH,
                "MAX_WIDTH",
            ),
            (
                "vision_config.intermediate_size",
                v.intermediate_size,
                MAX_WIDTH,
                "MAX_WIDTH",
            ),
            (
                "vision_config.num_channels",
                v.num_channels,
                MAX_WIDTH,
                "MAX_WIDTH",
            ),
            (
                "projection_dim",
                self.projection_dim,
                MAX_WIDTH,
                "MAX_WIDTH",
            ),
        ];
        for (name, x, limit, limit_name) in bounded {
            if x > limit {
                return Err(format!(
                    "{name} is {x}, beyond the limit {limit_name} ({limit})"
                ));
            }
        }
        if t.hidden_size % t.num_attention_heads != 0 {
            return Err(format!(
                "text_config.hidden_size {} is not a multiple of num_attention_heads {}",
                t.hidden_size, t.num_attention_heads
            ));
        }
        if v.hidden_size % v.num_attention_heads != 0 {
            return Err(format!(
                "vision_config.hidden_size {} is not a multiple of num_attention_heads {}",
                v.hidden_size, v.num_attention_heads
            ));
        }
        if v.image_size % v.patch_size != 0 {
            return Err(format!(
                "vision_config.image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        if v.num_positions() > MAX_POSITIONS {
            return Err(format!(
                "vision_config.image_size {} / patch_size {} makes {} image positions, beyond \
                 the limit MAX_POSITIONS ({MAX_POSITIONS})",
                v.image_size,
                v.patch_size,
                v.num_positions()
            ));
        }
        for (name, eps) in [
            ("text_config.layer_norm_eps", t.layer_norm_eps),
            ("vision_config.layer_norm_eps", v.layer_norm_eps),
        ] {
            if !(eps.is_finite() && eps >= 0.0) {
                return Err(format!("{name} must be a finite number >= 0, got {eps}"));
            }
        }
        Ok(())
    }

    /// openai/clip-vit-base-patch32.
    pub fn vit_base_patch32() -> ClipConfig {
        ClipConfig {
            text: TextConfig::base(),
            vision: VisionConfig {
                hidden_size: 768,
                intermediate_size: 3072,
                num_hidden_layers: 12,
                num_attention_heads: 12,
                num_channels: 3,
                image_size: 224,
                patch_size: 32,
                hidden_act: Act::QuickGelu,
                layer_norm_eps: 1e-5,
            },
            projection_dim: 512,
            logit_scale_init_value: 2.6592,
        }
    }

    /// openai/clip-vit-base-patch16.
    pub fn vit_base_patch16() -> ClipConfig {
        let mut c = ClipConfig::vit_base_patch32();
        c.vision.patch_size = 16;
        c
    }

    /// openai/clip-vit-large-patch14 (`image_size` 336 for the @336 variant).
    pub fn vit_large_patch14(image_size: usize) -> ClipConfig {
        ClipConfig {
            text: TextConfig {
                hidden_size: 768,
                intermediate_size: 3072,
                num_attention_heads: 12,
                ..TextConfig::base()
            },
            vision: VisionConfig {
                hidden_size: 1024,
                intermediate_size: 4096,
                num_hidden_layers: 24,
                num_attention_heads: 16,
                num_channels: 3,
                image_size,
                patch_size: 14,
                hidden_act: Act::QuickGelu,
                layer_norm_eps: 1e-5,
            },
            projection_dim: 768,
            logit_scale_init_value: 2.6592,
        }
    }
}

impl ClipConfig {
    /// Every tensor a `CLIPModel` checkpoint of this config holds, with its shape, in the
    /// order transformers lists them (the persistent `position_ids` buffers excepted).
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out: Vec<(String, Vec<usize>)> = Vec::new();
        let mut add = |k: String, s: &[usize]| out.push((k, s.to_vec()));
        let layers =
            |add: &mut dyn FnMut(String, &[usize]), pre: &str, n: usize, d: usize, i: usize| {
                for l in 0..n {
                    let p = format!("{pre}.encoder.layers.{l}");
                    for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                        add(format!("{p}.self_attn.{proj}.weight"), &[d, d]);
                        add(format!("{p}.self_attn.{proj}.bias"), &[d]);
                    }
                    add(format!("{p}.layer_norm1.weight"), &[d]);
                    add(format!("{p}.layer_norm1.bias"), &[d]);
                    add(format!("{p}.mlp.fc1.weight"), &[i, d]);
                    add(format!("{p}.mlp.fc1.bias"), &[i]);
                    add(format!("{p}.mlp.fc2.weight"), &[d, i]);
                    add(format!("{p}.mlp.fc2.bias"), &[d]);
                    add(format!("{p}.layer_norm2.weight"), &[d]);
                    add(format!("{p}.layer_norm2.bias"), &[d]);
                }
            };
        let (t, v) = (&self.text, &self.vision);
        let td = t.hidden_size;
        add(
            "text_model.embeddings.token_embedding.weight".into(),
            &[t.vocab_size, td],
        );
        add(
            "text_model.embeddings.position_embedding.weight".into(),
            &[t.max_position_embeddings, td],
        );
        layers(
            &mut add,
            "text_model",
            t.num_hidden_layers,
            td,
            t.intermediate_size,
        );
        add("text_model.final_layer_norm.weight".into(), &[td]);
        add("text_model.final_layer_norm.bias".into(), &[td]);
        let (vd, p) = (v.hidden_size, v.patch_size);
        add("vision_model.embeddings.class_embedding".into(), &[vd]);
        add(
            "vision_model.embeddings.patch_embedding.weight".into(),
            &[vd, v.num_channels, p, p],
        );
        add(
            "vision_model.embeddings.position_embedding.weight".into(),
            &[v.num_positions(), vd],
        );
        add("vision_model.pre_layrnorm.weight".into(), &[vd]);
        add("vision_model.pre_layrnorm.bias".into(), &[vd]);
        layers(
            &mut add,
            "vision_model",
            v.num_hidden_layers,
            vd,
            v.intermediate_size,
        );
        add("vision_model.post_layernorm.weight".into(), &[vd]);
        add("vision_model.post_layernorm.bias".into(), &[vd]);
        add(
            "visual_projection.weight".into(),
            &[self.projection_dim, vd],
        );
        add("text_projection.weight".into(), &[self.projection_dim, td]);
        add("logit_scale".into(), &[]);
        out
    }
}

impl TextConfig {
    fn base() -> TextConfig {
        TextConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Act::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_id: 2,
        }
    }

    /// The position whose final hidden state is pooled, as transformers' `CLIPTextTransformer`
    /// chooses it: with the legacy `eos_token_id == 2`, the first largest id (OpenAI's EOT is
    /// the largest id of its vocabulary); otherwise the first occurrence of `eos_token_id`
    /// (position 0 if there is none, as `argmax` of all zeros gives).
    pub fn pool_index(&self, ids: &[u32]) -> usize {
        if self.eos_token_id == 2 {
            let mut best = 0;
            for (i, &t) in ids.iter().enumerate() {
                if t > ids[best] {
                    best = i;
                }
            }
            best
        } else {
            ids.iter()
                .position(|&t| t as i64 == self.eos_token_id)
                .unwrap_or(0)
        }
    }
}

impl VisionConfig {
    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Tokens per image: patches plus the class token.
    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}

/// `config.json` of a `CLIPModel` with this architecture.
pub fn hf_config(c: &ClipConfig) -> serde_json::Value {
    let (t, v) = (&c.text, &c.vision);
    serde_json::json!({
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": c.projection_dim,
        "logit_scale_init_value": c.logit_scale_init_value,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "max_position_embeddings": t.max_position_embeddings,
            "hidden_act": t.hidden_act.hf_name(),
            "layer_norm_eps": t.layer_norm_eps,
            "projection_dim": c.projection_dim,
            "bos_token_id": t.vocab_size - 2,
            "eos_token_id": t.eos_token_id,
            "pad_token_id": t.eos_token_id,
            "attention_dropout": 0.0,
            "dropout": 0.0,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "num_channels": v.num_channels,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "hidden_act": v.hidden_act.hf_name(),
            "layer_norm_eps": v.layer_norm_eps,
            "projection_dim": c.projection_dim,
            "attention_dropout": 0.0,
            "dropout": 0.0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_file_and_defaults() {
        // The shape of the hub config.json of openai/clip-vit-base-patch32 (trimmed).
        let hub = r#"{"architectures":["CLIPModel"],"model_type":"clip","projection_dim":512,
            "logit_scale_init_value":2.6592,"text_config_dict":null,"vision_config_dict":null,
            "text_config":{"hidden_size":512,"intermediate_size":2048,"num_attention_heads":8,
              "num_hidden_layers":12,"max_position_embeddings":77,"vocab_size":49408,
              "hidden_act":"quick_gelu","layer_norm_eps":1e-05,"bos_token_id":0,
              "eos_token_id":2,"pad_token_id":1,"dropout":0.0},
            "vision_config":{"hidden_size":768,"intermediate_size":3072,"num_attention_heads":12,
              "num_hidden_layers":12,"image_size":224,"patch_size":32,"hidden_act":"quick_gelu",
              "layer_norm_eps":1e-05}}"#;
        let c = ClipConfig::from_json(hub).unwrap();
        assert_eq!(c, ClipConfig::vit_base_patch32());
        assert_eq!(c.vision.num_positions(), 50);
        // Everything defaulted: the class defaults (ViT-B/32, new eos id).
        let d = ClipConfig::from_json("{}").unwrap();
        assert_eq!(d.text.eos_token_id, 49407);
        assert_eq!(d.vision, ClipConfig::vit_base_patch32().vision);
        // *_config_dict wins over *_config.
        let c = ClipConfig::from_json(
            r#"{"text_config":{"hidden_size":64,"num_attention_heads":2},
                "text_config_dict":{"hidden_size":96,"hidden_act":"gelu"}}"#,
        )
        .unwrap();
        assert_eq!(c.text.hidden_size, 96);
        assert_eq!(c.text.hidden_act, Act::Gelu);
        let l = ClipConfig::vit_large_patch14(336);
        assert_eq!(l.vision.num_positions(), 577);
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        for (json, want) in [
            ("[1]", "JSON object"),
            ("{", "not valid JSON"),
            (r#"{"model_type":"bert"}"#, "model_type is 'bert'"),
            (
                r#"{"vision_config":{"hidden_act":"tanhish"}}"#,
                "vision_config.hidden_act 'tanhish'",
            ),
            (
                r#"{"text_config":{"hidden_size":100,"num_attention_heads":8}}"#,
                "not a multiple of num_attention_heads",
            ),
            (
                r#"{"vision_config":{"image_size":100}}"#,
                "not a multiple of patch_size",
            ),
            (r#"{"text_config":{"hidden_size":"big"}}"#, "text_config"),
            (r#"{"text_config":{"eos_token_id":[2,3]}}"#, "eos_token_id"),
            (
                r#"{"projection_dim":0}"#,
                "projection_dim must be at least 1",
            ),
            (
                r#"{"text_config":{"num_hidden_layers":1000000000000}}"#,
                "MAX_LAYERS",
            ),
            (r#"{"projection_dim":4611686018427387904}"#, "MAX_WIDTH"),
            (
                r#"{"text_config":{"vocab_size":100000000000}}"#,
                "MAX_VOCAB",
            ),
            (
                r#"{"vision_config":{"image_size":65536,"patch_size":1}}"#,
                "image positions",
            ),
        ] {
            let e = ClipConfig::from_json(json).unwrap_err();
            assert!(e.contains(want), "{json}: {e}");
        }
    }

    #[test]
    fn tensor_list_matches_the_hub_checkpoint() {
        // The key list of openai/clip-vit-base-patch32 (docs/keys, from the transformers
        // module structure) and its parameter count, 151,277,313.
        let want: Vec<(String, Vec<usize>)> =
            include_str!("../../../tests/fixtures/clip/vit_b32_hf_keys.txt")
                .lines()
                .map(|l| {
                    let (k, s) = l.split_once(' ').unwrap();
                    let dims = s.trim_matches(|c| c == '[' || c == ']');
                    let shape = dims
                        .split(", ")
                        .filter(|x| !x.is_empty())
                        .map(|x| x.parse().unwrap())
                        .collect();
                    (k.to_string(), shape)
                })
                .collect();
        let got = ClipConfig::vit_base_patch32().tensor_shapes();
        assert_eq!(got, want);
        let params = |c: &ClipConfig| -> usize {
            c.tensor_shapes()
                .iter()
                .map(|(_, s)| s.iter().product::<usize>())
                .sum()
        };
        // docs/MODEL_FACTS D1 (they match open_clip's model profile).
        assert_eq!(params(&ClipConfig::vit_base_patch32()), 151_277_313);
        assert_eq!(params(&ClipConfig::vit_base_patch16()), 149_620_737);
        assert_eq!(params(&ClipConfig::vit_large_patch14(224)), 427_616_513);
        assert_eq!(params(&ClipConfig::vit_large_patch14(336)), 427_944_193);
    }

    #[test]
    fn pooling_position_follows_transformers() {
        let mut t = ClipConfig::vit_base_patch32().text;
        // Legacy: first largest id, even with EOS padding after it.
        assert_eq!(t.pool_index(&[49406, 320, 49407, 49407, 49407]), 2);
        t.eos_token_id = 49407;
        assert_eq!(t.pool_index(&[49406, 320, 1125, 49407, 49407]), 3);
        t.eos_token_id = 7;
        assert_eq!(t.pool_index(&[1, 9, 7, 12]), 2);
        assert_eq!(t.pool_index(&[1, 9, 8]), 0);
    }
}
