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
const MAX_PICKLE_BYTES: u64 = 1 << 30;

/// An opened PyTorch zip checkpoint.
pub struct TorchCheckpoint {
    path: String,
    zip: Mutex<zip::ZipArchive<std::io::BufReader<std::fs::File>>>,
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
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| {
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
        if let Ok(mut f) = zip.by_name(&format!("{prefix}byteorder")) {
            let mut s = String::new();
            f.read_to_string(&mut s)
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
            let mut f = zip
                .by_name(&pkl_name)
                .map_err(|e| format_err(&path, format!("{pkl_name}: {e}")))?;
            if f.size() > MAX_PICKLE_BYTES {
                return Err(format_err(
                    &path,
                    format!("{pkl_name} is implausibly large"),
                ));
            }
            let mut buf = Vec::with_capacity(f.size() as usize);
            f.read_to_end(&mut buf).map_err(|e| {
                format_err(
                    &path,
                    format!("{pkl_name}: truncated or corrupt entry ({e})"),
                )
            })?;
            buf
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
                    let s = zip
                        .by_name(&entry)
                        .map_err(|_| {
                            format_err(
                                &path,
                                format!("tensor '{k}': storage entry {entry} is missing"),
                            )
                        })?
                        .size();
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
        let mut f = zip
            .by_name(&entry)
            .map_err(|e| format_err(&self.path, format!("tensor '{key}': {entry}: {e}")))?;
        // Read the whole entry so that the archive's CRC is checked, then keep what the view
        // can touch.
        let want = t.extent().unwrap_or(0) * t.storage.dtype.size();
        let mut buf = Vec::with_capacity(f.size() as usize);
        f.read_to_end(&mut buf).map_err(|e| {
            format_err(
                &self.path,
                format!("tensor '{key}': {entry}: truncated or corrupt data ({e})"),
            )
        })?;
        if buf.len() < want {
            return Err(format_err(
                &self.path,
                format!("tensor '{key}': {entry} is truncated"),
            ));
        }
        buf.truncate(want);
        Ok(buf)
    }
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
        for d in (0..rank).rev() {
            idx[d] += 1;
            off += t.stride[d];
            if idx[d] < t.shape[d] {
                break;
            }
            off -= t.stride[d] * t.shape[d];
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
