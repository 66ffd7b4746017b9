//! Building blocks shared by the encoder and decoder, mirroring
//! `taming/modules/diffusionmodules/model.py` (`Normalize`, `ResnetBlock`, `AttnBlock`,
//! `Downsample`, `Upsample`). Field names are the checkpoint's module names.

use crate::ops::attention::attention_bthd;
use crate::ops::conv2d::{conv2d, Conv2dOpts};
use crate::ops::group_norm::group_norm;
use crate::ops::matmul::{matmul, MatmulOpts};
use crate::ops::permute::permute;
use crate::ops::Act;
use crate::weights::Loader;
use crate::{Result, Tensor};

/// taming's `Normalize`: GroupNorm with 32 groups, eps 1e-6, affine.
pub const GROUPS: usize = 32;
/// GroupNorm epsilon.
pub const EPS: f32 = 1e-6;

/// `torch.nn.Conv2d` weights.
#[derive(Clone)]
pub struct Conv {
    /// `[Cout, Cin, K, K]`
    pub weight: Tensor,
    /// `[Cout]`
    pub bias: Tensor,
}

impl Conv {
    /// Loads `weight` `[cout, cin, k, k]` and `bias` `[cout]` under `l`.
    pub fn load(l: &Loader, cin: usize, cout: usize, k: usize) -> Result<Conv> {
        Ok(Conv {
            weight: l.tensor("weight", &[cout, cin, k, k])?,
            bias: l.tensor("bias", &[cout])?,
        })
    }
    /// Output channels.
    pub fn cout(&self) -> usize {
        self.weight.dim(0)
    }
    /// `x`: `[N, Cin, H, W]`: same-size convolution (padding K/2), plus `residual`.
    pub fn forward(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        conv2d(
            x,
            &self.weight,
            &Conv2dOpts {
                pad: [self.weight.dim(2) / 2; 4],
                bias: Some(&self.bias),
                residual,
                ..Default::default()
            },
        )
    }
}

/// `torch.nn.GroupNorm(32, C, eps=1e-6, affine=True)`.
#[derive(Clone)]
pub struct Norm {
    /// gamma `[C]`
    pub weight: Tensor,
    /// beta `[C]`
    pub bias: Tensor,
}

impl Norm {
    /// Loads gamma and beta `[c]` under `l`.
    pub fn load(l: &Loader, c: usize) -> Result<Norm> {
        Ok(Norm {
            weight: l.tensor("weight", &[c])?,
            bias: l.tensor("bias", &[c])?,
        })
    }
    /// `x`: `[N, C, H, W]` -> `act(group_norm(x))`.
    pub fn forward(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        group_norm(x, GROUPS, Some(&self.weight), Some(&self.bias), EPS, act)
    }
}

/// `ResnetBlock(in, out)` with `temb_channels = 0` (no `temb_proj`):
/// `nin_shortcut(x) + conv2(swish(norm2(conv1(swish(norm1(x))))))`.
#[derive(Clone)]
pub struct ResnetBlock {
    /// GroupNorm over the input.
    pub norm1: Norm,
    /// 3x3, in -> out.
    pub conv1: Conv,
    /// GroupNorm over conv1's output.
    pub norm2: Norm,
    /// 3x3, out -> out.
    pub conv2: Conv,
    /// 1x1 projection of the input when in != out.
    pub nin_shortcut: Option<Conv>,
}

impl ResnetBlock {
    /// Loads a block `cin -> cout` under `l`.
    pub fn load(l: &Loader, cin: usize, cout: usize) -> Result<ResnetBlock> {
        Ok(ResnetBlock {
            norm1: Norm::load(&l.sub("norm1"), cin)?,
            conv1: Conv::load(&l.sub("conv1"), cin, cout, 3)?,
            norm2: Norm::load(&l.sub("norm2"), cout)?,
            conv2: Conv::load(&l.sub("conv2"), cout, cout, 3)?,
            nin_shortcut: if cin != cout {
                Some(Conv::load(&l.sub("nin_shortcut"), cin, cout, 1)?)
            } else {
                None
            },
        })
    }
    /// `x`: `[N, Cin, H, W]` -> `[N, Cout, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self
            .conv1
            .forward(&self.norm1.forward(x, Act::Silu)?, None)?;
        let h = self.norm2.forward(&h, Act::Silu)?;
        // dropout is identity at inference
        match &self.nin_shortcut {
            Some(nin) => {
                let skip = nin.forward(x, None)?;
                self.conv2.forward(&h, Some(&skip))
            }
            None => self.conv2.forward(&h, Some(x)),
        }
    }
}

