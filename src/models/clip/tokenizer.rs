//! CLIP's byte-level BPE tokenizer through the `tokenizers` crate, giving the same ids as
//! transformers' `CLIPTokenizer` (the fast tokenizer; `tokenization_clip.py`).
//!
//! A model folder holds either `tokenizer.json` (used as is) or `vocab.json` + `merges.txt`,
//! from which the pipeline transformers builds is rebuilt here: NFC, whitespace runs to one
//! space, lowercase; split on CLIP's regex; byte-level mapping; BPE with the `</w>` suffix;
//! `<|startoftext|>` … `<|endoftext|>` around every text. Texts longer than the context are
//! truncated as `tokenizer(text, truncation=True, max_length=context)` does: the end of the
//! text is dropped and `<|endoftext|>` stays last.

use crate::{Error, Result};
use std::path::Path;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer, TruncationParams};

/// Start-of-text token.
pub const BOS: &str = "<|startoftext|>";
/// End-of-text token (also the padding and unknown token).
pub const EOS: &str = "<|endoftext|>";
/// CLIP's pre-tokenizer pattern (transformers `CLIPTokenizer`).
const SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// Merges OpenAI's vocabulary uses (49152 - 256 - 2); transformers reads no more.
const MAX_MERGES: usize = 48894;

/// A CLIP tokenizer with its context length.
pub struct ClipTokenizer {
    inner: Tokenizer,
    context: usize,
    bos: u32,
    eos: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ClipTokenizer(vocab {}, context {})",
            self.inner.get_vocab_size(true),
            self.context
        )
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Format {
        path: path.display().to_string(),
        msg: format!("cannot build the tokenizer: {e}"),
    }
}

impl ClipTokenizer {
    /// Loads `dir/tokenizer.json`, else `dir/vocab.json` + `dir/merges.txt`. `context` is the
    /// text tower's `max_position_embeddings` (77 for OpenAI CLIP).
    pub fn from_dir(dir: impl AsRef<Path>, context: usize) -> Result<ClipTokenizer> {
        let dir = dir.as_ref();
        let json = dir.join("tokenizer.json");
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if json.is_file() {
            ClipTokenizer::from_tokenizer_json(&json, context)
        } else if vocab.is_file() && merges.is_file() {
            ClipTokenizer::from_vocab_merges(&vocab, &merges, context)
        } else {
            Err(Error::Format {
                path: dir.display().to_string(),
                msg: "no tokenizer: expected tokenizer.json, or vocab.json and merges.txt".into(),
            })
        }
    }

    /// Loads a `tokenizer.json` written by transformers or `tokenizers`.
    pub fn from_tokenizer_json(path: &Path, context: usize) -> Result<ClipTokenizer> {
        if !path.is_file() {
            return Err(Error::Io {
                path: path.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
            });
        }
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        ClipTokenizer::from_tokenizer_json_bytes(&bytes, context, path)
    }

    /// [`ClipTokenizer::from_tokenizer_json`] from the file's contents; `path` names it in
    /// error messages (the fuzz target uses this).
    pub fn from_tokenizer_json_bytes(
        bytes: &[u8],
        context: usize,
        path: &Path,
    ) -> Result<ClipTokenizer> {
        // tokenizers 0.23 re-parses parts of the file with `expect` (decoders/mod.rs), so a
        // string escape that serde_json refuses there (a lone surrogate, "\\udc00") panics
        // inside the crate. Checking the whole file as JSON first turns that into an error;
        // catching a panic is the last resort for whatever else the crate does not handle.
        serde_json::from_slice::<serde_json::Value>(bytes)
            .map_err(|e| tok_err(path, format!("not valid JSON: {e}")))?;
        let inner = std::panic::catch_unwind(|| Tokenizer::from_bytes(bytes))
            .map_err(|_| tok_err(path, "the tokenizers crate failed on this file"))?
            .map_err(|e| tok_err(path, e))?;
        ClipTokenizer::finish(inner, context, path)
    }

