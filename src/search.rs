//! Image search over a folder: CLIP image embeddings kept in an SQLite file, refreshed
//! incrementally, ranked by cosine on the GPU.
//!
//! Each indexed file is stored with its size and modification time; a later update
//! re-encodes only files that are new or changed, forgets files that are gone, and remembers
//! files that could not be decoded (so that they are reported, not retried, until they
//! change). The index records which model made the embeddings and starts over when the model
//! changes.
//!
//! The index is safe to share and to interrupt: it runs in WAL mode with a busy timeout, so
//! several processes can index and search the same folder at once; every write is one
//! `BEGIN IMMEDIATE` transaction that first checks the model that made the index, so the
//! model swap (the check, the deletion of old embeddings and the new model id) is atomic
//! and embeddings of two models never mix; new embeddings are committed batch by batch, so a
//! killed run loses at most one batch and the next run goes on from there. A file that is
//! not an SQLite database, or whose tables are not the ones this version writes, is
//! rebuilt with a note. The scan never stops at one bad entry: unreadable folders, symlink
//! loops, names that are not UTF-8, empty files, undecodable or oversized images and files
//! that change while being read are skipped, each with its reason.
//!
//! The index lives in the folder (`FOLDER/.vqclip-index.sqlite`) when the folder is
//! writable, else in the per-user cache ([`default_index_path`]), or wherever the caller
//! says ([`ImageIndex::open_at`]).

use crate::models::clip::{preprocess::decode_image, ClipModel};
use crate::ops::matmul::{matmul, MatmulOpts};
use crate::{Error, Result, Tensor};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Name of the index file inside the indexed folder.
pub const DB_NAME: &str = ".vqclip-index.sqlite";

/// How long a write waits for another process's transaction before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(120);

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

/// The tables, and the statements whose preparing proves an existing file has them.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE IF NOT EXISTS images (path TEXT PRIMARY KEY, size INTEGER NOT NULL,
         mtime INTEGER NOT NULL, embedding BLOB NOT NULL);
     CREATE TABLE IF NOT EXISTS failed (path TEXT PRIMARY KEY, size INTEGER NOT NULL,
         mtime INTEGER NOT NULL, error TEXT NOT NULL);";
const SCHEMA_PROBES: [&str; 3] = [
    "SELECT key, value FROM meta LIMIT 0",
    "SELECT path, size, mtime, embedding FROM images LIMIT 0",
    "SELECT path, size, mtime, error FROM failed LIMIT 0",
];

/// An image index of one folder.
pub struct ImageIndex {
    conn: Connection,
    root: PathBuf,
    db_path: PathBuf,
    db: String,
    model_id: String,
    dim: usize,
    model_changed: bool,
    notes: Vec<String>,
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
    /// Entries not indexed, with the reason (path relative to the folder, non-UTF-8 bytes
    /// shown as U+FFFD): undecodable or oversized images, unreadable folders, symlink loops,
    /// names that are not UTF-8, empty files, files that changed while being read.
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

fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn io_err(p: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: p.display().to_string(),
        source,
    }
}

