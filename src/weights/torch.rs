//! PyTorch zip checkpoints (`torch.save` since 1.6, Lightning `.ckpt`) as a [`TensorSource`].
//!
//! The archive holds `<name>/data.pkl` (the pickled object, read by [`super::pickle`], which
//! never executes anything) and one entry `<name>/data/<key>` per storage. A tensor is a view
//! of a storage (offset, size, stride); views are materialised into row-major f32.

use super::pickle::{self, StorageDType, TensorRef};
use super::TensorSource;
use crate::{Error, Result};
use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;

/// Largest `data.pkl` accepted (a state dict's pickle is a few MB even for big models).
pub const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// Largest ratio of an entry's stated size to its compressed size. Deflate cannot do better
/// than about 1032:1, so an entry that claims more is a decompression bomb (torch stores its
/// entries uncompressed, at 1:1).
pub const MAX_DEFLATE_RATIO: u64 = 1032;

/// What a checkpoint is read from: a file, or bytes already in memory.
trait Archive: Read + std::io::Seek + Send {}
impl<T: Read + std::io::Seek + Send> Archive for T {}

/// An opened PyTorch zip checkpoint.
pub struct TorchCheckpoint {
    path: String,
    zip: Mutex<zip::ZipArchive<Box<dyn Archive>>>,
    prefix: String,
    order: Vec<String>,
    tensors: HashMap<String, TensorRef>,
}

impl std::fmt::Debug for TorchCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TorchCheckpoint({}, {} tensors)",
            self.path,
            self.order.len()
        )
    }
}

fn format_err(path: &str, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_string(),
        msg: msg.into(),
    }
}

impl TorchCheckpoint {
    /// Opens `path`, reads its pickle and checks every tensor's storage entry. The state dict
    /// is `obj["state_dict"]` for Lightning checkpoints, else the top-level dict.
    pub fn open(path: impl AsRef<std::path::Path>) -> Result<TorchCheckpoint> {
        let p = path.as_ref();
        let path = p.display().to_string();
        let file = std::fs::File::open(p).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let mut head = [0u8; 2];
        let legacy = std::fs::File::open(p)
            .and_then(|mut f| f.read_exact(&mut head))
            .is_ok()
            && head[0] == 0x80;
        let reader: Box<dyn Archive> = Box::new(std::io::BufReader::new(file));
        Self::read(path, reader, legacy)
    }

    /// Reads a checkpoint held in memory; `name` stands for its path in messages. This is
    /// [`TorchCheckpoint::open`] without the file (the fuzz target uses it).
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<TorchCheckpoint> {
        let legacy = bytes.first() == Some(&0x80);
        Self::read(
            name.to_string(),
            Box::new(std::io::Cursor::new(bytes)),
            legacy,
        )
    }

    fn read(path: String, reader: Box<dyn Archive>, legacy: bool) -> Result<TorchCheckpoint> {
        let mut zip = zip::ZipArchive::new(reader).map_err(|e| {
            if legacy {
                format_err(
                    &path,
                    "this is a legacy (pre-1.6, non-zip) torch.save file, which is not \
                     supported; re-save it with a recent PyTorch (torch.save(torch.load(f), f))",
                )
            } else {
                format_err(
                    &path,
                    format!(
                        "not a readable PyTorch checkpoint: truncated or corrupt zip archive ({e})"
                    ),
                )
            }
        })?;
        // The pickle is `<archive name>/data.pkl`; the archive name is whatever the file was
        // called when saved ("archive" in recent PyTorch).
        let pkl_name = zip
            .file_names()
            .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .min_by_key(|n| n.len())
            .map(str::to_string)
            .ok_or_else(|| {
                format_err(
                    &path,
                    "zip archive has no <name>/data.pkl: not a PyTorch checkpoint",
                )
            })?;
        let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
        if let Ok(f) = zip.by_name(&format!("{prefix}byteorder")) {
            let mut s = String::new();
            f.take(64)
                .read_to_string(&mut s)
                .map_err(|e| format_err(&path, format!("reading byteorder: {e}")))?;
            if s.trim() != "little" {
                return Err(format_err(
                    &path,
                    format!(
                        "big-endian checkpoints are not supported (byteorder '{}')",
                        s.trim()
                    ),
                ));
            }
        }
        let pkl = {
            let f = zip
                .by_name(&pkl_name)
                .map_err(|e| format_err(&path, format!("{pkl_name}: {e}")))?;
            let size = checked_size(&path, &f)?;
            if size > MAX_PICKLE_BYTES {
                return Err(format_err(
                    &path,
                    format!(
                        "{pkl_name} claims {size} bytes, beyond the limit MAX_PICKLE_BYTES \
                         ({MAX_PICKLE_BYTES}); a state dict's pickle is a few MB"
                    ),
                ));
            }
            read_entry(&path, f, size, size)?
        };
        let root =
            pickle::parse(&pkl).map_err(|e| format_err(&path, format!("{pkl_name}: {e}")))?;
        let entries = pickle::state_dict_tensors(&root).map_err(|e| format_err(&path, e))?;
        let mut order = Vec::with_capacity(entries.len());
        let mut tensors = HashMap::with_capacity(entries.len());
        let mut sizes: HashMap<String, u64> = HashMap::new();
        for (k, t) in entries {
            let entry = format!("{prefix}data/{}", t.storage.key);
            let size = match sizes.get(&entry) {
                Some(&s) => s,
                None => {
                    let f = zip.by_name(&entry).map_err(|_| {
                        format_err(
                            &path,
                            format!("tensor '{k}': storage entry {entry} is missing"),
                        )
                    })?;
                    let s = checked_size(&path, &f)?;
                    sizes.insert(entry.clone(), s);
                    s
                }
            };
            let need = (t.storage.numel as u64).saturating_mul(t.storage.dtype.size() as u64);
            if size < need {
                return Err(format_err(
                    &path,
                    format!("tensor '{k}': storage {entry} has {size} bytes, expected {need}"),
                ));
            }
            if tensors.insert(k.clone(), t).is_none() {
                order.push(k);
            }
        }
        Ok(TorchCheckpoint {
            path,
            zip: Mutex::new(zip),
            prefix,
            order,
            tensors,
        })
    }

