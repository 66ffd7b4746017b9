//! A [`TensorSource`] over a memory-mapped `.safetensors` file (the Hugging Face format).
//!
//! The header is parsed and checked once at open: every tensor's byte range must match its
//! dtype and shape, ranges must tile the data section, and the data section must end exactly
//! at the end of the file. A file whose header lies about sizes, or that was cut short,
//! fails there with a message that names the file, instead of reading out of bounds later.
//! Tensor bytes are read from the mapping only when a tensor is requested.

use super::TensorSource;
use crate::{Error, Result};
use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors, TensorInfo};
use std::collections::BTreeMap;
use std::path::Path;

/// The bytes of a safetensors file: mapped from disk, or already in memory.
enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: String,
    mmap: Bytes,
    /// Offset of the data section (8 + header length).
    data_start: usize,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: std::collections::HashMap<String, String>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SafetensorsFile({}, {} tensors)",
            self.path,
            self.tensors.len()
        )
    }
}

fn format_err(path: &str, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_string(),
        msg: msg.into(),
    }
}

impl SafetensorsFile {
    /// Maps `path` and validates its header.
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile> {
        let p = path.as_ref();
        let path = p.display().to_string();
        let file = std::fs::File::open(p).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let len = file
            .metadata()
            .map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?
            .len();
        if len < 8 {
            return Err(format_err(
                &path,
                format!("{len} bytes is too short for a safetensors file (truncated or empty?)"),
            ));
        }
        // SAFETY: the mapping is read-only and private to this process; the file is not
        // expected to change while it is mapped (a model file being rewritten underneath a
        // running process is outside what any checkpoint reader can defend against).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        Self::validate(path, Bytes::Mapped(mmap))
    }

    /// Reads a safetensors file held in memory; `name` stands for its path in messages. This
    /// is [`SafetensorsFile::open`] without the file (the fuzz target uses it).
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<SafetensorsFile> {
        if bytes.len() < 8 {
            return Err(format_err(
                name,
                format!(
                    "{} bytes is too short for a safetensors file (truncated or empty?)",
                    bytes.len()
                ),
            ));
        }
        Self::validate(name.to_string(), Bytes::Owned(bytes))
    }

    fn validate(path: String, mmap: Bytes) -> Result<SafetensorsFile> {
        let (header_len, meta) =
            SafeTensors::read_metadata(&mmap).map_err(|e| describe(&path, &mmap, e))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let tensors = meta
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, v.clone()))
            .collect();
        Ok(SafetensorsFile {
            path,
            mmap,
            data_start: 8 + header_len,
            tensors,
            metadata,
        })
    }

    /// The header's `__metadata__` strings (empty when it has none).
    pub fn metadata(&self) -> std::collections::HashMap<String, String> {
        self.metadata.clone()
    }

    /// The stored dtype of `key`.
    pub fn dtype(&self, key: &str) -> Option<Dtype> {
        self.tensors.get(key).map(|t| t.dtype)
    }

    fn info(&self, key: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(key)
            .ok_or_else(|| format_err(&self.path, format!("missing tensor '{key}'")))
    }
}

