//! `vqclip bench all`: every kernel family and model stage on one adapter, each with ms,
//! GFLOP/s or GB/s and its share of the adapter's measured limits ([`super::peak`]), as
//! `report.json`, `report.md` and a roofline chart (`roofline.svg`): what a user posts when
//! comparing two GPUs.
//!
//! Each item carries its [`Spec`], so that `tools/peer_bench_all.py` can run the same list
//! in PyTorch/numpy right after, and [`merge_peer`] adds its figures as a column.

use super::peak::{self, PeakBench};
pub use super::report::{markdown, merge_peer, roofline_svg, write_report, PeerFile, PeerItem};
use crate::models::clip::{self, ClipConfig, ClipModel};
use crate::models::vqgan::{VqGan, VqGanConfig};
use crate::ops::matmul::{self, MatmulOpts, ShapeClass, Variant};
use crate::ops::{self, Act};
use crate::{Error, Gpu, Result, Tensor};
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// One benchmark item: what runs, with the parameters the peer script needs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
// Each variant's doc names its fields' roles; they are the dimensions the names say.
#[allow(missing_docs)]
pub enum Spec {
    /// `[batch, m, k] @ [k, n]` (`[n, k]` stored when `trans_b`, a Linear weight).
    Matmul {
        batch: usize,
        m: usize,
        n: usize,
        k: usize,
        trans_b: bool,
    },
    /// Scaled dot-product attention, q/k/v `[batch, heads, tokens, head_dim]`.
    Attention {
        batch: usize,
        heads: usize,
        tokens: usize,
        head_dim: usize,
        causal: bool,
    },
    /// Attention with gradients on the tape, q/k/v `[batch, tokens, heads·head_dim]`: the
    /// forward, then the backward of `Σ o·w` to q, k and v, by the path the device uses
    /// ([`crate::ops::attention_backward::path`]).
    AttentionBackward {
        batch: usize,
        heads: usize,
        tokens: usize,
        head_dim: usize,
        causal: bool,
    },
    /// 3×3 convolution, padding 1, `[1, cin, h, w]` to `[1, cout, h, w]`, with bias.
    Conv3x3 {
        cin: usize,
        cout: usize,
        h: usize,
        w: usize,
    },
    /// Layer norm over the last axis of `[rows, cols]`, with gain and bias.
    LayerNorm { rows: usize, cols: usize },
    /// Group norm (32 groups) + swish of `[1, c, h, w]`, with gain and bias.
    GroupNormSwish { c: usize, h: usize, w: usize },
    /// `a + b` of `n` elements.
    Add { n: usize },
    /// GELU (erf) of `n` elements.
    Gelu { n: usize },
    /// `count` dependent adds of 64 elements, each on the previous result: what a chain of
    /// tiny kernels costs in dispatch, submission and synchronisation (ms per run ÷ `count`
    /// = time per dispatch; PyTorch's peer is its kernel-launch overhead).
    Dispatches { count: usize },
    /// CLIP ViT-B/32 text tower (random weights), `batch` texts of 77 tokens; `f16`: its
    /// linear-layer weights and its encoder's activations stored in f16 (`--precision
    /// f16` inference; the peer runs f32).
    TextEncode {
        batch: usize,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        f16: bool,
    },
    /// CLIP ViT-B/32 image tower (random weights), `batch` 224×224 images; `f16` as for
    /// [`Spec::TextEncode`].
    ImageEncode {
        batch: usize,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        f16: bool,
    },
    /// VQGAN f16-16384 decoder (random weights), one `size`×`size` image.
    VqganDecode { size: usize },
    /// One VQGAN+CLIP optimisation step (random ViT-B/32 and f16-16384) at `size`².
    GenerateStep { size: usize, cutn: usize },
}

/// What an f16-weight item's name ends with.
fn f16_suffix(f16: bool) -> &'static str {
    if f16 {
        " f16"
    } else {
        ""
    }
}