    /// The stored element type of `key`.
    pub fn dtype(&self, key: &str) -> Option<StorageDType> {
        self.tensors.get(key).map(|t| t.storage.dtype)
    }

    fn storage_bytes(&self, key: &str, t: &TensorRef) -> Result<Vec<u8>> {
        let entry = format!("{}data/{}", self.prefix, t.storage.key);
        let mut zip = self.zip.lock().unwrap_or_else(|e| e.into_inner());
        let f = zip
            .by_name(&entry)
            .map_err(|e| format_err(&self.path, format!("tensor '{key}': {entry}: {e}")))?;
        let size = checked_size(&self.path, &f)?;
        // open() checked that the storage fits its entry, so this cannot overflow; a view
        // past its storage was refused by the pickle reader.
        let want = t
            .extent()
            .and_then(|e| e.checked_mul(t.storage.dtype.size()))
            .and_then(|w| u64::try_from(w).ok())
            .filter(|&w| w <= size)
            .ok_or_else(|| {
                format_err(
                    &self.path,
                    format!("tensor '{key}': its view runs past {entry} ({size} bytes)"),
                )
            })?;
        read_entry(&self.path, f, size, want)
            .map_err(|e| format_err(&self.path, format!("tensor '{key}': {e}")))
    }
}

/// The size `f` claims, refused if it claims more than deflate can expand its compressed
/// bytes to (a decompression bomb).
fn checked_size(path: &str, f: &zip::read::ZipFile<'_, Box<dyn Archive>>) -> Result<u64> {
    let (size, packed) = (f.size(), f.compressed_size());
    if f.compression() != zip::CompressionMethod::Stored
        && size > packed.saturating_mul(MAX_DEFLATE_RATIO).max(1 << 16)
    {
        return Err(format_err(
            path,
            format!(
                "{} claims {size} bytes from {packed} compressed bytes, more than the limit \
                 MAX_DEFLATE_RATIO ({MAX_DEFLATE_RATIO}:1) allows: a decompression bomb",
                f.name()
            ),
        ));
    }
    Ok(size)
}

/// Reads the first `keep` bytes of entry `f`, which claims `size` bytes, and checks the rest
/// (its length and the archive's CRC) without keeping it, so that memory follows what is
/// used and never what an entry claims.
fn read_entry(
    path: &str,
    mut f: zip::read::ZipFile<'_, Box<dyn Archive>>,
    size: u64,
    keep: u64,
) -> Result<Vec<u8>> {
    let name = f.name().to_string();
    let corrupt =
        |e: std::io::Error| format_err(path, format!("{name}: truncated or corrupt entry ({e})"));
    // Grows with the data actually read, never to a size the entry merely claims.
    let mut buf = Vec::new();
    (&mut f).take(keep).read_to_end(&mut buf).map_err(corrupt)?;
    let rest = std::io::copy(&mut (&mut f).take(size - keep + 1), &mut std::io::sink())
        .map_err(corrupt)?;
    let got = buf.len() as u64 + rest;
    if got != size {
        return Err(format_err(
            path,
            format!("{name} holds {got} bytes but its header says {size}: truncated or corrupt"),
        ));
    }
    Ok(buf)
}

