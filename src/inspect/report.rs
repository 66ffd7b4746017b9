//! `report.html`: one self-contained page (pictures inline as base64 `data:` URIs, no script,
//! no external style) showing the pictures and the numbers of `summary.json`.

use super::folder::Picture;
use super::summary::{LayerStats, Lens, Summary};
use std::fmt::Write;

/// Standard base64 (RFC 4648, with padding) of `bytes`.
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `s` with HTML's special characters escaped.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em;max-width:80em;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 6px;\
text-align:right;font-size:90%}th{background:#f3f3f3}figure{display:inline-block;margin:0 1em 1em 0;\
vertical-align:top}figcaption{max-width:32em;font-size:90%}img{image-rendering:pixelated}\
code{background:#f3f3f3;padding:0 3px}";

/// The page.
pub fn html(title: &str, s: &Summary, pictures: &[Picture]) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\
         <style>{STYLE}</style></head><body>\n<h1>{}</h1>\n",
        escape(title),
        escape(title)
    );
    let m = &s.model;
    let _ = writeln!(
        h,
        "<p>Text tower: {} layers, {} heads, width {}. Vision tower: {} layers, {} heads, \
         width {}, {}px images in {}px patches. Embeddings of {} values. Tensors: \
         <code>tensors.safetensors</code>; numbers: <code>summary.json</code>.</p>",
        m.text.layers,
        m.text.heads,
        m.text.hidden,
        m.vision.layers,
        m.vision.heads,
        m.vision.hidden,
        m.image_size,
        m.patch_size,
        m.projection_dim
    );
    for (k, im) in s.images.iter().enumerate() {
        let _ = writeln!(h, "<h2>Image {k}: {}</h2>", escape(&im.source));
        figures(&mut h, pictures, &format!("image{k}_"));
        layers_table(
            &mut h,
            &im.hidden_states,
            &im.attention_entropy,
            &im.logit_lens,
        );
    }
    for (k, t) in s.texts.iter().enumerate() {
        let _ = writeln!(h, "<h2>Text {k}: {}</h2>", escape(&format!("{:?}", t.text)));
        let _ = write!(h, "<p>Tokens (the pooled one in bold): ");
        for (i, tok) in t.tokens.iter().enumerate() {
            let tok = escape(tok);
            if i == t.pooled_position {
                let _ = write!(h, "<b><code>{i}:{tok}</code></b> ");
            } else {
                let _ = write!(h, "<code>{i}:{tok}</code> ");
            }
        }
        let _ = writeln!(h, "</p>");
        figures(&mut h, pictures, &format!("text{k}_"));
        layers_table(
            &mut h,
            &t.hidden_states,
            &t.attention_entropy,
            &t.logit_lens,
        );
    }
    h.push_str(
        "<h2>How to read this</h2><p><b>Rollout</b> (Abnar &amp; Zuidema 2020): the product \
         over layers of the head-averaged attention mixed half-and-half with the identity (the \
         residual stream); the class token's row. <b>Relevance</b> (Chefer et al. 2021): from \
         the identity, each layer adds the head mean of (gradient &#215; attention)<sup>+</sup> \
         times the relevance so far; the gradient is that of the image-text cosine, taken on \
         vqclip's tape. <b>Entropy</b>: per head, the mean over queries of the attention \
         entropy in nats. <b>Logit lens</b>: each layer's pooled state (class token or \
         end-of-text token) through the tower's final layer norm and projection, as cosine \
         with each other input's final embedding.</p>\n</body></html>\n",
    );
    h
}

fn figures(h: &mut String, pictures: &[Picture], prefix: &str) {
    for p in pictures.iter().filter(|p| p.name.starts_with(prefix)) {
        let _ = writeln!(
            h,
            "<figure><img alt=\"{}\" src=\"data:image/png;base64,{}\"><figcaption>{}</figcaption></figure>",
            escape(&p.name),
            base64(&p.png),
            escape(&p.caption)
        );
    }
}

/// One row per hidden state: statistics, the entropy of the attention that follows it,
/// and the lens.
fn layers_table(h: &mut String, stats: &[LayerStats], entropy: &[Vec<f32>], lens: &[Lens]) {
    let others: Vec<&str> = lens
        .first()
        .map(|l| l.cosine.iter().map(|a| a.input.as_str()).collect())
        .unwrap_or_default();
    let _ = write!(
        h,
        "<table><tr><th>l</th><th>mean</th><th>std</th><th>max |x|</th><th>top channels</th>\
         <th>entropy per head of attentions.l (which reads this state)</th>"
    );
    for o in &others {
        let _ = write!(h, "<th>lens cos {}</th>", escape(o));
    }
    let _ = writeln!(h, "</tr>");
    for (i, s) in stats.iter().enumerate() {
        let top: Vec<String> = s
            .top_channels
            .iter()
            .map(|c| format!("{} ({:.3})", c.channel, c.max_abs))
            .collect();
        let ent = entropy
            .get(i)
            .map(|e| {
                e.iter()
                    .map(|x| format!("{x:.3}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td><td>{}</td><td>{}</td>",
            s.layer,
            s.mean,
            s.std,
            s.max_abs,
            top.join(", "),
            ent
        );
        if let Some(l) = lens.get(i) {
            for a in &l.cosine {
                let _ = write!(h, "<td>{:+.4}</td>", a.cosine);
            }
        }
        let _ = writeln!(h, "</tr>");
    }
    let _ = writeln!(h, "</table>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), enc);
        }
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn escape_handles_markup() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
