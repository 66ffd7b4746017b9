//! `VQCLIP_PROFILE`: per-kernel timing, in the library and on the command line. A test binary
//! of its own, because profiling is switched on for the whole process.

use std::process::Command;
use vqclip::gpu::profile;
use vqclip::{Gpu, Tensor};

#[test]
fn library_counts_each_dispatch_and_results_stay_right() {
    let gpu = Gpu::shared().expect("a wgpu adapter (install mesa-vulkan-drivers for lavapipe)");
    let a = Tensor::from_slice(&gpu, &[1.0, 2.0, 3.0, 4.0], &[2, 2]).unwrap();
    let b = Tensor::from_slice(&gpu, &[10.0, 20.0], &[2]).unwrap();
    profile::set_enabled(true);
    profile::reset();
    let y = vqclip::ops::elementwise::add(&a, &b).unwrap();
    let y = vqclip::ops::elementwise::mul(&y, &b).unwrap();
    profile::set_enabled(false);
    let _untimed = vqclip::ops::elementwise::add(&a, &b).unwrap();
    assert_eq!(y.to_vec().unwrap(), vec![110.0, 440.0, 130.0, 480.0]);
    let rows = profile::report();
    let binary: Vec<_> = rows
        .iter()
        .filter(|r| r.kernel.starts_with("elementwise:binary"))
        .collect();
    assert_eq!(binary.len(), 2, "add and mul are two pipelines: {rows:?}");
    assert!(
        binary.iter().all(|r| r.calls == 1 && r.workgroups == 1),
        "{rows:?}"
    );
    assert!(binary.iter().all(|r| r.seconds > 0.0), "{rows:?}");
    assert_eq!(rows.iter().map(|r| r.calls).sum::<u64>(), 2, "{rows:?}");
    profile::reset();
    assert!(profile::report().is_empty());
}

#[test]
fn command_line_prints_the_table_only_when_asked() {
    let run = |profile: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_vqclip"))
            .args(["embed", "--text", "a red circle on a blue background"])
            .env("VQCLIP_PROFILE", profile)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let on = run("1");
    assert!(on.contains("GPU time by kernel"), "{on}");
    let total = on.lines().find(|l| l.starts_with("total")).expect(&on);
    assert!(total.contains("100.0%"), "{on}");
    assert!(on.contains("matmul"), "the text tower's matmuls: {on}");
    let off = run("0");
    assert!(!off.contains("GPU time by kernel"), "{off}");
}
