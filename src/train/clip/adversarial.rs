//! Adversarial training of the shapes CLIP (TeCoA-style, Mao et al. 2023): each batch's images
//! are first moved by projected gradient ascent (PGD) on the contrastive loss within a small
//! L2 or L∞ ball around them, in pixel space ([0, 1] before the preprocessing), and the step
//! then trains on the moved images. A model trained so has gradients that change what an image
//! shows rather than textures a person cannot see, which is what VQGAN+CLIP follows
//! (Santurkar et al. 2019, "Image Synthesis with a Single (Robust) Classifier").

use super::{ClipTrainer, MEAN, STD};
use crate::autodiff::Tape;
use crate::{Error, Result, Tensor};

/// The ball the attack stays in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdvNorm {
    /// Euclidean norm of the whole image's perturbation.
    L2,
    /// Largest change of any pixel channel.
    Linf,
}

impl std::str::FromStr for AdvNorm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "l2" => Ok(AdvNorm::L2),
            "linf" => Ok(AdvNorm::Linf),
            o => Err(Error::invalid(format!(
                "unknown norm '{o}': expected l2 or linf"
            ))),
        }
    }
}

impl std::fmt::Display for AdvNorm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AdvNorm::L2 => "l2",
            AdvNorm::Linf => "linf",
        })
    }
}

/// The attack of adversarial training: `steps` steps of PGD within a ball of radius `eps`
/// (pixels in [0, 1]) of the given norm. `steps == 0` or `eps == 0` is plain training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adversarial {
    /// Radius of the ball, in [0, 1] pixel units.
    pub eps: f32,
    /// Gradient steps of the attack.
    pub steps: usize,
    /// Norm of the ball.
    pub norm: AdvNorm,
}

impl Adversarial {
    /// No attack.
    pub const OFF: Adversarial = Adversarial {
        eps: 0.0,
        steps: 0,
        norm: AdvNorm::L2,
    };

    /// True when the attack changes the images.
    pub fn is_on(&self) -> bool {
        self.eps > 0.0 && self.steps > 0
    }
}

/// Moves `delta` (one image's perturbation, `[3, S, S]` flattened) into the ball.
fn project(delta: &mut [f32], adv: &Adversarial) {
    match adv.norm {
        AdvNorm::Linf => delta
            .iter_mut()
            .for_each(|d| *d = d.clamp(-adv.eps, adv.eps)),
        AdvNorm::L2 => {
            let n = delta.iter().map(|d| d * d).sum::<f32>().sqrt();
            if n > adv.eps {
                delta.iter_mut().for_each(|d| *d *= adv.eps / n);
            }
        }
    }
}

impl ClipTrainer {
    /// The images of a batch moved by PGD to raise the contrastive loss (with the same
    /// captions and negatives as [`ClipTrainer::loss`]): `pixels` `[N, 3, S, S]` are
    /// preprocessed (normalised by [`MEAN`] and [`STD`]); the attack works in [0, 1] pixel
    /// units, keeps each image within `adv.eps` of its start in `adv.norm` and within [0, 1],
    /// and takes `adv.steps` steps of size 2.5 · eps / steps from the unperturbed image (no
    /// random start, so a resumed run repeats it exactly). Returns the moved images,
    /// preprocessed.
    pub fn attack(
        &self,
        pixels: &Tensor,
        captions: &[String],
        negatives: &[String],
        adv: &Adversarial,
    ) -> Result<Tensor> {
        if !adv.is_on() {
            return Ok(pixels.clone());
        }
        if !(adv.eps.is_finite() && adv.eps > 0.0) {
            return Err(Error::invalid(format!(
                "the attack radius must be a positive number, got {}",
                adv.eps
            )));
        }
        let shape = pixels.shape().to_vec();
        let (n, plane) = (shape[0], shape[2] * shape[3]);
        if shape.len() != 4 || shape[1] != 3 {
            return Err(Error::shape(format!(
                "attack: pixels must be [N, 3, S, S], got {shape:?}"
            )));
        }
        let per_image = 3 * plane;
        let channel = |i: usize| (i / plane) % 3;
        // pixel values in [0, 1]
        let raw: Vec<f32> = pixels
            .to_vec()?
            .iter()
            .enumerate()
            .map(|(i, &p)| p * STD[channel(i)] + MEAN[channel(i)])
            .collect();
        let mut delta = vec![0f32; raw.len()];
        let alpha = 2.5 * adv.eps / adv.steps as f32;
        // The perturbed raw pixels, normalised as the model reads them.
        let normalised = |delta: &[f32]| -> Vec<f32> {
            raw.iter()
                .zip(delta)
                .enumerate()
                .map(|(i, (&r, &d))| (r + d - MEAN[channel(i)]) / STD[channel(i)])
                .collect()
        };
        for _ in 0..adv.steps {
            let moved = normalised(&delta);
            let tape = Tape::new();
            let x = tape.leaf(Tensor::from_slice(self.model.gpu(), &moved, &shape)?, true);
            let (loss, _) = self.loss_on(&tape, &x, captions, negatives)?;
            let grads = tape.backward(&loss)?;
            let g = grads
                .get(&x)
                .ok_or_else(|| Error::invalid("attack: the loss does not reach the pixels"))?
                .to_vec()?;
            // d loss / d raw pixel = d loss / d normalised pixel / std
            let g: Vec<f32> = g
                .iter()
                .enumerate()
                .map(|(i, &v)| v / STD[channel(i)])
                .collect();
            for k in 0..n {
                let r = k * per_image..(k + 1) * per_image;
                let (gk, dk) = (&g[r.clone()], &mut delta[r.clone()]);
                match adv.norm {
                    AdvNorm::Linf => {
                        for (d, &v) in dk.iter_mut().zip(gk) {
                            *d += alpha * v.signum() * f32::from(v != 0.0);
                        }
                    }
                    AdvNorm::L2 => {
                        let norm = gk.iter().map(|v| v * v).sum::<f32>().sqrt();
                        if norm > 0.0 {
                            for (d, &v) in dk.iter_mut().zip(gk) {
                                *d += alpha * v / norm;
                            }
                        }
                    }
                }
                project(dk, adv);
                // stay a valid image: the clamp only shrinks the perturbation
                for (d, &x) in dk.iter_mut().zip(&raw[r]) {
                    *d = (x + *d).clamp(0.0, 1.0) - x;
                }
            }
        }
        Tensor::from_slice(self.model.gpu(), &normalised(&delta), &shape)
    }
}
