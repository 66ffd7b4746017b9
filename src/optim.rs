//! Optimisers on the GPU (`shaders/optim.wgsl`): Adam and AdamW with PyTorch's semantics.

use crate::gpu::{grid_1d, Kernel, Shader};
use crate::{Error, Result, Tensor};

pub(crate) static SHADER: Shader<Params> = crate::shader!("optim", "grid");

crate::shader_params! {
    /// Mirrors `struct Params` in `shaders/optim.wgsl`.
    pub(crate) struct Params {
        n: u32,
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
        decoupled: f32,
        bias1: f32,
        bias2: f32,
        _pad: [u32; 3],
    }
}

/// Which update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Adam; weight decay is an L2 term added to the gradient (`torch.optim.Adam`).
    Adam,
    /// AdamW; weight decay is decoupled from the gradient (`torch.optim.AdamW`).
    AdamW,
}

/// Hyper-parameters (PyTorch defaults except `lr`).
#[derive(Debug, Clone, Copy)]
pub struct AdamConfig {
    /// Update rule.
    pub kind: Kind,
    /// Learning rate.
    pub lr: f32,
    /// β1.
    pub beta1: f32,
    /// β2.
    pub beta2: f32,
    /// ε.
    pub eps: f32,
    /// Weight decay.
    pub weight_decay: f32,
}

