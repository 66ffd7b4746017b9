//! Zero-shot evaluation of a CLIP on held-out scenes of the shapes world.

use crate::data::shapes::{Colour, ShapeKind, ShapesDataset, Split};
use crate::models::clip::ClipModel;
use crate::{Error, Result};

/// Zero-shot results of [`evaluate`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EvalResult {
    /// Images scored.
    pub n: usize,
    /// Right shape colour among captions that differ only in it (8 candidates).
    pub colour_correct: usize,
    /// Right shape kind among captions that differ only in it (4 candidates).
    pub shape_correct: usize,
    /// Exact (colour, kind, background) among every `"a {colour} {kind} on a {bg}
    /// background"` with colour ≠ background (224 candidates).
    pub free_correct: usize,
}

/// Zero-shot accuracy of `model` on the first `n` single-shape scenes of the held-out split
/// of dataset `data_seed`, rendered at the model's image size and preprocessed by the
/// model's own preprocessing. Captions use the sample's phrasing.
pub fn evaluate(model: &ClipModel, data_seed: u64, n: usize) -> Result<EvalResult> {
    use std::collections::HashMap;
    let size = model.config.vision.image_size;
    let ds = ShapesDataset::new(data_seed, Split::HeldOut);
    let mut scenes = Vec::with_capacity(n);
    let mut i = 0u64;
    while scenes.len() < n {
        let (scene, _) = ds.sample(i);
        // Phrasings in turn (index mod 4).
        let variant = (i % 4) as usize;
        if scene.shapes.len() == 1 {
            scenes.push((scene, variant));
        }
        i += 1;
    }
    let mut texts: Vec<String> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut id_of = |s: String, texts: &mut Vec<String>| -> usize {
        *index.entry(s.clone()).or_insert_with(|| {
            texts.push(s);
            texts.len() - 1
        })
    };
    let mut colour_sets = Vec::new();
    let mut shape_sets = Vec::new();
    let mut free_truth = Vec::new();
    for (scene, v) in &scenes {
        let sh = scene.shapes[0];
        let with = |colour: Colour, kind: ShapeKind| {
            let mut s = scene.clone();
            s.shapes[0].colour = colour;
            s.shapes[0].kind = kind;
            s.caption(*v)
        };
        let cs: Vec<usize> = Colour::ALL
            .iter()
            .map(|&c| id_of(with(c, sh.kind), &mut texts))
            .collect();
        let ks: Vec<usize> = ShapeKind::ALL
            .iter()
            .map(|&k| id_of(with(sh.colour, k), &mut texts))
            .collect();
        colour_sets.push((cs, Colour::ALL.iter().position(|&c| c == sh.colour)));
        shape_sets.push((ks, ShapeKind::ALL.iter().position(|&k| k == sh.kind)));
        free_truth.push((sh.colour, sh.kind, scene.background));
    }
    let mut free = Vec::new();
    for bg in Colour::ALL {
        for c in Colour::ALL {
            if c == bg {
                continue;
            }
            for k in ShapeKind::ALL {
                let t = format!("a {} {} on a {} background", c.word(), k.word(), bg.word());
                free.push(((c, k, bg), id_of(t, &mut texts)));
            }
        }
    }
    let text_emb = model.encode_text(&texts)?.to_vec()?;
    let p = model.config.projection_dim;
    let mut res = EvalResult {
        n,
        ..Default::default()
    };
    for (ci, chunk) in scenes.chunks(64).enumerate() {
        let imgs: Vec<image::RgbImage> = chunk
            .iter()
            .map(|(s, _)| {
                image::RgbImage::from_raw(size as u32, size as u32, s.render(size))
                    .ok_or_else(|| Error::invalid("render size mismatch"))
            })
            .collect::<Result<_>>()?;
        let emb = model.encode_image(&model.pixel_values(&imgs)?)?.to_vec()?;
        for j in 0..chunk.len() {
            let k = ci * 64 + j;
            let e = &emb[j * p..(j + 1) * p];
            let score = |t: usize| -> f32 {
                e.iter()
                    .zip(&text_emb[t * p..(t + 1) * p])
                    .map(|(a, b)| a * b)
                    .sum()
            };
            let best =
                |c: &[usize]| (0..c.len()).max_by(|&a, &b| score(c[a]).total_cmp(&score(c[b])));
            let (cs, ct) = &colour_sets[k];
            res.colour_correct += usize::from(best(cs) == *ct);
            let (ks, kt) = &shape_sets[k];
            res.shape_correct += usize::from(best(ks) == *kt);
            let ids: Vec<usize> = free.iter().map(|f| f.1).collect();
            let b = best(&ids).map(|x| free[x].0);
            res.free_correct += usize::from(b == Some(free_truth[k]));
        }
    }
    Ok(res)
}