/// A stable identity for a CLIP folder: FNV-1a of its `config.json` plus the size and
/// modification time of `model.safetensors`.
pub fn model_fingerprint(dir: &Path) -> Result<String> {
    let cfg = dir.join("config.json");
    let weights = dir.join("model.safetensors");
    let h = fnv1a(&std::fs::read(&cfg).map_err(io_err(&cfg))?, FNV_OFFSET);
    let (size, mtime) = stat(&std::fs::metadata(&weights).map_err(io_err(&weights))?);
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

/// True if files can be created in `dir` (tried, not guessed from permission bits: a
/// read-only mount or an ACL says no where the bits say yes).
fn writable(dir: &Path) -> bool {
    tempfile::Builder::new()
        .prefix(".vqclip-probe")
        .tempfile_in(dir)
        .is_ok()
}

/// Where the index of `root` lives by default: `root/.vqclip-index.sqlite` if the folder is
/// writable (or already holds a writable index), else
/// `<user cache>/vqclip/indexes/<hash of the folder's absolute path>.sqlite`.
pub fn default_index_path(root: &Path) -> Result<PathBuf> {
    let local = root.join(DB_NAME);
    if writable(root) {
        return Ok(local);
    }
    let abs = std::fs::canonicalize(root).map_err(io_err(root))?;
    let h = fnv1a(abs.as_os_str().as_encoded_bytes(), FNV_OFFSET);
    let Some(cache) = dirs::cache_dir() else {
        return Err(Error::invalid(format!(
            "{} is read-only and there is no per-user cache folder for its index: give \
             --index PATH",
            root.display()
        )));
    };
    let dir = cache.join("vqclip").join("indexes");
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    Ok(dir.join(format!("{h:016x}.sqlite")))
}

/// One directory entry that could not be indexed: relative path, reason.
type Skip = (String, String);
/// Image files found by [`scan`]: relative path → (size, mtime).
type Found = HashMap<String, (i64, i64)>;

/// Image files under `root` (recursively; hidden entries skipped; symlinked files and
/// folders followed, each folder once), relative path → (size, mtime), plus what was skipped
/// and why.
fn scan(root: &Path) -> Result<(Found, Vec<Skip>)> {
    let mut out = HashMap::new();
    let mut skipped = Vec::new();
    let rel = |p: &Path| {
        p.strip_prefix(root)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned()
    };
    // Folders already walked, by identity, so that a symlink back up the tree (or two
    // links to one folder) is walked once.
    let mut seen: HashSet<FolderId> = HashSet::new();
    let root_meta = std::fs::metadata(root).map_err(io_err(root))?;
    seen.insert(folder_id(root, &root_meta));
    let mut stack = vec![root.to_path_buf()];
    // Symlinked folders are walked after every real one, so that a folder reachable both
    // ways is always indexed under its real path, whatever the listing order.
    let mut linked: Vec<(PathBuf, FolderId)> = Vec::new();
    loop {
        let dir = match stack.pop() {
            Some(d) => d,
            None => match linked.pop() {
                Some((path, id)) => {
                    if !seen.insert(id) {
                        skipped.push((
                            rel(&path),
                            "symlink loop or second link: the folder is already indexed".into(),
                        ));
                        continue;
                    }
                    path
                }
                None => break,
            },
        };
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if dir == root => return Err(io_err(root)(e)),
            Err(e) => {
                skipped.push((rel(&dir), format!("cannot read the folder: {e}")));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    skipped.push((rel(&dir), format!("cannot list the folder: {e}")));
                    break;
                }
            };
            let name = entry.file_name();
            let path = entry.path();
            if name.as_encoded_bytes().starts_with(b".") {
                continue;
            }
            let Ok(ft) = entry.file_type() else {
                continue;
            };
            let is_link = ft.is_symlink();
            // Follows symlinks; a loop or a dangling link fails here.
            let meta = if is_link {
                match std::fs::metadata(&path) {
                    Ok(m) => m,
                    Err(e) => {
                        if is_image_path(&path) || e.raw_os_error() == Some(ELOOP) {
                            skipped.push((rel(&path), link_error(&e)));
                        }
                        continue;
                    }
                }
            } else if ft.is_dir() || is_image_path(&path) {
                match entry.metadata() {
                    Ok(m) => m,
                    Err(e) => {
                        skipped.push((rel(&path), format!("cannot read its metadata: {e}")));
                        continue;
                    }
                }
            } else {
                continue;
            };
            if meta.is_dir() {
                if name.to_str().is_none() {
                    skipped.push((rel(&path), "the folder name is not UTF-8".into()));
                } else if is_link {
                    linked.push((path.clone(), folder_id(&path, &meta)));
                } else if seen.insert(folder_id(&path, &meta)) {
                    stack.push(path);
                }
            } else if meta.is_file() && is_image_path(&path) {
                if name.to_str().is_none()
                    || path
                        .strip_prefix(root)
                        .ok()
                        .and_then(Path::to_str)
                        .is_none()
                {
                    skipped.push((rel(&path), "the file name is not UTF-8".into()));
                } else if meta.len() == 0 {
                    skipped.push((rel(&path), "empty file".into()));
                } else {
                    out.insert(rel(&path), stat(&meta));
                }
            }
        }
    }
    skipped.sort();
    Ok((out, skipped))
}

