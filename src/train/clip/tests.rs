use super::batches::render_pairs;
use super::*;
use crate::autodiff::Tape;
use crate::models::clip::ClipModel;
use crate::ops::testutil::{assert_close, gpu};
use crate::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A tiny architecture for tests: 16 px images in 8 px patches, width 16, one layer each.
fn tiny(vocab: usize) -> ClipConfig {
    let mut c = shapes_config(vocab);
    c.text.hidden_size = 16;
    c.text.intermediate_size = 32;
    c.text.num_hidden_layers = 2;
    c.text.num_attention_heads = 2;
    c.vision.hidden_size = 16;
    c.vision.intermediate_size = 32;
    c.vision.num_hidden_layers = 1;
    c.vision.num_attention_heads = 2;
    c.vision.image_size = 16;
    c.vision.patch_size = 8;
    c.projection_dim = 16;
    c
}

fn vocab_size() -> usize {
    shapes_tokenizer(16).unwrap().vocab_size()
}

#[test]
fn the_written_config_reads_back_with_every_activation() {
    // `hf_config` once wrote "quick_gelu" for any activation but GELU.
    for act in Act::ALL {
        let mut c = tiny(vocab_size());
        c.text.hidden_act = act;
        c.vision.hidden_act = act;
        let back = ClipConfig::from_json(&hf_config(&c).to_string()).unwrap();
        assert_eq!(back.text.hidden_act, act);
        assert_eq!(back.vision.hidden_act, act);
    }
}

#[test]
fn shapes_tokenizer_spells_every_grammar_word_as_one_token() {
    let tok = shapes_tokenizer(77).unwrap();
    let v = tok.vocab_size();
    assert!((514..1000).contains(&v), "vocabulary of {v}");
    assert_eq!(
        tok.eos_id() as usize,
        v - 1,
        "end-of-text is the highest id"
    );
    assert_eq!(tok.bos_id() as usize, v - 2);
    for w in grammar_words() {
        let ids = tok.encode(&w).unwrap();
        assert_eq!(ids.len(), 3, "'{w}' -> {ids:?}");
    }
    let ds = ShapesDataset::new(3, Split::Train);
    for i in 0..300 {
        let (_, cap) = ds.sample(i);
        let ids = tok.encode(&cap).unwrap();
        assert_eq!(ids.len(), cap.split(' ').count() + 2, "{cap}");
        assert_eq!(tok.decode(&ids).unwrap().trim(), cap);
    }
    // Anything else still tokenises (byte pieces) and decodes back.
    for odd in [
        "Zebra-crossing #42!",
        "naïve café ☃",
        "the backgrounds",
        "x",
    ] {
        let ids = tok.encode(odd).unwrap();
        assert!(ids.len() >= 3, "{odd}");
        let strip = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
        assert_eq!(
            strip(&tok.decode(&ids).unwrap()),
            strip(&odd.to_lowercase())
        );
    }
    let longest = longest_caption_tokens().unwrap();
    assert_eq!(longest, 17, "two shapes with positions");
    assert!(longest <= shapes_config(v).text.max_position_embeddings);
    // merges.txt has the #version header; vocab.json is id-ordered JSON.
    let (vj, m) = shapes_tokenizer_files();
    assert!(m.starts_with("#version"));
    let map: std::collections::HashMap<String, u32> = serde_json::from_str(&vj).unwrap();
    assert_eq!(map.len(), v);
    assert_eq!(map["<|endoftext|>"] as usize, v - 1);
    assert_eq!(map["!"], 0);
}

