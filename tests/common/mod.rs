//! Helpers shared by the CLI integration tests: run the `vqclip` binary as a user would and
//! check its exit status and messages. (Each test crate uses only some of them.)
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs the `vqclip` binary with `args`, without the `VQCLIP_CLIP` / `VQCLIP_VQGAN`
/// defaults of the calling environment, so a test sees exactly the models it names.
pub fn vqclip(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vqclip"))
        .args(args)
        .env_remove("VQCLIP_CLIP")
        .env_remove("VQCLIP_VQGAN")
        .output()
        .expect("run vqclip")
}

/// Runs `vqclip args` and asserts that it succeeded, showing its stderr if not.
pub fn ok(args: &[&str]) -> Output {
    let out = vqclip(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `vqclip args` and asserts that it failed with `want` in its stderr and no panic.
pub fn fails(args: &[&str], want: &str) {
    let out = vqclip(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(err.contains(want), "{args:?}: expected {want:?} in: {err}");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
}

/// A path as a command-line argument (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}
