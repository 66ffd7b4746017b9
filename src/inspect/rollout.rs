//! Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers") and
//! gradient-weighted relevance (Chefer, Gur & Wolf 2021, "Generic Attention-model
//! Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers", eq. 5-6), on
//! the CPU over the probabilities a recorded forward returns (`[T, T]` per head: small).

use crate::{Error, Result};

/// `[T, T]` row-major matrix product `a · b`.
fn matmul(a: &[f32], b: &[f32], t: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; t * t];
    for i in 0..t {
        for k in 0..t {
            let aik = a[i * t + k];
            if aik == 0.0 {
                continue;
            }
            for j in 0..t {
                out[i * t + j] += aik * b[k * t + j];
            }
        }
    }
    out
}

fn check(layer: &[f32], heads: usize, t: usize, what: &str) -> Result<()> {
    if layer.len() != heads * t * t {
        return Err(Error::shape(format!(
            "{what}: a layer holds {} values, expected heads·T·T = {heads}·{t}·{t}",
            layer.len()
        )));
    }
    Ok(())
}

/// The mean over heads of `f(i)` for each entry `e` of a `[T, T]` matrix (`i` indexes
/// `[H, T, T]`): `[H, T, T]` → `[T, T]`.
fn head_mean(heads: usize, t: usize, f: impl Fn(usize) -> f32) -> Vec<f32> {
    let tt = t * t;
    (0..tt)
        .map(|e| (0..heads).map(|h| f(h * tt + e)).sum::<f32>() / heads as f32)
        .collect()
}

/// Attention rollout `[T, T]` of the layers' probabilities (each `[H, T, T]`, first layer
/// first): `Â_l = ½·mean_h A_l + ½·I` with its rows renormalised (the residual stream carries
/// half the signal), and `rollout = Â_L ⋯ Â_1`. Row `i` says how much each input token flows
/// into position `i` after the last layer; each row sums to 1.
pub fn rollout(layers: &[Vec<f32>], heads: usize, t: usize) -> Result<Vec<f32>> {
    let mut r = identity(t);
    for layer in layers {
        check(layer, heads, t, "attention rollout")?;
        let mut a = head_mean(heads, t, |i| layer[i]);
        for i in 0..t {
            a[i * t + i] += 1.0;
            let row = &mut a[i * t..(i + 1) * t];
            let s: f32 = row.iter().sum();
            row.iter_mut().for_each(|x| *x /= s.max(f32::MIN_POSITIVE));
        }
        r = matmul(&a, &r, t);
    }
    Ok(r)
}

/// Gradient-weighted relevance `[T, T]` (Chefer et al. 2021, self-attention rule): from
/// `R = I`, each layer in order adds `Ā·R` with `Ā = mean_h (∇A ⊙ A)⁺`, the attention
/// weighted by the gradient of the explained score with respect to it, negative
/// contributions clipped. Row 0 (the class token) over the patches is the image's relevance
/// map. `attn` and `grads`: one `[H, T, T]` per layer, first layer first.
pub fn relevance(
    attn: &[Vec<f32>],
    grads: &[Vec<f32>],
    heads: usize,
    t: usize,
) -> Result<Vec<f32>> {
    if attn.len() != grads.len() {
        return Err(Error::shape(format!(
            "relevance: {} attention layers but {} gradient layers",
            attn.len(),
            grads.len()
        )));
    }
    let mut r = identity(t);
    for (a, g) in attn.iter().zip(grads) {
        check(a, heads, t, "relevance attention")?;
        check(g, heads, t, "relevance gradient")?;
        let cam = head_mean(heads, t, |i| (a[i] * g[i]).max(0.0));
        let add = matmul(&cam, &r, t);
        r.iter_mut().zip(add).for_each(|(x, y)| *x += y);
    }
    Ok(r)
}

