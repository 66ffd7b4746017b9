//! Value parsers shared by every subcommand's numeric options, so that each option declares
//! its valid range once (`#[arg(value_parser = values::positive_f32)]`) and a bad value is
//! refused by clap, naming the option and the value, before any file is read or device opened.
//!
//! Rust's float parser accepts `nan`, `inf` and overflowing literals such as `1e309` (which
//! become infinity); none of these is a usable learning rate, weight or probability.

/// A finite number: not NaN, not infinite (`1e309` overflows to infinity and is refused too).
fn finite<T>(s: &str) -> Result<T, String>
where
    T: std::str::FromStr + Copy + Into<f64>,
{
    let v: T = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number"))?;
    if !v.into().is_finite() {
        return Err(format!("'{s}' is not a finite number"));
    }
    Ok(v)
}

/// Any finite f32.
#[allow(dead_code)] // kept beside its siblings for options without a range of their own
pub fn finite_f32(s: &str) -> Result<f32, String> {
    finite(s)
}

/// A finite f32 greater than 0 (learning rates, exponents).
pub fn positive_f32(s: &str) -> Result<f32, String> {
    let v: f32 = finite(s)?;
    if v <= 0.0 {
        return Err(format!("must be greater than 0, got {s}"));
    }
    Ok(v)
}

/// A finite f32 of at least 0 (loss weights, noise amplitudes).
pub fn non_negative_f32(s: &str) -> Result<f32, String> {
    let v: f32 = finite(s)?;
    if v < 0.0 {
        return Err(format!("must be 0 or more, got {s}"));
    }
    Ok(v)
}

/// A probability: a finite f32 in [0, 1].
pub fn unit_interval(s: &str) -> Result<f32, String> {
    let v: f32 = finite(s)?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("must be between 0 and 1, got {s}"));
    }
    Ok(v)
}

/// Longest time a `--seconds` or `--time-limit` option may ask for: a week. Beyond that the
/// value is a typo, and a run that long should be split into resumed runs anyway.
pub const MAX_SECONDS: f64 = 7.0 * 24.0 * 3600.0;

/// A duration in seconds: finite, greater than 0 and at most [`MAX_SECONDS`].
pub fn seconds(s: &str) -> Result<f64, String> {
    let v: f64 = finite(s)?;
    if v <= 0.0 {
        return Err(format!("must be a positive number of seconds, got {s}"));
    }
    if v > MAX_SECONDS {
        return Err(format!(
            "{s} seconds is more than a week ({MAX_SECONDS} s), the most allowed"
        ));
    }
    Ok(v)
}

/// Most images one batch may hold (training, evaluation, indexing): every image of a batch
/// is on the GPU at once with its activations, and past this no device has the memory.
pub const MAX_BATCH: usize = 4096;
/// Most held-out images an `eval` may score: each is rendered and scored, so the run's time
/// grows with it, and a few thousand already give percentages to a fraction of a point.
pub const MAX_EVAL_IMAGES: usize = 100_000;

/// Refuses `value` of option `name` above `max`, saying why the cap exists.
pub fn at_most(name: &str, value: usize, max: usize, why: &str) -> anyhow::Result<()> {
    if value > max {
        anyhow::bail!("{name} {value} is more than the {max} allowed ({why})");
    }
    Ok(())
}

/// A count of at least 1.
pub fn at_least_one(s: &str) -> Result<usize, String> {
    let v: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number"))?;
    if v == 0 {
        return Err("must be at least 1".into());
    }
    Ok(v)
}

/// A byte count: a whole number with an optional unit, `B`, `KiB`/`K`, `MiB`/`M`, `GiB`/`G`
/// or `TiB`/`T` (binary multiples; a trailing `B` or `iB` is optional), e.g. `512MiB`, `8G`.
pub fn byte_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        u => {
            return Err(format!(
                "unknown unit '{u}' in '{s}': use B, KiB, MiB, GiB or TiB"
            ))
        }
    };
    let v: f64 = finite(num).map_err(|_| format!("'{s}' is not a size such as 512MiB or 8GiB"))?;
    let bytes = v * (1u64 << shift) as f64;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("'{s}' is not a size between 1 byte and 16 EiB"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_and_out_of_range_values_are_refused() {
        for bad in ["nan", "NaN", "inf", "-inf", "1e309", "x", ""] {
            assert!(finite_f32(bad).is_err(), "{bad}");
            assert!(positive_f32(bad).is_err(), "{bad}");
            assert!(unit_interval(bad).is_err(), "{bad}");
            assert!(seconds(bad).is_err(), "{bad}");
        }
        assert_eq!(finite_f32("-2.5"), Ok(-2.5));
        assert!(positive_f32("0").is_err());
        assert!(positive_f32("-1").is_err());
        assert_eq!(positive_f32("0.01"), Ok(0.01));
        assert!(non_negative_f32("-0.1").is_err());
        assert_eq!(non_negative_f32("0"), Ok(0.0));
        assert!(unit_interval("1.5").is_err());
        assert_eq!(unit_interval("1"), Ok(1.0));
        assert!(seconds("1e9").unwrap_err().contains("more than a week"));
        assert!(at_least_one("0").is_err());
        assert_eq!(at_least_one("3"), Ok(3));
    }

    #[test]
    fn byte_sizes_parse_with_binary_units() {
        assert_eq!(byte_size("64MiB"), Ok(64 << 20));
        assert_eq!(byte_size("64M"), Ok(64 << 20));
        assert_eq!(byte_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(byte_size("4096"), Ok(4096));
        assert!(byte_size("0").is_err());
        assert!(byte_size("nan").is_err());
        assert!(byte_size("12 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(byte_size("99999999TiB").is_err());
    }
}