impl Spec {
    /// True for items that run with f16 linear-layer weights.
    pub fn is_f16(&self) -> bool {
        matches!(
            self,
            Spec::TextEncode { f16: true, .. } | Spec::ImageEncode { f16: true, .. }
        )
    }
    /// The item's family: matmul, attention, conv, norm, elementwise or model.
    pub fn family(&self) -> &'static str {
        match self {
            Spec::Matmul { .. } => "matmul",
            Spec::Attention { .. } | Spec::AttentionBackward { .. } => "attention",
            Spec::Conv3x3 { .. } => "conv",
            Spec::LayerNorm { .. } | Spec::GroupNormSwish { .. } => "norm",
            Spec::Add { .. } | Spec::Gelu { .. } => "elementwise",
            Spec::Dispatches { .. } => "overhead",
            _ => "model",
        }
    }

    /// A short unique name, e.g. `matmul 50x3072x768 Bt`.
    pub fn name(&self) -> String {
        match *self {
            Spec::Matmul {
                batch,
                m,
                n,
                k,
                trans_b,
            } => format!(
                "matmul {}{m}x{n}x{k}{}",
                if batch > 1 {
                    format!("{batch}*")
                } else {
                    String::new()
                },
                if trans_b { " Bt" } else { "" }
            ),
            Spec::Attention {
                batch,
                heads,
                tokens,
                head_dim,
                causal,
            } => format!(
                "attention {batch}x{heads}x{tokens}x{head_dim}{}",
                if causal { " causal" } else { "" }
            ),
            Spec::AttentionBackward {
                batch,
                heads,
                tokens,
                head_dim,
                causal,
            } => format!(
                "attention backward {batch}x{heads}x{tokens}x{head_dim}{}",
                if causal { " causal" } else { "" }
            ),
            Spec::Conv3x3 { cin, cout, h, w } => format!("conv3x3 {cin}->{cout} {h}x{w}"),
            Spec::LayerNorm { rows, cols } => format!("layer_norm {rows}x{cols}"),
            Spec::GroupNormSwish { c, h, w } => format!("group_norm+swish {c}x{h}x{w}"),
            Spec::Add { n } => format!("add {n}"),
            Spec::Gelu { n } => format!("gelu {n}"),
            Spec::Dispatches { count } => format!("dispatch overhead {count} tiny adds"),
            Spec::TextEncode { batch, f16 } => {
                format!("text encode ViT-B/32 x{batch}{}", f16_suffix(f16))
            }
            Spec::ImageEncode { batch, f16 } => {
                format!("image encode ViT-B/32 x{batch}{}", f16_suffix(f16))
            }
            Spec::VqganDecode { size } => format!("vqgan decode f16-16384 {size}x{size}"),
            Spec::GenerateStep { size, cutn } => {
                format!("generate step {size}x{size} cutn {cutn}")
            }
        }
    }

    /// FLOP of one run (an FMA counts 2), where the item has a well-defined count.
    pub fn flop(&self) -> Option<f64> {
        let f = |x: usize| x as f64;
        match *self {
            Spec::Matmul { batch, m, n, k, .. } => Some(2.0 * f(batch) * f(m) * f(n) * f(k)),
            Spec::Attention {
                batch,
                heads,
                tokens,
                head_dim,
                causal,
            } => {
                // QKᵀ and PV; a causal mask halves the useful work.
                let full = 4.0 * f(batch * heads) * f(tokens) * f(tokens) * f(head_dim);
                Some(if causal { full / 2.0 } else { full })
            }
            Spec::AttentionBackward {
                batch,
                heads,
                tokens,
                head_dim,
                causal,
            } => {
                // The forward's two products and the backward's four (dV, dP, dK, dQ);
                // the fused path's recomputed QKᵀ is not counted as useful work.
                let full = 12.0 * f(batch * heads) * f(tokens) * f(tokens) * f(head_dim);
                Some(if causal { full / 2.0 } else { full })
            }
            Spec::Conv3x3 { cin, cout, h, w } => Some(2.0 * 9.0 * f(cin * cout) * f(h * w)),
            Spec::TextEncode { batch, .. } => {
                let c = ClipConfig::vit_base_patch32();
                Some(
                    f(batch)
                        * tower_flop(
                            77,
                            c.text.hidden_size,
                            c.text.intermediate_size,
                            c.text.num_hidden_layers,
                        ),
                )
            }
            Spec::ImageEncode { batch, .. } => {
                let c = ClipConfig::vit_base_patch32();
                let v = &c.vision;
                let patches = (v.image_size / v.patch_size).pow(2);
                let embed =
                    2.0 * f(patches) * f(3 * v.patch_size * v.patch_size) * f(v.hidden_size);
                Some(
                    f(batch)
                        * (embed
                            + tower_flop(
                                patches + 1,
                                v.hidden_size,
                                v.intermediate_size,
                                v.num_hidden_layers,
                            )),
                )
            }
            _ => None,
        }
    }

    /// Bytes a run must at least read and write (f32 operands and result once each), where
    /// the item has a well-defined count.
    pub fn bytes(&self) -> Option<f64> {
        let f = |x: usize| 4.0 * x as f64;
        match *self {
            Spec::Matmul { batch, m, n, k, .. } => {
                Some(f(batch * m * k) + f(k * n) + f(batch * m * n))
            }
            Spec::Attention {
                batch,
                heads,
                tokens,
                head_dim,
                ..
            } => Some(4.0 * f(batch * heads * tokens * head_dim)),
            // Forward q, k, v, o; backward q, k, v, o, dO in and dq, dk, dv out.
            Spec::AttentionBackward {
                batch,
                heads,
                tokens,
                head_dim,
                ..
            } => Some(12.0 * f(batch * heads * tokens * head_dim)),
            Spec::Conv3x3 { cin, cout, h, w } => {
                Some(f(cin * h * w) + f(9 * cin * cout) + f(cout * h * w))
            }
            Spec::LayerNorm { rows, cols } => Some(2.0 * f(rows * cols)),
            Spec::GroupNormSwish { c, h, w } => Some(2.0 * f(c * h * w)),
            Spec::Add { n } => Some(3.0 * f(n)),
            Spec::Gelu { n } => Some(2.0 * f(n)),
            _ => None,
        }
    }
}

/// FLOP of one transformer tower pass over `t` tokens of width `d` with MLP width `ff`:
/// per layer the q, k, v and output projections (4·t·d²), the MLP (2·t·d·ff) and
/// attention's two products (2·t²·d), as multiply-adds.
fn tower_flop(t: usize, d: usize, ff: usize, layers: usize) -> f64 {
    let (t, d, ff) = (t as f64, d as f64, ff as f64);
    2.0 * layers as f64 * (4.0 * t * d * d + 2.0 * t * d * ff + 2.0 * t * t * d)
}

