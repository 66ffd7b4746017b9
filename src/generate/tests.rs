//! The loop on tiny stand-in models (a linear "VQGAN" and a linear "CLIP"), so that the
//! optimisation, the gradients through quantisation, cutouts and losses, and determinism are
//! tested independently of the real models.

use super::cutouts::CutMethod;
use super::losses::rank_pool;
use super::views::colour_jitter_and_erase;
use super::*;
use crate::ops::matmul::MatmulOpts;
use crate::ops::testutil::{gpu, rand_vec};
use rand::SeedableRng;

const E: usize = 4;
const F: usize = 4;
const S: usize = 8;
const P: usize = 16;

struct LinearVqgan {
    codebook: Tensor,
    dec: Tensor, // [3·H·W, E·h·w] for a fixed 16x16 output
    enc: Tensor, // [E·h·w, 3·H·W]
}

impl LinearVqgan {
    fn new(g: &Gpu) -> Self {
        let (h, w) = (16 / F, 16 / F);
        LinearVqgan {
            codebook: Tensor::from_slice(g, &rand_vec(256 * E, 1), &[256, E]).unwrap(),
            dec: Tensor::from_slice(g, &rand_vec(3 * 256 * E * h * w, 2), &[3 * 256, E * h * w])
                .unwrap(),
            enc: Tensor::from_slice(g, &rand_vec(3 * 256 * E * h * w, 3), &[E * h * w, 3 * 256])
                .unwrap(),
        }
    }
}

impl Generator for LinearVqgan {
    fn factor(&self) -> usize {
        F
    }
    fn codebook(&self) -> &Tensor {
        &self.codebook
    }
    fn quantize(&self, z: &Tensor) -> Result<Tensor> {
        let (zv, cb) = (z.to_vec()?, self.codebook.to_vec()?);
        let hw = z.numel() / E;
        let mut out = vec![0.0; zv.len()];
        for pos in 0..hw {
            let best = (0..256)
                .min_by(|&a, &b| {
                    let d = |k: usize| {
                        (0..E)
                            .map(|c| (zv[c * hw + pos] - cb[k * E + c]).powi(2))
                            .sum::<f32>()
                    };
                    d(a).total_cmp(&d(b))
                })
                .unwrap();
            for c in 0..E {
                out[c * hw + pos] = cb[best * E + c];
            }
        }
        Tensor::from_slice(z.gpu(), &out, z.shape())
    }
    fn decode(&self, tape: &Tape, z_q: &Var) -> Result<Var> {
        let n = z_q.value().numel();
        let z = tape.reshape(z_q, &[n, 1])?;
        let d = tape.leaf(self.dec.clone(), false);
        let x = tape.matmul(
            &d,
            &z,
            None,
            &MatmulOpts {
                alpha: Some(0.3),
                ..Default::default()
            },
        )?;
        tape.reshape(&x, &[1, 3, 16, 16])
    }
    fn encode(&self, image: &Tensor) -> Result<Tensor> {
        let x = image.reshape(&[3 * 256, 1])?;
        let z = crate::ops::matmul(
            &self.enc,
            &x,
            &MatmulOpts {
                alpha: Some(0.05),
                ..Default::default()
            },
        )?;
        z.reshape(&[1, E, 16 / F, 16 / F])
    }
}

struct LinearClip {
    proj: Tensor, // [P, 3·S·S]
}

impl Perceptor for LinearClip {
    fn image_size(&self) -> usize {
        S
    }
    fn embed_dim(&self) -> usize {
        P
    }
    fn mean_std(&self) -> ([f32; 3], [f32; 3]) {
        ([0.48, 0.46, 0.41], [0.27, 0.26, 0.28])
    }
    fn encode_text(&self, texts: &[String]) -> Result<Tensor> {
        let mut v = Vec::new();
        for t in texts {
            let seed = t
                .bytes()
                .fold(7u64, |a, b| a.wrapping_mul(31).wrapping_add(b as u64));
            v.extend(rand_vec(P, seed));
        }
        Tensor::from_slice(&self.proj.gpu().clone(), &v, &[texts.len(), P])
    }
    fn encode_image(&self, tape: &Tape, pixels: &Var) -> Result<Var> {
        let n = pixels.shape()[0];
        let x = tape.reshape(pixels, &[n, 3 * S * S])?;
        let w = tape.leaf(self.proj.clone(), false);
        tape.matmul(
            &x,
            &w,
            None,
            &MatmulOpts {
                trans_b: true,
                ..Default::default()
            },
        )
    }
}