#[test]
fn tape_text_tower_matches_the_inference_model() {
    let g = gpu();
    let tr = ClipTrainer::new(tiny(vocab_size()), 5, 1e-3, &g).unwrap();
    let texts: Vec<String> = [
        "a red circle",
        "a small blue square at the top left on a white background",
        "x",
        "a green diamond and a black triangle on a purple background",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let want = tr.model.text_features(&texts).unwrap().to_vec().unwrap();
    for training in [false, true] {
        let tape = if training {
            Tape::training()
        } else {
            Tape::new()
        };
        let ids = tr.model.tokenize(&texts).unwrap();
        let got = text_features(&tape, &tr.model, &ids)
            .unwrap()
            .value()
            .to_vec()
            .unwrap();
        let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
        assert_close(&got, &want, 1e-4, 0.0, &format!("training={training}"));
    }
}

#[test]
fn training_steps_lower_the_loss_and_resume_exactly() {
    let g = gpu();
    let cfg = tiny(vocab_size());
    let aug = Augment::default();
    let mut tr = ClipTrainer::new(cfg.clone(), 1, 3e-3, &g).unwrap();
    // One fixed batch, repeated: the loss must fall.
    let (px, caps) = batch(&g, 0, 1, 0, 8, 16, &aug).unwrap();
    let losses: Vec<f32> = (0..12)
        .map(|_| tr.step(&px, &caps, &[], 3e-3).unwrap().loss)
        .collect();
    assert!(losses[11] < losses[0] * 0.8, "loss should fall: {losses:?}");
    // Resume: 2 steps, save, 2 more == 2 steps, load into a fresh trainer, 2 more.
    let run = |tr: &mut ClipTrainer, from: usize, to: usize| {
        for s in from..to {
            let (px, caps) = batch(&g, 0, 9, s, 4, 16, &aug).unwrap();
            tr.step(&px, &caps, &[], 1e-3).unwrap();
        }
    };
    let mut a = ClipTrainer::new(cfg.clone(), 2, 1e-3, &g).unwrap();
    run(&mut a, 0, 2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.safetensors");
    super::super::save_state(&path, &a.params, &a.adam, 2, &[]).unwrap();
    run(&mut a, 2, 4);
    let mut b = ClipTrainer::new(cfg, 77, 1e-3, &g).unwrap();
    let st = super::super::load_state(&path, &b.params, &mut b.adam).unwrap();
    b.model.logit_scale = b.logit_scale.to_vec().unwrap()[0];
    run(&mut b, st.step, 4);
    for ((k, x), (_, y)) in a.params.iter().zip(&b.params) {
        assert_eq!(x.to_vec().unwrap(), y.to_vec().unwrap(), "{k}");
    }
}

#[test]
fn written_folder_loads_with_the_same_embeddings() {
    let g = gpu();
    let tr = ClipTrainer::new(tiny(vocab_size()), 3, 1e-3, &g).unwrap();
    let dir = tempfile::tempdir().unwrap();
    tr.write_folder(dir.path()).unwrap();
    let m = ClipModel::load(dir.path(), &g).unwrap();
    assert_eq!(m.config, tr.model.config);
    assert_eq!(m.logit_scale, tr.model.logit_scale);
    assert_eq!(m.preprocess.normalize, Some((MEAN, STD)));
    let texts = vec!["a red circle on a blue background".to_string()];
    assert_eq!(
        m.encode_text(&texts).unwrap().to_vec().unwrap(),
        tr.model.encode_text(&texts).unwrap().to_vec().unwrap()
    );
    let (px, _) = batch(&g, 0, 0, 0, 2, 16, &Augment::none()).unwrap();
    assert_eq!(
        m.encode_image(&px).unwrap().to_vec().unwrap(),
        tr.model.encode_image(&px).unwrap().to_vec().unwrap()
    );
    // The evaluation runs on it (an untrained model scores near chance).
    let r = evaluate(&m, 0, 8).unwrap();
    assert_eq!(r.n, 8);
    assert!(r.colour_correct <= 8 && r.shape_correct <= 8);
}

/// Augmented pixels stay finite, and the caption names positions only when the crop is
/// large enough (`position_crop`) for them to still hold.
#[test]
fn augmentation_keeps_pixels_finite_and_drops_position_words_from_tight_crops() {
    let ds = ShapesDataset::new(0, Split::Train);
    let aug = Augment::default();
    let none = Augment::none();
    // Every crop is at least `position_crop`: positions always kept.
    let keep = Augment {
        position_crop: 0.0,
        ..Augment::default()
    };
    // Every crop (at most the whole image) is under `position_crop`: positions always dropped.
    let drop = Augment {
        position_crop: 1.5,
        ..Augment::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut dropped = 0;
    for i in 0..50 {
        let (scene, _) = ds.sample(i);
        let (px, cap) = augmented_pair(&scene, 3, 32, &none, &mut rng);
        assert_eq!(
            px,
            normalise(&scene.render(32), 32),
            "no augmentation = plain"
        );
        assert_eq!(cap, scene.caption(3));
        let (px, cap) = augmented_pair(&scene, 3, 32, &aug, &mut rng);
        assert_eq!(px.len(), 3 * 32 * 32);
        assert!(px.iter().all(|v| v.is_finite()));
        // Either the full phrasing or one without positions.
        let ok = cap == scene.caption(3)
            || cap == scene.caption(1)
            || (scene.shapes.len() == 2 && cap == scene.caption(0));
        assert!(ok, "{cap}");
        dropped += usize::from(cap != scene.caption(3));
        let (_, cap) = augmented_pair(&scene, 3, 32, &keep, &mut rng);
        assert_eq!(cap, scene.caption(3));
        for sh in &scene.shapes {
            assert!(cap.contains(sh.position.words()), "{cap}");
        }
        let (_, cap) = augmented_pair(&scene, 3, 32, &drop, &mut rng);
        for sh in &scene.shapes {
            assert!(!cap.contains(sh.position.words()), "{cap}");
        }
    }
    // The default crops drop positions sometimes, not never or always.
    assert!((1..50).contains(&dropped), "{dropped} of 50 dropped");
}

/// Where the pixels of `colour` are in normalised CHW pixels `px` of side `size`: their mean
/// (x, y) as fractions of the side, `None` if there are none.
fn colour_centre(px: &[f32], size: usize, colour: Colour) -> Option<(f32, f32)> {
    let plane = size * size;
    let (mut sx, mut sy, mut n) = (0f32, 0f32, 0f32);
    for p in 0..plane {
        let rgb: [f32; 3] = std::array::from_fn(|c| (px[c * plane + p] * STD[c] + MEAN[c]) * 255.0);
        if Colour::nearest(rgb) == colour {
            sx += (p % size) as f32 + 0.5;
            sy += (p / size) as f32 + 0.5;
            n += 1.0;
        }
    }
    (n > 0.0).then(|| (sx / n / size as f32, sy / n / size as f32))
}

/// True if a shape whose centre is at (x, y) (fractions of the side) is where `position`'s
/// words say: in the named quadrant, or within the middle 30% for the centre.
fn is_at(position: Position, (x, y): (f32, f32)) -> bool {
    let (cx, cy) = position.centre();
    if position == Position::Centre {
        (x - 0.5).abs() < 0.15 && (y - 0.5).abs() < 0.15
    } else {
        (x < 0.5) == (cx < 0.5) && (y < 0.5) == (cy < 0.5)
    }
}

/// The position words a default-augmented caption keeps are true of its pixels: the shape is
/// in the named quadrant (or the middle) of the cropped image. Crops of any size that kept
/// their position words would not be: with `position_crop` 0 some shapes leave their place.
#[test]
fn augmented_captions_keep_position_words_only_where_the_pixels_honour_them() {
    let ds = ShapesDataset::new(0, Split::Train);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let keep_all = Augment {
        position_crop: 0.0,
        ..Augment::default()
    };
    let (mut checked, mut misplaced_if_kept) = (0, 0);
    for i in 0..400 {
        let (scene, _) = ds.sample(i);
        // one shape whose colour is its own: its pixels locate it
        let [sh] = scene.shapes.as_slice() else {
            continue;
        };
        let (px, cap) = augmented_pair(&scene, 3, 32, &Augment::default(), &mut rng);
        if cap.contains(sh.position.words()) {
            let at = colour_centre(&px, 32, sh.colour).expect("the shape is visible");
            assert!(is_at(sh.position, at), "{cap}: the shape is at {at:?}");
            checked += 1;
        }
        let (px, _) = augmented_pair(&scene, 3, 32, &keep_all, &mut rng);
        let at = colour_centre(&px, 32, sh.colour).expect("the shape is visible");
        misplaced_if_kept += usize::from(!is_at(sh.position, at));
    }
    assert!(
        checked >= 50,
        "only {checked} captions with positions checked"
    );
    assert!(
        misplaced_if_kept > 0,
        "tight crops never moved a shape: the check above would not catch dishonest captions"
    );
}

#[test]
fn tokenizer_matches_transformers() {
    // Ids from transformers' CLIPTokenizer on a folder written by `vqclip train clip`
    // (tools/verify_clip_hf.py --write-fixture).
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/clip/shapes_tokenizer_ids.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ctx = v["context"].as_u64().unwrap() as usize;
    let tok = shapes_tokenizer(ctx).unwrap();
    let texts = v["texts"].as_array().unwrap();
    let ids = v["ids"].as_array().unwrap();
    assert!(texts.len() >= 10);
    for (t, want) in texts.iter().zip(ids) {
        let want: Vec<u32> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let t = t.as_str().unwrap();
        assert_eq!(tok.encode(t).unwrap(), want, "{t:?}");
    }
}

#[test]
fn every_parameter_gets_a_gradient() {
    let g = gpu();
    let tr = ClipTrainer::new(tiny(vocab_size()), 4, 1e-3, &g).unwrap();
    let (px, caps) = batch(&g, 0, 1, 0, 4, 16, &Augment::default()).unwrap();
    let tape = Tape::training();
    let (loss, _) = tr.loss(&tape, &px, &caps, &[]).unwrap();
    let grads = tape.backward(&loss).unwrap();
    for (k, t) in &tr.params {
        let gr = grads.param(&tape, t);
        assert!(gr.is_some(), "no gradient for {k}");
        let v = gr.unwrap().to_vec().unwrap();
        assert!(v.iter().any(|x| *x != 0.0), "zero gradient for {k}");
    }
}

/// The trainer's parameter gradients against central finite differences of the loss, for
/// every tensor (the image tower's patch, class and position embeddings included): the
/// directional derivative along the gradient itself (must equal |g|) and along a fixed
/// random direction, with a tolerance for the f32 rounding of the loss and curvature.
fn check_gradients_by_finite_differences(cfg: ClipConfig, n: usize) {
    let g = gpu();
    let size = cfg.vision.image_size;
    let tr = ClipTrainer::new(cfg, 6, 1e-3, &g).unwrap();
    let aug = Augment {
        hard_negatives: true,
        ..Augment::none()
    };
    let (px, caps) = batch(&g, 0, 3, 0, n, size, &aug).unwrap();
    // Shape-negative captions for the first two pairs: the loss with extra text columns.
    let negs: Vec<String> = caps[..2].iter().flat_map(|c| shape_negatives(c)).collect();
    let loss_of = |tr: &ClipTrainer| -> f64 {
        let tape = Tape::new();
        let (l, _) = tr.loss(&tape, &px, &caps, &negs).unwrap();
        l.value().to_vec().unwrap()[0] as f64
    };
    let tape = Tape::training();
    let (loss, _) = tr.loss(&tape, &px, &caps, &negs).unwrap();
    let grads = tape.backward(&loss).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut failures = Vec::new();
    for (k, t) in &tr.params {
        let gv = grads.param(&tape, t).unwrap().to_vec().unwrap();
        let base = t.to_vec().unwrap();
        let gn = gv.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let rand_dir: Vec<f64> = (0..base.len())
            .map(|_| rng.random_range(-1.0..1.0f64))
            .collect();
        let rn = rand_dir.iter().map(|x| x * x).sum::<f64>().sqrt();
        for (name, dir) in [
            (
                "gradient",
                gv.iter()
                    .map(|x| *x as f64 / gn.max(1e-30))
                    .collect::<Vec<f64>>(),
            ),
            ("random", rand_dir.iter().map(|x| x / rn).collect()),
        ] {
            let want: f64 = gv.iter().zip(&dir).map(|(a, b)| *a as f64 * b).sum();
            let eps = 1e-2;
            let at = |s: f64| {
                let v: Vec<f32> = base
                    .iter()
                    .zip(&dir)
                    .map(|(b, d)| (*b as f64 + s * d) as f32)
                    .collect();
                t.assign(&Tensor::from_slice(&g, &v, t.shape()).unwrap())
                    .unwrap();
                loss_of(&tr)
            };
            let num = (at(eps) - at(-eps)) / (2.0 * eps);
            t.assign(&Tensor::from_slice(&g, &base, t.shape()).unwrap())
                .unwrap();
            // f32 loss rounding (~1e-6 after reductions) over 2·eps, plus curvature.
            let tol = 2e-4 + 0.03 * want.abs().max(num.abs());
            eprintln!("{k:55} {name:8} analytic {want:+.6e} numeric {num:+.6e}");
            if (want - num).abs() > tol {
                failures.push(format!("{k} ({name}): analytic {want:e} numeric {num:e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// [`check_gradients_by_finite_differences`] on 24 px images in 3×3 patches, two image
/// layers.
#[test]
fn parameter_gradients_match_finite_differences() {
    let mut cfg = tiny(vocab_size());
    cfg.vision.image_size = 24;
    cfg.vision.num_hidden_layers = 2;
    check_gradients_by_finite_differences(cfg, 6);
}

/// The same at the full shapes architecture (65 image tokens, width 64), batch 4 (on
/// request: `cargo test --release full_size_gradients -- --ignored --nocapture`).
#[test]
#[ignore]
fn full_size_gradients_match_finite_differences() {
    check_gradients_by_finite_differences(shapes_config(vocab_size()), 4);
}

#[test]
fn batch_rendering_is_the_same_on_any_number_of_threads() {
    let ds = ShapesDataset::new(3, Split::Train);
    let jobs: Vec<(Scene, usize, u64)> = (0..7)
        .map(|i| (ds.sample(i).0, (i % 4) as usize, 1000 + i))
        .collect();
    let aug = Augment::default();
    let one = render_pairs(&jobs, 24, &aug, 1);
    for threads in [2, 3, 16] {
        assert_eq!(
            render_pairs(&jobs, 24, &aug, threads),
            one,
            "{threads} threads"
        );
    }
    assert_eq!(one.0.len(), 7 * 3 * 24 * 24);
    // Different seeds give different augmentations of the same scene.
    let mut other = jobs.clone();
    other[0].2 += 1;
    let two = render_pairs(&other, 24, &aug, 3);
    assert_ne!(two.0[..3 * 24 * 24], one.0[..3 * 24 * 24]);
    assert_eq!(two.0[3 * 24 * 24..], one.0[3 * 24 * 24..]);
}

#[test]
fn shape_negatives_swap_only_the_first_shape_word() {
    let got = shape_negatives("a small red circle and a blue square on a green background");
    assert_eq!(
        got,
        vec![
            "a small red square and a blue square on a green background",
            "a small red triangle and a blue square on a green background",
            "a small red diamond and a blue square on a green background",
        ]
    );
    assert!(shape_negatives("a red thing").is_empty());
    assert!(shape_negatives("").is_empty());
}

#[test]
fn batch_shape_negatives_never_repeat_a_caption_of_the_batch() {
    let caps: Vec<String> = [
        "a red circle on a blue background",
        "a red square on a blue background", // the first one's hard negative
        "a red circle on a blue background", // the same caption twice
        "a green triangle",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let got = batch_shape_negatives(&caps);
    assert_eq!(
        got,
        vec![
            "a red triangle on a blue background",
            "a red diamond on a blue background",
            "a green circle",
            "a green square",
            "a green diamond",
        ]
    );
    // without such pairs it is every caption's shape negatives, in order
    let plain: Vec<String> = vec![
        "a red circle".into(),
        "a blue square on a white background".into(),
    ];
    let all: Vec<String> = plain.iter().flat_map(|c| shape_negatives(c)).collect();
    assert_eq!(batch_shape_negatives(&plain), all);
}

#[test]
fn swap_negatives_exchange_the_shape_and_background_colours() {
    assert_eq!(
        swap_negative("a small red circle at the top left on a blue background").as_deref(),
        Some("a small blue circle at the top left on a red background")
    );
    // two shapes, no background, one colour: none
    for c in [
        "a red circle and a blue square on a green background",
        "a red circle at the top left",
        "a plain red background",
        "a red circle on a red background",
        "",
    ] {
        assert_eq!(swap_negative(c), None, "{c}");
    }
    let caps: Vec<String> = [
        "a red circle on a blue background",
        "a blue circle on a red background", // the first one's swap: a caption, not a negative
        "a green triangle on a white background",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(
        batch_negatives(&caps, false, true),
        vec!["a white triangle on a green background"]
    );
    let both = batch_negatives(&caps, true, true);
    assert_eq!(both.len(), 3 + 3 + 3 + 1);
    assert!(both.contains(&"a red square on a blue background".to_string()));
    assert!(batch_negatives(&caps, false, false).is_empty());
}

/// The loss with negative captions against a CPU evaluation of its formula: image rows pick
/// among all texts, caption columns among the images only.
#[test]
fn contrastive_loss_with_negative_captions_matches_its_formula() {
    let g = gpu();
    let (n, m, p) = (3usize, 5usize, 4usize);
    let img: Vec<f32> = (0..n * p)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0)
        .collect();
    let txt: Vec<f32> = (0..m * p)
        .map(|i| ((i * 5 % 13) as f32 - 6.0) / 4.0)
        .collect();
    let scale = 1.3f32;
    let tape = Tape::new();
    let leaf = |v: &[f32], r: usize| tape.leaf(Tensor::from_slice(&g, v, &[r, p]).unwrap(), false);
    let ls = tape.leaf(Tensor::from_slice(&g, &[scale], &[1]).unwrap(), false);
    let (loss, logits) = contrastive_loss(&tape, &leaf(&img, n), &leaf(&txt, m), &ls).unwrap();
    assert_eq!(logits.shape(), &[n, m]);
    let norm = |v: &[f32]| {
        let l = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        v.iter().map(|x| *x as f64 / l).collect::<Vec<f64>>()
    };
    let l: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let a = norm(&img[i * p..(i + 1) * p]);
            (0..m)
                .map(|j| {
                    let b = norm(&txt[j * p..(j + 1) * p]);
                    (scale as f64).exp() * a.iter().zip(&b).map(|(x, y)| x * y).sum::<f64>()
                })
                .collect()
        })
        .collect();
    let ce = |row: &[f64], t: usize| {
        let mx = row.iter().cloned().fold(f64::MIN, f64::max);
        mx + row.iter().map(|x| (x - mx).exp()).sum::<f64>().ln() - row[t]
    };
    let a: f64 = (0..n).map(|i| ce(&l[i], i)).sum::<f64>() / n as f64;
    let b: f64 = (0..n)
        .map(|j| ce(&(0..n).map(|i| l[i][j]).collect::<Vec<_>>(), j))
        .sum::<f64>()
        / n as f64;
    let want = (a + b) / 2.0;
    let got = loss.value().to_vec().unwrap()[0] as f64;
    assert!((got - want).abs() < 1e-4, "loss {got} vs {want}");
    // Fewer texts than images is refused.
    assert!(contrastive_loss(&tape, &leaf(&img, n), &leaf(&txt[..2 * p], 2), &ls).is_err());
}

#[test]
fn the_adversarial_attack_raises_the_loss_within_its_ball() {
    let g = gpu();
    let tr = ClipTrainer::new(tiny(vocab_size()), 8, 1e-3, &g).unwrap();
    let (px, caps) = batch(&g, 0, 1, 0, 4, 16, &Augment::default()).unwrap();
    let negatives = batch_negatives(&caps, true, true);
    let loss = |p: &Tensor| {
        let tape = Tape::new();
        let (l, _) = tr.loss(&tape, p, &caps, &negatives).unwrap();
        l.value().to_vec().unwrap()[0]
    };
    // pixels in [0, 1], per image
    let raw = |p: &Tensor| -> Vec<Vec<f32>> {
        let v = p.to_vec().unwrap();
        v.chunks(3 * 16 * 16)
            .map(|img| {
                img.iter()
                    .enumerate()
                    .map(|(i, &x)| x * STD[i / 256] + MEAN[i / 256])
                    .collect()
            })
            .collect()
    };
    let before = loss(&px);
    let clean = raw(&px);
    assert!(
        tr.attack(&px, &caps, &negatives, &Adversarial::OFF)
            .unwrap()
            .to_vec()
            .unwrap()
            == px.to_vec().unwrap()
    );
    for (norm, eps) in [(AdvNorm::L2, 0.5f32), (AdvNorm::Linf, 0.03)] {
        let adv = Adversarial {
            eps,
            steps: 3,
            norm,
        };
        let moved = tr.attack(&px, &caps, &negatives, &adv).unwrap();
        let after = loss(&moved);
        assert!(after > before + 1e-3, "{norm}: loss {before} -> {after}");
        for (c, m) in clean.iter().zip(raw(&moved)) {
            let d: Vec<f32> = c.iter().zip(&m).map(|(a, b)| b - a).collect();
            let size = match norm {
                AdvNorm::L2 => d.iter().map(|v| v * v).sum::<f32>().sqrt(),
                AdvNorm::Linf => d.iter().fold(0f32, |a, v| a.max(v.abs())),
            };
            assert!(size <= eps * 1.001, "{norm}: moved by {size} > {eps}");
            assert!(size > eps * 0.1, "{norm}: moved by only {size}");
            assert!(
                m.iter().all(|&v| (-1e-5..=1.0 + 1e-5).contains(&v)),
                "{norm}: left [0, 1]"
            );
        }
    }
}