/// The item list: `quick` keeps every family and stage at sizes lavapipe runs in a few
/// minutes; the full list adds the sizes a GPU comparison wants (batch 32, 256² and 512²).
pub fn plan(quick: bool) -> Vec<Spec> {
    use Spec::*;
    let mm = |batch, m, n, k, trans_b| Matmul {
        batch,
        m,
        n,
        k,
        trans_b,
    };
    let mut v = vec![
        mm(1, 1024, 1024, 1024, false),
        // ViT-B/32, one image: 50 tokens through q/k/v, the MLP up and down projections.
        mm(1, 50, 768, 768, true),
        mm(1, 50, 3072, 768, true),
        mm(1, 50, 768, 3072, true),
        // The text tower's MLP, 77 tokens of 512.
        mm(1, 77, 2048, 512, true),
        // A VQGAN 3×3 convolution at 16×16 with 512 channels, as its implicit GEMM.
        mm(1, 256, 512, 4608, false),
        Attention {
            batch: 1,
            heads: 12,
            tokens: 50,
            head_dim: 64,
            causal: false,
        },
        Attention {
            batch: 1,
            heads: 8,
            tokens: 77,
            head_dim: 64,
            causal: true,
        },
        // One ViT layer's attention over 4 cutouts, with gradients (VQGAN+CLIP).
        AttentionBackward {
            batch: 4,
            heads: 12,
            tokens: 50,
            head_dim: 64,
            causal: false,
        },
        Conv3x3 {
            cin: 512,
            cout: 512,
            h: 16,
            w: 16,
        },
        Conv3x3 {
            cin: 128,
            cout: 128,
            h: 64,
            w: 64,
        },
        LayerNorm {
            rows: 50,
            cols: 768,
        },
        GroupNormSwish {
            c: 128,
            h: 64,
            w: 64,
        },
        Add { n: 1 << 22 },
        Gelu { n: 1 << 22 },
        Dispatches { count: 1000 },
        TextEncode {
            batch: 1,
            f16: false,
        },
        TextEncode {
            batch: 1,
            f16: true,
        },
        ImageEncode {
            batch: 1,
            f16: false,
        },
        ImageEncode {
            batch: 1,
            f16: true,
        },
        // 64² keeps the two VQGAN stages at seconds per run on lavapipe.
        VqganDecode { size: 64 },
        GenerateStep { size: 64, cutn: 2 },
    ];
    if !quick {
        v.extend([
            mm(1, 4096, 4096, 4096, false),
            mm(32, 50, 3072, 768, true),
            mm(1, 1600, 3072, 768, true),
            mm(1, 4096, 128, 1152, false),
            Attention {
                batch: 32,
                heads: 12,
                tokens: 50,
                head_dim: 64,
                causal: false,
            },
            AttentionBackward {
                batch: 32,
                heads: 12,
                tokens: 50,
                head_dim: 64,
                causal: false,
            },
            // The VQGAN's AttnBlock at 128² (one head of 512 over 16×16 positions).
            AttentionBackward {
                batch: 1,
                heads: 1,
                tokens: 256,
                head_dim: 512,
                causal: false,
            },
            Conv3x3 {
                cin: 128,
                cout: 128,
                h: 256,
                w: 256,
            },
            LayerNorm {
                rows: 1600,
                cols: 768,
            },
            GroupNormSwish {
                c: 128,
                h: 256,
                w: 256,
            },
            Add { n: 1 << 26 },
            ImageEncode {
                batch: 32,
                f16: false,
            },
            ImageEncode {
                batch: 32,
                f16: true,
            },
            VqganDecode { size: 256 },
            GenerateStep { size: 128, cutn: 4 },
            GenerateStep {
                size: 256,
                cutn: 32,
            },
            GenerateStep {
                size: 512,
                cutn: 32,
            },
        ]);
    }
    v
}

/// One measured item.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Item {
    /// What ran.
    pub spec: Spec,
    /// [`Spec::name`].
    pub name: String,
    /// [`Spec::family`].
    pub family: String,
    /// Fastest run, ms.
    pub ms_min: f64,
    /// Median run, ms.
    pub ms_median: f64,
    /// Runs timed (after one untimed warm-up).
    pub runs: usize,
    /// GFLOP/s at the median run, where the FLOP count is defined.
    pub gflops: Option<f64>,
    /// GB/s at the median run (minimum bytes moved), where defined.
    pub gbs: Option<f64>,
    /// Median throughput as a share of the roofline at the item's arithmetic intensity:
    /// `min(peak FLOP/s, intensity · peak bandwidth)`, in percent.
    pub pct_of_peak: Option<f64>,
    /// The peer's (PyTorch/numpy) median ms, once merged ([`merge_peer`]).
    pub peer_ms_median: Option<f64>,
    /// The peer's fastest run, ms.
    pub peer_ms_min: Option<f64>,
    /// `ms_median / peer_ms_median`: above 1, vqclip is slower.
    pub ratio_to_peer: Option<f64>,
}

/// A tuned choice (a matmul shape class, convolutions, the attention-with-gradients path
/// or the attention forward kernel) and the variant that won it here.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Tuned {
    /// [`ShapeClass::tuning_key`], [`ops::conv2d::TUNING_KEY`],
    /// [`ops::attention_backward::TUNING_KEY`] or [`ops::attention_tiled::TUNING_KEY`].
    pub key: String,
    /// The shapes it was timed on (`4 x 50x768x768 + ...`: times each counts in the sum).
    pub shape: String,
    /// Winner.
    pub variant: String,
    /// Median ms of every variant tried, by name, summed over the shapes.
    pub ms: Vec<(String, f64)>,
}

/// What `bench all` writes to `report.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Adapter name.
    pub adapter: String,
    /// Backend name.
    pub backend: String,
    /// Driver and its version.
    pub driver: String,
    /// vqclip version.
    pub version: String,
    /// Seconds since the Unix epoch when the run started.
    pub started_unix: u64,
    /// Whether the `--quick` list ran.
    pub quick: bool,
    /// The adapter's measured limits.
    pub peak: PeakFigures,
    /// Matmul variant chosen per shape class, and the convolution variant, on this run.
    pub tuning: Vec<Tuned>,
    /// Every item, in plan order.
    pub items: Vec<Item>,
    /// What the peer column is (e.g. "PyTorch 2.5 CPU, 2 threads"), once merged.
    pub peer: Option<String>,
    /// Whether the f16 items stored the CLIP encoder's activations in f16 (this adapter's
    /// `--precision f16` default or `VQCLIP_F16_ACTIVATIONS`); `None` when no f16 item
    /// ran (and in reports written before this field).
    #[serde(default)]
    pub f16_activations: Option<bool>,
    /// Side `S` of the `S×S×S` cooperative-matrix (tensor core) configuration the f16
    /// items' products ran on (f16 activations, [`crate::ops::matmul::Variant::Coop`]);
    /// `None` where they ran the other kernels or no f16 item ran.
    #[serde(default)]
    pub f16_coop_matrix: Option<u32>,
}