impl AdamConfig {
    /// Adam with PyTorch's defaults and the given learning rate.
    pub fn adam(lr: f32) -> Self {
        AdamConfig {
            kind: Kind::Adam,
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
    /// AdamW with PyTorch's defaults (weight decay 0.01) and the given learning rate.
    pub fn adamw(lr: f32) -> Self {
        AdamConfig {
            kind: Kind::AdamW,
            weight_decay: 0.01,
            ..Self::adam(lr)
        }
    }
}

/// Adam / AdamW state for a list of parameters, updated in place on the GPU.
pub struct Adam {
    /// Hyper-parameters; `lr` may be changed between steps (schedules).
    pub config: AdamConfig,
    params: Vec<Tensor>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: u32,
}

impl Adam {
    /// Optimiser state for `params` (moments start at zero).
    pub fn new(params: Vec<Tensor>, config: AdamConfig) -> Result<Self> {
        let mut m = Vec::with_capacity(params.len());
        let mut v = Vec::with_capacity(params.len());
        for p in &params {
            p.expect_f32("optimiser parameter")?;
            m.push(Tensor::zeros(p.gpu(), p.shape())?);
            v.push(Tensor::zeros(p.gpu(), p.shape())?);
        }
        Ok(Adam {
            config,
            params,
            m,
            v,
            t: 0,
        })
    }

    /// The parameters (updated in place by [`Adam::step`]).
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u32 {
        self.t
    }

    /// The first and second moment estimates, one pair per parameter (for checkpoints).
    pub fn moments(&self) -> (&[Tensor], &[Tensor]) {
        (&self.m, &self.v)
    }

    /// Restores a checkpointed state: the moments (shapes must match the parameters) and the
    /// step count.
    pub fn restore(&mut self, m: &[Vec<f32>], v: &[Vec<f32>], steps: u32) -> Result<()> {
        if m.len() != self.params.len() || v.len() != self.params.len() {
            return Err(Error::invalid(format!(
                "optimiser state has {}/{} moments for {} parameters",
                m.len(),
                v.len(),
                self.params.len()
            )));
        }
        for i in 0..self.params.len() {
            let shape = self.params[i].shape().to_vec();
            self.m[i] = Tensor::from_slice(self.params[i].gpu(), &m[i], &shape)?;
            self.v[i] = Tensor::from_slice(self.params[i].gpu(), &v[i], &shape)?;
        }
        self.t = steps;
        Ok(())
    }

    /// One update with `grads[i]` for `params[i]` (`None` skips a parameter this step).
    pub fn step(&mut self, grads: &[Option<&Tensor>]) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(Error::invalid(format!(
                "optimiser has {} parameters but got {} gradients",
                self.params.len(),
                grads.len()
            )));
        }
        self.t += 1;
        let c = self.config;
        let (wd, decoupled) = match c.kind {
            Kind::Adam => (c.weight_decay, 0.0),
            Kind::AdamW => (0.0, c.weight_decay),
        };
        let kernel = Kernel::new(&SHADER, "adam");
        for (i, g) in grads.iter().enumerate() {
            let Some(g) = g else { continue };
            let p = &self.params[i];
            if g.shape() != p.shape() {
                return Err(Error::shape(format!(
                    "gradient {:?} does not match parameter {i} {:?}",
                    g.shape(),
                    p.shape()
                )));
            }
            let n = p.numel();
            let params = Params {
                n: n as u32,
                lr: c.lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: wd,
                decoupled,
                bias1: 1.0 - c.beta1.powi(self.t as i32),
                bias2: 1.0 - c.beta2.powi(self.t as i32),
                _pad: [0; 3],
            };
            p.gpu().dispatch(
                &kernel,
                &params,
                &[
                    g.binding(),
                    p.binding(),
                    self.m[i].binding(),
                    self.v[i].binding(),
                ],
                grid_1d((n as u32).div_ceil(256)),
            );
            // Copies made from the old values (e.g. packed convolution weights) are stale.
            p.gpu().invalidate_derived(p);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};

    /// f64 reference of `steps` updates with fixed gradients.
    fn reference(p0: &[f32], grads: &[Vec<f32>], c: AdamConfig) -> Vec<f64> {
        let mut p: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let mut m = vec![0.0; p.len()];
        let mut v = vec![0.0; p.len()];
        for (t, g) in grads.iter().enumerate() {
            let t = t as i32 + 1;
            for i in 0..p.len() {
                let mut gi = g[i] as f64;
                if c.kind == Kind::Adam {
                    gi += c.weight_decay as f64 * p[i];
                } else {
                    p[i] -= c.lr as f64 * c.weight_decay as f64 * p[i];
                }
                m[i] = c.beta1 as f64 * m[i] + (1.0 - c.beta1 as f64) * gi;
                v[i] = c.beta2 as f64 * v[i] + (1.0 - c.beta2 as f64) * gi * gi;
                let mh = m[i] / (1.0 - (c.beta1 as f64).powi(t));
                let vh = v[i] / (1.0 - (c.beta2 as f64).powi(t));
                p[i] -= c.lr as f64 * mh / (vh.sqrt() + c.eps as f64);
            }
        }
        p
    }

    #[test]
    fn adam_and_adamw_match_reference() {
        let g = gpu();
        for cfg in [
            AdamConfig::adam(0.05),
            AdamConfig {
                weight_decay: 0.1,
                ..AdamConfig::adam(0.01)
            },
            AdamConfig::adamw(0.05),
        ] {
            let n = 1000;
            let p0 = rand_vec(n, 1);
            let grads: Vec<Vec<f32>> = (0..5).map(|s| rand_vec(n, 10 + s)).collect();
            let p = Tensor::from_slice(&g, &p0, &[10, 100]).unwrap();
            let mut opt = Adam::new(vec![p.clone()], cfg).unwrap();
            for gv in &grads {
                let gt = Tensor::from_slice(&g, gv, &[10, 100]).unwrap();
                opt.step(&[Some(&gt)]).unwrap();
            }
            let got = opt.params()[0].to_vec().unwrap();
            let want = reference(&p0, &grads, cfg);
            for i in 0..n {
                assert!(
                    (got[i] as f64 - want[i]).abs() < 1e-5,
                    "{cfg:?} [{i}]: {} vs {}",
                    got[i],
                    want[i]
                );
            }
        }
    }

    #[test]
    fn mismatched_gradients_are_refused() {
        let g = gpu();
        let p = Tensor::zeros(&g, &[4]).unwrap();
        let mut opt = Adam::new(vec![p], AdamConfig::adam(0.1)).unwrap();
        let wrong = Tensor::zeros(&g, &[5]).unwrap();
        assert!(opt.step(&[Some(&wrong)]).is_err());
        assert!(opt.step(&[]).is_err());
    }
}