fn models(g: &Gpu) -> (LinearClip, LinearVqgan) {
    (
        LinearClip {
            proj: Tensor::from_slice(g, &rand_vec(P * 3 * S * S, 9), &[P, 3 * S * S]).unwrap(),
        },
        LinearVqgan::new(g),
    )
}

fn opts() -> Options {
    let mut o = Options::new(
        Prompt::parse_list("a red circle|blurry:-0.3").unwrap(),
        16,
        16,
    );
    o.cutn = 4;
    o.lr = 0.1;
    o
}

#[test]
fn loss_goes_down_and_the_same_seed_gives_the_same_bytes() {
    let g = gpu();
    let (clip, vq) = models(&g);
    let run = |o: Options, steps: usize| {
        let mut gen = Generation::new(&g, &clip, &vq, o).unwrap();
        let logs: Vec<StepLog> = (0..steps).map(|_| gen.step().unwrap()).collect();
        (logs, gen.image_rgb8().unwrap())
    };
    let (logs, img) = run(opts(), 40);
    let first: f32 = logs[..5].iter().map(|l| l.loss).sum::<f32>() / 5.0;
    let last: f32 = logs[35..].iter().map(|l| l.loss).sum::<f32>() / 5.0;
    assert!(
        last < first - 0.05,
        "loss should fall: first steps {first}, last steps {last}"
    );
    assert_eq!(logs[0].prompt_losses.len(), 2);
    assert_eq!(img.len(), 16 * 16 * 3);
    let (logs2, img2) = run(opts(), 40);
    assert_eq!(img, img2, "same seed, same bytes");
    assert_eq!(logs.last().unwrap().loss, logs2.last().unwrap().loss);
    let mut o = opts();
    o.seed = 1;
    assert_ne!(run(o, 5).1, run(opts(), 5).1, "another seed, another image");
}

#[test]
fn every_init_and_option_runs() {
    let g = gpu();
    let (clip, vq) = models(&g);
    for init in [
        Init::RandomCodes,
        Init::Pixels,
        Init::Gradient,
        Init::Image(vec![0.5; 3 * 256]),
    ] {
        let mut o = opts();
        o.init = init.clone();
        o.init_weight = 0.5;
        o.tv_weight = 0.1;
        o.cut_method = CutMethod::Pooled;
        o.optimizer = Kind::AdamW;
        o.noise_prompts = vec![(3, 0.5)];
        o.image_prompts = vec![(
            vec![0.2; 3 * 12 * 20],
            20,
            12,
            Prompt::parse("img:0.5").unwrap(),
        )];
        let mut gen = Generation::new(&g, &clip, &vq, o).unwrap();
        let log = gen.step().unwrap();
        assert!(log.loss.is_finite(), "{init:?}");
        assert_eq!(log.prompt_losses.len(), 4);
        // z stays within the codebook's per-channel range
        let (z, cb) = (
            gen.latent().unwrap().to_vec().unwrap(),
            vq.codebook.to_vec().unwrap(),
        );
        let hw = z.len() / E;
        for c in 0..E {
            let lo = (0..256).map(|k| cb[k * E + c]).fold(f32::MAX, f32::min);
            let hi = (0..256).map(|k| cb[k * E + c]).fold(f32::MIN, f32::max);
            assert!(z[c * hw..(c + 1) * hw].iter().all(|&v| v >= lo && v <= hi));
        }
    }
}

#[test]
fn bad_options_are_refused() {
    let g = gpu();
    let (clip, vq) = models(&g);
    let mut o = opts();
    o.width = 18;
    let e = Generation::new(&g, &clip, &vq, o)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("multiples of the VQGAN factor 4"), "{e}");
    let mut o = opts();
    o.prompts.clear();
    assert!(Generation::new(&g, &clip, &vq, o).is_err());
    let mut o = opts();
    o.cutn = 0;
    assert!(Generation::new(&g, &clip, &vq, o).is_err());
}