/// The peak figures the percentages use (medians would understate the limits: best runs).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PeakFigures {
    /// f32 FMA GFLOP/s.
    pub f32_gflops: f64,
    /// f16 FMA GFLOP/s, where measured.
    pub f16_gflops: Option<f64>,
    /// Copy GB/s.
    pub copy_gbs: f64,
}

impl From<&PeakBench> for PeakFigures {
    fn from(p: &PeakBench) -> Self {
        PeakFigures {
            f32_gflops: p.f32_fma.best,
            f16_gflops: p.f16_fma.as_ref().map(|f| f.best),
            copy_gbs: p.copy.best,
        }
    }
}

/// Options of [`run`].
#[derive(Debug, Clone)]
pub struct AllOptions {
    /// The short list ([`plan`]).
    pub quick: bool,
    /// Seconds to spend timing each item (at least 3 runs, at most 50).
    pub seconds: f64,
    /// Only items whose name contains one of these (all when empty).
    pub only: Vec<String>,
    /// Time the matmul variants per shape class, the convolution variants, the
    /// attention-with-gradients paths and the attention forward kernels first and keep the
    /// winners (else the cached choices, or the defaults, stand).
    pub tune: bool,
}

fn rand_tensor(gpu: &Gpu, shape: &[usize], seed: u64) -> Result<Tensor> {
    Tensor::from_slice(gpu, &super::random(shape.iter().product(), seed), shape)
}

