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

/// The bytes of a PNG whose header claims `width`×`height` RGB pixels but whose data is a
/// few bytes: a decompression bomb's header, for checking that the size is refused before
/// any pixel buffer is allocated.
pub fn png_header_only(width: u32, height: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend(kind);
        out.extend(data);
        let crc = crc32(&out[start..]);
        out.extend(crc.to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter method, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    // zlib stream of a single empty stored block.
    chunk(
        &mut out,
        b"IDAT",
        &[
            0x78, 0x01, 0x01, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x01,
        ],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}