#[test]
fn colour_jitter_keeps_grey_grey_and_erasing_zeroes_a_rectangle() {
    // Hue rotation about the grey axis and saturation toward luma leave grey pixels grey;
    // brightness and contrast move them within ±0.1·0.5 + small; erased pixels are exactly 0
    // and get no gradient.
    let g = gpu();
    let (n, s) = (16, 8);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let tape = Tape::new();
    let x = tape.leaf(Tensor::full(&g, &[n, 3, s, s], 0.5).unwrap(), true);
    let y = colour_jitter_and_erase(&g, &tape, &x, &mut rng).unwrap();
    let v = y.value().to_vec().unwrap();
    let grads = tape.backward(&tape.sum(&y).unwrap()).unwrap();
    let gx = grads.get(&x).unwrap().to_vec().unwrap();
    let mut zeros = 0;
    for cut in 0..n {
        for p in 0..s * s {
            let rgb: Vec<f32> = (0..3).map(|c| v[(cut * 3 + c) * s * s + p]).collect();
            if rgb.iter().all(|&c| c == 0.0) {
                zeros += 1;
                assert!((0..3).all(|c| gx[(cut * 3 + c) * s * s + p] == 0.0));
                continue;
            }
            assert!(
                (rgb[0] - rgb[1]).abs() < 1e-5 && (rgb[1] - rgb[2]).abs() < 1e-5,
                "{rgb:?}"
            );
            assert!((rgb[0] - 0.5).abs() < 0.07, "{rgb:?}");
        }
    }
    // The erased rectangle is the same in every cutout (or absent with probability 0.3).
    assert_eq!(zeros % n, 0);
}

#[test]
fn coarse_to_fine_latent_grids_lay_out_large_regions_first() {
    let g = gpu();
    let (clip, vq) = models(&g);
    // The 16x16 image has a 4x4 latent: phases of 2 steps on grids 1, 2 and 4.
    for init in [Init::RandomCodes, Init::Image(rand_vec(3 * 256, 8))] {
        let mut o = opts();
        o.init = init.clone();
        o.steps = 6;
        o.latent_grids = vec![1, 2, 4];
        o.cut_method = CutMethod::Jitter;
        o.init_weight = 0.1;
        let mut gen = Generation::new(&g, &clip, &vq, o.clone()).unwrap();
        let at = |z: &[f32], c: usize, y: usize, x: usize| z[(c * 4 + y) * 4 + x];
        for step in 0..6 {
            let log = gen.step().unwrap();
            assert!(log.loss.is_finite(), "{init:?} step {step}");
            let z = gen.latent().unwrap();
            assert_eq!(z.shape(), [1, E, 4, 4]);
            let z = z.to_vec().unwrap();
            match step {
                // grid 1: one latent vector everywhere
                0 | 1 => {
                    for c in 0..E {
                        assert!((0..16).all(|p| z[c * 16 + p] == z[c * 16]), "step {step}");
                    }
                }
                // grid 2: bilinear upsampling, e.g. row 1 = 0.75 row 0 + 0.25 row 3
                2 | 3 => {
                    for c in 0..E {
                        for x in 0..4 {
                            let want = 0.75 * at(&z, c, 0, x) + 0.25 * at(&z, c, 3, x);
                            assert!((at(&z, c, 1, x) - want).abs() < 1e-5, "step {step}");
                        }
                        assert_ne!(at(&z, c, 0, 0), at(&z, c, 3, 3), "step {step}");
                    }
                }
                // the full 4x4 latent, free
                _ => {
                    let bilinear = (0..E).all(|c| {
                        (0..4).all(|x| {
                            let want = 0.75 * at(&z, c, 0, x) + 0.25 * at(&z, c, 3, x);
                            (at(&z, c, 1, x) - want).abs() < 1e-5
                        })
                    });
                    assert!(!bilinear, "step {step}: the last phase is not constrained");
                }
            }
        }
        // seeded like everything else
        let mut again = Generation::new(&g, &clip, &vq, o).unwrap();
        for _ in 0..6 {
            again.step().unwrap();
        }
        assert_eq!(again.image_rgb8().unwrap(), gen.image_rgb8().unwrap());
    }
}

#[test]
fn latent_grids_are_checked_and_follow_the_aspect_ratio() {
    assert_eq!(resolve_grids(&[], 4, 8).unwrap(), vec![(4, 8)]);
    assert_eq!(
        resolve_grids(&[1, 2, 4], 4, 8).unwrap(),
        vec![(1, 2), (2, 4), (4, 8)]
    );
    assert_eq!(resolve_grids(&[3], 6, 4).unwrap(), vec![(5, 3)]);
    for bad in [0, 5] {
        let e = resolve_grids(&[2, bad], 4, 8).unwrap_err().to_string();
        assert!(e.contains(&format!("latent grid {bad}")), "{e}");
    }
    let g = gpu();
    let (clip, vq) = models(&g);
    let mut o = opts();
    o.latent_grids = vec![9];
    let e = Generation::new(&g, &clip, &vq, o)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("between 1 and 4"), "{e}");
}