/// `ELOOP` (too many levels of symbolic links) on the platforms with symlinks.
#[cfg(target_os = "linux")]
const ELOOP: i32 = 40;
#[cfg(all(unix, not(target_os = "linux")))]
const ELOOP: i32 = 62;
#[cfg(not(unix))]
const ELOOP: i32 = -1;

fn link_error(e: &std::io::Error) -> String {
    if e.raw_os_error() == Some(ELOOP) {
        "symlink loop".into()
    } else {
        format!("broken symlink: {e}")
    }
}

/// A folder's identity: device and inode where there are such, else its canonical path.
#[derive(Hash, PartialEq, Eq)]
enum FolderId {
    #[cfg(unix)]
    Inode(u64, u64),
    #[cfg(not(unix))]
    Path(PathBuf),
}

fn folder_id(path: &Path, meta: &std::fs::Metadata) -> FolderId {
    #[cfg(unix)]
    {
        let _ = path;
        use std::os::unix::fs::MetadataExt;
        FolderId::Inode(meta.dev(), meta.ino())
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        FolderId::Path(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()))
    }
}

/// Why an image file could not be used, without the path (the caller shows it).
fn reason(e: Error) -> String {
    match e {
        Error::Format { msg, .. } => msg,
        Error::Io { source, .. } => source.to_string(),
        e => e.to_string(),
    }
}

/// True for the errors that say the file is not a usable SQLite database.
fn is_corrupt(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt)
    )
}

impl ImageIndex {
    /// Opens (or creates) the index of `root` at its default place ([`default_index_path`]),
    /// made by the model `model_id` (see [`model_fingerprint`]) with embeddings of `dim`
    /// values.
    pub fn open(root: &Path, model_id: &str, dim: usize) -> Result<ImageIndex> {
        check_root(root)?;
        ImageIndex::open_at(root, &default_index_path(root)?, model_id, dim)
    }

