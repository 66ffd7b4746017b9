//! Crash-safe file output. Every file vqclip writes for the user (images, GIFs, logs,
//! safetensors, checkpoints, the tuning file) goes through here: the bytes go to a hidden
//! temporary file with a unique name (`.NAME.XXXXXX.tmp`) in the destination's folder, which
//! is synced to disk and then renamed over the destination, and the folder is synced so the
//! rename itself survives a power cut.
//!
//! A reader, or a later run after a crash, therefore sees the previous complete file or the
//! new complete file, never a part. A process killed mid-write leaves at most a hidden
//! `.tmp` file that nothing reads. Two processes writing the same destination at once each
//! use their own temporary file; the last rename wins whole.

use crate::{Error, Result};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// A file being written; it appears under its final name only on [`AtomicFile::commit`].
/// Dropped without a commit (an error, a panic), the temporary file is removed.
pub struct AtomicFile {
    out: BufWriter<tempfile::NamedTempFile>,
    path: PathBuf,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

impl AtomicFile {
    /// Starts writing `path`. Its folder must exist; nothing at `path` changes until
    /// [`AtomicFile::commit`].
    pub fn create(path: impl AsRef<Path>) -> Result<AtomicFile> {
        let path = path.as_ref().to_path_buf();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .ok_or_else(|| Error::invalid(format!("{} is not a file path", path.display())))?
            .to_string_lossy()
            .into_owned();
        let prefix = format!(".{name}.");
        let mut b = tempfile::Builder::new();
        b.prefix(&prefix).suffix(".tmp");
        // tempfile's default is 0600; an output file gets the usual 0666 less the umask, as
        // File::create would give it.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            b.permissions(std::fs::Permissions::from_mode(0o666));
        }
        let tmp = b.tempfile_in(&dir).map_err(io_err(&path))?;
        Ok(AtomicFile {
            out: BufWriter::new(tmp),
            path,
        })
    }

    /// The destination.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The temporary file's path (where the bytes are until the commit).
    pub fn temp_path(&self) -> &Path {
        self.out.get_ref().path()
    }

    /// Flushes, syncs and renames the file to its destination, then syncs the folder.
    pub fn commit(self) -> Result<()> {
        let path = self.path;
        let tmp = self
            .out
            .into_inner()
            .map_err(|e| io_err(&path)(e.into_error()))?;
        tmp.as_file().sync_all().map_err(io_err(&path))?;
        tmp.persist(&path).map_err(|e| io_err(&path)(e.error))?;
        sync_dir(&path);
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Syncs the folder holding `path` so that a rename into it is durable. Best effort: some
/// file systems (and Windows) cannot open or sync a folder, and the rename has happened
/// either way.
fn sync_dir(path: &Path) {
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Writes `bytes` to `path` atomically (see the module doc).
pub fn write(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    write_with(path, |w| w.write_all(bytes).map_err(io_err(path)))
}

/// Writes what `f` writes to `path` atomically; if `f` fails, `path` is untouched and the
/// temporary file is removed.
pub fn write_with(
    path: impl AsRef<Path>,
    f: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let mut file = AtomicFile::create(path)?;
    f(&mut file)?;
    file.commit()
}

/// True for the name of a temporary file this module makes (`.NAME.XXXXXX.tmp`): such a file
/// is an interrupted write, never a result to read.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn replaces_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.json");
        write(&p, b"old").unwrap();
        // A failing writer leaves the old file and no temporary.
        let e = write_with(&p, |w| {
            w.write_all(b"half of the new").unwrap();
            Err(Error::invalid("disk on fire"))
        })
        .unwrap_err();
        assert!(e.to_string().contains("disk on fire"));
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["out.json"]);
        // Before the commit the destination is unchanged and the bytes sit in a hidden
        // temporary file of its own.
        let mut f = AtomicFile::create(&p).unwrap();
        f.write_all(b"new").unwrap();
        f.flush().unwrap();
        let tmp = f.temp_path().to_path_buf();
        let tmp_name = tmp.file_name().unwrap().to_string_lossy().into_owned();
        assert!(is_temp_name(&tmp_name), "{tmp_name}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read(&tmp).unwrap(), b"new");
        // Two writers of the same destination do not share a temporary file.
        let g = AtomicFile::create(&p).unwrap();
        assert_ne!(g.temp_path(), tmp);
        drop(g);
        f.commit().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(names(dir.path()), ["out.json"]);
        // A missing folder is an error naming the destination.
        let e = write(dir.path().join("nope/x.png"), b"x").unwrap_err();
        assert!(e.to_string().contains("nope/x.png"), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn output_gets_ordinary_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        write(&p, b"x").unwrap();
        // Readable by others unless the umask says otherwise (it never masks the owner).
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o600, 0o600);
        let plain = dir.path().join("b.png");
        std::fs::write(&plain, b"x").unwrap();
        assert_eq!(
            mode & 0o777,
            std::fs::metadata(&plain).unwrap().permissions().mode() & 0o777
        );
    }
}
