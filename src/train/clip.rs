//! Training a small CLIP on the shapes world ([`crate::data::shapes`]): a byte-level BPE
//! vocabulary whose merges spell every caption word as one token, the text tower on the
//! autodiff tape (both towers are [`ClipModel`]'s own forwards on a training tape), the
//! symmetric contrastive loss with a learned temperature, augmented batches, one optimiser
//! step, and the Hugging Face folder that transformers' `CLIPModel` and [`ClipModel::load`]
//! both read.

use super::{download, init_weights, write_atomic, write_safetensors, Init, Schedule};
use crate::autodiff::{Tape, Var};
use crate::data::shapes::{Colour, Position, Scene, ShapeKind, ShapesDataset, Split};
use crate::models::clip::tokenizer::{BOS, EOS};
use crate::models::clip::{ClipConfig, ClipModel, ClipTokenizer, TextConfig, VisionConfig};
use crate::ops::matmul::MatmulOpts;
use crate::ops::Act;
use crate::optim::{Adam, AdamConfig};
use crate::weights::NamedParams;
use crate::{Error, Gpu, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::collections::BTreeSet;
use std::path::Path;

/// Per-channel mean of the preprocessing (OpenAI CLIP's, written to
/// `preprocessor_config.json`).
pub const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// Per-channel standard deviation of the preprocessing.
pub const STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];
/// Upper clamp of `logit_scale` (CLIP's `ln 100`).
pub const MAX_LOGIT_SCALE: f32 = 4.605_170_2;

/// GPT-2 / CLIP byte-to-character map: printable Latin-1 bytes map to themselves, the rest
/// to `U+0100 + n` in byte order. Returned in vocabulary order (the printable ones first).
pub fn bytes_to_unicode() -> Vec<(u8, char)> {
    let mut bs: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.iter()
        .zip(&cs)
        .map(|(&b, &c)| (b as u8, char::from_u32(c).unwrap_or('?')))
        .collect()
}

/// Every word the caption grammar of [`Scene::caption`] uses, sorted.
pub fn grammar_words() -> Vec<String> {
    let mut words: BTreeSet<String> = ["a", "on", "background", "large", "small", "and", "plain"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    words.extend(Colour::ALL.iter().map(|c| c.word().to_string()));
    words.extend(ShapeKind::ALL.iter().map(|k| k.word().to_string()));
    for p in Position::ALL {
        words.extend(p.words().split(' ').map(str::to_string));
    }
    words.into_iter().collect()
}

/// OpenAI's BPE on one word (symbols already split, last one with `</w>`): repeatedly
/// merges every occurrence of the adjacent pair of lowest rank.
fn bpe(
    mut syms: Vec<String>,
    ranks: &std::collections::HashMap<(String, String), usize>,
) -> Vec<String> {
    loop {
        let best = syms
            .windows(2)
            .filter_map(|w| ranks.get(&(w[0].clone(), w[1].clone())).map(|&r| (r, w)))
            .min_by_key(|(r, _)| *r)
            .map(|(_, w)| (w[0].clone(), w[1].clone()));
        let Some((a, b)) = best else {
            return syms;
        };
        let mut out = Vec::with_capacity(syms.len());
        let mut i = 0;
        while i < syms.len() {
            if i + 1 < syms.len() && syms[i] == a && syms[i + 1] == b {
                out.push(format!("{a}{b}"));
                i += 2;
            } else {
                out.push(syms[i].clone());
                i += 1;
            }
        }
        syms = out;
    }
}

/// The shapes world's tokenizer files, `(vocab.json, merges.txt)`, in the format of
/// openai/clip-vit-base-patch32's: the 256 byte characters, the same with `</w>`, one token
/// per merge, then `<|startoftext|>` and `<|endoftext|>` (the highest id). The merges spell
/// every word of [`grammar_words`] as a single token; any other text still tokenises into
/// byte-level pieces.
pub fn shapes_tokenizer_files() -> (String, String) {
    let bytes = bytes_to_unicode();
    let mut vocab: Vec<String> = bytes.iter().map(|(_, c)| c.to_string()).collect();
    vocab.extend(bytes.iter().map(|(_, c)| format!("{c}</w>")));
    let mut ranks = std::collections::HashMap::new();
    let mut merges: Vec<(String, String)> = Vec::new();
    for word in grammar_words() {
        let chars: Vec<char> = word.chars().collect();
        let mut syms: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        if let Some(last) = syms.last_mut() {
            last.push_str("</w>");
        }
        // Appending merges never changes words finished earlier (their merges all rank
        // lower), so each word is completed by merging its leftmost remaining pair.
        loop {
            let toks = bpe(syms.clone(), &ranks);
            if toks.len() <= 1 {
                break;
            }
            let pair = (toks[0].clone(), toks[1].clone());
            ranks.insert(pair.clone(), merges.len());
            vocab.push(format!("{}{}", pair.0, pair.1));
            merges.push(pair);
        }
    }
    vocab.push(BOS.to_string());
    vocab.push(EOS.to_string());
    let entries: Vec<String> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{}:{i}", serde_json::Value::from(t.as_str())))
        .collect();
    let vocab_json = format!("{{{}}}", entries.join(","));
    let mut merges_txt = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        merges_txt.push_str(&format!("{a} {b}\n"));
    }
    (vocab_json, merges_txt)
}

