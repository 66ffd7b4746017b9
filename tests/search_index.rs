//! `vqclip search`'s index under stress, as users meet it: two processes indexing one folder
//! at once, a process killed mid-indexing, a read-only folder, a corrupt or foreign index
//! file, and a folder full of entries that cannot be indexed.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

mod common;
use common::{ok, png_header_only, s};

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip/tiny_quickgelu")
}

/// `n` distinct small PNGs (a colour gradient per image) in `dir`.
fn images(dir: &Path, n: usize) {
    for i in 0..n {
        let img = image::RgbImage::from_fn(24 + (i % 5) as u32, 20, |x, y| {
            image::Rgb([
                (i * 37 % 256) as u8,
                (x * 9 + i as u32) as u8,
                (y * 11 + (i * 7) as u32) as u8,
            ])
        });
        img.save(dir.join(format!("img_{i:03}.png"))).unwrap();
    }
}

fn search_cmd(dir: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vqclip"));
    c.args([
        "search",
        "--clip",
        s(&model()),
        "--dir",
        s(dir),
        "a red disc",
    ])
    .args(["--top", "1000", "--json"])
    .args(extra)
    .env_remove("VQCLIP_CLIP");
    c
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "search failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

/// (path, score) of every result.
fn ranking(v: &Value) -> Vec<(String, f64)> {
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["path"].as_str().unwrap().to_string(),
                h["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn same_ranking(a: &Value, b: &Value) {
    let (a, b) = (ranking(a), ranking(b));
    assert_eq!(a.len(), b.len());
    for ((pa, sa), (pb, sb)) in a.iter().zip(&b) {
        assert_eq!(pa, pb);
        assert!((sa - sb).abs() < 1e-6, "{pa}: {sa} vs {sb}");
    }
}

/// Rows in the index and SQLite's own integrity verdict.
fn index_state(db: &Path) -> (i64, String) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(std::time::Duration::from_secs(30)).unwrap();
    let n = c
        .query_row("SELECT COUNT(*) FROM images", [], |r| r.get(0))
        .unwrap();
    let check = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    (n, check)
}

/// A clean index of a copy of `dir`'s images, for comparison.
fn clean_run(dir: &Path) -> Value {
    let copy = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        if e.file_type().unwrap().is_file() && !name.to_string_lossy().starts_with('.') {
            std::fs::copy(e.path(), copy.path().join(name)).unwrap();
        }
    }
    json(&search_cmd(copy.path(), &[]).output().unwrap())
}

