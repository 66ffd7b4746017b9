//! The environment variables that force a kernel path (`VQCLIP_MATMUL`, `VQCLIP_CONV`,
//! `VQCLIP_ATTENTION`, `VQCLIP_ATTENTION_FORWARD`, `VQCLIP_GROUP_NORM`, `VQCLIP_SPLIT_K`,
//! `VQCLIP_F16_ACTIVATIONS`, `VQCLIP_COOP_MATRIX`): the one place that reads them and knows the values each
//! takes, so that a misspelt value is reported instead of silently running the default (a
//! benchmark of `VQCLIP_CONV=implict` would otherwise time the wrong kernel).

use crate::{Error, Result};
use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

/// One override variable: its name, what it chooses, and the values it takes.
pub struct Override {
    /// The variable, e.g. `VQCLIP_CONV`.
    pub var: &'static str,
    /// What it chooses, for messages ("the convolution kernel").
    pub what: &'static str,
    /// Every accepted value.
    pub values: fn() -> Vec<&'static str>,
}

/// `VQCLIP_MATMUL`: a [`super::matmul::Variant`] name.
pub const MATMUL: Override = Override {
    var: "VQCLIP_MATMUL",
    what: "the matmul kernel",
    values: || {
        super::matmul::Variant::ALL
            .iter()
            .map(|v| v.name())
            .collect()
    },
};

/// `VQCLIP_CONV`: a [`super::conv2d::Variant`] name, or `direct`.
pub const CONV: Override = Override {
    var: "VQCLIP_CONV",
    what: "the convolution kernel",
    values: || {
        let mut v: Vec<_> = super::conv2d::Variant::ALL
            .iter()
            .map(|v| v.name())
            .collect();
        v.push("direct");
        v
    },
};

/// `VQCLIP_ATTENTION`: a [`super::attention_backward::Path`] name.
pub const ATTENTION: Override = Override {
    var: "VQCLIP_ATTENTION",
    what: "the attention-with-gradients path",
    values: || {
        super::attention_backward::Path::ALL
            .iter()
            .map(|p| p.name())
            .collect()
    },
};

/// `VQCLIP_ATTENTION_FORWARD`: a [`super::attention_tiled::Forward`] name.
pub const ATTENTION_FORWARD: Override = Override {
    var: "VQCLIP_ATTENTION_FORWARD",
    what: "the attention forward kernel",
    values: || {
        super::attention_tiled::Forward::ALL
            .iter()
            .map(|f| f.name())
            .collect()
    },
};

/// `VQCLIP_GROUP_NORM`: `one` (one dispatch per direction) or `passes`.
pub const GROUP_NORM: Override = Override {
    var: "VQCLIP_GROUP_NORM",
    what: "the group-norm kernels",
    values: || vec!["one", "passes"],
};

/// `VQCLIP_SPLIT_K`: `on` or `off` (see [`super::matmul_split::slices`]).
pub const SPLIT_K: Override = Override {
    var: "VQCLIP_SPLIT_K",
    what: "whether products with few output tiles split K",
    values: || vec!["on", "off"],
};

/// `VQCLIP_F16_ACTIVATIONS`: `on` or `off` (see
/// [`crate::models::clip::encoder::f16_activations_default`]).
pub const F16_ACTIVATIONS: Override = Override {
    var: "VQCLIP_F16_ACTIVATIONS",
    what: "whether --precision f16 inference stores the CLIP encoder's activations in f16",
    values: || vec!["on", "off"],
};

/// `VQCLIP_COOP_MATRIX`: `on` or `off` (see [`super::matmul::coop_default`]): `off` also
/// leaves wgpu's experimental cooperative-matrix feature off the device.
pub const COOP_MATRIX: Override = Override {
    var: "VQCLIP_COOP_MATRIX",
    what: "whether f16 products run on cooperative matrices (tensor cores)",
    values: || vec!["on", "off"],
};

/// Every override variable.
pub const ALL: [Override; 8] = [
    MATMUL,
    CONV,
    ATTENTION,
    ATTENTION_FORWARD,
    GROUP_NORM,
    SPLIT_K,
    F16_ACTIVATIONS,
    COOP_MATRIX,
];