    /// [`ImageIndex::open`] with the index file at `db_path`. A file there that is not an
    /// SQLite database, or has other tables, is replaced by a new index (said in
    /// [`ImageIndex::notes`]).
    pub fn open_at(root: &Path, db_path: &Path, model_id: &str, dim: usize) -> Result<ImageIndex> {
        check_root(root)?;
        let db = db_path.display().to_string();
        let mut notes = Vec::new();
        let conn = match connect(db_path) {
            Ok(c) => c,
            Err(e) if is_corrupt(&e) => {
                notes.push(format!(
                    "the index {db} was not a readable database ({e}); it was rebuilt"
                ));
                for suffix in ["", "-wal", "-shm", "-journal"] {
                    let mut p = db_path.as_os_str().to_owned();
                    p.push(suffix);
                    let p = PathBuf::from(p);
                    match std::fs::remove_file(&p) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io_err(&p)(e)),
                    }
                }
                connect(db_path).map_err(|e| sql(&db, e))?
            }
            Err(e) => return Err(sql(&db, e)),
        };
        let mut index = ImageIndex {
            conn,
            root: root.to_path_buf(),
            db_path: db_path.to_path_buf(),
            db,
            model_id: format!("{model_id}/{dim}"),
            dim,
            model_changed: false,
            notes,
        };
        index.model_changed = index.check_model()?;
        Ok(index)
    }

    /// Warnings from opening (an index rebuilt because it was unreadable or of another
    /// layout).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Where the index file is.
    pub fn db_path(&self) -> &Path {
        &self.db_path
    }

    /// A write transaction that waits (busy timeout) for other writers instead of failing
    /// halfway; the caller checks the model inside it.
    fn write_tx(&mut self) -> Result<rusqlite::Transaction<'_>> {
        let db = self.db.clone();
        self.conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| sql(&db, e))
    }

    /// Makes the index this model's, in one transaction: if another model (or none yet)
    /// made it, its embeddings are deleted and the model id replaced together. True if an
    /// existing index of another model was emptied.
    fn check_model(&mut self) -> Result<bool> {
        let db = self.db.clone();
        let id = self.model_id.clone();
        let e = |err| sql(&db, err);
        let mut note = None;
        let tx = self.write_tx()?;
        let layout_ok = SCHEMA_PROBES.iter().all(|q| tx.prepare(q).is_ok());
        let has_tables: bool = tx
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(e)?
            > 0;
        if has_tables && !layout_ok {
            // Another program's file, or another layout: start over inside the transaction.
            let tables: Vec<String> = {
                let mut q = tx
                    .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
                    .map_err(e)?;
                let rows = q.query_map([], |r| r.get(0)).map_err(e)?;
                rows.collect::<rusqlite::Result<_>>().map_err(e)?
            };
            for t in &tables {
                tx.execute_batch(&format!("DROP TABLE \"{}\";", t.replace('"', "\"\"")))
                    .map_err(e)?;
            }
            note = Some(format!(
                "the index {db} had other tables ({}); it was rebuilt",
                tables.join(", ")
            ));
        }
        tx.execute_batch(SCHEMA).map_err(e)?;
        let old: Option<String> = tx
            .query_row("SELECT value FROM meta WHERE key = 'model'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(e)?;
        let swap = old.as_deref() != Some(id.as_str());
        if swap {
            tx.execute_batch("DELETE FROM images; DELETE FROM failed;")
                .map_err(e)?;
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('model', ?1)",
                params![id],
            )
            .map_err(e)?;
        }
        tx.commit().map_err(e)?;
        self.notes.extend(note);
        Ok(swap && old.is_some())
    }

    /// Brings the index up to date with the folder: encodes new and changed images in
    /// batches of `batch`, each committed on its own (an interrupted update keeps the
    /// batches done), calling `progress(done, total)` after each batch.
    pub fn update(
        &mut self,
        model: &ClipModel,
        batch: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<UpdateStats> {
        let db = self.db.clone();
        let e = |err| sql(&db, err);
        let (files, scan_skipped) = scan(&self.root)?;
        let mut stats = UpdateStats {
            model_changed: std::mem::take(&mut self.model_changed),
            skipped: scan_skipped,
            ..Default::default()
        };
        let mut known: HashMap<String, (i64, i64)> = HashMap::new();
        let mut failed: HashMap<String, (i64, i64, String)> = HashMap::new();
        let want_bytes = (self.dim * 4) as i64;
        {
            // An embedding of the wrong length (a damaged row) counts as not indexed.
            let mut q = self
                .conn
                .prepare("SELECT path, size, mtime, length(embedding) FROM images")
                .map_err(e)?;
            let rows = q
                .query_map([], |r| {
                    Ok((r.get(0)?, (r.get(1)?, r.get(2)?), r.get::<_, i64>(3)?))
                })
                .map_err(e)?;
            for r in rows {
                let (p, s, len): (String, (i64, i64), i64) = r.map_err(e)?;
                known.insert(p, if len == want_bytes { s } else { (-1, -1) });
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
        {
            let id = self.model_id.clone();
            let tx = self.write_tx()?;
            check_owner(&tx, &id, &db)?;
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
        }
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
        let batch = batch.max(1);
        let side = model.config.vision.image_size;
        progress(0, total);
        for (done, chunk) in todo.chunks(batch).enumerate() {
            let mut ok = Vec::new();
            let mut pixels: Vec<f32> = Vec::new();
            let mut bad = Vec::new();
            let mut changed = Vec::new();
            let mut transient = Vec::new();
            for p in chunk {
                let full = self.root.join(p);
                match decode_and_preprocess(model, &full, side) {
                    Ok(px) => {
                        // A file rewritten while it was read may have given a mix of its
                        // old and new bytes: skip it now, the next update takes it.
                        let now = std::fs::metadata(&full).ok().map(|m| stat(&m));
                        if now == Some(files[*p]) {
                            ok.push(*p);
                            pixels.extend(px);
                        } else {
                            changed.push(*p);
                        }
                    }
                    // An I/O error (a file gone or unreadable right now) is not remembered;
                    // a file that does not decode is, until it changes.
                    Err(Error::Io { source, .. }) => {
                        transient.push((*p, format!("cannot read it: {source}")))
                    }
                    Err(err) => bad.push((*p, reason(err))),
                }
            }
            let embeds = if ok.is_empty() {
                vec![]
            } else {
                let x = Tensor::from_slice(model.gpu(), &pixels, &[ok.len(), 3, side, side])?;
                model.encode_image(&x)?.to_vec()?
            };
            let id = self.model_id.clone();
            let dim = self.dim;
            let tx = self.write_tx()?;
            check_owner(&tx, &id, &db)?;
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
            for p in changed {
                stats
                    .skipped
                    .push((p.clone(), "the file changed while it was being read".into()));
            }
            for (p, why) in transient {
                stats.skipped.push((p.clone(), why));
            }
            stats.encoded += ok.len();
            progress((done * batch + chunk.len()).min(total), total);
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
        // One read transaction: the model check and the rows come from the same snapshot.
        let tx = self.conn.unchecked_transaction().map_err(e)?;
        check_owner(&tx, &self.model_id, &self.db)?;
        let mut q = tx
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
                // A damaged row (the next update re-encodes it) or a query of another width.
                if p == self.dim {
                    continue;
                }
                return Err(Error::invalid(format!(
                    "the query has {p} values but the index holds embeddings of {}",
                    self.dim
                )));
            }
            data.extend(
                blob.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
            paths.push(path);
        }
        drop(q);
        drop(tx);
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
        msg: format!("image index database: {e}"),
    }
}

fn check_root(root: &Path) -> Result<()> {
    if root.is_dir() {
        return Ok(());
    }
    Err(Error::Io {
        path: root.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a folder"),
    })
}

/// Opens the database in WAL mode with the busy timeout; fails with SQLite's own error (so
/// that a file that is not a database can be told from other failures).
fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // WAL: readers never block the writer and a killed writer leaves the last commit intact;
    // NORMAL sync is durable across a process kill (only a power cut can lose the last
    // transactions, never corrupt the file).
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        // Some file systems cannot share memory for WAL; the rollback journal still works.
        conn.pragma_update(None, "journal_mode", "DELETE")?;
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // Reading the schema proves the file is a database.
    conn.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    })?;
    Ok(conn)
}

/// Fails if the index now belongs to another model (another process swapped it since this
/// one opened it): writing or ranking this model's embeddings there would mix two models.
fn check_owner(conn: &Connection, id: &str, db: &str) -> Result<()> {
    let now: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'model'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(|e| sql(db, e))?;
    if now.as_deref() == Some(id) {
        return Ok(());
    }
    Err(Error::Format {
        path: db.to_string(),
        msg: "another vqclip process re-indexed this folder with a different model; run again \
              to index it with this one"
            .into(),
    })
}

/// Decodes one image and preprocesses it to the model's `[3, side, side]` input.
fn decode_and_preprocess(model: &ClipModel, path: &Path, side: usize) -> Result<Vec<f32>> {
    let img = crate::models::clip::preprocess::to_rgb(decode_image(path)?);
    let (h, w) = model.preprocess.output_size(img.height(), img.width());
    if (h as usize, w as usize) != (side, side) {
        return Err(Error::invalid(format!(
            "preprocessing gives {h}x{w} images but the model takes {side}x{side}; check \
             crop_size in preprocessor_config.json"
        )));
    }
    model.preprocess.apply(&img)
}
