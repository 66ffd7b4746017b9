//! `vqclip bench vqgan`: the VQGAN's stages timed one by one (encode, quantise, decode, and
//! decode with the backward pass VQGAN+CLIP runs), with the FLOPs of their convolutions and
//! products, so that each stage can be set beside `tools/peer_vqgan_bench.py` (PyTorch doing
//! the same work).

use crate::autodiff::Tape;
use crate::models::vqgan::{QuantizerKind, VqGan, VqGanConfig};
use crate::ops::vq;
use crate::{Error, Gpu, Result, Tensor};
use std::time::Instant;

/// One stage's timings over the repeats.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageTiming {
    /// `encode`, `quantize`, `decode` or `decode_backward`.
    pub stage: String,
    /// Floating-point operations of one run, in GFLOP (2 per multiply-add of the
    /// convolutions, attention products and code distances; norms and elementwise ops not
    /// counted).
    pub gflop: f64,
    /// Fastest run, milliseconds.
    pub min_ms: f64,
    /// Median run, milliseconds.
    pub median_ms: f64,
    /// `gflop` per second at the fastest run.
    pub gflops: f64,
}

/// What [`vqgan_stages`] measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VqganBench {
    /// Adapter name.
    pub adapter: String,
    /// Backend name.
    pub backend: String,
    /// Image width.
    pub width: usize,
    /// Image height.
    pub height: usize,
    /// Timed runs per stage, after one untimed warm-up run.
    pub repeats: usize,
    /// The stages in pipeline order.
    pub stages: Vec<StageTiming>,
}

/// Multiply-adds of a convolution producing `cout x hw` from `cin` channels with a `k x k`
/// kernel.
fn conv_macs(cin: usize, cout: usize, k: usize, hw: usize) -> f64 {
    (cin * cout * k * k * hw) as f64
}

fn resnet_macs(cin: usize, cout: usize, hw: usize) -> f64 {
    let skip = if cin != cout {
        conv_macs(cin, cout, 1, hw)
    } else {
        0.0
    };
    conv_macs(cin, cout, 3, hw) + conv_macs(cout, cout, 3, hw) + skip
}

/// q, k, v, proj_out (1x1) and the two `hw x hw x c` products.
fn attn_macs(c: usize, hw: usize) -> f64 {
    4.0 * conv_macs(c, c, 1, hw) + 2.0 * (hw * hw * c) as f64
}

/// FLOPs of `encoder` + `quant_conv` on one `w x h` image, following
/// `taming/modules/diffusionmodules/model.py` (attention placed by nominal resolution, as
/// the model does).
pub fn encode_flops(cfg: &VqGanConfig, w: usize, h: usize) -> f64 {
    let d = &cfg.dd;
    let (mut hh, mut ww) = (h, w);
    let mut macs = conv_macs(d.in_channels, d.ch, 3, h * w);
    let mut block_in = d.ch;
    let mut res = d.resolution;
    for (i, &mult) in d.ch_mult.iter().enumerate() {
        let out = d.ch * mult;
        for _ in 0..d.num_res_blocks {
            macs += resnet_macs(block_in, out, hh * ww);
            block_in = out;
            if d.attn_resolutions.contains(&res) {
                macs += attn_macs(block_in, hh * ww);
            }
        }
        if i + 1 != d.ch_mult.len() {
            res /= 2;
            hh /= 2;
            ww /= 2;
            macs += conv_macs(block_in, block_in, 3, hh * ww);
        }
    }
    let hw = hh * ww;
    macs += 2.0 * resnet_macs(block_in, block_in, hw) + attn_macs(block_in, hw);
    macs += conv_macs(block_in, d.z_channels, 3, hw);
    macs += conv_macs(d.z_channels, cfg.embed_dim, 1, hw);
    2.0 * macs
}

/// FLOPs of `post_quant_conv` + `decoder` producing one `w x h` image.
pub fn decode_flops(cfg: &VqGanConfig, w: usize, h: usize) -> f64 {
    let d = &cfg.dd;
    let levels = d.ch_mult.len();
    let f = 1 << (levels - 1);
    let (mut hh, mut ww) = (h / f, w / f);
    let mut block_in = d.ch * d.ch_mult[levels - 1];
    let mut res = d.resolution >> (levels - 1);
    let mut macs = conv_macs(cfg.embed_dim, d.z_channels, 1, hh * ww);
    macs += conv_macs(d.z_channels, block_in, 3, hh * ww);
    macs += 2.0 * resnet_macs(block_in, block_in, hh * ww) + attn_macs(block_in, hh * ww);
    for i in (0..levels).rev() {
        let out = d.ch * d.ch_mult[i];
        for _ in 0..=d.num_res_blocks {
            macs += resnet_macs(block_in, out, hh * ww);
            block_in = out;
            if d.attn_resolutions.contains(&res) {
                macs += attn_macs(block_in, hh * ww);
            }
        }
        if i != 0 {
            res *= 2;
            hh *= 2;
            ww *= 2;
            macs += conv_macs(block_in, block_in, 3, hh * ww);
        }
    }
    macs += conv_macs(block_in, d.out_ch, 3, hh * ww);
    2.0 * macs
}

