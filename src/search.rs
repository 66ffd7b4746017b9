//! Image search over a folder: CLIP image embeddings kept in an SQLite file inside the folder
//! (`.vqclip-index.sqlite`), refreshed incrementally, ranked by cosine on the GPU.
//!
//! Each indexed file is stored with its size and modification time; a later update
//! re-encodes only files that are new or changed, forgets files that are gone, and remembers
//! files that could not be decoded (so that they are reported, not retried, until they
//! change). The index records which model made the embeddings and starts over when the model
//! changes.

use crate::models::clip::{load_image, ClipModel};
use crate::ops::matmul::{matmul, MatmulOpts};
use crate::{Error, Result, Tensor};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Name of the index file inside the indexed folder.
pub const DB_NAME: &str = ".vqclip-index.sqlite";

/// File extensions treated as images (lower case).
pub const IMAGE_EXTENSIONS: [&str; 9] = [
    "png", "jpg", "jpeg", "jfif", "webp", "bmp", "gif", "tif", "tiff",
];

/// True if `p` has an image file extension.
pub fn is_image_path(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// An image index of one folder.
pub struct ImageIndex {
    conn: Connection,
    root: PathBuf,
    db: String,
    model_changed: bool,
}

/// What an [`ImageIndex::update`] did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UpdateStats {
    /// Images in the index after the update.
    pub indexed: usize,
    /// Images encoded by this update (new or changed).
    pub encoded: usize,
    /// Index entries dropped because their file is gone.
    pub removed: usize,
    /// Image files that could not be decoded, with the reason (path relative to the folder).
    pub skipped: Vec<(String, String)>,
    /// True if the index was emptied because a different model made it.
    pub model_changed: bool,
}

/// One search hit.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Hit {
    /// Path relative to the folder.
    pub path: String,
    /// Cosine similarity with the query.
    pub score: f32,
}

/// A stable identity for a CLIP folder: FNV-1a of its `config.json` plus the size and
/// modification time of `model.safetensors`.
pub fn model_fingerprint(dir: &Path) -> Result<String> {
    fn io(p: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            path: p.display().to_string(),
            source,
        }
    }
    let cfg = dir.join("config.json");
    let weights = dir.join("model.safetensors");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in std::fs::read(&cfg).map_err(io(&cfg))? {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    let (size, mtime) = stat(&std::fs::metadata(&weights).map_err(io(&weights))?);
    Ok(format!("{h:016x}-{size}-{mtime}"))
}

/// Size and modification time (ns since the epoch) of a file.
fn stat(m: &std::fs::Metadata) -> (i64, i64) {
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i64);
    (m.len() as i64, mtime)
}

/// Image files under `root` (recursively; hidden entries and symlinked folders skipped),
/// relative path → (size, mtime).
fn scan(root: &Path) -> Result<HashMap<String, (i64, i64)>> {
    let mut out = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|source| Error::Io {
            path: dir.display().to_string(),
            source,
        })?;
        for e in entries.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let path = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(path);
            } else if is_image_path(&path) {
                // Follows a symlinked file; skips what cannot be stat'ed.
                if let Ok(m) = std::fs::metadata(&path) {
                    if m.is_file() {
                        let rel = path.strip_prefix(root).unwrap_or(&path);
                        out.insert(rel.to_string_lossy().into_owned(), stat(&m));
                    }
                }
            }
        }
    }
    Ok(out)
}

