//! Prompt syntax of the VQGAN+CLIP tools: `text[:weight[:stop]]`, several joined by `|`.

use crate::{Error, Result};

/// One weighted prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// The text (or, for image prompts, the path).
    pub text: String,
    /// Loss weight; negative pushes the image away from the prompt.
    pub weight: f32,
    /// Distances below this stop contributing gradient (`-inf`: never).
    pub stop: f32,
}

fn number(s: &str) -> Option<f32> {
    let t = s.trim();
    match t {
        "-inf" => Some(f32::NEG_INFINITY),
        "inf" => Some(f32::INFINITY),
        _ => t.parse::<f32>().ok().filter(|v| v.is_finite()),
    }
}

impl Prompt {
    /// Parses `text`, `text:weight` or `text:weight:stop`. Trailing fields count only when
    /// they are numbers, so a text that contains a colon ("a photo: sunset") stays whole.
    pub fn parse(s: &str) -> Result<Prompt> {
        let mut parts: Vec<&str> = s.rsplitn(3, ':').collect();
        parts.reverse();
        let (text, weight, stop) = match parts.as_slice() {
            [t, w, st] if number(w).is_some() && number(st).is_some() => {
                (t.to_string(), number(w), number(st))
            }
            [t, w, st] if number(st).is_some() => (format!("{t}:{w}"), number(st), None),
            [t, w] if number(w).is_some() => (t.to_string(), number(w), None),
            _ => (s.to_string(), None, None),
        };
        let text = text.trim().to_string();
        if text.is_empty() {
            return Err(Error::invalid(format!(
                "empty prompt in '{s}': write some text before the ':weight:stop' fields"
            )));
        }
        let weight = weight.unwrap_or(1.0);
        if !weight.is_finite() {
            return Err(Error::invalid(format!(
                "prompt '{s}': the weight must be a finite number"
            )));
        }
        if weight == 0.0 {
            return Err(Error::invalid(format!(
                "prompt '{s}': a weight of 0 has no effect"
            )));
        }
        Ok(Prompt {
            text,
            weight,
            stop: stop.unwrap_or(f32::NEG_INFINITY),
        })
    }

    /// Parses several prompts separated by `|`.
    pub fn parse_list(s: &str) -> Result<Vec<Prompt>> {
        if s.trim().is_empty() {
            return Err(Error::invalid(
                "empty prompt: say what the image should show",
            ));
        }
        s.split('|').map(Prompt::parse).collect()
    }
}

/// Parses a noise prompt, `SEED[:weight]` (a random CLIP embedding to aim for), as
/// `vqclip generate --noise-prompt` reads it.
pub fn parse_noise(s: &str) -> Result<(u64, f32)> {
    let (seed, weight) = match s.split_once(':') {
        Some((seed, w)) => (
            seed,
            w.parse::<f32>()
                .map_err(|_| Error::invalid(format!("--noise-prompt '{s}': bad weight")))?,
        ),
        None => (s, 1.0),
    };
    let seed = seed
        .parse()
        .map_err(|_| Error::invalid(format!("--noise-prompt '{s}': the seed must be a number")))?;
    Ok((seed, weight))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_weights_stops_and_lists() {
        let p = Prompt::parse("a red circle").unwrap();
        assert_eq!(
            (p.text.as_str(), p.weight, p.stop),
            ("a red circle", 1.0, f32::NEG_INFINITY)
        );
        let p = Prompt::parse("a red circle:2.5").unwrap();
        assert_eq!((p.text.as_str(), p.weight), ("a red circle", 2.5));
        let p = Prompt::parse("blurry:-1:0.5").unwrap();
        assert_eq!((p.text.as_str(), p.weight, p.stop), ("blurry", -1.0, 0.5));
        let p = Prompt::parse("a photo: sunset").unwrap();
        assert_eq!((p.text.as_str(), p.weight), ("a photo: sunset", 1.0));
        // Numeric trailing fields are always weight and stop, as in the reference tools.
        let p = Prompt::parse("time: 12:30:2").unwrap();
        assert_eq!((p.text.as_str(), p.weight, p.stop), ("time: 12", 30.0, 2.0));
        let l = Prompt::parse_list("a cat:1 | a dog:-0.5").unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!((l[1].text.as_str(), l[1].weight), ("a dog", -0.5));
    }

    #[test]
    fn refuses_empty_and_zero_weight() {
        assert!(Prompt::parse_list("")
            .unwrap_err()
            .to_string()
            .contains("empty prompt"));
        assert!(Prompt::parse_list("  ").is_err());
        assert!(Prompt::parse(":2")
            .unwrap_err()
            .to_string()
            .contains("empty prompt"));
        assert!(Prompt::parse_list("a cat||a dog").is_err());
        assert!(Prompt::parse("a cat:0")
            .unwrap_err()
            .to_string()
            .contains("weight of 0"));
    }
}