#[test]
fn candidates_try_random_starts_and_keep_the_best() {
    let g = gpu();
    let (clip, vq) = models(&g);
    let mut o = opts();
    o.steps = 10;
    o.latent_grids = vec![2, 4];
    o.candidates = 3;
    o.candidate_steps = 2;
    let mut gen = Generation::new(&g, &clip, &vq, o.clone()).unwrap();
    let mut starts = Vec::new();
    for step in 0..6usize {
        gen.step().unwrap();
        if step % 2 == 1 && step < 5 {
            // a new random start has begun
            starts.push(gen.latent().unwrap().to_vec().unwrap());
        }
        assert_eq!(
            gen.candidate_losses().len(),
            step.div_ceil(2),
            "step {step}"
        );
    }
    assert_ne!(starts[0], starts[1], "each start draws its own codes");
    // After the third start the best one is back, with the loss it was chosen for.
    let tried = gen.candidate_losses().to_vec();
    let best = tried.iter().cloned().fold(f32::INFINITY, f32::min);
    assert_eq!(gen.clean_loss().unwrap(), best, "tried {tried:?}");
    assert!(
        tried.iter().any(|&l| l > best),
        "three different starts: {tried:?}"
    );
    for _ in 6..10 {
        assert!(gen.step().unwrap().loss.is_finite());
    }
    assert_eq!(gen.candidate_losses().len(), 3);
    // seeded
    let mut again = Generation::new(&g, &clip, &vq, o.clone()).unwrap();
    for _ in 0..10 {
        again.step().unwrap();
    }
    assert_eq!(again.image_rgb8().unwrap(), gen.image_rgb8().unwrap());
    // refused: no room for the choice, zero-step starts, a fixed start
    for (steps, k, ks, init) in [
        (6, 3, 2, Init::RandomCodes),
        (10, 3, 0, Init::RandomCodes),
        (10, 2, 4, Init::RandomCodes), // 4 steps > the first phase of (10 - 4) / 2 = 3
        (10, 2, 2, Init::Image(vec![0.5; 3 * 256])),
        (10, 0, 2, Init::RandomCodes),
    ] {
        let mut o = o.clone();
        (o.steps, o.candidates, o.candidate_steps, o.init) = (steps, k, ks, init);
        let e = Generation::new(&g, &clip, &vq, o).err();
        assert!(e.is_some(), "{steps} {k} {ks}");
        assert!(e.unwrap().to_string().contains("candidates"));
    }
}

/// CLIP's loss of `img` (`[3, h, w]`) seen whole, on the CPU: the stand-in CLIP is linear, so
/// this is `acos(cos(proj · normalise(resample(img)), text))² / 2` summed over the weighted
/// text prompts.
fn cpu_pool_loss(clip: &LinearClip, prompts: &[Prompt], img: &[f32], w: usize, h: usize) -> f32 {
    let my = cutouts::resample_matrix(S, h, 0.0, h as f32, false);
    let mx = cutouts::resample_matrix(S, w, 0.0, w as f32, false);
    let (mean, std) = clip.mean_std();
    let mut x = vec![0.0f32; 3 * S * S];
    for c in 0..3 {
        for i in 0..S {
            for j in 0..S {
                let mut v = 0.0;
                for y in 0..h {
                    for xx in 0..w {
                        v += my[i * h + y] * img[(c * h + y) * w + xx] * mx[j * w + xx];
                    }
                }
                x[(c * S + i) * S + j] = (v - mean[c]) / std[c];
            }
        }
    }
    let proj = clip.proj.to_vec().unwrap();
    let emb: Vec<f32> = (0..P)
        .map(|p| (0..3 * S * S).map(|k| proj[p * 3 * S * S + k] * x[k]).sum())
        .collect();
    let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
    let mut total = 0.0;
    for pr in prompts {
        let t = clip
            .encode_text(std::slice::from_ref(&pr.text))
            .unwrap()
            .to_vec()
            .unwrap();
        let cos = emb.iter().zip(&t).map(|(a, b)| a * b).sum::<f32>() / (norm(&emb) * norm(&t));
        total += pr.weight * cos.clamp(-1.0, 1.0).acos().powi(2) / 2.0;
    }
    total
}