/// Times `f` once untimed, then `repeats` times, each ending with a wait for the device.
fn time_stage(
    gpu: &Gpu,
    name: &str,
    flops: f64,
    repeats: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<StageTiming> {
    f()?;
    gpu.sync()?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t = Instant::now();
        f()?;
        gpu.sync()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let (min, med) = (times[0], times[times.len() / 2]);
    Ok(StageTiming {
        stage: name.to_string(),
        gflop: flops / 1e9,
        min_ms: min * 1e3,
        median_ms: med * 1e3,
        gflops: flops / min / 1e9,
    })
}

fn check_finite(t: &Tensor, what: &str) -> Result<()> {
    let v = t.to_vec()?;
    match v.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(Error::invalid(format!(
            "bench vqgan: {what} has a non-finite value at {i} ({})",
            v[i]
        ))),
        None => Ok(()),
    }
}

/// Checks the quantiser's codes at up to 64 positions against an f64 CPU search: the chosen
/// code's distance must be within f32 rounding of the best one.
fn check_codes(z: &Tensor, codebook: &Tensor, codes: &Tensor) -> Result<()> {
    let (d, hw) = (z.dim(1), z.dim(2) * z.dim(3));
    let (zv, ev, cv) = (z.to_vec()?, codebook.to_vec()?, codes.to_vec_u32()?);
    let k = codebook.dim(0);
    let step = (z.dim(0) * hw).div_ceil(64).max(1);
    for m in (0..z.dim(0) * hw).step_by(step) {
        let (n, s) = (m / hw, m % hw);
        let at = |c: usize| zv[(n * d + c) * hw + s] as f64;
        let dist = |j: usize| -> f64 {
            (0..d)
                .map(|c| (at(c) - ev[j * d + c] as f64).powi(2))
                .sum::<f64>()
        };
        let best = (0..k).map(dist).fold(f64::INFINITY, f64::min);
        let scale: f64 = (0..d).map(|c| at(c).powi(2)).sum::<f64>() + 1.0;
        let got = dist(cv[m] as usize);
        if got - best > 1e-5 * scale {
            return Err(Error::invalid(format!(
                "bench vqgan: code at position {m} is {} (distance {got}) but the CPU finds \
                 one at distance {best}",
                cv[m]
            )));
        }
    }
    Ok(())
}