/// The shapes tokenizer with a context of `context` tokens.
pub fn shapes_tokenizer(context: usize) -> Result<ClipTokenizer> {
    let (v, m) = shapes_tokenizer_files();
    ClipTokenizer::from_vocab_merges_text(
        &v,
        &m,
        context,
        Path::new("<shapes vocab.json>"),
        Path::new("<shapes merges.txt>"),
    )
}

/// The default architecture of the shapes CLIP for a vocabulary of `vocab_size` tokens
/// (`eos_token_id` is the last id): 64×64 images in 8×8 patches, width 64 in both towers,
/// quick-GELU, a 20-token context (the longest caption has 17).
pub fn shapes_config(vocab_size: usize) -> ClipConfig {
    ClipConfig {
        text: TextConfig {
            vocab_size,
            hidden_size: 64,
            intermediate_size: 256,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            max_position_embeddings: 20,
            hidden_act: Act::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_id: vocab_size as i64 - 1,
        },
        vision: VisionConfig {
            hidden_size: 64,
            intermediate_size: 256,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_channels: 3,
            image_size: 64,
            patch_size: 8,
            hidden_act: Act::QuickGelu,
            layer_norm_eps: 1e-5,
        },
        projection_dim: 64,
        logit_scale_init_value: 2.6592,
    }
}

/// How each weight of a fresh model starts: LayerNorm gains 1 and shifts 0, biases 0,
/// embeddings N(0, 0.02) (class embedding N(0, D^-½)), projections N(0, D^-½), other
/// linear layers PyTorch's default, `logit_scale` its config value.
pub fn init_rule(config: &ClipConfig) -> impl Fn(&str, &[usize]) -> Init {
    let ls = config.logit_scale_init_value;
    move |key: &str, shape: &[usize]| {
        let norm = key.contains("layer_norm")
            || key.contains("layernorm")
            || key.contains("layrnorm")
            || key.contains("final_layer_norm");
        if key == "logit_scale" {
            Init::Const(ls)
        } else if norm {
            Init::Const(if key.ends_with("weight") { 1.0 } else { 0.0 })
        } else if key.ends_with("bias") {
            Init::Const(0.0)
        } else if key.ends_with("class_embedding") {
            Init::Normal((shape[0] as f32).powf(-0.5))
        } else if key.contains("embedding") && !key.contains("patch_embedding") {
            Init::Normal(0.02)
        } else if key.contains("projection") {
            Init::Normal((shape[1] as f32).powf(-0.5))
        } else {
            super::default_init(shape)
        }
    }
}

/// A CLIP being trained: the model (with the shapes tokenizer), its learned log temperature
/// as a `[1]` tensor, and every trained tensor by checkpoint key.
pub struct ClipTrainer {
    /// The model; its weights are updated in place.
    pub model: ClipModel,
    /// `logit_scale` `[1]`.
    pub logit_scale: Tensor,
    /// `model.params` plus `("logit_scale", logit_scale)`.
    pub params: NamedParams,
    /// The optimiser over `params` (same order).
    pub adam: Adam,
}

/// What one step measured.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Contrastive loss.
    pub loss: f32,
    /// Fraction of the batch matched to its own caption (both directions averaged).
    pub accuracy: f32,
    /// `exp(logit_scale)` after the step.
    pub temperature: f32,
}

impl ClipTrainer {
    /// A fresh model of `config` (its vocabulary must be the shapes tokenizer's) with weights
    /// from `seed`, and AdamW at `lr`.
    pub fn new(config: ClipConfig, seed: u64, lr: f32, gpu: &Gpu) -> Result<ClipTrainer> {
        let tok = shapes_tokenizer(config.text.max_position_embeddings)?;
        if tok.vocab_size() != config.text.vocab_size
            || config.text.eos_token_id != tok.eos_id() as i64
        {
            return Err(Error::invalid(format!(
                "the config's vocab_size {} / eos_token_id {} do not match the shapes \
                 tokenizer ({} tokens, end-of-text id {})",
                config.text.vocab_size,
                config.text.eos_token_id,
                tok.vocab_size(),
                tok.eos_id()
            )));
        }
        let src = init_weights(&config.tensor_shapes(), seed, init_rule(&config))?;
        let mut model = ClipModel::from_source(config, &src, gpu)?;
        model.tokenizer = Some(tok);
        model.preprocess.normalize = Some((MEAN, STD));
        ClipTrainer::from_model(model, lr)
    }

