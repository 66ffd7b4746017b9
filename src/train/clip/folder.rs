//! The Hugging Face CLIP folder a training run writes, which transformers' `CLIPModel` and
//! [`crate::models::clip::ClipModel::load`] both read.

use super::{hf_config, shapes_tokenizer_files, ClipTrainer, MEAN, STD};
use crate::models::clip::tokenizer::{BOS, EOS};
use crate::train::{download, write_atomic, write_safetensors};
use crate::{Error, Result};
use std::path::Path;

impl ClipTrainer {
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