#[test]
fn a_pool_start_is_the_image_clip_ranks_closest_to_the_prompts() {
    let g = gpu();
    let (clip, vq) = models(&g);
    let o = opts();
    let pool: Vec<Vec<f32>> = (0..70)
        .map(|i| {
            rand_vec(3 * 256, 100 + i)
                .iter()
                .map(|v| v * 0.5 + 0.5)
                .collect()
        })
        .collect();
    let mut po = o.clone();
    po.init = Init::Pool(pool.clone());
    let gen = Generation::new(&g, &clip, &vq, po).unwrap();
    // every image scored (70: more than one batch), as the CPU reference scores it
    let losses = gen.pool_losses().to_vec();
    assert_eq!(losses.len(), 70);
    for (i, img) in pool.iter().enumerate() {
        let want = cpu_pool_loss(&clip, &o.prompts, img, 16, 16);
        assert!(
            (losses[i] - want).abs() < 1e-4,
            "image {i}: {} vs CPU {want}",
            losses[i]
        );
    }
    let best = (0..70)
        .min_by(|&a, &b| losses[a].total_cmp(&losses[b]))
        .unwrap();
    assert!(losses.iter().any(|&l| l > losses[best] + 1e-3));
    // the start is the best image, encoded, as --init-image would start from it
    let mut io = o.clone();
    io.init = Init::Image(pool[best].clone());
    let from_image = Generation::new(&g, &clip, &vq, io).unwrap();
    assert_eq!(
        gen.latent().unwrap().to_vec().unwrap(),
        from_image.latent().unwrap().to_vec().unwrap()
    );
    assert!(from_image.pool_losses().is_empty());
    // CLIP-sized images go to CLIP as they are: same losses as the CPU reference
    let small: Vec<Vec<f32>> = pool
        .iter()
        .take(5)
        .map(|p| p[..3 * S * S].to_vec())
        .collect();
    let targets: Vec<Target> = o
        .prompts
        .iter()
        .map(|p| Target {
            embed: clip.encode_text(std::slice::from_ref(&p.text)).unwrap(),
            weight: p.weight,
            stop: p.stop,
        })
        .collect();
    let got = rank_pool(&g, &clip, &targets, &small, S, S).unwrap();
    for (i, img) in small.iter().enumerate() {
        let want = cpu_pool_loss(&clip, &o.prompts, img, S, S);
        assert!((got[i] - want).abs() < 1e-4, "{} vs {want}", got[i]);
    }
    // a wrong-sized pool image is refused
    let mut bad = o.clone();
    bad.init = Init::Pool(vec![vec![0.5; 10]]);
    let e = Generation::new(&g, &clip, &vq, bad)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("init pool image"), "{e}");
}

#[test]
fn scene_starts_are_seeded_shapes_world_pools() {
    let g = gpu();
    let (clip, vq) = models(&g);
    let mut o = opts();
    o.init = Init::Scenes(6);
    let a = Generation::new(&g, &clip, &vq, o.clone()).unwrap();
    let b = Generation::new(&g, &clip, &vq, o.clone()).unwrap();
    assert_eq!(a.pool_losses().len(), 6);
    assert_eq!(a.pool_losses(), b.pool_losses(), "same seed, same scenes");
    o.seed = 5;
    let c = Generation::new(&g, &clip, &vq, o.clone()).unwrap();
    assert_ne!(
        a.pool_losses(),
        c.pool_losses(),
        "another seed, other scenes"
    );
    for (init, k) in [(Init::Scenes(0), 1), (Init::Scenes(4), 3)] {
        let mut o = o.clone();
        o.init = init;
        o.candidates = k;
        o.steps = 10;
        o.candidate_steps = 2;
        assert!(Generation::new(&g, &clip, &vq, o).is_err());
    }
}

#[test]
fn presets_set_the_documented_options() {
    let base = Options::new(Vec::new(), 64, 64);
    let r = base.clone().with_preset("reference".parse().unwrap());
    assert_eq!((r.steps, r.lr, r.cutn), (100, 0.1, 32));
    assert_eq!(r.init, Init::RandomCodes);
    let s = base.clone().with_preset("shapes-scenes".parse().unwrap());
    assert_eq!(s.init, Init::Scenes(512));
    assert_eq!((s.steps, s.lr, s.cutn, s.candidates), (10, 0.01, 6, 1));
    assert_eq!(s.cut_method, CutMethod::Jitter);
    assert!(s.latent_grids.is_empty());
    let c = base.with_preset("shapes".parse().unwrap());
    assert_eq!(c.init, Init::RandomCodes);
    assert_eq!(
        (c.steps, c.lr, c.candidates, c.candidate_steps),
        (28, 0.3, 3, 2)
    );
    assert_eq!(c.latent_grids, vec![2, 4, 8, 16]);
    assert!("fast".parse::<Preset>().is_err());
}
