//! Building a byte-level BPE vocabulary (CLIP's `vocab.json` and `merges.txt`) for a closed
//! set of words, such as the caption grammar of the shapes world, which
//! [`super::ClipTokenizer`] then reads like any other.

use super::tokenizer::{BOS, EOS};

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

/// Tokenizer files `(vocab.json, merges.txt)` in the format of openai/clip-vit-base-patch32's
/// for a closed set of `words`: the 256 byte characters, the same with `</w>`, one token per
/// merge, then `<|startoftext|>` and `<|endoftext|>` (the highest id). The merges spell every
/// word of `words` as a single token; any other text still tokenises into byte-level pieces.
pub fn word_vocab_files(words: &[String]) -> (String, String) {
    let bytes = bytes_to_unicode();
    let mut vocab: Vec<String> = bytes.iter().map(|(_, c)| c.to_string()).collect();
    vocab.extend(bytes.iter().map(|(_, c)| format!("{c}</w>")));
    let mut ranks = std::collections::HashMap::new();
    let mut merges: Vec<(String, String)> = Vec::new();
    for word in words {
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