/// What each variable held when first asked, in [`ALL`]'s order: its accepted value, or the
/// message for one it does not take. Read once per process: the choosers ask on every
/// dispatch, and the environment does not change under a running command.
fn readings() -> &'static [std::result::Result<Option<String>, String>] {
    static READINGS: OnceLock<Vec<std::result::Result<Option<String>, String>>> = OnceLock::new();
    READINGS.get_or_init(|| ALL.iter().map(Override::read).collect())
}

impl Override {
    /// The variable's value if it is set to an accepted one; `None` if it is unset or empty.
    /// Any other value is an error naming the variable and the accepted values.
    pub fn checked(&self) -> Result<Option<String>> {
        let at = ALL.iter().position(|o| o.var == self.var);
        match at.map(|i| &readings()[i]) {
            Some(Ok(v)) => Ok(v.clone()),
            Some(Err(msg)) => Err(Error::invalid(msg.clone())),
            // Not one of ALL (none is defined elsewhere): read it now.
            None => self.read().map_err(Error::invalid),
        }
    }

    /// The variable read from the environment now: as [`Override::checked`], the error
    /// being its message.
    fn read(&self) -> std::result::Result<Option<String>, String> {
        match std::env::var(self.var) {
            Ok(raw) => self.check(&raw),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(format!(
                "{} is not valid UTF-8; it chooses {}: one of {}",
                self.var,
                self.what,
                (self.values)().join(", ")
            )),
        }
    }

    /// The value `raw` checked: as [`Override::read`].
    fn check(&self, raw: &str) -> std::result::Result<Option<String>, String> {
        let s = raw.trim();
        if s.is_empty() {
            return Ok(None);
        }
        let values = (self.values)();
        if values.contains(&s) {
            Ok(Some(s.to_string()))
        } else {
            Err(format!(
                "{}={raw:?} is not a value it takes; it chooses {}: one of {} (or unset it)",
                self.var,
                self.what,
                values.join(", ")
            ))
        }
    }

    /// The value for the kernel choosers: as [`Override::checked`], but an unaccepted value
    /// is reported once per process on stderr and then ignored (the choosers cannot fail;
    /// the command line rejects such values up front with [`check_all`]).
    pub fn get(&self) -> Option<String> {
        static WARNED: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
        match self.checked() {
            Ok(v) => v,
            Err(e) => {
                let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
                if warned.get_or_insert_with(HashSet::new).insert(self.var) {
                    eprintln!("warning: {e}; running the default");
                }
                None
            }
        }
    }
}

/// Checks every override variable: the first set to a value it does not take is an error.
pub fn check_all() -> Result<()> {
    for o in &ALL {
        o.checked()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_values_pass_and_others_name_the_choices() {
        assert_eq!(CONV.check("implicit").unwrap().as_deref(), Some("implicit"));
        assert_eq!(CONV.check(" direct ").unwrap().as_deref(), Some("direct"));
        assert_eq!(CONV.check("").unwrap(), None);
        assert_eq!(GROUP_NORM.check("one").unwrap().as_deref(), Some("one"));
        assert_eq!(ATTENTION.check("fused").unwrap().as_deref(), Some("fused"));
        assert_eq!(
            ATTENTION_FORWARD.check("tiled").unwrap().as_deref(),
            Some("tiled")
        );
        let e = ATTENTION_FORWARD.check("flash").unwrap_err().to_string();
        assert!(
            e.contains("VQCLIP_ATTENTION_FORWARD") && e.contains("broadcast"),
            "{e}"
        );
        let e = CONV.check("implict").unwrap_err().to_string();
        assert!(
            e.contains("VQCLIP_CONV") && e.contains("implicit-tiled"),
            "{e}"
        );
        let e = MATMUL.check("fastest").unwrap_err().to_string();
        assert!(e.contains("VQCLIP_MATMUL") && e.contains("tile128"), "{e}");
        assert!(GROUP_NORM.check("One").is_err());
    }

    #[test]
    fn every_variant_name_is_accepted() {
        for v in super::super::matmul::Variant::ALL {
            assert!(MATMUL.check(v.name()).is_ok(), "{}", v.name());
        }
        for v in super::super::conv2d::Variant::ALL {
            assert!(CONV.check(v.name()).is_ok(), "{}", v.name());
        }
    }
}
