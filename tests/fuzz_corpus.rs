//! Replays every committed fuzz input, on stable, through the same target bodies the
//! fuzzers run (`fuzz/src/lib.rs`): the seed corpora (`fuzz/seeds/<target>/`) and every
//! input a fuzzer once crashed or hung on (`fuzz/regressions/<target>/`). A panic, abort or
//! stack overflow fails the suite; returning an error is the parsers doing their job.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod targets;

use std::path::Path;

/// Runs target `name` over every file of `fuzz/<kind>/<name>/`; returns how many it ran.
fn replay(kind: &str, name: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(name);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
    files.sort();
    for f in &files {
        let data = std::fs::read(f).unwrap();
        let result = std::panic::catch_unwind(|| run(&data));
        assert!(result.is_ok(), "{name}: {} panicked", f.display());
    }
    files.len()
}

#[test]
fn every_seed_and_regression_input_replays_without_a_panic() {
    let mut seeds = 0;
    for &(name, run) in targets::TARGETS {
        let n = replay("seeds", name, run);
        assert!(n > 0, "target {name} has no committed seeds");
        seeds += n;
        replay("regressions", name, run);
    }
    // Every folder belongs to a target (a renamed target must not orphan its inputs).
    for kind in ["seeds", "regressions"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz")
            .join(kind);
        for e in std::fs::read_dir(dir).into_iter().flatten() {
            let name = e.unwrap().file_name().into_string().unwrap();
            assert!(
                targets::TARGETS.iter().any(|&(t, _)| t == name),
                "fuzz/{kind}/{name} matches no target"
            );
        }
    }
    assert!(seeds >= 30, "only {seeds} seeds");
}
