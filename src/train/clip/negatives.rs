//! Hard-negative captions (NegCLIP-style): captions that differ from a batch's own in one
//! word, so that the towers must tell shape and colour roles apart.

use crate::data::shapes::{Colour, ShapeKind};

/// Hard-negative captions for shape: `caption` with its first shape word replaced by each
/// other shape kind (three for the shapes world), so the image must be told from captions
/// that differ from its own in the shape alone. Empty when the caption names no shape.
pub fn shape_negatives(caption: &str) -> Vec<String> {
    let words: Vec<&str> = caption.split(' ').collect();
    let Some((at, kind)) = words
        .iter()
        .enumerate()
        .find_map(|(i, w)| ShapeKind::from_word(w).map(|k| (i, k)))
    else {
        return Vec::new();
    };
    ShapeKind::ALL
        .into_iter()
        .filter(|&k| k != kind)
        .map(|k| {
            let mut w = words.clone();
            w[at] = k.word();
            w.join(" ")
        })
        .collect()
}

/// The colour-role negative of a caption: for a one-shape caption that names the shape's
/// colour and the background's ("a red circle on a blue background"), the same caption with
/// the two colours exchanged ("a blue circle on a red background"), which describes the
/// inverse picture. `None` for captions without exactly two colour words or with two shapes
/// (exchanging two shape colours there can describe the same scene).
pub fn swap_negative(caption: &str) -> Option<String> {
    if caption.contains(" and ") || !caption.ends_with(" background") {
        return None;
    }
    let mut words: Vec<&str> = caption.split(' ').collect();
    let at: Vec<usize> = (0..words.len())
        .filter(|&i| Colour::from_word(words[i]).is_some())
        .collect();
    match at.as_slice() {
        [a, b] if words[*a] != words[*b] => {
            words.swap(*a, *b);
            Some(words.join(" "))
        }
        _ => None,
    }
}

/// The hard-negative captions of a whole batch: [`shape_negatives`] (with `shape`) and
/// [`swap_negative`] (with `swap`) of every caption, without repeats and without any text
/// that is itself a caption of the batch. A batch that holds a scene and its hard negative
/// (the same scene with another shape) would otherwise list each one's own caption among the
/// other's negatives, as a second column that also matches the image, and cap its best
/// image-to-text probability at 1/2.
pub fn batch_negatives(captions: &[String], shape: bool, swap: bool) -> Vec<String> {
    let own: std::collections::HashSet<&str> = captions.iter().map(String::as_str).collect();
    let mut seen = std::collections::HashSet::new();
    captions
        .iter()
        .flat_map(|c| {
            let mut v = if shape {
                shape_negatives(c)
            } else {
                Vec::new()
            };
            if swap {
                v.extend(swap_negative(c));
            }
            v
        })
        .filter(|n| !own.contains(n.as_str()) && seen.insert(n.clone()))
        .collect()
}

/// [`batch_negatives`] with shape negatives only.
pub fn batch_shape_negatives(captions: &[String]) -> Vec<String> {
    batch_negatives(captions, true, false)
}