    /// Builds the transformers `CLIPTokenizer` pipeline from `vocab.json` and `merges.txt`
    /// (a `#version` header line is skipped; at most 48,894 merges are used, as transformers
    /// does).
    pub fn from_vocab_merges(vocab: &Path, merges: &Path, context: usize) -> Result<ClipTokenizer> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| Error::Io {
                path: p.display().to_string(),
                source,
            })
        };
        ClipTokenizer::from_vocab_merges_text(&read(vocab)?, &read(merges)?, context, vocab, merges)
    }

    /// [`ClipTokenizer::from_vocab_merges`] from the files' contents; `vocab` and `merges`
    /// name them in error messages.
    pub fn from_vocab_merges_text(
        vocab_text: &str,
        text: &str,
        context: usize,
        vocab: &Path,
        merges: &Path,
    ) -> Result<ClipTokenizer> {
        let vocab_map: std::collections::HashMap<String, u32> = serde_json::from_str(vocab_text)
            .map_err(|e| Error::Format {
                path: vocab.display().to_string(),
                msg: format!("not a JSON map of token to id: {e}"),
            })?;
        let mut pairs = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.starts_with("#version") || line.trim().is_empty() {
                continue;
            }
            if pairs.len() == MAX_MERGES {
                break;
            }
            let mut it = line.split(' ');
            match (it.next(), it.next(), it.next()) {
                (Some(a), Some(b), None) => pairs.push((a.to_string(), b.to_string())),
                _ => {
                    return Err(Error::Format {
                        path: merges.display().to_string(),
                        msg: format!("line {}: expected two symbols, got '{line}'", n + 1),
                    })
                }
            }
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab_map.into_iter().collect::<Vocab>(), pairs)
            .unk_token(EOS.into())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .fuse_unk(false)
            .build()
            .map_err(|e| tok_err(merges, e))?;
        let mut inner = Tokenizer::new(bpe);
        let ws = Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
            .map_err(|e| tok_err(vocab, e))?;
        inner
            .with_normalizer(Some(NormSeq::new(vec![
                NFC.into(),
                ws.into(),
                Lowercase.into(),
            ])))
            .map_err(|e| tok_err(vocab, e))?;
        let split = Split::new(
            SplitPattern::Regex(SPLIT.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| tok_err(vocab, e))?;
        inner.with_pre_tokenizer(Some(PreSeq::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        inner.with_decoder(Some(ByteLevel::default()));
        let id = |t: &str| {
            inner.token_to_id(t).ok_or_else(|| Error::Format {
                path: vocab.display().to_string(),
                msg: format!("vocabulary has no '{t}' token"),
            })
        };
        let (bos, eos) = (id(BOS)?, id(EOS)?);
        inner.with_post_processor(Some(
            RobertaProcessing::new((EOS.into(), eos), (BOS.into(), bos))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
        inner
            .add_special_tokens([AddedToken::from(BOS, true), AddedToken::from(EOS, true)])
            .map_err(|e| tok_err(vocab, e))?;
        ClipTokenizer::finish(inner, context, vocab)
    }

    fn finish(mut inner: Tokenizer, context: usize, path: &Path) -> Result<ClipTokenizer> {
        if context < 2 {
            return Err(Error::invalid(format!(
                "context length {context} leaves no room for <|startoftext|> and <|endoftext|>"
            )));
        }
        let id = |t: &str| {
            inner.token_to_id(t).ok_or_else(|| Error::Format {
                path: path.display().to_string(),
                msg: format!("tokenizer has no '{t}' token; is this a CLIP tokenizer?"),
            })
        };
        let (bos, eos) = (id(BOS)?, id(EOS)?);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: context,
                ..Default::default()
            }))
            .map_err(|e| tok_err(path, e))?;
        // Padding is the model's business (to the longest text of a batch).
        inner.with_padding(None);
        Ok(ClipTokenizer {
            inner,
            context,
            bos,
            eos,
        })
    }

    /// Token ids of `text`: `<|startoftext|>`, the text's tokens, `<|endoftext|>`, truncated
    /// to the context length with `<|endoftext|>` kept last. An empty text gives the two
    /// special tokens alone (transformers allows it; the CLI refuses empty prompts).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_checked(text)?.0)
    }

    /// [`Self::encode`], also saying whether the text was truncated to fit the context.
    pub fn encode_checked(&self, text: &str) -> Result<(Vec<u32>, bool)> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::invalid(format!("cannot tokenize {text:?}: {e}")))?;
        Ok((enc.get_ids().to_vec(), !enc.get_overflowing().is_empty()))
    }

    /// [`Self::encode`] for every text.
    pub fn encode_all(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        texts.iter().map(|t| self.encode(t)).collect()
    }

    /// The id of `<|startoftext|>`.
    pub fn bos_id(&self) -> u32 {
        self.bos
    }
    /// The id of `<|endoftext|>`, also used for padding (transformers' `pad_token`).
    pub fn eos_id(&self) -> u32 {
        self.eos
    }
    /// Longest id sequence [`Self::encode`] returns.
    pub fn context_length(&self) -> usize {
        self.context
    }
    /// Entries in the vocabulary, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    /// Turns ids back into text (special tokens dropped, `</w>` as spaces).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let s = self
            .inner
            .decode(ids, true)
            .map_err(|e| Error::invalid(format!("cannot decode ids: {e}")))?;
        Ok(s.replace("</w>", " ").trim().to_string())
    }
}
