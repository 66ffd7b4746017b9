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

/// A trailing field that reads as a number. Non-finite spellings (`nan`, `inf`, `1e309`,
/// which overflows to infinity) count as numbers here so that [`Prompt::parse`] refuses
/// them rather than silently keeping them as part of the text.
fn number(s: &str) -> Option<f32> {
    s.trim().parse::<f32>().ok()
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
        let p = Prompt {
            text,
            weight: weight.unwrap_or(1.0),
            stop: stop.unwrap_or(f32::NEG_INFINITY),
        };
        match p.problem() {
            Some(e) => Err(Error::invalid(format!("prompt '{s}': {e}"))),
            None => Ok(p),
        }
    }

    /// Checks the weight (finite and not 0) and the stop (finite, or `-inf` for none).
    pub fn check(&self) -> Result<()> {
        match self.problem() {
            Some(e) => Err(Error::invalid(format!("prompt '{}': {e}", self.text))),
            None => Ok(()),
        }
    }

    fn problem(&self) -> Option<String> {
        if let Some(e) = weight_problem(self.weight) {
            return Some(e);
        }
        if self.stop.is_nan() || self.stop == f32::INFINITY {
            return Some(format!(
                "the stop must be a finite number (or -inf for none), got {}",
                self.stop
            ));
        }
        None
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

/// What is wrong with a prompt weight, if anything: it must be finite (NaN or infinity
/// makes the loss NaN) and not 0 (no effect).
pub fn weight_problem(weight: f32) -> Option<String> {
    if !weight.is_finite() {
        return Some(format!("the weight must be a finite number, got {weight}"));
    }
    if weight == 0.0 {
        return Some("a weight of 0 has no effect".into());
    }
    None
}

/// Parses a noise prompt, `SEED[:weight]` (a random CLIP embedding to aim for), as
/// `vqclip generate --noise-prompt` reads it; the weight must pass [`weight_problem`].
pub fn parse_noise(s: &str) -> Result<(u64, f32)> {
    let (seed, weight) = match s.split_once(':') {
        Some((seed, w)) => (
            seed,
            w.parse::<f32>()
                .map_err(|_| Error::invalid(format!("--noise-prompt '{s}': bad weight")))?,
        ),
        None => (s, 1.0),
    };
    if let Some(e) = weight_problem(weight) {
        return Err(Error::invalid(format!("--noise-prompt '{s}': {e}")));
    }
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

    #[test]
    fn refuses_non_finite_weights_and_stops() {
        // "1e309" overflows f32 to infinity; none of these may reach the loss.
        for bad in [
            "x:nan", "x:1e309", "x:inf", "x:-inf", "x:NaN", "x:1:nan", "x:1:inf",
        ] {
            let e = Prompt::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("finite"), "{bad}: {e}");
        }
        assert!(Prompt::parse_list("a cat | x:nan").is_err());
        // -inf stays the explicit "no stop".
        let p = Prompt::parse("x:1:-inf").unwrap();
        assert_eq!((p.weight, p.stop), (1.0, f32::NEG_INFINITY));
        let direct = Prompt {
            text: "x".into(),
            weight: f32::NAN,
            stop: 0.0,
        };
        assert!(direct.check().is_err());
    }
}