    /// Wraps a loaded model for training (its `logit_scale` becomes a trained tensor).
    pub fn from_model(model: ClipModel, lr: f32) -> Result<ClipTrainer> {
        if model
            .text_model
            .embeddings
            .token_embedding
            .table
            .chunks()
            .len()
            != 1
        {
            return Err(Error::invalid(
                "the token embedding is too large for one binding; training needs it whole",
            ));
        }
        let logit_scale = Tensor::from_slice(model.gpu(), &[model.logit_scale], &[1])?;
        let mut params = model.params.clone();
        params.push(("logit_scale".into(), logit_scale.clone()));
        let adam = Adam::new(
            params.iter().map(|(_, t)| t.clone()).collect(),
            AdamConfig::adamw(lr),
        )?;
        Ok(ClipTrainer {
            model,
            logit_scale,
            params,
            adam,
        })
    }

    /// The contrastive loss of a batch (`pixels` `[N, 3, S, S]` preprocessed, one caption
    /// per image, plus `negatives`: extra captions that match no image, see
    /// [`contrastive_loss`]) on `tape`, and the logits `[N, N + negatives]` (image rows,
    /// text columns).
    pub fn loss(
        &self,
        tape: &Tape,
        pixels: &Tensor,
        captions: &[String],
        negatives: &[String],
    ) -> Result<(Var, Var)> {
        let texts: Vec<String> = captions.iter().chain(negatives).cloned().collect();
        let ids = self.model.tokenize(&texts)?;
        let img = self
            .model
            .image_features_on(tape, &tape.leaf(pixels.clone(), false), false)?;
        let txt = text_features(tape, &self.model, &ids)?;
        contrastive_loss(tape, &img, &txt, &tape.param(&self.logit_scale))
    }