#[test]
fn two_processes_indexing_one_folder_both_finish_consistently() {
    let dir = tempfile::tempdir().unwrap();
    let n = 40;
    images(dir.path(), n);
    let spawn = || -> Child {
        search_cmd(dir.path(), &["--batch", "2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (
        json(&a.wait_with_output().unwrap()),
        json(&b.wait_with_output().unwrap()),
    );
    for r in [&a, &b] {
        assert_eq!(r["indexed"], n);
        assert_eq!(r["results"].as_array().unwrap().len(), n);
    }
    same_ranking(&a, &b);
    same_ranking(&a, &clean_run(dir.path()));
    let (rows, check) = index_state(&dir.path().join(".vqclip-index.sqlite"));
    assert_eq!((rows, check.as_str()), (n as i64, "ok"));
    // Together they encoded every image at least once; a third run has nothing to do.
    let enc = a["encoded"].as_u64().unwrap() + b["encoded"].as_u64().unwrap();
    assert!(enc >= n as u64, "{enc}");
    let c = json(&search_cmd(dir.path(), &[]).output().unwrap());
    assert_eq!(
        (c["indexed"].as_u64(), c["encoded"].as_u64()),
        (Some(n as u64), Some(0))
    );
}

#[cfg(unix)]
#[test]
fn a_run_killed_mid_indexing_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let n = 120;
    images(dir.path(), n);
    let db = dir.path().join(".vqclip-index.sqlite");
    let mut child = search_cmd(dir.path(), &["--batch", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the first committed batches, then SIGKILL (Child::kill on unix).
    let seen = loop {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the run finished ({st}) before it could be killed: use more images");
        }
        let rows =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .and_then(|c| {
                    c.query_row("SELECT COUNT(*) FROM images", [], |r| r.get::<_, i64>(0))
                })
                .unwrap_or(0);
        if rows >= 3 {
            break rows;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let (kept, check) = index_state(&db);
    assert_eq!(check, "ok");
    assert!(kept >= seen && kept < n as i64, "kept {kept} of {n}");
    // The next run encodes only what is missing and ranks as a clean run does.
    let r = json(&search_cmd(dir.path(), &[]).output().unwrap());
    assert_eq!(r["indexed"], n);
    assert_eq!(r["encoded"].as_i64().unwrap(), n as i64 - kept);
    same_ranking(&r, &clean_run(dir.path()));
}

/// Runs `cmd` with `dir` read-only: by permissions where they bind this user, else (root
/// ignores them) under a read-only bind mount in a private mount namespace. None where
/// neither is possible.
#[cfg(unix)]
fn run_read_only(dir: &Path, cmd: &Command) -> Option<Output> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    let probe = dir.join("probe");
    let honoured = std::fs::write(&probe, b"x").is_err();
    let _ = std::fs::remove_file(&probe);
    let mut c = if honoured {
        Command::new(cmd.get_program())
    } else {
        let mut u = Command::new("unshare");
        u.args([
            "--mount",
            "sh",
            "-c",
            r#"mount --bind -o ro "$0" "$0" && exec "$@""#,
        ])
        .arg(dir)
        .arg(cmd.get_program());
        u
    };
    c.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    let out = c.output().ok()?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    if !honoured && String::from_utf8_lossy(&out.stderr).contains("unshare") {
        return None;
    }
    Some(out)
}

#[cfg(unix)]
#[test]
fn a_read_only_folder_is_indexed_in_the_user_cache_or_at_index() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("photos");
    std::fs::create_dir(&folder).unwrap();
    images(&folder, 4);
    let cache = dir.path().join("cache");
    let mut cmd = search_cmd(&folder, &[]);
    cmd.env("XDG_CACHE_HOME", &cache);
    let Some(out) = run_read_only(&folder, &cmd) else {
        eprintln!("note: cannot make a folder read-only here (root without mount rights)");
        return;
    };
    let r = json(&out);
    assert_eq!(
        (r["indexed"].as_u64(), r["encoded"].as_u64()),
        (Some(4), Some(4))
    );
    let index = PathBuf::from(r["index"].as_str().unwrap());
    assert!(index.starts_with(cache.join("vqclip/indexes")), "{index:?}");
    assert!(index.is_file());
    assert!(!folder.join(".vqclip-index.sqlite").exists());
    // The same cache index is found again.
    let r = json(&run_read_only(&folder, &cmd).unwrap());
    assert_eq!(
        (r["indexed"].as_u64(), r["encoded"].as_u64()),
        (Some(4), Some(0))
    );
    // --index puts it anywhere.
    let at = dir.path().join("elsewhere.sqlite");
    let mut cmd = search_cmd(&folder, &["--index", s(&at)]);
    cmd.env("XDG_CACHE_HOME", &cache);
    let r = json(&run_read_only(&folder, &cmd).unwrap());
    assert_eq!(
        (r["indexed"].as_u64(), r["encoded"].as_u64()),
        (Some(4), Some(4))
    );
    assert!(at.is_file());
}

#[test]
fn a_corrupt_or_foreign_index_is_rebuilt_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    images(dir.path(), 3);
    let db = dir.path().join(".vqclip-index.sqlite");
    let good = json(&search_cmd(dir.path(), &[]).output().unwrap());
    // Not a database at all (and a stale WAL beside it).
    std::fs::write(&db, vec![7u8; 4096]).unwrap();
    std::fs::write(dir.path().join(".vqclip-index.sqlite-wal"), b"junk").unwrap();
    let out = search_cmd(dir.path(), &[]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let r = json(&out);
    assert!(err.contains("warning") && err.contains("rebuilt"), "{err}");
    assert_eq!(
        (r["indexed"].as_u64(), r["encoded"].as_u64()),
        (Some(3), Some(3))
    );
    same_ranking(&r, &good);
    // A database with other tables (another program's, or another layout).
    std::fs::remove_file(&db).unwrap();
    let c = rusqlite::Connection::open(&db).unwrap();
    c.execute_batch("CREATE TABLE images (name TEXT); INSERT INTO images VALUES ('x');")
        .unwrap();
    drop(c);
    let out = search_cmd(dir.path(), &[]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let r = json(&out);
    assert!(
        err.contains("other tables") && err.contains("rebuilt"),
        "{err}"
    );
    assert_eq!(
        (r["indexed"].as_u64(), r["encoded"].as_u64()),
        (Some(3), Some(3))
    );
    same_ranking(&r, &good);
}

#[test]
fn entries_that_cannot_be_indexed_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    images(d, 2);
    std::fs::write(d.join("empty.png"), b"").unwrap();
    std::fs::write(d.join("garbage.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    std::fs::write(d.join("bomb.png"), png_header_only(65535, 65535)).unwrap();
    // A 1x20000 strip is not skipped: only the crop's window of its resize is computed.
    image::RgbImage::from_fn(1, 20000, |_, y| image::Rgb([(y % 256) as u8, 40, 90]))
        .save(d.join("strip.png"))
        .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        std::os::unix::fs::symlink(".", d.join("loop")).unwrap();
        std::os::unix::fs::symlink("self.png", d.join("self.png")).unwrap();
        // A folder reachable through a link too ("a_alias" lists before "sub"): indexed once,
        // under its real path.
        std::fs::create_dir(d.join("sub")).unwrap();
        images(&d.join("sub"), 1);
        std::os::unix::fs::symlink("sub", d.join("a_alias")).unwrap();
        let bad = d.join(std::ffi::OsStr::from_bytes(b"bad\xffname.png"));
        std::fs::copy(d.join("img_000.png"), bad).unwrap();
    }
    // A folder this user cannot read (root reads it anyway: then it is simply indexed).
    let locked = d.join("locked");
    std::fs::create_dir(&locked).unwrap();
    images(&locked, 1);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    let locked_out = std::fs::read_dir(&locked).is_err();
    let out = search_cmd(d, &[]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let r = json(&out);
    let mut skipped: Vec<(String, String)> = r["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["path"].as_str().unwrap().to_string(),
                k["error"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    skipped.sort();
    let find = |p: &str| -> &str {
        &skipped
            .iter()
            .find(|(q, _)| q.starts_with(p))
            .unwrap_or_else(|| panic!("{p} not skipped: {skipped:?}"))
            .1
    };
    assert!(find("empty.png").contains("empty"));
    assert!(find("garbage.png").contains("decode"));
    assert!(find("bomb.png").contains("65535x65535"));
    let mut want = 3;
    if locked_out {
        assert!(find("locked").contains("cannot read the folder"));
        want += 1;
    }
    #[cfg(unix)]
    {
        assert!(find("loop").contains("symlink loop"));
        assert!(find("self.png").contains("symlink loop"));
        assert!(find("bad").contains("not UTF-8"));
        assert!(find("a_alias").contains("already indexed"));
        want += 4;
    }
    assert_eq!(skipped.len(), want, "{skipped:?}");
    assert!(err.contains(&format!("{want} skipped")), "{err}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let indexed = 3 + usize::from(!locked_out) + usize::from(cfg!(unix));
    assert_eq!(
        r["indexed"], indexed,
        "the two images, the strip (and locked/)"
    );
    let paths: Vec<String> = ranking(&r).into_iter().map(|(p, _)| p).collect();
    assert!(paths.contains(&"strip.png".to_string()), "{paths:?}");
    #[cfg(unix)]
    assert!(paths.contains(&"sub/img_000.png".to_string()), "{paths:?}");
    // The strip ranks as embed scores it.
    let e = ok(&[
        "embed",
        "--clip",
        s(&model()),
        "--json",
        "--text",
        "a red disc",
        "--image",
        s(&d.join("strip.png")),
    ]);
    let e: Value = serde_json::from_slice(&e.stdout).unwrap();
    let dot: f64 = e["text_embeds"][0]
        .as_array()
        .unwrap()
        .iter()
        .zip(e["image_embeds"][0].as_array().unwrap())
        .map(|(a, b)| a.as_f64().unwrap() * b.as_f64().unwrap())
        .sum();
    let strip = ranking(&r)
        .into_iter()
        .find(|(p, _)| p == "strip.png")
        .unwrap();
    assert!((strip.1 - dot).abs() < 1e-5, "{} vs {dot}", strip.1);
}

#[test]
fn a_model_swap_by_another_process_stops_writes_of_the_old_model() {
    use vqclip::search::ImageIndex;
    let dir = tempfile::tempdir().unwrap();
    images(dir.path(), 3);
    let gpu = vqclip::Gpu::shared().expect("a wgpu adapter");
    let clip = vqclip::models::clip::ClipModel::load(model(), &gpu).unwrap();
    let dim = clip.config.projection_dim;
    // Two processes' views of one index, made by two models of the same width: the second
    // swaps the index to its model while the first still has it open.
    let mut first = ImageIndex::open(dir.path(), "model-one", dim).unwrap();
    let mut second = ImageIndex::open(dir.path(), "model-two", dim).unwrap();
    let e = first
        .update(&clip, 2, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("different model"), "{e}");
    let q = clip.encode_text(&["a red disc".to_string()]).unwrap();
    let e = first.search(&q, 5).unwrap_err().to_string();
    assert!(e.contains("different model"), "{e}");
    // Nothing of the first model's got in; the second indexes and ranks its own.
    let (rows, _) = index_state(&dir.path().join(".vqclip-index.sqlite"));
    assert_eq!(rows, 0);
    let st = second.update(&clip, 2, &mut |_, _| {}).unwrap();
    assert_eq!((st.indexed, st.encoded), (3, 3));
    assert_eq!(second.search(&q, 5).unwrap().len(), 3);
}

#[test]
fn a_file_rewritten_after_the_scan_is_skipped_then_taken_next_time() {
    use vqclip::search::ImageIndex;
    let dir = tempfile::tempdir().unwrap();
    images(dir.path(), 3);
    let gpu = vqclip::Gpu::shared().expect("a wgpu adapter");
    let clip = vqclip::models::clip::ClipModel::load(model(), &gpu).unwrap();
    let dim = clip.config.projection_dim;
    let mut index = ImageIndex::open(dir.path(), "m", dim).unwrap();
    let victim = dir.path().join("img_001.png");
    // progress(0, total) comes after the scan and before any file is read: rewrite one file
    // there, as another program writing it while vqclip indexes would.
    let st = index
        .update(&clip, 8, &mut |done, _| {
            if done == 0 {
                image::RgbImage::from_pixel(50, 50, image::Rgb([9, 9, 9]))
                    .save(&victim)
                    .unwrap();
            }
        })
        .unwrap();
    assert_eq!((st.indexed, st.encoded), (2, 2));
    assert_eq!(st.skipped.len(), 1, "{:?}", st.skipped);
    assert_eq!(st.skipped[0].0, "img_001.png");
    assert!(
        st.skipped[0].1.contains("changed while"),
        "{:?}",
        st.skipped
    );
    // Not remembered as bad: the next update encodes its new content.
    let st = index.update(&clip, 8, &mut |_, _| {}).unwrap();
    assert_eq!((st.indexed, st.encoded, st.skipped.len()), (3, 1, 0));
}