/// Turns a safetensors parse error into a sentence about the file.
fn describe(path: &str, buf: &[u8], e: SafeTensorError) -> Error {
    let header_len = buf
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        .unwrap_or(0);
    let msg = match e {
        SafeTensorError::MetadataIncompleteBuffer => {
            // The header parsed and its offsets are consistent, but the data section they
            // describe does not end where the file ends.
            let have = buf.len() as u64 - 8 - header_len;
            let declared = buf
                .get(8..8 + header_len as usize)
                .and_then(|h| serde_json::from_slice::<serde_json::Value>(h).ok())
                .and_then(|v| {
                    v.as_object()?
                        .values()
                        .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
                        .max()
                })
                .unwrap_or(0);
            format!(
                "the header describes {declared} bytes of tensor data but {have} bytes follow \
                 it: the file is truncated or the header lies about sizes"
            )
        }
        SafeTensorError::InvalidHeaderLength => format!(
            "the header length field says {header_len} bytes but the file has only {} bytes \
             after it (truncated or not a safetensors file)",
            buf.len().saturating_sub(8)
        ),
        SafeTensorError::HeaderTooLarge => {
            format!("header length {header_len} is implausibly large (not a safetensors file?)")
        }
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's byte range does not match its dtype and shape (the header lies about \
             sizes)"
                .to_string()
        }
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor '{name}' has data offsets that overlap or leave gaps (corrupt header)")
        }
        SafeTensorError::InvalidHeader(_) | SafeTensorError::InvalidHeaderDeserialization(_) => {
            format!("the header is not valid JSON ({e}); not a safetensors file or corrupt")
        }
        other => format!("not a valid safetensors file: {other}"),
    };
    format_err(path, msg)
}

impl TensorSource for SafetensorsFile {
    fn path(&self) -> &str {
        &self.path
    }

    fn keys(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.tensors.get(key).map(|t| t.shape.clone())
    }