/// Times the VQGAN's stages on one random `w x h` image: `encode` (encoder + `quant_conv`),
/// `quantize` (nearest code per position and the codebook gather), `decode`
/// (`post_quant_conv` + decoder) and `decode_backward` (decode on a tape, `sum(y ⊙ m)` for a
/// fixed random `m`, and the gradient of the latent, the weights frozen, as in VQGAN+CLIP).
/// The outputs are checked finite and the codes against a CPU search before anything is
/// timed.
pub fn vqgan_stages(
    gpu: &Gpu,
    model: &VqGan,
    width: usize,
    height: usize,
    repeats: usize,
) -> Result<VqganBench> {
    if repeats == 0 {
        return Err(Error::invalid("at least one timed repeat is needed"));
    }
    let cfg = &model.config;
    let f = model.downsampling_factor();
    if width == 0 || height == 0 || !width.is_multiple_of(f) || !height.is_multiple_of(f) {
        return Err(Error::invalid(format!(
            "bench vqgan: {width}x{height} is not a multiple of the factor {f}"
        )));
    }
    let c = cfg.dd.in_channels;
    let img = Tensor::from_slice(
        gpu,
        &super::random_in(c * width * height, 11, -1.0, 1.0),
        &[1, c, height, width],
    )?;
    let z = model.encode(&img)?;
    let (zq, codes) = model.quantize(&z)?;
    check_finite(&z, "the encoder output")?;
    if cfg.quantizer == QuantizerKind::NearestNeighbour {
        check_codes(&z, model.quantize.codebook(), &codes)?;
    }
    let y = model.decode(&zq)?;
    check_finite(&y, "the decoder output")?;
    let mask = Tensor::from_slice(gpu, &super::random_in(y.numel(), 12, -1.0, 1.0), y.shape())?;
    let decode_backward = || -> Result<Tensor> {
        let tape = Tape::new();
        let zv = tape.leaf(zq.clone(), true);
        let y = model.decode_on(&tape, &zv, false)?;
        let m = tape.leaf(mask.clone(), false);
        let loss = tape.sum(&tape.mul(&y, &m)?)?;
        let grads = tape.backward(&loss)?;
        grads
            .get(&zv)
            .cloned()
            .ok_or_else(|| Error::invalid("bench vqgan: the latent got no gradient"))
    };
    check_finite(&decode_backward()?, "the latent's gradient")?;

    let (fe, fd) = (
        encode_flops(cfg, width, height),
        decode_flops(cfg, width, height),
    );
    let positions = (width / f) * (height / f);
    let fq = 2.0 * (positions * cfg.n_embed * cfg.embed_dim) as f64;
    let codebook = model.quantize.codebook();
    let stages = vec![
        time_stage(gpu, "encode", fe, repeats, || model.encode(&img).map(drop))?,
        time_stage(gpu, "quantize", fq, repeats, || {
            let codes = vq::nearest_codes(&z, codebook)?;
            vq::gather(&codes, codebook).map(drop)
        })?,
        time_stage(gpu, "decode", fd, repeats, || model.decode(&zq).map(drop))?,
        // The input gradient of every convolution costs what its forward does.
        time_stage(gpu, "decode_backward", 2.0 * fd, repeats, || {
            decode_backward().map(drop)
        })?,
    ];
    Ok(VqganBench {
        adapter: gpu.info().name.clone(),
        backend: format!("{:?}", gpu.info().backend),
        width,
        height,
        repeats,
        stages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_decoder_flops_match_a_hand_count_at_16x16() {
        // f16-16384 (ch 128, ch_mult 1,1,2,2,4, 2 res blocks, attention at 16) decoding a
        // 1x1 latent to 16x16, level by level.
        let cfg = VqGanConfig::imagenet_f16(16384);
        let r = |a: f64, b: f64, hw: f64| {
            (9.0 * a * b + 9.0 * b * b + if a != b { a * b } else { 0.0 }) * hw
        };
        let (c5, c2, c1) = (512.0f64, 256.0f64, 128.0f64);
        let attn = 4.0 * c5 * c5 + 2.0 * c5;
        let macs = c2 * c2 // post_quant_conv
            + 9.0 * c2 * c5 // conv_in
            + 2.0 * r(c5, c5, 1.0) + attn // mid
            + 3.0 * (r(c5, c5, 1.0) + attn) + 9.0 * c5 * c5 * 4.0 // level 4 + upsample to 2x2
            + r(c5, c2, 4.0) + 2.0 * r(c2, c2, 4.0) + 9.0 * c2 * c2 * 16.0 // level 3
            + 3.0 * r(c2, c2, 16.0) + 9.0 * c2 * c2 * 64.0 // level 2
            + r(c2, c1, 64.0) + 2.0 * r(c1, c1, 64.0) + 9.0 * c1 * c1 * 256.0 // level 1
            + 3.0 * r(c1, c1, 256.0) // level 0
            + 9.0 * c1 * 3.0 * 256.0; // conv_out
        let got = decode_flops(&cfg, 16, 16);
        assert!((got - 2.0 * macs).abs() < 1.0, "{got} vs {}", 2.0 * macs);
    }

    #[test]
    fn f16_encoder_flops_match_a_hand_count_at_16x16() {
        // 16x16 image down to a 1x1 latent; attention only at level 4 (nominal 16) and mid.
        let cfg = VqGanConfig::imagenet_f16(16384);
        let r = |a: f64, b: f64, hw: f64| {
            (9.0 * a * b + 9.0 * b * b + if a != b { a * b } else { 0.0 }) * hw
        };
        let (c5, c2, c1) = (512.0f64, 256.0f64, 128.0f64);
        let attn = 4.0 * c5 * c5 + 2.0 * c5;
        let macs = 9.0 * 3.0 * c1 * 256.0 // conv_in
            + 2.0 * r(c1, c1, 256.0) + 9.0 * c1 * c1 * 64.0 // level 0 + downsample to 8x8
            + 2.0 * r(c1, c1, 64.0) + 9.0 * c1 * c1 * 16.0 // level 1
            + r(c1, c2, 16.0) + r(c2, c2, 16.0) + 9.0 * c2 * c2 * 4.0 // level 2
            + 2.0 * r(c2, c2, 4.0) + 9.0 * c2 * c2 // level 3
            + r(c2, c5, 1.0) + attn + r(c5, c5, 1.0) + attn // level 4 (nominal 16)
            + 2.0 * r(c5, c5, 1.0) + attn // mid
            + 9.0 * c5 * c2 // conv_out
            + c2 * c2; // quant_conv
        let got = encode_flops(&cfg, 16, 16);
        assert!((got - 2.0 * macs).abs() < 1.0, "{got} vs {}", 2.0 * macs);
    }
}
