//! `vqclip reconstruct` and `vqclip convert` as a user runs them, including bad input: a
//! missing config, a config that does not match the weights, image sizes that are not
//! multiples of the downsampling factor, truncated and malicious checkpoints.

use std::path::{Path, PathBuf};
use vqclip::models::vqgan::VqGan;
use vqclip::Gpu;

mod common;
use common::s;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vqgan")
        .join(name)
}

/// Runs the CLI; returns (success, stderr without Mesa's XDG noise).
fn vqclip(args: &[&str]) -> (bool, String) {
    let out = common::vqclip(args);
    let err = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.contains("XDG"))
        .collect::<Vec<_>>()
        .join("\n");
    (out.status.success(), err)
}

fn golden(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(&format!("{name}.json"))).unwrap())
        .unwrap()
}

#[test]
fn reconstruct_writes_the_png_and_codes_taming_gives() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let codes = dir.path().join("codes.json");
    // The config is found beside the checkpoint (tiny_f2.yaml).
    let (ok, err) = vqclip(&[
        "reconstruct",
        "--vqgan",
        s(&fixture("tiny_f2.ckpt")),
        s(&fixture("input.png")),
        "-o",
        s(&out),
        "--codes",
        s(&codes),
    ]);
    assert!(ok, "{err}");
    let g = golden("tiny_f2");
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&codes).unwrap()).unwrap();
    assert_eq!(got["codes"], g["codes"]);
    let img = image::open(&out).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (48, 32));
    // taming's pixels are round(clamp((x+1)/2)*255) of its own decoded floats; ours differ from
    // those floats by < 1e-5, so a pixel can only differ where the value sits on a .5 boundary.
    let want: Vec<i32> = serde_json::from_value(g["pixels"].clone()).unwrap();
    let (h, w) = (32usize, 48usize);
    let mut off = 0;
    for c in 0..3 {
        for i in 0..h * w {
            let d = (img.as_raw()[3 * i + c] as i32 - want[c * h * w + i]).abs();
            assert!(d <= 1, "pixel {i} channel {c}");
            off += (d != 0) as usize;
        }
    }
    assert!(off <= 3, "{off} pixels differ by one");
}

#[test]
fn convert_to_safetensors_then_reconstruct_gives_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("model.safetensors");
    let (ok, err) = vqclip(&["convert", s(&fixture("tiny_gumbel_f8.ckpt")), "-o", s(&st)]);
    assert!(ok, "{err}");
    assert!(dir.path().join("model.yaml").is_file());
    let bytes = std::fs::read(&st).unwrap();
    let t = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(t.names().iter().all(|k| !k.starts_with("loss.")));
    assert!(t.names().contains(&"quantize.embed.weight"));
    let (a, b) = (dir.path().join("a.png"), dir.path().join("b.png"));
    for (w, o) in [(fixture("tiny_gumbel_f8.ckpt"), &a), (st.clone(), &b)] {
        let (ok, err) = vqclip(&[
            "reconstruct",
            "--vqgan",
            s(&w),
            "--config",
            s(&fixture("tiny_gumbel_f8.yaml")),
            s(&fixture("input.png")),
            "-o",
            s(o),
        ]);
        assert!(ok, "{err}");
    }
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

#[test]
fn missing_config_is_a_clear_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("lonely.ckpt");
    std::fs::copy(fixture("tiny_f2.ckpt"), &ckpt).unwrap();
    let out = dir.path().join("out.png");
    let (ok, err) = vqclip(&[
        "reconstruct",
        "--vqgan",
        s(&ckpt),
        s(&fixture("input.png")),
        "-o",
        s(&out),
    ]);
    assert!(!ok);
    assert!(
        err.contains("no config") && err.contains("--config"),
        "{err}"
    );
    let (ok, err) = vqclip(&[
        "reconstruct",
        "--vqgan",
        s(&ckpt),
        "--config",
        s(&dir.path().join("nope.yaml")),
        s(&fixture("input.png")),
        "-o",
        s(&out),
    ]);
    assert!(!ok);
    assert!(err.contains("nope.yaml"), "{err}");
    assert!(!out.exists());
}

