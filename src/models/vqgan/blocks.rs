//! Building blocks shared by the encoder and decoder, mirroring
//! `taming/modules/diffusionmodules/model.py` (`Normalize`, `ResnetBlock`, `AttnBlock`,
//! `Downsample`, `Upsample`). Field names are the checkpoint's module names.

use crate::autodiff::{Tape, Var};
use crate::nn::{attend, Conv2d, GroupNorm};
use crate::ops::attention_backward::{fused_fits, path, Path};
use crate::ops::{Act, MatmulOpts};
use crate::weights::Loader;
use crate::Result;

/// taming's `Normalize`: GroupNorm with 32 groups, eps 1e-6, affine.
pub const GROUPS: usize = 32;
/// GroupNorm epsilon.
pub const EPS: f32 = 1e-6;

/// taming's `Normalize(c)` under `l`.
pub fn normalize(l: &Loader, c: usize) -> Result<GroupNorm> {
    GroupNorm::load(l, c, GROUPS, EPS)
}

/// `ResnetBlock(in, out)` with `temb_channels = 0` (no `temb_proj`):
/// `nin_shortcut(x) + conv2(swish(norm2(conv1(swish(norm1(x))))))`.
#[derive(Clone)]
pub struct ResnetBlock {
    /// GroupNorm over the input.
    pub norm1: GroupNorm,
    /// 3x3, in -> out.
    pub conv1: Conv2d,
    /// GroupNorm over conv1's output.
    pub norm2: GroupNorm,
    /// 3x3, out -> out.
    pub conv2: Conv2d,
    /// 1x1 projection of the input when in != out.
    pub nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    /// Loads a block `cin -> cout` under `l`.
    pub fn load(l: &Loader, cin: usize, cout: usize) -> Result<ResnetBlock> {
        Ok(ResnetBlock {
            norm1: normalize(&l.sub("norm1"), cin)?,
            conv1: Conv2d::load(&l.sub("conv1"), cin, cout, 3)?,
            norm2: normalize(&l.sub("norm2"), cout)?,
            conv2: Conv2d::load(&l.sub("conv2"), cout, cout, 3)?,
            nin_shortcut: if cin != cout {
                Some(Conv2d::load(&l.sub("nin_shortcut"), cin, cout, 1)?)
            } else {
                None
            },
        })
    }
    /// `x`: `[N, Cin, H, W]` -> `[N, Cout, H, W]`.
    pub fn forward(&self, tape: &Tape, x: &Var) -> Result<Var> {
        // Temporaries, not shadowed bindings: each activation is freed as soon as it is read.
        let h = self
            .conv1
            .forward(tape, &self.norm1.forward(tape, x, Act::Silu)?, None)?;
        let h = self.norm2.forward(tape, &h, Act::Silu)?;
        // dropout is identity at inference
        match &self.nin_shortcut {
            Some(nin) => {
                let skip = nin.forward(tape, x, None)?;
                self.conv2.forward(tape, &h, Some(&skip))
            }
            None => self.conv2.forward(tape, &h, Some(x)),
        }
    }
}

/// `AttnBlock(C)`: single-head self-attention over the H·W positions,
/// `x + proj_out(attend(q(norm(x)), k(..), v(..)))` with scores scaled by `C^-0.5`.
#[derive(Clone)]
pub struct AttnBlock {
    /// GroupNorm over the input.
    pub norm: GroupNorm,
    /// 1x1 query projection.
    pub q: Conv2d,
    /// 1x1 key projection.
    pub k: Conv2d,
    /// 1x1 value projection.
    pub v: Conv2d,
    /// 1x1 output projection.
    pub proj_out: Conv2d,
}

impl AttnBlock {
    /// Loads a block of `c` channels under `l`.
    pub fn load(l: &Loader, c: usize) -> Result<AttnBlock> {
        Ok(AttnBlock {
            norm: normalize(&l.sub("norm"), c)?,
            q: Conv2d::load(&l.sub("q"), c, c, 1)?,
            k: Conv2d::load(&l.sub("k"), c, c, 1)?,
            v: Conv2d::load(&l.sub("v"), c, c, 1)?,
            proj_out: Conv2d::load(&l.sub("proj_out"), c, c, 1)?,
        })
    }