    /// One optimiser step on a batch (with optional hard-negative captions, see
    /// [`ClipTrainer::loss`]) at learning rate `lr`; clamps `logit_scale` to `[0, ln 100]`
    /// afterwards as CLIP does.
    pub fn step(
        &mut self,
        pixels: &Tensor,
        captions: &[String],
        negatives: &[String],
        lr: f32,
    ) -> Result<StepStats> {
        let tape = Tape::training();
        let (loss, logits) = self.loss(&tape, pixels, captions, negatives)?;
        let grads = tape.backward(&loss)?;
        // A parameter used under another view (the class embedding as [1, D]) gets its
        // gradient in that shape.
        let g: Vec<Option<Tensor>> = self
            .params
            .iter()
            .map(|(_, t)| {
                grads
                    .param(&tape, t)
                    .map(|g| g.reshape(t.shape()))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let g: Vec<Option<&Tensor>> = g.iter().map(Option::as_ref).collect();
        self.adam.config.lr = lr;
        self.adam.step(&g)?;
        drop(grads);
        let loss = loss.value().to_vec()?[0];
        let accuracy = in_batch_accuracy(
            &logits.value().to_vec()?,
            captions.len(),
            captions.len() + negatives.len(),
        );
        let mut s = self.logit_scale.to_vec()?[0];
        if !(0.0..=MAX_LOGIT_SCALE).contains(&s) {
            s = s.clamp(0.0, MAX_LOGIT_SCALE);
            self.logit_scale
                .assign(&Tensor::from_slice(self.model.gpu(), &[s], &[1])?)?;
        }
        self.model.logit_scale = s;
        if !loss.is_finite() {
            return Err(Error::invalid(format!(
                "the loss became {loss}; try a lower learning rate"
            )));
        }
        Ok(StepStats {
            loss,
            accuracy,
            temperature: s.exp(),
        })
    }

    /// Writes the Hugging Face CLIP folder: `config.json`, `model.safetensors`, `vocab.json`,
    /// `merges.txt`, `tokenizer_config.json`, `special_tokens_map.json`,
    /// `preprocessor_config.json`. Each file is written atomically.
    pub fn write_folder(&self, dir: &Path) -> Result<()> {
        let c = &self.model.config;
        let mut tensors = download(&self.model.params)?;
        tensors.push((
            "logit_scale".into(),
            vec![],
            vec![self.logit_scale.to_vec()?[0]],
        ));
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.display().to_string(),
            source,
        })?;
        write_safetensors(
            &dir.join("model.safetensors"),
            &tensors,
            &[("format", "pt".into())],
        )?;
        let (vocab, merges) = shapes_tokenizer_files();
        write_atomic(&dir.join("vocab.json"), vocab.as_bytes())?;
        write_atomic(&dir.join("merges.txt"), merges.as_bytes())?;
        let json = |v: serde_json::Value| -> Result<Vec<u8>> {
            let mut s =
                serde_json::to_string_pretty(&v).map_err(|e| Error::invalid(e.to_string()))?;
            s.push('\n');
            Ok(s.into_bytes())
        };
        write_atomic(&dir.join("config.json"), &json(hf_config(c))?)?;
        let special = serde_json::json!({
            "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
        });
        write_atomic(&dir.join("special_tokens_map.json"), &json(special)?)?;
        let tc = serde_json::json!({
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": c.text.max_position_embeddings,
            "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
            "do_lower_case": true,
            "errors": "replace",
            "add_prefix_space": false,
            "clean_up_tokenization_spaces": false,
        });
        write_atomic(&dir.join("tokenizer_config.json"), &json(tc)?)?;
        let s = c.vision.image_size;
        let pp = serde_json::json!({
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": true,
            "size": {"shortest_edge": s},
            "resample": 3,
            "do_center_crop": true,
            "crop_size": {"height": s, "width": s},
            "do_rescale": true,
            "rescale_factor": 1.0 / 255.0,
            "do_normalize": true,
            "image_mean": MEAN,
            "image_std": STD,
            "do_convert_rgb": true,
        });
        write_atomic(&dir.join("preprocessor_config.json"), &json(pp)?)?;
        Ok(())
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

/// The longest caption of the grammar in tokens, with the start and end tokens (17:
/// two shapes with positions). Captions longer than a model's context are truncated.
pub fn longest_caption_tokens() -> Result<usize> {
    let tok = shapes_tokenizer(1024)?;
    // The longest phrasing: two shapes with positions ("... at the bottom right and ...").
    let mut longest = 0;
    let ds = ShapesDataset::new(0, Split::Train);
    for i in 0..64 {
        let (scene, _) = ds.sample(i);
        for v in 0..4 {
            longest = longest.max(tok.encode_checked(&scene.caption(v))?.0.len());
        }
    }
    let worst = Scene {
        background: Colour::Purple,
        shapes: vec![
            crate::data::shapes::Shape {
                kind: ShapeKind::Triangle,
                colour: Colour::Yellow,
                large: false,
                position: Position::BottomRight,
            },
            crate::data::shapes::Shape {
                kind: ShapeKind::Triangle,
                colour: Colour::Yellow,
                large: false,
                position: Position::BottomLeft,
            },
        ],
    };
    for v in 0..4 {
        longest = longest.max(tok.encode_checked(&worst.caption(v))?.0.len());
    }
    Ok(longest)
}

/// Image-to-text and text-to-image top-1 accuracy of `[N, M]` logits (M ≥ N; columns past
/// N are negative captions, which count against the images), averaged.
fn in_batch_accuracy(logits: &[f32], n: usize, m: usize) -> f32 {
    let mut hits = 0;
    for i in 0..n {
        let row = (0..m).max_by(|&a, &b| logits[i * m + a].total_cmp(&logits[i * m + b]));
        let col = (0..n).max_by(|&a, &b| logits[a * m + i].total_cmp(&logits[b * m + i]));
        hits += usize::from(row == Some(i)) + usize::from(col == Some(i));
    }
    hits as f32 / (2 * n.max(1)) as f32
}

/// CLIP's text tower and projection on the tape: projected, unnormalised features `[N, P]`
/// of token id sequences (padded with the end-of-text id to the longest; pooled at
/// [`TextConfig::pool_index`] of each unpadded sequence): [`ClipModel::text_features_on`],
/// the forward behind [`ClipModel::text_features_ids`], with its input checks.
pub fn text_features(tape: &Tape, model: &ClipModel, ids: &[Vec<u32>]) -> Result<Var> {
    let vocab = model.config.text.vocab_size;
    let pad = model.config.text.eos_token_id.clamp(0, vocab as i64 - 1) as u32;
    model.text_features_on(tape, ids, pad)
}

/// CLIP's symmetric contrastive loss of image features `[N, P]` and text features `[M, P]`
/// (row i < N of each is a pair; text rows from N on are hard-negative captions that match
/// no image, as in NegCLIP) with the learned log temperature `logit_scale` `[1]`:
/// `logits = exp(logit_scale) · norm(img) · norm(txt)ᵀ` `[N, M]`,
/// `loss = (CE(logits, diag) + CE(logits[:, :N]ᵀ, diag)) / 2`: each image picks its caption
/// among all M texts, each caption its image among the N images. With M = N this is CLIP's
/// loss. Returns `(loss, logits)`.
pub fn contrastive_loss(
    tape: &Tape,
    img: &Var,
    txt: &Var,
    logit_scale: &Var,
) -> Result<(Var, Var)> {
    let n = img.shape()[0];
    let m = txt.shape()[0];
    if m < n {
        return Err(Error::shape(format!(
            "contrastive loss: {n} images but only {m} texts"
        )));
    }
    let (i, t) = (tape.l2_normalize(img)?, tape.l2_normalize(txt)?);
    let sim = tape.matmul(
        &i,
        &t,
        None,
        &MatmulOpts {
            trans_b: true,
            ..Default::default()
        },
    )?;
    let logits = tape.mul_scalar(&sim, &tape.exp(logit_scale)?)?;
    let diag: Vec<u32> = (0..n as u32).collect();
    let a = tape.cross_entropy(&logits, &diag)?;
    let pairs = if m == n {
        logits.clone()
    } else {
        tape.slice(&logits, 1, 0, n)?
    };
    let b = tape.cross_entropy(&tape.permute(&pairs, &[1, 0])?, &diag)?;
    let loss = tape.affine(&tape.add(&a, &b)?, 0.5, 0.0)?;
    Ok((loss, logits))
}

/// Hard-negative captions for shape: `caption` with its first shape word replaced by each
/// other shape kind (three for the shapes world), so the image must be told from captions
/// that differ from its own in the shape alone. Empty when the caption names no shape.
pub fn shape_negatives(caption: &str) -> Vec<String> {
    let words: Vec<&str> = caption.split(' ').collect();
    let Some((at, kind)) = words
        .iter()
        .enumerate()
        .find_map(|(i, w)| ShapeKind::from_word(w).map(|k| (i, k)))
    else {
        return Vec::new();
    };
    ShapeKind::ALL
        .into_iter()
        .filter(|&k| k != kind)
        .map(|k| {
            let mut w = words.clone();
            w[at] = k.word();
            w.join(" ")
        })
        .collect()
}

/// The colour-role negative of a caption: for a one-shape caption that names the shape's
/// colour and the background's ("a red circle on a blue background"), the same caption with
/// the two colours exchanged ("a blue circle on a red background"), which describes the
/// inverse picture. `None` for captions without exactly two colour words or with two shapes
/// (exchanging two shape colours there can describe the same scene).
pub fn swap_negative(caption: &str) -> Option<String> {
    if caption.contains(" and ") || !caption.ends_with(" background") {
        return None;
    }
    let mut words: Vec<&str> = caption.split(' ').collect();
    let at: Vec<usize> = (0..words.len())
        .filter(|&i| Colour::from_word(words[i]).is_some())
        .collect();
    match at.as_slice() {
        [a, b] if words[*a] != words[*b] => {
            words.swap(*a, *b);
            Some(words.join(" "))
        }
        _ => None,
    }
}

/// The hard-negative captions of a whole batch: [`shape_negatives`] (with `shape`) and
/// [`swap_negative`] (with `swap`) of every caption, without repeats and without any text
/// that is itself a caption of the batch. A batch that holds a scene and its hard negative
/// (the same scene with another shape) would otherwise list each one's own caption among the
/// other's negatives, as a second column that also matches the image, and cap its best
/// image-to-text probability at 1/2.
pub fn batch_negatives(captions: &[String], shape: bool, swap: bool) -> Vec<String> {
    let own: std::collections::HashSet<&str> = captions.iter().map(String::as_str).collect();
    let mut seen = std::collections::HashSet::new();
    captions
        .iter()
        .flat_map(|c| {
            let mut v = if shape {
                shape_negatives(c)
            } else {
                Vec::new()
            };
            if swap {
                v.extend(swap_negative(c));
            }
            v
        })
        .filter(|n| !own.contains(n.as_str()) && seen.insert(n.clone()))
        .collect()
}

/// [`batch_negatives`] with shape negatives only.
pub fn batch_shape_negatives(captions: &[String]) -> Vec<String> {
    batch_negatives(captions, true, false)
}

/// Augmentation of training images.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augment {
    /// Smallest side of a random square crop, as a fraction of the image side (1 = none).
    pub min_crop: f32,
    /// Crops smaller than this fraction drop position words from the caption.
    pub position_crop: f32,
    /// Largest standard deviation of added Gaussian noise (pixel values in [0, 1]).
    pub noise: f32,
    /// Make every second pair of a batch a hard negative of the one before (one word of
    /// the caption, the shape kind (p = 3/4) or colour, changed in both scene and caption).
    pub hard_negatives: bool,
    /// Probability that a pair (with its hard negative) is recoloured to white shapes on a
    /// black background, caption included: a shape curriculum, since the image tower learns
    /// shape quickly without colour variation and slowly with it (docs/clip_shape_diagnosis.md).
    /// Its hard negative then always changes the shape kind.
    pub mask: f32,
}

impl Default for Augment {
    fn default() -> Self {
        Augment {
            min_crop: 0.6,
            position_crop: 0.85,
            noise: 0.04,
            hard_negatives: true,
            mask: 0.0,
        }
    }
}

impl Augment {
    /// No augmentation.
    pub fn none() -> Self {
        Augment {
            min_crop: 1.0,
            position_crop: 0.0,
            noise: 0.0,
            hard_negatives: false,
            mask: 0.0,
        }
    }
}

/// `rgb` (`size`×`size` HWC bytes) normalised with [`MEAN`] / [`STD`] into CHW floats.
pub fn normalise(rgb: &[u8], size: usize) -> Vec<f32> {
    let mut out = vec![0.0; 3 * size * size];
    for p in 0..size * size {
        for c in 0..3 {
            out[c * size * size + p] = (rgb[p * 3 + c] as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    out
}

/// One training pair: the scene rendered at `size` px, randomly cropped (keeping every
/// shape's centre well inside; crops tighter than `aug.position_crop` use a caption
/// without position words) and resampled back to `size` bilinearly, with Gaussian noise;
/// returns normalised CHW pixels and the caption.
pub fn augmented_pair(
    scene: &Scene,
    variant: usize,
    size: usize,
    aug: &Augment,
    rng: &mut ChaCha8Rng,
) -> (Vec<f32>, String) {
    let img = scene.render(size);
    let mut s = if aug.min_crop < 1.0 {
        rng.random_range(aug.min_crop..=1.0f32)
    } else {
        1.0
    };
    // Offsets that keep each shape's centre at least half its half-size inside the crop.
    let range = |s: f32, axis: usize| -> (f32, f32) {
        let mut lo = 0.0f32;
        let mut hi = 1.0 - s;
        for sh in &scene.shapes {
            let c = if axis == 0 {
                sh.position.centre().0
            } else {
                sh.position.centre().1
            };
            let m = 0.5 * sh.half_size();
            lo = lo.max(c + m - s);
            hi = hi.min(c - m);
        }
        (lo, hi)
    };
    let (mut rx, mut ry) = (range(s, 0), range(s, 1));
    if rx.0 > rx.1 || ry.0 > ry.1 {
        s = 1.0;
        rx = (0.0, 0.0);
        ry = (0.0, 0.0);
    }
    let pick = |rng: &mut ChaCha8Rng, r: (f32, f32)| {
        if r.1 > r.0 {
            rng.random_range(r.0..=r.1)
        } else {
            r.0.max(0.0)
        }
    };
    let (x0, y0) = (pick(rng, rx), pick(rng, ry));
    let sigma = if aug.noise > 0.0 {
        rng.random_range(0.0..=aug.noise)
    } else {
        0.0
    };
    let noise = Normal::new(0.0f32, sigma.max(1e-12)).ok();
    let mut out = vec![0.0f32; 3 * size * size];
    let sz = size as f32;
    let at = |x: usize, y: usize, c: usize| img[(y * size + x) * 3 + c] as f32 / 255.0;
    for oy in 0..size {
        let fy = (y0 + (oy as f32 + 0.5) / sz * s) * sz - 0.5;
        let (yl, wy) = (fy.floor(), fy - fy.floor());
        let ya = (yl.max(0.0) as usize).min(size - 1);
        let yb = ((yl + 1.0).max(0.0) as usize).min(size - 1);
        for ox in 0..size {
            let fx = (x0 + (ox as f32 + 0.5) / sz * s) * sz - 0.5;
            let (xl, wx) = (fx.floor(), fx - fx.floor());
            let xa = (xl.max(0.0) as usize).min(size - 1);
            let xb = ((xl + 1.0).max(0.0) as usize).min(size - 1);
            for c in 0..3 {
                let top = at(xa, ya, c) * (1.0 - wx) + at(xb, ya, c) * wx;
                let bot = at(xa, yb, c) * (1.0 - wx) + at(xb, yb, c) * wx;
                let mut v = top * (1.0 - wy) + bot * wy;
                if sigma > 0.0 {
                    if let Some(n) = &noise {
                        v += n.sample(rng);
                    }
                }
                let v = v.clamp(0.0, 1.0);
                out[c * size * size + oy * size + ox] = (v - MEAN[c]) / STD[c];
            }
        }
    }
    let variant = if s < aug.position_crop {
        // Phrasings without positions: 0 and 1 for one shape, 0 for two.
        if scene.shapes.len() == 1 {
            variant % 2
        } else {
            0
        }
    } else {
        variant
    };
    (out, scene.caption(variant))
}

/// Training batch `step`: samples `step·batch ..` of the train split of dataset `data_seed`,
/// augmented with a generator seeded by `(seed, step)`, so a batch depends only on its step
/// (a resumed run sees the same data). With `aug.hard_negatives` every second pair is a
/// variation of the one before. Returns `[B, 3, S, S]` pixels and the captions.
pub fn batch(
    gpu: &Gpu,
    data_seed: u64,
    seed: u64,
    step: usize,
    batch: usize,
    size: usize,
    aug: &Augment,
) -> Result<(Tensor, Vec<String>)> {
    let ds = ShapesDataset::new(data_seed, Split::Train);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(step as u64 + 1);
    let mut jobs = Vec::with_capacity(batch);
    let mut prev: Option<(Scene, usize, bool)> = None;
    for i in 0..batch {
        let (scene, variant) = match prev.take() {
            // Every second pair is a hard negative of the one before: the same scene and
            // phrasing with the first shape's kind (3 times in 4, always for a recoloured
            // pair: colour is the easy part) or colour changed.
            Some((mut scene, variant, masked)) if aug.hard_negatives => {
                let sh = &mut scene.shapes[0];
                if masked || rng.random_range(0..4) != 0 {
                    let others: Vec<ShapeKind> = ShapeKind::ALL
                        .into_iter()
                        .filter(|&k| k != sh.kind)
                        .collect();
                    sh.kind = others[rng.random_range(0..others.len())];
                } else {
                    let bg = scene.background;
                    let others: Vec<Colour> = Colour::ALL
                        .into_iter()
                        .filter(|&c| c != sh.colour && c != bg)
                        .collect();
                    sh.colour = others[rng.random_range(0..others.len())];
                }
                (scene, variant)
            }
            _ => {
                let (mut scene, _) = ds.sample((step * batch + i) as u64);
                let variant = rng.random_range(0..4usize);
                // No draw when the curriculum is off: earlier runs keep their data.
                let masked = aug.mask > 0.0 && rng.random_bool(aug.mask.min(1.0) as f64);
                if masked {
                    scene.background = Colour::Black;
                    for sh in &mut scene.shapes {
                        sh.colour = Colour::White;
                    }
                }
                prev = Some((scene.clone(), variant, masked));
                (scene, variant)
            }
        };
        // Each pair's augmentation gets its own generator, so the pairs can be rendered on
        // several threads and the batch is the same for any thread count.
        jobs.push((scene, variant, rng.random::<u64>()));
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (pixels, captions) = render_pairs(&jobs, size, aug, threads);
    Ok((
        Tensor::from_slice(gpu, &pixels, &[batch, 3, size, size])?,
        captions,
    ))
}

/// Renders `(scene, variant, seed)` pairs with [`augmented_pair`] on up to `threads`
/// threads: `[N, 3, S, S]` normalised pixels and the captions, independent of `threads`.
fn render_pairs(
    jobs: &[(Scene, usize, u64)],
    size: usize,
    aug: &Augment,
    threads: usize,
) -> (Vec<f32>, Vec<String>) {
    let per = 3 * size * size;
    let mut pixels = vec![0.0f32; jobs.len() * per];
    let mut captions = vec![String::new(); jobs.len()];
    let chunk = jobs.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|sc| {
        for ((js, px), caps) in jobs
            .chunks(chunk)
            .zip(pixels.chunks_mut(chunk * per))
            .zip(captions.chunks_mut(chunk))
        {
            sc.spawn(move || {
                for ((scene, variant, seed), (out, cap)) in
                    js.iter().zip(px.chunks_mut(per).zip(caps.iter_mut()))
                {
                    let mut rng = ChaCha8Rng::seed_from_u64(*seed);
                    let (p, c) = augmented_pair(scene, *variant, size, aug, &mut rng);
                    out.copy_from_slice(&p);
                    *cap = c;
                }
            });
        }
    });
    (pixels, captions)
}

/// A learning-rate schedule for `total` steps: warm-up over 5% (at least 1 step), cosine to
/// 5% of `lr`.
pub fn schedule(lr: f32, total: usize) -> Schedule {
    Schedule {
        lr,
        warmup: (total / 20).max(1),
        total,
        floor: 0.05,
    }
}

/// Zero-shot results of [`evaluate`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EvalResult {
    /// Images scored.
    pub n: usize,
    /// Right shape colour among captions that differ only in it (8 candidates).
    pub colour_correct: usize,
    /// Right shape kind among captions that differ only in it (4 candidates).
    pub shape_correct: usize,
    /// Exact (colour, kind, background) among every `"a {colour} {kind} on a {bg}
    /// background"` with colour ≠ background (224 candidates).
    pub free_correct: usize,
}

/// Zero-shot accuracy of `model` on the first `n` single-shape scenes of the held-out split
/// of dataset `data_seed`, rendered at the model's image size and preprocessed by the
/// model's own preprocessing. Captions use the sample's phrasing.
pub fn evaluate(model: &ClipModel, data_seed: u64, n: usize) -> Result<EvalResult> {
    use std::collections::HashMap;
    let size = model.config.vision.image_size;
    let ds = ShapesDataset::new(data_seed, Split::HeldOut);
    let mut scenes = Vec::with_capacity(n);
    let mut i = 0u64;
    while scenes.len() < n {
        let (scene, _) = ds.sample(i);
        // Phrasings in turn (index mod 4).
        let variant = (i % 4) as usize;
        if scene.shapes.len() == 1 {
            scenes.push((scene, variant));
        }
        i += 1;
    }
    let mut texts: Vec<String> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut id_of = |s: String, texts: &mut Vec<String>| -> usize {
        *index.entry(s.clone()).or_insert_with(|| {
            texts.push(s);
            texts.len() - 1
        })
    };
    let mut colour_sets = Vec::new();
    let mut shape_sets = Vec::new();
    let mut free_truth = Vec::new();
    for (scene, v) in &scenes {
        let sh = scene.shapes[0];
        let with = |colour: Colour, kind: ShapeKind| {
            let mut s = scene.clone();
            s.shapes[0].colour = colour;
            s.shapes[0].kind = kind;
            s.caption(*v)
        };
        let cs: Vec<usize> = Colour::ALL
            .iter()
            .map(|&c| id_of(with(c, sh.kind), &mut texts))
            .collect();
        let ks: Vec<usize> = ShapeKind::ALL
            .iter()
            .map(|&k| id_of(with(sh.colour, k), &mut texts))
            .collect();
        colour_sets.push((cs, Colour::ALL.iter().position(|&c| c == sh.colour)));
        shape_sets.push((ks, ShapeKind::ALL.iter().position(|&k| k == sh.kind)));
        free_truth.push((sh.colour, sh.kind, scene.background));
    }
    let mut free = Vec::new();
    for bg in Colour::ALL {
        for c in Colour::ALL {
            if c == bg {
                continue;
            }
            for k in ShapeKind::ALL {
                let t = format!("a {} {} on a {} background", c.word(), k.word(), bg.word());
                free.push(((c, k, bg), id_of(t, &mut texts)));
            }
        }
    }
    let text_emb = model.encode_text(&texts)?.to_vec()?;
    let p = model.config.projection_dim;
    let mut res = EvalResult {
        n,
        ..Default::default()
    };
    for (ci, chunk) in scenes.chunks(64).enumerate() {
        let imgs: Vec<image::RgbImage> = chunk
            .iter()
            .map(|(s, _)| {
                image::RgbImage::from_raw(size as u32, size as u32, s.render(size))
                    .ok_or_else(|| Error::invalid("render size mismatch"))
            })
            .collect::<Result<_>>()?;
        let emb = model.encode_image(&model.pixel_values(&imgs)?)?.to_vec()?;
        for j in 0..chunk.len() {
            let k = ci * 64 + j;
            let e = &emb[j * p..(j + 1) * p];
            let score = |t: usize| -> f32 {
                e.iter()
                    .zip(&text_emb[t * p..(t + 1) * p])
                    .map(|(a, b)| a * b)
                    .sum()
            };
            let best =
                |c: &[usize]| (0..c.len()).max_by(|&a, &b| score(c[a]).total_cmp(&score(c[b])));
            let (cs, ct) = &colour_sets[k];
            res.colour_correct += usize::from(best(cs) == *ct);
            let (ks, kt) = &shape_sets[k];
            res.shape_correct += usize::from(best(ks) == *kt);
            let ids: Vec<usize> = free.iter().map(|f| f.1).collect();
            let b = best(&ids).map(|x| free[x].0);
            res.free_correct += usize::from(b == Some(free_truth[k]));
        }
    }
    Ok(res)
}

#[cfg(test)]
mod tests;