    fn read_f32(&self, key: &str) -> Result<Vec<f32>> {
        let info = self.info(key)?;
        let (s, e) = info.data_offsets;
        // Offsets were validated against the file length at open.
        let bytes = &self.mmap[self.data_start + s..self.data_start + e];
        Ok(match info.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F64 => bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            other => {
                return Err(format_err(
                    &self.path,
                    format!(
                        "tensor '{key}' is stored as {other:?}; only F32, F16, BF16 and F64 \
                         tensors can be read as weights"
                    ),
                ))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a safetensors file by hand: header JSON + data, so that tests can also write
    /// files that lie.
    fn build(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn reads_every_float_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let vals = [1.5f32, -2.25, 0.0, 3.0e-3];
        let mut data = Vec::new();
        for v in vals {
            data.extend(v.to_le_bytes());
        }
        for v in vals {
            data.extend(half::f16::from_f32(v).to_le_bytes());
        }
        for v in vals {
            data.extend(half::bf16::from_f32(v).to_le_bytes());
        }
        for v in vals {
            data.extend((v as f64).to_le_bytes());
        }
        data.extend(7i64.to_le_bytes());
        let header = r#"{"__metadata__":{"format":"pt"},
            "a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},
            "b":{"dtype":"F16","shape":[4],"data_offsets":[16,24]},
            "c":{"dtype":"BF16","shape":[4,1],"data_offsets":[24,32]},
            "d":{"dtype":"F64","shape":[4],"data_offsets":[32,64]},
            "ids":{"dtype":"I64","shape":[1],"data_offsets":[64,72]}}"#;
        let p = write(dir.path(), "ok.safetensors", &build(header, &data));
        let f = SafetensorsFile::open(&p).unwrap();
        assert_eq!(f.keys(), vec!["a", "b", "c", "d", "ids"]);
        assert_eq!(f.shape("a"), Some(vec![2, 2]));
        assert_eq!(f.shape("c"), Some(vec![4, 1]));
        assert_eq!(f.read_f32("a").unwrap(), vals);
        assert_eq!(f.read_f32("d").unwrap(), vals);
        // f16 / bf16 round to their own precision: compare with the rounded values.
        let f16: Vec<f32> = vals
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect();
        let bf16: Vec<f32> = vals
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        assert_eq!(f.read_f32("b").unwrap(), f16);
        assert_eq!(f.read_f32("c").unwrap(), bf16);
        let e = f.read_f32("ids").unwrap_err().to_string();
        assert!(e.contains("'ids'") && e.contains("I64"), "{e}");
        let e = f.read_f32("nope").unwrap_err().to_string();
        assert!(e.contains("missing tensor 'nope'"), "{e}");
    }

    #[test]
    fn hostile_headers_are_refused_before_anything_is_allocated() {
        let huge = r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,0]}}"#;
        let overlap = r#"{"a":{"dtype":"F32","shape":[6],"data_offsets":[0,24]},"b":{"dtype":"F32","shape":[6],"data_offsets":[0,24]}}"#;
        let dtype = r#"{"w":{"dtype":"F9","shape":[6],"data_offsets":[0,24]}}"#;
        let neg = r#"{"w":{"dtype":"F32","shape":[-6],"data_offsets":[0,24]}}"#;
        // Nested where serde has to skip it (an unknown field) or refuse it at the top.
        let deep = format!(
            r#"{{"w":{{"dtype":"F32","shape":[6],"data_offsets":[0,24],"x":{}{}}}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let deep_top = "[".repeat(100_000) + &"]".repeat(100_000);
        let mut max_len = build("{}", &[]);
        max_len[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (build(huge, &[]), "overflow"),
            (build(overlap, &[0; 24]), "overlap"),
            (build(dtype, &[0; 24]), "not valid JSON"),
            (build(neg, &[0; 24]), "not valid JSON"),
            (build(&deep, &[0; 24]), "not valid JSON"),
            (build(&deep_top, &[]), "not valid JSON"),
            (max_len, "implausibly large"),
        ];
        for (bytes, want) in cases {
            let e = SafetensorsFile::from_bytes("hostile.safetensors", bytes)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("hostile.safetensors") && e.contains(want),
                "{want}: {e}"
            );
        }
    }

    #[test]
    fn corrupt_files_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let good_header = r#"{"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#;
        let data = [0u8; 24];
        let good = build(good_header, &data);
        assert!(SafetensorsFile::open(write(dir.path(), "good.safetensors", &good)).is_ok());

        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            // Cut short: the last tensor's bytes are missing.
            (
                "truncated.safetensors",
                good[..good.len() - 5].to_vec(),
                "truncated",
            ),
            // Header claims a bigger shape than its byte range.
            (
                "lying_shape.safetensors",
                build(
                    r#"{"w":{"dtype":"F32","shape":[4,3],"data_offsets":[0,24]}}"#,
                    &data,
                ),
                "lies about sizes",
            ),
            // Header claims more bytes than the file has.
            (
                "lying_offsets.safetensors",
                build(
                    r#"{"w":{"dtype":"F32","shape":[2,6],"data_offsets":[0,48]}}"#,
                    &data,
                ),
                "truncated or the header lies",
            ),
            // Header length field points past the end of the file.
            (
                "bad_len.safetensors",
                {
                    let mut b = good.clone();
                    b[..8].copy_from_slice(&10_000u64.to_le_bytes());
                    b
                },
                "header length field",
            ),
            ("tiny.safetensors", vec![1, 2, 3], "too short"),
            (
                "not_json.safetensors",
                build("this is not json", &[]),
                "not valid JSON",
            ),
        ];
        for (name, bytes, want) in cases {
            let p = write(dir.path(), name, &bytes);
            let e = SafetensorsFile::open(&p).unwrap_err().to_string();
            assert!(
                e.contains(name),
                "{name}: error does not name the file: {e}"
            );
            assert!(e.contains(want), "{name}: expected '{want}' in: {e}");
        }
        let e = SafetensorsFile::open(dir.path().join("absent.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent.safetensors"), "{e}");
    }

    #[test]
    fn loader_reports_key_and_both_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let header = r#"{"enc.w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#;
        let p = write(dir.path(), "m.safetensors", &build(header, &[0u8; 24]));
        let f = SafetensorsFile::open(&p).unwrap();
        let gpu = crate::ops::testutil::gpu();
        let l = crate::weights::Loader::new(&f, &gpu).sub("enc");
        let e = l.tensor("w", &[3, 2]).err().unwrap().to_string();
        assert!(
            e.contains("enc.w") && e.contains("[2, 3]") && e.contains("[3, 2]"),
            "{e}"
        );
        assert!(l.tensor("w", &[2, 3]).is_ok());
    }
}