/// Converts `bytes` of `dtype` to f32 values.
fn to_f32(bytes: &[u8], dtype: StorageDType) -> Vec<f32> {
    let n = dtype.size();
    let chunks = bytes.chunks_exact(n);
    match dtype {
        StorageDType::F32 => chunks
            .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
            .collect(),
        StorageDType::F16 => chunks
            .map(|c| half::f16::from_le_bytes(c.try_into().expect("2")).to_f32())
            .collect(),
        StorageDType::BF16 => chunks
            .map(|c| half::bf16::from_le_bytes(c.try_into().expect("2")).to_f32())
            .collect(),
        StorageDType::F64 => chunks
            .map(|c| f64::from_le_bytes(c.try_into().expect("8")) as f32)
            .collect(),
        StorageDType::I64 => chunks
            .map(|c| i64::from_le_bytes(c.try_into().expect("8")) as f32)
            .collect(),
        StorageDType::I32 => chunks
            .map(|c| i32::from_le_bytes(c.try_into().expect("4")) as f32)
            .collect(),
        StorageDType::I16 => chunks
            .map(|c| i16::from_le_bytes(c.try_into().expect("2")) as f32)
            .collect(),
        StorageDType::I8 => chunks.map(|c| c[0] as i8 as f32).collect(),
        StorageDType::U8 | StorageDType::Bool => chunks.map(|c| c[0] as f32).collect(),
    }
}

/// Gathers a strided view of `storage` into row-major order.
pub fn materialise(storage: &[f32], t: &TensorRef) -> Vec<f32> {
    let n = t.numel();
    if t.is_contiguous() {
        return storage[t.offset..t.offset + n].to_vec();
    }
    let rank = t.shape.len();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; rank];
    let mut off = t.offset;
    for _ in 0..n {
        out.push(storage[off]);
        // Odometer increment over the view's index, innermost dim fastest.
        // Wrapping: a stride the view never steps along (a dim of size 1 may have any
        // stride, even usize::MAX) is added and taken back again; every offset read above
        // is exact and inside the storage (the reader checked the view's extent).
        for d in (0..rank).rev() {
            idx[d] += 1;
            off = off.wrapping_add(t.stride[d]);
            if idx[d] < t.shape[d] {
                break;
            }
            off = off.wrapping_sub(t.stride[d].wrapping_mul(t.shape[d]));
            idx[d] = 0;
        }
    }
    out
}

