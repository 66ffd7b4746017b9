//! VQGAN against taming-transformers goldens (tests/fixtures/vqgan, made by
//! tools/make_vqgan_fixtures.py): small random models of the real architecture saved as
//! Lightning checkpoints, their encoder outputs, codes and decoded images.

use vqclip::models::vqgan::VqGan;
use vqclip::{Gpu, Tensor};

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/vqgan/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn gpu() -> Gpu {
    Gpu::shared().expect("a wgpu adapter (install mesa-vulkan-drivers for lavapipe)")
}

struct Golden {
    input_shape: Vec<usize>,
    input: Vec<f32>,
    h_shape: Vec<usize>,
    h: Vec<f32>,
    codes: Vec<u32>,
    z_q: Vec<f32>,
    decoded: Vec<f32>,
}

fn golden(name: &str) -> Golden {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(&format!("{name}.json"))).unwrap())
            .unwrap();
    let f = |k: &str| -> Vec<f32> { serde_json::from_value(v[k].clone()).unwrap() };
    let u = |k: &str| -> Vec<usize> { serde_json::from_value(v[k].clone()).unwrap() };
    let codes: Vec<Vec<u32>> = serde_json::from_value(v["codes"].clone()).unwrap();
    Golden {
        input_shape: u("input_shape"),
        input: f("input"),
        h_shape: u("h_shape"),
        h: f("h"),
        codes: codes.concat(),
        z_q: f("z_q"),
        decoded: f("decoded"),
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max)
}

/// Runs one fixture model end to end and checks every stage against taming.
fn check_model(name: &str) {
    let g = gpu();
    let model = VqGan::load(
        fixture(&format!("{name}.ckpt")),
        fixture(&format!("{name}.yaml")),
        &g,
    )
    .unwrap();
    let gold = golden(name);
    let x = Tensor::from_slice(&g, &gold.input, &gold.input_shape).unwrap();
    let z = model.encode(&x).unwrap();
    assert_eq!(z.shape(), gold.h_shape.as_slice());
    let h_err = max_abs_diff(&z.to_vec().unwrap(), &gold.h);
    let (zq, codes) = model.quantize(&z).unwrap();
    let codes = codes.to_vec_u32().unwrap();
    let zq_v = zq.to_vec().unwrap();
    let dec = model.decode(&zq).unwrap().to_vec().unwrap();
    let dec_err = max_abs_diff(&dec, &gold.decoded);
    let mismatched = codes
        .iter()
        .zip(&gold.codes)
        .filter(|(a, b)| a != b)
        .count();
    eprintln!(
        "{name}: encoder h max|err| {h_err:.2e}; codes {}/{} equal; decoded max|err| {dec_err:.2e}",
        codes.len() - mismatched,
        codes.len()
    );
    // Encoder: f32 on both sides through ~20 layers; 1e-3 is the bound for images and
    // far below the fixtures' smallest code margin (tools/make_vqgan_fixtures.py: 2e-3 in
    // squared distance at unit-spread z), so codes must then match exactly.
    assert!(h_err <= 1e-3, "{name}: encoder output error {h_err:e}");
    assert_eq!(codes, gold.codes, "{name}: codes differ from taming");
    assert_eq!(zq_v, gold.z_q, "{name}: z_q is not the codebook rows");
    assert!(dec_err <= 1e-3, "{name}: decoded error {dec_err:e}");
}

#[test]
fn tiny_f2_matches_taming() {
    check_model("tiny_f2");
}

#[test]
fn tiny_f4_with_checkpoint_views_matches_taming() {
    check_model("tiny_f4");
}

#[test]
fn gumbel_f8_matches_taming() {
    check_model("tiny_gumbel_f8");
}

#[test]
fn config_tensor_list_is_exactly_the_checkpoint_model_keys() {
    use vqclip::models::vqgan::VqGanConfig;
    use vqclip::weights::torch::TorchCheckpoint;
    use vqclip::weights::TensorSource;
    for name in ["tiny_f2", "tiny_f4", "tiny_gumbel_f8"] {
        let cfg = VqGanConfig::from_file(fixture(&format!("{name}.yaml"))).unwrap();
        let ck = TorchCheckpoint::open(fixture(&format!("{name}.ckpt"))).unwrap();
        let want: Vec<(String, Vec<usize>)> = ck
            .keys()
            .into_iter()
            .filter(|k| !k.starts_with("loss."))
            .map(|k| {
                let s = ck.shape(&k).unwrap();
                (k, s)
            })
            .collect();
        // Same names, shapes and order as torch's state_dict.
        assert_eq!(cfg.tensor_shapes(), want, "{name}");
    }
}
