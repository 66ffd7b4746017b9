//! Whether a generation of a given size fits the device, checked before any work: the
//! decoder's largest tensor against the buffer-binding limit and a lower bound of a step's
//! memory against the memory budget, with the largest size of the same shape that can fit.

use crate::gpu::human_bytes;
use crate::models::clip::VisionConfig;
use crate::models::vqgan::config::VqGanConfig;
use crate::Gpu;

/// A generation size that cannot fit the device; the message names the limit and the
/// largest size of the same shape that can (or that none can).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DoesNotFit(pub String);

/// Bytes of the largest single tensor the decoder (and its backward) holds at `w`×`h`
/// (saturating: a size whose products overflow needs `u64::MAX`).
pub fn largest_tensor(cfg: &VqGanConfig, w: usize, h: usize) -> u64 {
    let d = &cfg.dd;
    let mut most = 0u64;
    for (i, &m) in d.ch_mult.iter().enumerate() {
        let hw = ((h >> i) as u64).saturating_mul((w >> i) as u64);
        most = most.max(4u64.saturating_mul((d.ch * m) as u64).saturating_mul(hw));
        // attention probabilities [HW, HW], kept for the backward pass
        if d.attn_resolutions.contains(&(d.resolution >> i)) {
            most = most.max(4u64.saturating_mul(hw).saturating_mul(hw));
        }
    }
    most
}

/// A lower bound of the GPU bytes one optimisation step adds at `w`×`h` with `cutn`
/// cutouts: the decoder's activations the backward pass needs (per residual block its input
/// and the outputs of its two convolutions and a normalisation, at every level; with
/// `recompute` only the largest level's), the cutouts, and per cutout the CLIP image tower's
/// residual stream and attention input at every layer. Gradients, scratch and the engine's
/// other buffers come on top (the shipped models measure 3-9 times this on a step), so a
/// size refused by it cannot fit, while one it passes may still meet the pool's budget.
pub fn step_bytes_at_least(
    cfg: &VqGanConfig,
    vision: &VisionConfig,
    (w, h): (usize, usize),
    cutn: usize,
    recompute: bool,
) -> u64 {
    let d = &cfg.dd;
    let blocks = (d.num_res_blocks + 1) as u64;
    let levels = d.ch_mult.iter().enumerate().map(|(i, &m)| {
        let hw = ((h >> i) as u64).saturating_mul((w >> i) as u64);
        (4 * blocks)
            .saturating_mul((d.ch * m) as u64)
            .saturating_mul(hw)
    });
    let decoder = if recompute {
        levels.max().unwrap_or(0)
    } else {
        levels.fold(0u64, u64::saturating_add)
    };
    let s = vision.image_size as u64;
    let tokens = (s / vision.patch_size.max(1) as u64).pow(2) + 1;
    let per_cut = (3 * s * s)
        .saturating_add(tokens * vision.hidden_size as u64 * 2 * vision.num_hidden_layers as u64);
    4u64.saturating_mul(decoder.saturating_add(per_cut.saturating_mul(cutn as u64)))
}

/// Refuses a size before any work when it cannot fit the device: a decoder tensor larger
/// than one buffer binding may be, or (with a memory budget) the loaded models plus
/// [`step_bytes_at_least`] past the budget. The message gives the largest size of the same
/// shape, a multiple of the VQGAN factor, that passes both checks: no larger size can fit,
/// though with a budget a size near it may still be refused by the pool during the run.
pub fn check_fits(
    gpu: &Gpu,
    cfg: &VqGanConfig,
    vision: &VisionConfig,
    (w, h): (usize, usize),
    cutn: usize,
    recompute: bool,
) -> std::result::Result<(), DoesNotFit> {
    let f = cfg.downsampling_factor().max(1);
    let limit = gpu
        .limits()
        .max_storage_buffer_binding_size
        .min(gpu.limits().max_buffer_size);
    let (budget, base) = (gpu.memory_budget(), gpu.memory().live);
    let total = |w: usize, h: usize| {
        base.saturating_add(step_bytes_at_least(cfg, vision, (w, h), cutn, recompute))
    };
    let fits = |w: usize, h: usize| {
        largest_tensor(cfg, w, h) <= limit && budget.is_none_or(|b| total(w, h) <= b)
    };
    if fits(w, h) {
        return Ok(());
    }
    // The largest multiple-of-f size of this aspect that fits (both costs grow with size).
    let long = w.max(h);
    let scaled = |side: usize| (side * w / long / f * f, side * h / long / f * f);
    let (mut lo, mut hi) = (0usize, long / f);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        let (sw, sh) = scaled(mid * f);
        if sw > 0 && sh > 0 && fits(sw, sh) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let largest = scaled(lo * f);
    let none = lo == 0 || largest.0 == 0 || largest.1 == 0;
    let need = largest_tensor(cfg, w, h);
    if need > limit {
        let largest = match none {
            true => "no size of this shape fits".to_string(),
            false => format!(
                "the largest size of this shape that fits is about {}x{}",
                largest.0, largest.1
            ),
        };
        return Err(DoesNotFit(format!(
            "{w}x{h} needs a {need}-byte tensor but this device allows {limit} bytes per buffer \
             binding; {largest}"
        )));
    }
    // The memory need is a lower bound: sizes above the one found cannot fit, and the pool
    // refuses, during the run, a size below it that still does not.
    let largest = match none {
        true => "no size of this shape fits in it".to_string(),
        false => format!(
            "the largest size of this shape that might fit is {}x{} (no larger one can)",
            largest.0, largest.1
        ),
    };
    let budget = budget.unwrap_or(u64::MAX);
    Err(DoesNotFit(format!(
        "{w}x{h} with {cutn} cutouts would need at least {} of GPU memory ({} of loaded models \
         and {} of activations per step), more than the --max-memory budget of {}; {largest}",
        human_bytes(total(w, h)),
        human_bytes(base),
        human_bytes(total(w, h) - base),
        human_bytes(budget)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::clip::ClipConfig;

    #[test]
    fn an_oversized_generation_is_refused_with_the_largest_size_that_fits() {
        let g = crate::ops::testutil::gpu();
        let cfg = VqGanConfig::imagenet_f16(1024);
        let vision = ClipConfig::from_json("{}").unwrap().vision;
        let side = 1 << 16;
        let e = check_fits(&g, &cfg, &vision, (side, side / 2), 32, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("{side}x{} needs a", side / 2)),
            "{e}"
        );
        let (w, h) = e
            .rsplit_once("about ")
            .and_then(|(_, s)| s.split_once('x'))
            .map(|(w, h)| (w.parse::<usize>().unwrap(), h.parse::<usize>().unwrap()))
            .expect(&e);
        assert_eq!((w % 16, h % 16, w / h), (0, 0, 2), "{e}");
        assert!(check_fits(&g, &cfg, &vision, (w, h), 32, false).is_ok());
        assert!(check_fits(&g, &cfg, &vision, (w + 32, h + 16), 32, false).is_err());
    }
}
