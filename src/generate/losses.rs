//! The loss terms of generation besides the prompts' own: total variation, and CLIP's loss
//! of whole images (used to rank a start pool and to report the clean loss).

use super::cutouts;
use super::views::whole_view;
use super::{clip_normalise, Perceptor, Target};
use crate::autodiff::{Tape, Var};
use crate::{Error, Gpu, Result, Tensor};

/// Images CLIP scores at once when it ranks an [`Init::Pool`].
pub(super) const POOL_BATCH: usize = 64;

/// Total variation: mean squared difference of vertically and horizontally adjacent pixels,
/// as differences of rows/columns taken by matmul with a difference matrix.
pub(super) fn total_variation(tape: &Tape, img: &Var) -> Result<Var> {
    let (c, h, w) = (img.shape()[1], img.shape()[2], img.shape()[3]);
    let gpu = img.value().gpu();
    let diff = |n: usize| -> Result<Tensor> {
        // [n-1, n]: row i is e_{i+1} − e_i
        let mut d = vec![0.0f32; (n - 1) * n];
        for i in 0..n - 1 {
            d[i * n + i] = -1.0;
            d[i * n + i + 1] = 1.0;
        }
        Tensor::from_slice(gpu, &d, &[n - 1, n])
    };
    if h < 2 || w < 2 {
        return Err(Error::invalid(
            "total variation needs an image of at least 2x2",
        ));
    }
    let x = tape.reshape(img, &[c, h, w])?;
    let dy = tape.leaf(diff(h)?, false);
    let dx = tape.leaf(diff(w)?, false);
    // vertical: Dy [h-1, h] @ x_c [h, w]; horizontal: x_c [h, w] @ Dxᵀ [w, w-1]
    let v = tape.matmul(&dy, &x, None, &Default::default())?;
    let hz = tape.matmul(
        &x,
        &dx,
        None,
        &crate::ops::matmul::MatmulOpts {
            trans_b: true,
            ..Default::default()
        },
    )?;
    let lv = tape.mean(&tape.square(&v)?)?;
    let lh = tape.mean(&tape.square(&hz)?)?;
    tape.add(&lv, &lh)
}

/// CLIP's weighted loss against `targets` of each image of `pool` (`[3, h, w]` in [0, 1]),
/// seen whole as [`Generation::clean_loss`] sees the current image, in batches of
/// [`POOL_BATCH`].
pub(super) fn rank_pool(
    gpu: &Gpu,
    clip: &dyn Perceptor,
    targets: &[Target],
    pool: &[Vec<f32>],
    w: usize,
    h: usize,
) -> Result<Vec<f32>> {
    let s = clip.image_size();
    let (wy, wx) = whole_view(gpu, w, h, s)?;
    // The whole-image view of an image of CLIP's size is the image itself (the resampling
    // matrices are the identity), so such pools go to CLIP as they are.
    let same_size = w == s && h == s;
    let mut losses = Vec::with_capacity(pool.len());
    for chunk in pool.chunks(POOL_BATCH) {
        if let Some(px) = chunk.iter().find(|px| px.len() != 3 * w * h) {
            return Err(Error::shape(format!(
                "init pool image has {} values, expected 3x{h}x{w}",
                px.len()
            )));
        }
        let tape = Tape::new();
        let batch = if same_size {
            let all: Vec<f32> = chunk.concat();
            tape.leaf(
                Tensor::from_slice(gpu, &all, &[chunk.len(), 3, h, w])?,
                false,
            )
        } else {
            let mut views = Vec::with_capacity(chunk.len());
            for px in chunk {
                let img = tape.leaf(Tensor::from_slice(gpu, px, &[1, 3, h, w])?, false);
                views.push(cutouts::cutouts(&tape, &img, &wy, &wx)?);
            }
            let refs: Vec<&Var> = views.iter().collect();
            tape.concat(&refs, 0)?
        };
        losses.extend(whole_losses(gpu, clip, targets, &tape, &batch)?);
    }
    Ok(losses)
}

/// The weighted loss against `targets` (prompt stops ignored) of each of `views`
/// `[N, 3, S, S]` (pixels in [0, 1], at CLIP's size), one value per view.
pub(super) fn whole_losses(
    gpu: &Gpu,
    clip: &dyn Perceptor,
    targets: &[Target],
    tape: &Tape,
    views: &Var,
) -> Result<Vec<f32>> {
    let emb = clip.encode_image(tape, &clip_normalise(gpu, clip, tape, views)?)?;
    let mut total = vec![0.0f32; views.shape()[0]];
    for t in targets {
        let d = tape.spherical_distance(&emb, &tape.leaf(t.embed.clone(), false))?;
        for (acc, v) in total.iter_mut().zip(d.value().to_vec()?) {
            *acc += t.weight * v;
        }
    }
    Ok(total)
}