    /// `x`: `[N, C, H, W]` -> `[N, C, H, W]`. The attention runs in the layout its path
    /// reads without copies ([`crate::ops::attention_backward::path`]): the composed path
    /// (products, softmax, products) works on the channels-major map as taming does, the
    /// fused kernels on positions-major tokens.
    pub fn forward(&self, tape: &Tape, x: &Var) -> Result<Var> {
        let c = x.shape()[1];
        let gpu = x.value().gpu();
        let hn = self.norm.forward(tape, x, Act::None)?;
        let o = if path(gpu) == Path::Fused && fused_fits(gpu, c) {
            self.attend_tokens(tape, &hn)?
        } else {
            self.attend_channels(tape, &hn)?
        };
        self.proj_out.forward(tape, &o, Some(x))
    }

    /// Attention over the channels-major `hn` `[N, C, H, W]`, no permuted copy made: q, k
    /// and v are 1×1 convolutions of the map (`[N, C, T]` viewed flat), the scores
    /// `qᵀk / √C` `[N, T, T]` and the output `v pᵀ` `[N, C, T]` are products that read
    /// that layout through their transpose flags.
    fn attend_channels(&self, tape: &Tape, hn: &Var) -> Result<Var> {
        let (n, c, h, w) = (hn.shape()[0], hn.shape()[1], hn.shape()[2], hn.shape()[3]);
        let flat = |conv: &Conv2d| -> Result<Var> {
            let y = conv.forward(tape, hn, None)?;
            tape.reshape(&y, &[n, c, h * w])
        };
        let (q, k) = (flat(&self.q)?, flat(&self.k)?);
        let scores = tape.matmul(
            &q,
            &k,
            None,
            &MatmulOpts {
                trans_a: true,
                alpha: Some((c as f32).powf(-0.5)),
                ..Default::default()
            },
        )?;
        drop((q, k));
        let p = tape.softmax(&scores, 1.0)?;
        drop(scores);
        let o = tape.matmul(
            &flat(&self.v)?,
            &p,
            None,
            &MatmulOpts {
                trans_b: true,
                ..Default::default()
            },
        )?;
        tape.reshape(&o, &[n, c, h, w])
    }

    /// Attention over positions-major tokens `[N, H·W, C]` (one head of width C), the
    /// layout the fused kernels read: the map is permuted in and the output back out.
    fn attend_tokens(&self, tape: &Tape, hn: &Var) -> Result<Var> {
        let (n, c, h, w) = (hn.shape()[0], hn.shape()[1], hn.shape()[2], hn.shape()[3]);
        let t = tape.permute(&tape.reshape(hn, &[n, c, h * w])?, &[0, 2, 1])?;
        let q = self.q.forward_tokens(tape, &t)?;
        let k = self.k.forward_tokens(tape, &t)?;
        let v = self.v.forward_tokens(tape, &t)?;
        drop(t);
        let o = attend(tape, &q, &k, &v, 1, false)?;
        drop((q, k, v));
        tape.reshape(&tape.permute(&o, &[0, 2, 1])?, &[n, c, h, w])
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
    pub fn forward(&self, tape: &Tape, x: &Var) -> Result<Var> {
        let h = self.block_1.forward(tape, x)?;
        let h = self.attn_1.forward(tape, &h)?;
        self.block_2.forward(tape, &h)
    }

    /// [`Mid::forward`] as one [`Tape::checkpoint`] when `recompute`.
    pub fn forward_maybe_recomputed(&self, tape: &Tape, x: &Var, recompute: bool) -> Result<Var> {
        if !recompute {
            return self.forward(tape, x);
        }
        let m = self.clone();
        tape.checkpoint(&[x], move |t, xs| m.forward(t, &xs[0]))
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
    pub fn forward(&self, tape: &Tape, x: &Var) -> Result<Var> {
        let mut h = x.clone();
        for (i, b) in self.block.iter().enumerate() {
            h = b.forward(tape, &h)?;
            if let Some(a) = self.attn.get(i) {
                h = a.forward(tape, &h)?;
            }
        }
        Ok(h)
    }

    /// [`Level::forward`] as one [`Tape::checkpoint`] when `recompute`.
    pub fn forward_maybe_recomputed(&self, tape: &Tape, x: &Var, recompute: bool) -> Result<Var> {
        if !recompute {
            return self.forward(tape, x);
        }
        let l = self.clone();
        tape.checkpoint(&[x], move |t, xs| l.forward(t, &xs[0]))
    }
}