/// `[T, T]` identity.
pub fn identity(t: usize) -> Vec<f32> {
    let mut m = vec![0.0f32; t * t];
    (0..t).for_each(|i| m[i * t + i] = 1.0);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    /// Each head attends to itself only: the residual mix changes nothing.
    #[test]
    fn identity_attention_rolls_out_to_identity() {
        let (h, t) = (2, 4);
        let layer: Vec<f32> = [identity(t), identity(t)].concat();
        let r = rollout(&[layer.clone(), layer], h, t).unwrap();
        assert!(close(&r, &identity(t)));
    }

    /// Uniform attention: after one layer row i is ½·e_i + ½·uniform; after many layers
    /// every row tends to uniform, and rows always sum to 1.
    #[test]
    fn uniform_attention_rolls_out_towards_uniform_with_unit_rows() {
        let (h, t) = (3, 5);
        let uniform = vec![1.0 / t as f32; h * t * t];
        let one = rollout(std::slice::from_ref(&uniform), h, t).unwrap();
        for i in 0..t {
            for j in 0..t {
                let want = 0.5 / t as f32 + if i == j { 0.5 } else { 0.0 };
                assert!((one[i * t + j] - want).abs() < 1e-6);
            }
        }
        let many = rollout(&vec![uniform; 30], h, t).unwrap();
        for i in 0..t {
            let row = &many[i * t..(i + 1) * t];
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            assert!(
                row.iter().all(|x| (x - 1.0 / t as f32).abs() < 1e-5),
                "{row:?}"
            );
        }
    }

    /// The head mean, then the product in layer order (Â₂·Â₁, not Â₁·Â₂).
    #[test]
    fn rollout_multiplies_later_layers_on_the_left() {
        let t = 2;
        // One head. Layer 1: token 1 reads token 0. Layer 2: token 0 reads token 1.
        let l1 = vec![1.0, 0.0, 1.0, 0.0];
        let l2 = vec![0.0, 1.0, 0.0, 1.0];
        let r = rollout(&[l1, l2], 1, t).unwrap();
        // Â₁ = [[1, 0], [.5, .5]], Â₂ = [[.5, .5], [0, 1]]; Â₂·Â₁ = [[.75, .25], [.5, .5]].
        assert!(close(&r, &[0.75, 0.25, 0.5, 0.5]), "{r:?}");
    }

    /// With zero gradients nothing is relevant beyond each token itself.
    #[test]
    fn zero_gradients_give_identity_relevance() {
        let (h, t) = (2, 3);
        let a = vec![1.0 / 3.0; h * t * t];
        let r = relevance(
            &[a.clone(), a],
            &[vec![0.0; h * t * t], vec![0.0; h * t * t]],
            h,
            t,
        )
        .unwrap();
        assert!(close(&r, &identity(t)));
    }

    /// `R_l = R_{l-1} + Ā_l·R_{l-1}`: when each Ā_l has constant row sums s_l, every row of R
    /// sums to Π(1 + s_l); negative gradient·attention products are clipped away first.
    #[test]
    fn relevance_rows_sum_to_the_product_of_one_plus_the_weighted_row_sums() {
        let (h, t) = (2, 3);
        let a = vec![1.0 / 3.0; h * t * t];
        // Head 0 gradient 0.6, head 1 gradient -5 (clipped): Ā = ½·(0.6·⅓) = 0.1 per entry,
        // row sum 0.3. Second layer: gradient 1.2 on both heads, Ā = 0.4, row sum 1.2.
        let g1: Vec<f32> = (0..h * t * t)
            .map(|i| if i < t * t { 0.6 } else { -5.0 })
            .collect();
        let g2 = vec![1.2; h * t * t];
        let r = relevance(&[a.clone(), a], &[g1, g2], h, t).unwrap();
        for i in 0..t {
            let s: f32 = r[i * t..(i + 1) * t].iter().sum();
            assert!((s - 1.3 * 2.2).abs() < 1e-5, "row {i} sums to {s}");
        }
        // And the exact matrix: R₁ = I + 0.1·J, R₂ = R₁ + 0.4·J·R₁ (J: all ones).
        let r1: Vec<f32> = identity(t).iter().map(|x| x + 0.1).collect();
        let j = vec![1.0f32; t * t];
        let jr = matmul(&j, &r1, t);
        let want: Vec<f32> = r1.iter().zip(&jr).map(|(x, y)| x + 0.4 * y).collect();
        assert!(close(&r, &want), "{r:?} vs {want:?}");
    }

    #[test]
    fn wrong_sizes_are_errors() {
        assert!(rollout(&[vec![0.0; 5]], 1, 2).is_err());
        assert!(relevance(&[vec![0.0; 4]], &[], 1, 2).is_err());
        assert!(relevance(&[vec![0.0; 4]], &[vec![0.0; 3]], 1, 2).is_err());
    }
}