#[test]
fn sizes_not_multiple_of_the_factor_are_refused_or_resized() {
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("odd.png");
    image::RgbImage::from_fn(37, 21, |x, y| {
        image::Rgb([(x * 7) as u8, (y * 11) as u8, 99])
    })
    .save(&odd)
    .unwrap();
    let out = dir.path().join("out.png");
    let args = |extra: &[&'static str]| {
        let mut v = vec![
            "reconstruct".to_string(),
            "--vqgan".into(),
            s(&fixture("tiny_f4.ckpt")).into(),
            s(&odd).into(),
            "-o".into(),
            s(&out).into(),
        ];
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let a = args(&[]);
    let (ok, err) = vqclip(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok);
    assert!(
        err.contains("37x21") && err.contains("multiples of 4"),
        "{err}"
    );
    assert!(!out.exists());
    let a = args(&["--resize"]);
    let (ok, err) = vqclip(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    assert_eq!(image::open(&out).unwrap().to_rgb8().dimensions(), (36, 20));
}

#[test]
fn truncated_and_malicious_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::read(fixture("tiny_f2.ckpt")).unwrap();
    let cut = dir.path().join("cut.ckpt");
    std::fs::write(&cut, &full[..full.len() * 2 / 3]).unwrap();
    let out = dir.path().join("out.png");
    let (ok, err) = vqclip(&[
        "reconstruct",
        "--vqgan",
        s(&cut),
        "--config",
        s(&fixture("tiny_f2.yaml")),
        s(&fixture("input.png")),
        "-o",
        s(&out),
    ]);
    assert!(!ok);
    assert!(
        err.contains("cut.ckpt") && err.contains("truncated or corrupt"),
        "{err}"
    );

    let marker = Path::new("/tmp/vqclip-pickle-pwned");
    let _ = std::fs::remove_file(marker);
    let (ok, err) = vqclip(&[
        "reconstruct",
        "--vqgan",
        s(&fixture("malicious.ckpt")),
        "--config",
        s(&fixture("tiny_f2.yaml")),
        s(&fixture("input.png")),
        "-o",
        s(&out),
    ]);
    assert!(!ok);
    assert!(
        err.contains("posix.system") && err.contains("refusing"),
        "{err}"
    );
    assert!(!marker.exists(), "the pickle's payload ran");
    let (ok, err) = vqclip(&[
        "convert",
        s(&fixture("malicious.ckpt")),
        "--config",
        s(&fixture("tiny_f2.yaml")),
        "-o",
        s(&dir.path().join("m.safetensors")),
    ]);
    assert!(!ok && err.contains("posix.system"), "{err}");
    assert!(!out.exists() && !dir.path().join("m.safetensors").exists());
}

#[test]
fn config_that_does_not_match_the_tensors_names_key_and_shapes() {
    let g = Gpu::shared().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let yaml = std::fs::read_to_string(fixture("tiny_f2.yaml")).unwrap();
    for (from, to, key, got, want) in [
        (
            "z_channels: 16",
            "z_channels: 8",
            "encoder.conv_out.weight",
            "[16, 32, 3, 3]",
            "[8, 32, 3, 3]",
        ),
        (
            "n_embed: 64",
            "n_embed: 1024",
            "quantize.embedding.weight",
            "[64, 8]",
            "[1024, 8]",
        ),
        (
            "- 1\n      - 1\n",
            "- 1\n      - 2\n",
            "encoder.down.1.block.0.conv1.weight",
            "[32, 32, 3, 3]",
            "[64, 32, 3, 3]",
        ),
    ] {
        assert!(yaml.contains(from), "{from}");
        let p = dir.path().join("bad.yaml");
        std::fs::write(&p, yaml.replacen(from, to, 1)).unwrap();
        let e = VqGan::load(fixture("tiny_f2.ckpt"), &p, &g)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&format!("'{key}'")) && e.contains(got) && e.contains(want),
            "{e}"
        );
    }
    // A VQModel config for the Gumbel checkpoint: the codebook key differs.
    let e = VqGan::load(fixture("tiny_gumbel_f8.ckpt"), fixture("tiny_f2.yaml"), &g)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("tiny_gumbel_f8.ckpt"), "{e}");
}