/// Times `f` (which records GPU work) once untimed, then until `seconds` have passed (3 to
/// 50 runs), each run synchronised; returns the sorted run times in seconds.
fn time_runs(gpu: &Gpu, seconds: f64, f: &mut dyn FnMut() -> Result<()>) -> Result<Vec<f64>> {
    f()?;
    gpu.sync()?;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || (start.elapsed().as_secs_f64() < seconds && times.len() < 50) {
        let t = Instant::now();
        f()?;
        gpu.sync()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// Models built once per run, on first use.
#[derive(Default)]
struct Models {
    clip: Option<ClipModel>,
    /// The same random weights with f16 linear layers (`--precision f16`).
    clip_f16: Option<ClipModel>,
    vqgan: Option<VqGan>,
}

impl Models {
    /// The f32 model, or with `f16` the f16-weight one.
    fn clip_at(&mut self, gpu: &Gpu, f16: bool) -> Result<&ClipModel> {
        if !f16 {
            return self.clip(gpu);
        }
        if self.clip_f16.is_none() {
            let cfg = ClipConfig::vit_base_patch32();
            let src = clip::random_weights(&cfg, 0)?;
            let p = crate::Precision::F16;
            self.clip_f16 = Some(ClipModel::from_source_with(cfg, &src, gpu, p)?);
        }
        self.clip_f16
            .as_ref()
            .ok_or_else(|| Error::invalid("f16 CLIP model not built"))
    }
    fn clip(&mut self, gpu: &Gpu) -> Result<&ClipModel> {
        if self.clip.is_none() {
            let cfg = ClipConfig::vit_base_patch32();
            let src = clip::random_weights(&cfg, 0)?;
            self.clip = Some(ClipModel::from_source(cfg, &src, gpu)?);
        }
        self.clip
            .as_ref()
            .ok_or_else(|| Error::invalid("CLIP model not built"))
    }
    fn vqgan(&mut self, gpu: &Gpu) -> Result<&VqGan> {
        if self.vqgan.is_none() {
            let cfg = VqGanConfig::imagenet_f16(16384);
            let src = super::random_vqgan(&cfg, 1)?;
            self.vqgan = Some(VqGan::from_source(&src, cfg, gpu)?);
        }
        self.vqgan
            .as_ref()
            .ok_or_else(|| Error::invalid("VQGAN model not built"))
    }
}

/// Times one item; returns its sorted run times in seconds.
fn time_item(gpu: &Gpu, spec: &Spec, models: &mut Models, seconds: f64) -> Result<Vec<f64>> {
    match *spec {
        Spec::Matmul {
            batch,
            m,
            n,
            k,
            trans_b,
        } => {
            let a = rand_tensor(gpu, &[batch, m, k], 1)?;
            let b_shape = if trans_b { [n, k] } else { [k, n] };
            let b = rand_tensor(gpu, &b_shape, 2)?;
            let o = MatmulOpts {
                trans_b,
                ..Default::default()
            };
            time_runs(gpu, seconds, &mut || matmul::matmul(&a, &b, &o).map(drop))
        }
        Spec::Attention {
            batch,
            heads,
            tokens,
            head_dim,
            causal,
        } => {
            let shape = [batch, heads, tokens, head_dim];
            let q = rand_tensor(gpu, &shape, 1)?;
            let k = rand_tensor(gpu, &shape, 2)?;
            let v = rand_tensor(gpu, &shape, 3)?;
            let scale = 1.0 / (head_dim as f32).sqrt();
            time_runs(gpu, seconds, &mut || {
                ops::attention(&q, &k, &v, causal, scale).map(drop)
            })
        }
        Spec::AttentionBackward {
            batch,
            heads,
            tokens,
            head_dim,
            causal,
        } => {
            let path = ops::attention_backward::path(gpu);
            let a = AttentionOperands::new(gpu, [batch, heads, tokens, head_dim])?;
            time_runs(gpu, seconds, &mut || a.step(heads, causal, path))
        }
        Spec::Conv3x3 { cin, cout, h, w } => {
            let x = rand_tensor(gpu, &[1, cin, h, w], 1)?;
            let wt = rand_tensor(gpu, &[cout, cin, 3, 3], 2)?;
            let bias = rand_tensor(gpu, &[cout], 3)?;
            let o = ops::conv2d::Conv2dOpts {
                pad: [1; 4],
                bias: Some(&bias),
                ..Default::default()
            };
            time_runs(gpu, seconds, &mut || {
                ops::conv2d::conv2d(&x, &wt, &o).map(drop)
            })
        }
        Spec::LayerNorm { rows, cols } => {
            let x = rand_tensor(gpu, &[rows, cols], 1)?;
            let g = rand_tensor(gpu, &[cols], 2)?;
            let b = rand_tensor(gpu, &[cols], 3)?;
            time_runs(gpu, seconds, &mut || {
                ops::layer_norm(&x, Some(&g), Some(&b), 1e-5).map(drop)
            })
        }
        Spec::GroupNormSwish { c, h, w } => {
            let x = rand_tensor(gpu, &[1, c, h, w], 1)?;
            let g = rand_tensor(gpu, &[c], 2)?;
            let b = rand_tensor(gpu, &[c], 3)?;
            time_runs(gpu, seconds, &mut || {
                ops::group_norm(&x, 32, Some(&g), Some(&b), 1e-6, Act::Silu).map(drop)
            })
        }
        Spec::Add { n } => {
            let a = rand_tensor(gpu, &[n], 1)?;
            let b = rand_tensor(gpu, &[n], 2)?;
            time_runs(gpu, seconds, &mut || {
                ops::elementwise::add(&a, &b).map(drop)
            })
        }
        Spec::Dispatches { count } => {
            let a = rand_tensor(gpu, &[64], 1)?;
            time_runs(gpu, seconds, &mut || {
                let mut x = a.clone();
                for _ in 0..count {
                    x = ops::elementwise::add(&x, &a)?;
                }
                Ok(())
            })
        }
        Spec::Gelu { n } => {
            let a = rand_tensor(gpu, &[n], 1)?;
            time_runs(gpu, seconds, &mut || {
                ops::unary(&a, ops::UnaryOp::Act(Act::Gelu)).map(drop)
            })
        }
        Spec::TextEncode { batch, f16 } => {
            let clip = models.clip_at(gpu, f16)?;
            // Random ids of the full context length: the cost does not depend on them.
            let ctx = clip.config.text.max_position_embeddings;
            let vocab = clip.config.text.vocab_size as u32;
            let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(4);
            let ids: Vec<Vec<u32>> = (0..batch)
                .map(|_| (0..ctx).map(|_| r.random_range(0..vocab)).collect())
                .collect();
            time_runs(gpu, seconds, &mut || clip.text_features_ids(&ids).map(drop))
        }
        Spec::ImageEncode { batch, f16 } => {
            let clip = models.clip_at(gpu, f16)?;
            let s = clip.config.vision.image_size;
            let px = rand_tensor(gpu, &[batch, 3, s, s], 5)?;
            time_runs(gpu, seconds, &mut || clip.image_features(&px).map(drop))
        }
        Spec::VqganDecode { size } => {
            let vq = models.vqgan(gpu)?;
            let f = vq.downsampling_factor();
            let zq = rand_tensor(gpu, &[1, vq.config.embed_dim, size / f, size / f], 6)?;
            time_runs(gpu, seconds, &mut || vq.decode(&zq).map(drop))
        }
        Spec::GenerateStep { size, cutn } => {
            models.clip(gpu)?;
            models.vqgan(gpu)?;
            let (Some(clip), Some(vq)) = (&models.clip, &models.vqgan) else {
                return Err(Error::invalid("models not built"));
            };
            let mut opts = crate::generate::Options::new(vec![], size, size);
            opts.noise_prompts = vec![(0, 1.0)];
            opts.cutn = cutn;
            let mut gen = crate::generate::Generation::new(gpu, clip, vq, opts)?;
            // Each step reads its loss back: its time includes all of its GPU work.
            time_runs(gpu, seconds, &mut || gen.step().map(drop))
        }
    }
}

/// Times every matmul variant per [`ShapeClass`] and saves each class's winner
/// ([`Gpu::save_tuning`]), so that the items (and later runs) use it. Skinny products are
/// timed on one ViT-B/32 layer's linears at 50 tokens (q, k, v and out 768 → 768, then
/// 768 → 3072 → 768), summed: one shape alone picked a kernel that lost on the others
/// (lavapipe: subgroup32w won 50x3072x768 and made the image encode slower). Large ones on
/// 1024².
fn tune_matmul(gpu: &Gpu, seconds: f64) -> Result<Vec<Tuned>> {
    let mut out = Vec::new();
    for class in ShapeClass::ALL {
        // (times in the sum, m, n, k)
        let shapes: &[(usize, usize, usize, usize)] = match class {
            ShapeClass::Skinny => &[(4, 50, 768, 768), (1, 50, 3072, 768), (1, 50, 768, 3072)],
            ShapeClass::Large => &[(1, 1024, 1024, 1024)],
        };
        let operands = shapes
            .iter()
            .map(|&(_, m, n, k)| Ok((rand_tensor(gpu, &[m, k], 1)?, rand_tensor(gpu, &[n, k], 2)?)))
            .collect::<Result<Vec<_>>>()?;
        let o = MatmulOpts::linear(None);
        let mut ms = Vec::new();
        for v in Variant::ALL {
            let mut total = 0.0;
            for (&(times, ..), (a, b)) in shapes.iter().zip(&operands) {
                let t = time_runs(gpu, seconds / shapes.len() as f64, &mut || {
                    matmul::matmul_variant(a, b, &o, v).map(drop)
                })?;
                total += times as f64 * t[t.len() / 2] * 1e3;
            }
            ms.push((v.name().to_string(), total));
        }
        let shape = shapes
            .iter()
            .map(|&(times, m, n, k)| match times {
                1 => format!("{m}x{n}x{k}"),
                t => format!("{t} x {m}x{n}x{k}"),
            })
            .collect::<Vec<_>>()
            .join(" + ");
        out.push(save_winner(
            gpu,
            class.tuning_key(),
            format!("{shape} Bt"),
            ms,
        )?);
    }
    Ok(out)
}

/// Times the convolution variants that avoid the direct kernels on a VQGAN decoder 3×3 conv
/// (1×128×64×64 → 128, pad 1, bias: the decoder's most common shape) and saves the winner
/// under [`ops::conv2d::TUNING_KEY`]: `im2col` and `implicit-tiled` always, `implicit` where
/// its subgroup kernel applies (elsewhere it would time the im2col fallback again).
fn tune_conv(gpu: &Gpu, seconds: f64) -> Result<Tuned> {
    use ops::conv2d::{self, Conv2dOpts, Variant as ConvVariant};
    let (c, s) = (128, 64);
    let x = rand_tensor(gpu, &[1, c, s, s], 1)?;
    let w = rand_tensor(gpu, &[c, c, 3, 3], 2)?;
    let b = rand_tensor(gpu, &[c], 3)?;
    let o = Conv2dOpts::padded(1, Some(&b));
    let mut variants = vec![ConvVariant::Im2col, ConvVariant::ImplicitTiled];
    if ops::conv2d_igemm::applies(gpu, c, [3, 3], s * s) {
        variants.push(ConvVariant::Implicit);
    }
    let mut ms = Vec::new();
    for v in variants {
        let t = time_runs(gpu, seconds, &mut || {
            conv2d::conv2d_variant(&x, &w, &o, v).map(drop)
        })?;
        ms.push((v.name().to_string(), t[t.len() / 2] * 1e3));
    }
    save_winner(
        gpu,
        conv2d::TUNING_KEY,
        format!("1x{c}x{s}x{s} -> {c} 3x3 pad 1"),
        ms,
    )
}

/// q, k, v and an output weight `w`, `[B, T, H·D]`, for timing attention with gradients.
struct AttentionOperands {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
}

impl AttentionOperands {
    fn new(gpu: &Gpu, [b, h, t, d]: [usize; 4]) -> Result<Self> {
        let shape = [b, t, h * d];
        Ok(AttentionOperands {
            q: rand_tensor(gpu, &shape, 1)?,
            k: rand_tensor(gpu, &shape, 2)?,
            v: rand_tensor(gpu, &shape, 3)?,
            w: rand_tensor(gpu, &shape, 4)?,
        })
    }

    /// One forward and backward (of `Σ o·w`, so that dO = w) of `attention_bthd` on a
    /// fresh tape, by `path`.
    fn step(&self, heads: usize, causal: bool, path: ops::attention_backward::Path) -> Result<()> {
        let tape = crate::autodiff::Tape::new();
        let (q, k, v) = (
            tape.leaf(self.q.clone(), true),
            tape.leaf(self.k.clone(), true),
            tape.leaf(self.v.clone(), true),
        );
        let w = tape.leaf(self.w.clone(), false);
        let d = self.q.dim(2) / heads;
        let scale = (d as f32).powf(-0.5);
        let o = tape.attention_bthd_path(&q, &k, &v, heads, causal, scale, path)?;
        let loss = tape.sum(&tape.mul(&o, &w)?)?;
        tape.backward(&loss).map(drop)
    }
}

/// Times both attention-with-gradients paths on one CLIP ViT layer over 4 cutouts
/// (4 × 12 heads × 50 tokens × 64) and saves the faster under
/// [`ops::attention_backward::TUNING_KEY`], which `Tape::attention_bthd` then takes.
fn tune_attention(gpu: &Gpu, seconds: f64) -> Result<Tuned> {
    use ops::attention_backward::{Path, TUNING_KEY};
    let (b, h, t, d) = (4, 12, 50, 64);
    let a = AttentionOperands::new(gpu, [b, h, t, d])?;
    let mut ms = Vec::new();
    for path in Path::ALL {
        let times = time_runs(gpu, seconds, &mut || a.step(h, false, path))?;
        ms.push((path.name().to_string(), times[times.len() / 2] * 1e3));
    }
    save_winner(
        gpu,
        TUNING_KEY,
        format!("{b}x{h}x{t}x{d} forward + backward"),
        ms,
    )
}

/// Times both attention forward kernels on CLIP ViT-B/32's self-attention over a batch of
/// 32 images (32 × 12 heads × 50 tokens × 64, read in place from the packed qkv
/// projection, as the image encoder does) and saves the faster under
/// [`ops::attention_tiled::TUNING_KEY`], which every attention forward then takes.
fn tune_attention_forward(gpu: &Gpu, seconds: f64) -> Result<Tuned> {
    use ops::attention_tiled::{tiled_fits, Forward, TUNING_KEY};
    let (b, h, t, d) = (32, 12, 50, 64);
    let qkv = rand_tensor(gpu, &[b, t, 3 * h * d], 1)?;
    let scale = (d as f32).powf(-0.5);
    let mut ms = Vec::new();
    for kernel in Forward::ALL {
        if kernel == Forward::Tiled && !tiled_fits(gpu) {
            continue;
        }
        let times = time_runs(gpu, seconds, &mut || {
            ops::attention::attention_qkv_by(&qkv, h, false, scale, kernel).map(drop)
        })?;
        ms.push((kernel.name().to_string(), times[times.len() / 2] * 1e3));
    }
    save_winner(gpu, TUNING_KEY, format!("{b}x{h}x{t}x{d} packed qkv"), ms)
}

/// Where the device has cooperative matrices for f16 products, times the products of four
/// images' ViT-B/32 layer (200 tokens: q, k, v and out 768 → 768, then 768 → 3072 → 768,
/// summed) with f16 weights and activations on them (`coop`) and on the kernel the shape
/// class would otherwise run (`fma`), and saves the faster under
/// [`ops::matmul::COOP_TUNING_KEY`], which [`ops::matmul::coop_default`] then takes.
fn tune_coop(gpu: &Gpu, seconds: f64) -> Result<Option<Tuned>> {
    if gpu.coop_f16_size().is_none() {
        return Ok(None);
    }
    let shapes: &[(usize, usize, usize, usize)] =
        &[(4, 200, 768, 768), (1, 200, 3072, 768), (1, 200, 768, 3072)];
    let f16 =
        |shape: &[usize], seed| ops::cast::cast(&rand_tensor(gpu, shape, seed)?, crate::DType::F16);
    let operands = shapes
        .iter()
        .map(|&(_, m, n, k)| Ok((f16(&[m, k], 1)?, f16(&[n, k], 2)?)))
        .collect::<Result<Vec<_>>>()?;
    let o = MatmulOpts::linear(None);
    let mut ms = Vec::new();
    for name in ["coop", "fma"] {
        let mut total = 0.0;
        for (&(times, m, n, _), (a, b)) in shapes.iter().zip(&operands) {
            let v = match name {
                "coop" => Variant::Coop,
                _ => matmul::variant_for(gpu, ShapeClass::of(m, n)),
            };
            let t = time_runs(gpu, seconds / shapes.len() as f64, &mut || {
                matmul::matmul_variant(a, b, &o, v).map(drop)
            })?;
            total += times as f64 * t[t.len() / 2] * 1e3;
        }
        ms.push((name.to_string(), total));
    }
    let shape = "4 x 200x768x768 + 200x3072x768 + 200x768x3072 Bt, f16".to_string();
    save_winner(gpu, matmul::COOP_TUNING_KEY, shape, ms).map(Some)
}

/// Saves the fastest of `ms` (name, median ms) under `key` ([`Gpu::save_tuning`]), timed on
/// `shape`.
fn save_winner(gpu: &Gpu, key: &str, shape: String, ms: Vec<(String, f64)>) -> Result<Tuned> {
    let best = ms
        .iter()
        .min_by(|x, y| x.1.total_cmp(&y.1))
        .map(|x| x.0.clone())
        .ok_or_else(|| Error::invalid(format!("nothing to tune for {key}")))?;
    gpu.save_tuning(key, &best)?;
    Ok(Tuned {
        key: key.to_string(),
        shape,
        variant: best,
        ms,
    })
}

/// The roofline at arithmetic intensity `flop / bytes`, GFLOP/s.
fn roof(peak: &PeakFigures, flop: f64, bytes: f64) -> f64 {
    peak.f32_gflops.min(flop / bytes * peak.copy_gbs)
}

/// Runs the benchmark: peak figures, matmul, convolution and attention tuning (when asked),
/// then every planned item. `progress` hears each item's name before it runs.
pub fn run(gpu: &Gpu, o: &AllOptions, progress: &dyn Fn(&str)) -> Result<Report> {
    if !(o.seconds > 0.0 && o.seconds.is_finite()) {
        return Err(Error::invalid(format!(
            "seconds per item must be a positive number, got {}",
            o.seconds
        )));
    }
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let has_f16 = gpu.features().contains(wgpu::Features::SHADER_F16);
    let specs: Vec<Spec> = plan(o.quick)
        .into_iter()
        // The f16-weight items need SHADER_F16; adapters without it skip them.
        .filter(|s| has_f16 || !s.is_f16())
        .filter(|s| o.only.is_empty() || o.only.iter().any(|w| s.name().contains(w.as_str())))
        .collect();
    if specs.is_empty() {
        return Err(Error::invalid(format!(
            "no benchmark item matches {:?}",
            o.only
        )));
    }
    progress("peak (FMA throughput, copy bandwidth)");
    let copy_bytes = if o.quick && gpu.is_cpu() {
        16 << 20
    } else {
        peak::default_copy_bytes(gpu)
    };
    let peak = PeakFigures::from(&peak::peak(gpu, copy_bytes, 5)?);
    let tuning = if o.tune {
        progress("matmul variants per shape class");
        let mut t = tune_matmul(gpu, o.seconds.min(1.0))?;
        progress("convolution variants");
        t.push(tune_conv(gpu, o.seconds.min(1.0))?);
        progress("attention with gradients: fused or composed");
        t.push(tune_attention(gpu, o.seconds.min(1.0))?);
        progress("attention forward: broadcast or tiled");
        t.push(tune_attention_forward(gpu, o.seconds.min(1.0))?);
        if gpu.coop_f16_size().is_some() {
            progress("f16 products: cooperative matrices or FMA kernels");
            t.extend(tune_coop(gpu, o.seconds.min(1.0))?);
        }
        t
    } else {
        Vec::new()
    };
    let mut models = Models::default();
    let mut items = Vec::new();
    for spec in specs {
        let name = spec.name();
        progress(&name);
        let t = time_item(gpu, &spec, &mut models, o.seconds)?;
        let (min, med) = (t[0], t[t.len() / 2]);
        let gflops = spec.flop().map(|f| f / med / 1e9);
        let gbs = spec.bytes().map(|b| b / med / 1e9);
        let pct_of_peak = match (spec.flop(), spec.bytes()) {
            (Some(f), Some(b)) => Some(100.0 * (f / med / 1e9) / roof(&peak, f, b)),
            (None, Some(b)) => Some(100.0 * (b / med / 1e9) / peak.copy_gbs),
            (Some(f), None) => Some(100.0 * (f / med / 1e9) / peak.f32_gflops),
            (None, None) => None,
        };
        items.push(Item {
            family: spec.family().to_string(),
            spec,
            name,
            ms_min: min * 1e3,
            ms_median: med * 1e3,
            runs: t.len(),
            gflops,
            gbs,
            pct_of_peak,
            peer_ms_median: None,
            peer_ms_min: None,
            ratio_to_peer: None,
        });
    }
    let info = gpu.info();
    let any_f16 = items.iter().any(|i| i.spec.is_f16());
    let f16_acts = crate::models::clip::encoder::f16_activations_default(gpu) == crate::DType::F16;
    Ok(Report {
        adapter: info.name.clone(),
        backend: format!("{:?}", info.backend),
        driver: format!("{} {}", info.driver, info.driver_info),
        version: crate::VERSION.to_string(),
        started_unix,
        quick: o.quick,
        peak,
        f16_activations: any_f16.then_some(f16_acts),
        f16_coop_matrix: gpu
            .coop_f16_size()
            .filter(|_| any_f16 && f16_acts && crate::ops::matmul::coop_default(gpu)),
        tuning,
        items,
        peer: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::gpu;

    #[test]
    fn names_are_unique_and_counts_positive() {
        let p = plan(false);
        let mut names: Vec<String> = p.iter().map(Spec::name).collect();
        names.sort();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "duplicate item names");
        for s in &p {
            for x in [s.flop(), s.bytes()].into_iter().flatten() {
                assert!(x > 0.0 && x.is_finite(), "{s:?}");
            }
        }
        // Every family and stage is in the quick list too.
        let quick: Vec<&str> = plan(true).iter().map(Spec::family).collect();
        for f in [
            "matmul",
            "attention",
            "conv",
            "norm",
            "elementwise",
            "model",
        ] {
            assert!(quick.contains(&f), "{f}");
        }
        // 2·M·N·K, and ViT-B/32 at about 8.7 GFLOP per image (4.4 G multiply-adds).
        let mm = Spec::Matmul {
            batch: 2,
            m: 3,
            n: 5,
            k: 7,
            trans_b: true,
        };
        assert_eq!(mm.flop(), Some(420.0));
        let img = Spec::ImageEncode {
            batch: 1,
            f16: false,
        }
        .flop()
        .unwrap();
        assert!((8.0e9..9.5e9).contains(&img), "{img}");
    }

    #[test]
    fn a_kernel_item_runs_and_the_report_renders_with_a_peer() {
        let g = gpu();
        let o = AllOptions {
            quick: true,
            seconds: 0.01,
            only: vec!["layer_norm".into(), "matmul 50x768x768".into()],
            tune: false,
        };
        let mut r = run(&g, &o, &|_| {}).unwrap();
        assert_eq!(r.items.len(), 2);
        for i in &r.items {
            assert!(i.ms_median > 0.0 && i.ms_min <= i.ms_median, "{i:?}");
            let pct = i.pct_of_peak.unwrap();
            assert!(pct > 0.0 && pct.is_finite(), "{i:?}");
        }
        let peer = PeerFile {
            peer: "test peer".into(),
            items: vec![PeerItem {
                name: r.items[0].name.clone(),
                ms_min: 1.0,
                ms_median: 2.0,
            }],
        };
        assert_eq!(merge_peer(&mut r, &peer).unwrap(), 1);
        let ratio = r.items[0].ratio_to_peer.unwrap();
        assert!((ratio - r.items[0].ms_median / 2.0).abs() < 1e-12);
        assert!(r.items[1].ratio_to_peer.is_none());
        let md = markdown(&r);
        assert!(
            md.contains("test peer") && md.contains(&r.items[1].name),
            "{md}"
        );
        // No f16 item ran: no f16 line. With one, the report says how its activations
        // were stored.
        assert_eq!(r.f16_activations, None);
        assert!(!md.contains("`f16` items"), "{md}");
        r.f16_activations = Some(true);
        let md = markdown(&r);
        assert!(
            md.contains("f16 linear weights and f16 activations"),
            "{md}"
        );
        assert!(md.contains("not on cooperative matrices"), "{md}");
        r.f16_coop_matrix = Some(16);
        let md = markdown(&r);
        assert!(md.contains("16×16×16 cooperative matrices"), "{md}");
        let svg = roofline_svg(&r);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // One point per item with both a FLOP and a byte count: the matmul, not layer norm
        // (memory-bound, no FLOP count).
        assert_eq!(svg.matches("<circle").count(), 1);
        assert_eq!(r.items[0].family, "matmul");
        assert!(svg.contains(&crate::bench::report::escape(&r.items[0].name)));
        let dir = tempfile::tempdir().unwrap();
        write_report(&r, dir.path()).unwrap();
        let back: Report =
            serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap())
                .unwrap();
        assert_eq!(back.items.len(), 2);
        assert_eq!(back.items[0].spec, r.items[0].spec);
    }

    #[test]
    fn bad_peer_times_and_empty_selections_are_refused() {
        let g = gpu();
        let o = AllOptions {
            quick: true,
            seconds: 0.01,
            only: vec!["no such item".into()],
            tune: false,
        };
        let e = run(&g, &o, &|_| {}).unwrap_err().to_string();
        assert!(e.contains("no benchmark item"), "{e}");
        let mut r = Report {
            adapter: "a".into(),
            backend: "b".into(),
            driver: "d".into(),
            version: "v".into(),
            started_unix: 0,
            quick: true,
            peak: PeakFigures {
                f32_gflops: 1.0,
                f16_gflops: None,
                copy_gbs: 1.0,
            },
            tuning: vec![],
            items: vec![],
            peer: None,
            f16_activations: None,
            f16_coop_matrix: None,
        };
        let peer = PeerFile {
            peer: "p".into(),
            items: vec![PeerItem {
                name: "x".into(),
                ms_min: 0.0,
                ms_median: f64::NAN,
            }],
        };
        let e = merge_peer(&mut r, &peer).unwrap_err().to_string();
        assert!(e.contains("'x'"), "{e}");
    }
}