impl ImageIndex {
    /// Opens (or creates) the index of `root`, made by the model `model_id` (see
    /// [`model_fingerprint`]) with embeddings of `dim` values.
    pub fn open(root: &Path, model_id: &str, dim: usize) -> Result<ImageIndex> {
        if !root.is_dir() {
            return Err(Error::Io {
                path: root.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a folder"),
            });
        }
        let db_path = root.join(DB_NAME);
        let db = db_path.display().to_string();
        let conn = Connection::open(&db_path).map_err(|e| sql(&db, e))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS images (path TEXT PRIMARY KEY, size INTEGER NOT NULL,
                 mtime INTEGER NOT NULL, embedding BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS failed (path TEXT PRIMARY KEY, size INTEGER NOT NULL,
                 mtime INTEGER NOT NULL, error TEXT NOT NULL);",
        )
        .map_err(|e| sql(&db, e))?;
        let mut index = ImageIndex {
            conn,
            root: root.to_path_buf(),
            db,
            model_changed: false,
        };
        index.model_changed = index.check_model(&format!("{model_id}/{dim}"))?;
        Ok(index)
    }

    /// Empties the index if another model (or none yet) made it; true if it was emptied.
    fn check_model(&mut self, id: &str) -> Result<bool> {
        let db = self.db.clone();
        let old: Option<String> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'model'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| sql(&db, e))?;
        if old.as_deref() == Some(id) {
            return Ok(false);
        }
        self.conn
            .execute_batch("DELETE FROM images; DELETE FROM failed;")
            .map_err(|e| sql(&db, e))?;
        self.conn
            .execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('model', ?1)",
                params![id],
            )
            .map_err(|e| sql(&db, e))?;
        Ok(old.is_some())
    }

    /// Brings the index up to date with the folder: encodes new and changed images in
    /// batches of `batch`, calling `progress(done, total)` after each batch.
    pub fn update(
        &mut self,
        model: &ClipModel,
        batch: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<UpdateStats> {
        let db = self.db.clone();
        let e = |err| sql(&db, err);
        let files = scan(&self.root)?;
        let mut stats = UpdateStats {
            model_changed: std::mem::take(&mut self.model_changed),
            ..Default::default()
        };
        let mut known: HashMap<String, (i64, i64)> = HashMap::new();
        let mut failed: HashMap<String, (i64, i64, String)> = HashMap::new();
        {
            let mut q = self
                .conn
                .prepare("SELECT path, size, mtime FROM images")
                .map_err(e)?;
            let rows = q
                .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
                .map_err(e)?;
            for r in rows {
                let (p, s): (String, (i64, i64)) = r.map_err(e)?;
                known.insert(p, s);
            }
            let mut q = self
                .conn
                .prepare("SELECT path, size, mtime, error FROM failed")
                .map_err(e)?;
            let rows = q
                .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?))))
                .map_err(e)?;
            for r in rows {
                let (p, s): (String, (i64, i64, String)) = r.map_err(e)?;
                failed.insert(p, s);
            }
        }
        // Forget entries whose file is gone or changed.
        let tx = self.conn.transaction().map_err(e)?;
        for (p, s) in &known {
            if files.get(p) != Some(s) {
                tx.execute("DELETE FROM images WHERE path = ?1", params![p])
                    .map_err(e)?;
                stats.removed += usize::from(!files.contains_key(p));
            }
        }
        for (p, (size, mtime, _)) in &failed {
            if files.get(p) != Some(&(*size, *mtime)) {
                tx.execute("DELETE FROM failed WHERE path = ?1", params![p])
                    .map_err(e)?;
            }
        }
        tx.commit().map_err(e)?;
        let mut todo: Vec<&String> = files
            .iter()
            .filter(|(p, s)| {
                known.get(*p) != Some(s) && failed.get(*p).is_none_or(|(a, b, _)| (*a, *b) != **s)
            })
            .map(|(p, _)| p)
            .collect();
        todo.sort();
        for (p, (size, mtime, err)) in &failed {
            if files.get(p) == Some(&(*size, *mtime)) {
                stats.skipped.push((p.clone(), err.clone()));
            }
        }
        let total = todo.len();
        progress(0, total);
        for (done, chunk) in todo.chunks(batch.max(1)).enumerate() {
            let mut ok = Vec::new();
            let mut images = Vec::new();
            let mut bad = Vec::new();
            for p in chunk {
                match load_image(self.root.join(p)) {
                    Ok(img) => {
                        ok.push(*p);
                        images.push(img);
                    }
                    Err(err) => bad.push((*p, err.to_string())),
                }
            }
            let embeds = if images.is_empty() {
                vec![]
            } else {
                model
                    .encode_image(&model.pixel_values(&images)?)?
                    .to_vec()?
            };
            let dim = model.config.projection_dim;
            let tx = self.conn.transaction().map_err(e)?;
            for (p, emb) in ok.iter().zip(embeds.chunks(dim)) {
                let (size, mtime) = files[*p];
                let blob: Vec<u8> = emb.iter().flat_map(|x| x.to_le_bytes()).collect();
                tx.execute(
                    "INSERT OR REPLACE INTO images (path, size, mtime, embedding) VALUES (?1, ?2, ?3, ?4)",
                    params![p, size, mtime, blob],
                )
                .map_err(e)?;
            }
            for (p, err) in &bad {
                let (size, mtime) = files[*p];
                tx.execute(
                    "INSERT OR REPLACE INTO failed (path, size, mtime, error) VALUES (?1, ?2, ?3, ?4)",
                    params![p, size, mtime, err],
                )
                .map_err(e)?;
                stats.skipped.push(((*p).clone(), err.clone()));
            }
            tx.commit().map_err(e)?;
            stats.encoded += ok.len();
            progress((done * batch.max(1) + chunk.len()).min(total), total);
        }
        stats.skipped.sort();
        stats.indexed = self
            .conn
            .query_row("SELECT COUNT(*) FROM images", [], |r| r.get::<_, i64>(0))
            .map_err(e)? as usize;
        Ok(stats)
    }

    /// The `top` images most similar to `query` (an L2-normalised embedding `[1, P]` or
    /// `[P]`), best first. Scores are computed on the GPU as one matrix product per block of
    /// embeddings that fits a storage binding.
    pub fn search(&self, query: &Tensor, top: usize) -> Result<Vec<Hit>> {
        let db = self.db.clone();
        let e = |err| sql(&db, err);
        let p = query.numel();
        let mut paths = Vec::new();
        let mut data: Vec<f32> = Vec::new();
        let mut q = self
            .conn
            .prepare("SELECT path, embedding FROM images ORDER BY path")
            .map_err(e)?;
        let rows = q
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(e)?;
        for r in rows {
            let (path, blob) = r.map_err(e)?;
            if blob.len() != p * 4 {
                return Err(Error::Format {
                    path: self.db.clone(),
                    msg: format!(
                        "embedding of {path} has {} bytes, expected {} (delete the index to rebuild it)",
                        blob.len(),
                        p * 4
                    ),
                });
            }
            data.extend(
                blob.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
            paths.push(path);
        }
        if paths.is_empty() {
            return Ok(vec![]);
        }
        let gpu = query.gpu();
        let q = query.reshape(&[1, p])?;
        let per_block = (gpu.limits().max_storage_buffer_binding_size as usize / (4 * p)).max(1);
        let mut scores = Vec::with_capacity(paths.len());
        for block in data.chunks(per_block * p) {
            let m = Tensor::from_slice(gpu, block, &[block.len() / p, p])?;
            let s = matmul(
                &m,
                &q,
                &MatmulOpts {
                    trans_b: true,
                    ..Default::default()
                },
            )?;
            scores.extend(s.to_vec()?);
        }
        let mut hits: Vec<Hit> = paths
            .into_iter()
            .zip(scores)
            .map(|(path, score)| Hit { path, score })
            .collect();
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.path.cmp(&b.path)));
        hits.truncate(top);
        Ok(hits)
    }

    /// The folder this index covers.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

fn sql(db: &str, e: rusqlite::Error) -> Error {
    Error::Format {
        path: db.to_string(),
        msg: format!("image index database: {e} (deleting the file rebuilds the index)"),
    }
}