/// `AttnBlock(C)`: single-head self-attention over the H·W positions,
/// `x + proj_out(attend(q(norm(x)), k(..), v(..)))` with scores scaled by `C^-0.5`.
#[derive(Clone)]
pub struct AttnBlock {
    /// GroupNorm over the input.
    pub norm: Norm,
    /// 1x1 query projection.
    pub q: Conv,
    /// 1x1 key projection.
    pub k: Conv,
    /// 1x1 value projection.
    pub v: Conv,
    /// 1x1 output projection.
    pub proj_out: Conv,
}

impl AttnBlock {
    /// Loads a block of `c` channels under `l`.
    pub fn load(l: &Loader, c: usize) -> Result<AttnBlock> {
        Ok(AttnBlock {
            norm: Norm::load(&l.sub("norm"), c)?,
            q: Conv::load(&l.sub("q"), c, c, 1)?,
            k: Conv::load(&l.sub("k"), c, c, 1)?,
            v: Conv::load(&l.sub("v"), c, c, 1)?,
            proj_out: Conv::load(&l.sub("proj_out"), c, c, 1)?,
        })
    }

    /// `x`: `[N, C, H, W]` -> `[N, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
        let hn = self.norm.forward(x, Act::None)?;
        // Positions-major [N, HW, C]: q/k/v are then plain linear layers and the attention
        // runs on the [B, T, H·D] layout with one head of width C.
        let t = permute(&hn.reshape(&[n, c, h * w])?, &[0, 2, 1])?;
        drop(hn);
        let proj = |p: &Conv| -> Result<Tensor> {
            matmul(
                &t,
                &p.weight.reshape(&[c, c])?,
                &MatmulOpts::linear(Some(&p.bias)),
            )
        };
        let (q, k, v) = (proj(&self.q)?, proj(&self.k)?, proj(&self.v)?);
        let o = attention_bthd(&q, &k, &v, 1, false, (c as f32).powf(-0.5))?;
        drop((q, k, v));
        let o = permute(&o, &[0, 2, 1])?.reshape(&[n, c, h, w])?;
        self.proj_out.forward(&o, Some(x))
    }
}

/// The middle of the encoder and decoder: `block_1`, `attn_1`, `block_2` at one width.
#[derive(Clone)]
pub struct Mid {
    /// First residual block.
    pub block_1: ResnetBlock,
    /// Attention.
    pub attn_1: AttnBlock,
    /// Second residual block.
    pub block_2: ResnetBlock,
}

impl Mid {
    /// Loads the middle blocks of width `c` under `l` (`.../mid`).
    pub fn load(l: &Loader, c: usize) -> Result<Mid> {
        Ok(Mid {
            block_1: ResnetBlock::load(&l.sub("block_1"), c, c)?,
            attn_1: AttnBlock::load(&l.sub("attn_1"), c)?,
            block_2: ResnetBlock::load(&l.sub("block_2"), c, c)?,
        })
    }
    /// `x`: `[N, C, H, W]` -> same.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.block_1.forward(x)?;
        let h = self.attn_1.forward(&h)?;
        self.block_2.forward(&h)
    }
}

/// One resolution level: residual blocks, each followed by an attention block when the level
/// has them (`attn` empty otherwise).
#[derive(Clone)]
pub struct Level {
    /// Residual blocks.
    pub block: Vec<ResnetBlock>,
    /// Attention blocks, one per residual block, or none.
    pub attn: Vec<AttnBlock>,
}

impl Level {
    /// Runs the blocks (and attention) in order.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, b) in self.block.iter().enumerate() {
            h = b.forward(&h)?;
            if let Some(a) = self.attn.get(i) {
                h = a.forward(&h)?;
            }
        }
        Ok(h)
    }
}