impl TensorSource for TorchCheckpoint {
    fn path(&self) -> &str {
        &self.path
    }
    fn keys(&self) -> Vec<String> {
        self.order.clone()
    }
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.tensors.get(key).map(|t| t.shape.clone())
    }
    fn read_f32(&self, key: &str) -> Result<Vec<f32>> {
        let t = self
            .tensors
            .get(key)
            .ok_or_else(|| format_err(&self.path, format!("no tensor '{key}'")))?;
        if t.numel() == 0 {
            return Ok(Vec::new());
        }
        let bytes = self.storage_bytes(key, t)?;
        Ok(materialise(&to_f32(&bytes, t.storage.dtype), t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        format!("{}/tests/fixtures/vqgan/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn dtypes_and_views_match_torch() {
        let ck = TorchCheckpoint::open(fixture("tensors.ckpt")).unwrap();
        let want: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture("tensors.json")).unwrap())
                .unwrap();
        let want = want.as_object().unwrap();
        assert_eq!(ck.keys().len(), want.len());
        for (k, w) in want {
            let shape: Vec<usize> = serde_json::from_value(w["shape"].clone()).unwrap();
            let vals: Vec<f64> = serde_json::from_value(w["values"].clone()).unwrap();
            assert_eq!(ck.shape(k).unwrap(), shape, "{k}");
            let got = ck.read_f32(k).unwrap();
            assert_eq!(got.len(), vals.len(), "{k}");
            for (i, (&g, &v)) in got.iter().zip(&vals).enumerate() {
                // Every stored value converts to f32 exactly except f64 (rounded once).
                assert_eq!(g, v as f32, "{k}[{i}]");
            }
        }
        assert_eq!(ck.dtype("bf16"), Some(StorageDType::BF16));
        assert_eq!(ck.dtype("i64"), Some(StorageDType::I64));
    }

    #[test]
    fn lightning_checkpoint_state_dict_is_found() {
        let ck = TorchCheckpoint::open(fixture("tiny_f4.ckpt")).unwrap();
        let keys = ck.keys();
        assert!(keys.contains(&"encoder.conv_in.weight".to_string()));
        assert!(keys.contains(&"quantize.embedding.weight".to_string()));
        assert!(keys.contains(&"loss.discriminator.main.3.num_batches_tracked".to_string()));
        // optimizer states (exp_avg ...) are not state-dict entries
        assert!(!keys.iter().any(|k| k.contains("exp_avg")));
        assert_eq!(
            ck.shape("encoder.conv_in.weight").unwrap(),
            vec![32, 3, 3, 3]
        );
    }

    #[test]
    fn materialise_walks_strides() {
        // storage 0..12 viewed as [3,2] with strides [1,3] from offset 2
        let s: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let t = TensorRef {
            storage: pickle::StorageRef {
                key: "0".into(),
                dtype: StorageDType::F32,
                numel: 12,
            },
            offset: 2,
            shape: vec![3, 2],
            stride: vec![1, 3],
        };
        assert_eq!(materialise(&s, &t), vec![2.0, 5.0, 3.0, 6.0, 4.0, 7.0]);
        // A dim of size 1 may carry any stride (PyTorch leaves them arbitrary); the walk
        // must neither overflow nor read past the storage.
        let t = TensorRef {
            shape: vec![3, 1, 2],
            stride: vec![1, usize::MAX, 3],
            ..t
        };
        assert_eq!(t.extent(), Some(8));
        assert_eq!(materialise(&s, &t), vec![2.0, 5.0, 3.0, 6.0, 4.0, 7.0]);
    }

    #[test]
    fn malicious_pickle_is_refused_and_nothing_runs() {
        // The fixture's pickle calls posix.system("touch /tmp/vqclip-pickle-pwned") when
        // Python unpickles it (tools/make_vqgan_fixtures.py).
        let marker = std::path::Path::new("/tmp/vqclip-pickle-pwned");
        let _ = std::fs::remove_file(marker);
        let e = TorchCheckpoint::open(fixture("malicious.ckpt"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'posix.system'") && e.contains("refusing"),
            "{e}"
        );
        assert!(!marker.exists(), "the payload ran");
    }

    fn zip_with_pickle(dir: &std::path::Path, pkl: &[u8]) -> std::path::PathBuf {
        use std::io::Write;
        let path = dir.join("evil.ckpt");
        let mut w = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        w.start_file("archive/data.pkl", opts).unwrap();
        w.write_all(pkl).unwrap();
        w.finish().unwrap();
        path
    }

    #[test]
    fn builtins_eval_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("ran");
        // {'state_dict': builtins.eval("open('<marker>','w')")}
        let code = format!("open('{}','w')", marker.display());
        let mut p = vec![0x80, 2, b'}', b'X'];
        p.extend((10u32).to_le_bytes());
        p.extend(b"state_dict");
        p.extend(b"cbuiltins\neval\n");
        p.push(b'X');
        p.extend((code.len() as u32).to_le_bytes());
        p.extend(code.as_bytes());
        p.extend([0x85, b'R', b's', b'.']);
        let e = TorchCheckpoint::open(zip_with_pickle(dir.path(), &p))
            .unwrap_err()
            .to_string();
        assert!(e.contains("'builtins.eval'"), "{e}");
        assert!(!marker.exists());
    }

    #[test]
    fn truncated_and_corrupt_archives_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let full = std::fs::read(fixture("tiny_f2.ckpt")).unwrap();
        let cut = dir.path().join("cut.ckpt");
        std::fs::write(&cut, &full[..full.len() / 2]).unwrap();
        let e = TorchCheckpoint::open(&cut).unwrap_err().to_string();
        assert!(e.contains("truncated or corrupt"), "{e}");
        assert!(e.contains("cut.ckpt"), "{e}");

        // One flipped byte inside a storage: the archive's CRC catches it on read.
        let ck = TorchCheckpoint::open(fixture("tiny_f2.ckpt")).unwrap();
        let key = "decoder.conv_out.weight";
        let good = ck.read_f32(key).unwrap();
        let needle: Vec<u8> = good[..4].iter().flat_map(|v| v.to_le_bytes()).collect();
        let at = full
            .windows(needle.len())
            .position(|w| w == needle.as_slice())
            .unwrap();
        let mut bad = full.clone();
        bad[at + 1] ^= 0x40;
        let flipped = dir.path().join("flipped.ckpt");
        std::fs::write(&flipped, &bad).unwrap();
        let e = TorchCheckpoint::open(&flipped)
            .and_then(|c| c.read_f32(key))
            .unwrap_err()
            .to_string();
        assert!(e.contains("corrupt") && e.contains(key), "{e}");

        let text = dir.path().join("text.ckpt");
        std::fs::write(&text, "hello, not a checkpoint").unwrap();
        let e = TorchCheckpoint::open(&text).unwrap_err().to_string();
        assert!(e.contains("not a readable PyTorch checkpoint"), "{e}");

        let legacy = dir.path().join("legacy.pt");
        std::fs::write(&legacy, [0x80, 0x02, 0x8a, 0x0a]).unwrap();
        let e = TorchCheckpoint::open(&legacy).unwrap_err().to_string();
        assert!(e.contains("legacy"), "{e}");

        let e = TorchCheckpoint::open(dir.path().join("missing.ckpt"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.ckpt"), "{e}");
    }
}
