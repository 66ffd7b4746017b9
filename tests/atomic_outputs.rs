//! Output files written whole or not at all under concurrency: the tuning file that `vqclip
//! bench` updates, written by many writers at once.

use std::path::Path;

#[test]
fn concurrent_tuning_writes_all_succeed_and_leave_valid_json() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tuning.json");
    // This test binary holds only this test, so the variable is set before any reader.
    std::env::set_var("VQCLIP_TUNING_FILE", &file);
    let gpu = vqclip::Gpu::shared().expect("a wgpu adapter");
    // Eight writers (as eight `bench` runs would be) each record twenty choices. With one
    // fixed temporary name they overwrite each other's half-written file and renames fail.
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let gpu = gpu.clone();
            std::thread::spawn(move || {
                for i in 0..20 {
                    gpu.save_tuning(&format!("key{t}"), &format!("value{i}"))
                        .unwrap_or_else(|e| panic!("writer {t}, write {i}: {e}"));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let scope = v.as_object().unwrap().values().next().unwrap();
    // The last writer's file is whole: its own last value is there.
    assert!(scope.as_object().unwrap().values().any(|x| x == "value19"));
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["tuning.json"], "temporaries left: {names:?}");
    assert!(Path::new(&file).is_file());
}
