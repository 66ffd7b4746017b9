//! The VQGAN encoder, mirroring `Encoder` in `taming/modules/diffusionmodules/model.py`:
//! `conv_in`, one level per `ch_mult` entry (residual blocks, attention at the configured
//! resolutions, a stride-2 downsample on all but the last level), the middle blocks, then
//! `norm_out` -> swish -> `conv_out` to `z_channels`.

use super::blocks::{normalize, AttnBlock, Level, Mid, ResnetBlock};
use super::config::VqGanConfig;
use crate::autodiff::{Tape, Var};
use crate::nn::{Conv2d, GroupNorm};
use crate::ops::conv2d::Conv2dOpts;
use crate::ops::Act;
use crate::weights::Loader;
use crate::Result;

/// One encoder level (`encoder.down.{i}`).
pub struct DownLevel {
    /// Blocks and attention.
    pub level: Level,
    /// `Downsample`: pad (left 0, right 1, top 0, bottom 1), then 3x3 stride 2 (absent on the
    /// last level).
    pub downsample: Option<Conv2d>,
}

/// `encoder.*`
pub struct Encoder {
    /// 3x3, in_channels -> ch.
    pub conv_in: Conv2d,
    /// Levels from full resolution down.
    pub down: Vec<DownLevel>,
    /// Middle blocks.
    pub mid: Mid,
    /// Final GroupNorm.
    pub norm_out: GroupNorm,
    /// 3x3 to z_channels.
    pub conv_out: Conv2d,
}

impl Encoder {
    /// Loads the encoder under `l` (`encoder`).
    pub fn load(l: &Loader, cfg: &VqGanConfig) -> Result<Encoder> {
        let d = &cfg.dd;
        let conv_in = Conv2d::load(&l.sub("conv_in"), d.in_channels, d.ch, 3)?;
        let mut curr_res = d.resolution;
        let mut block_in = d.ch;
        let mut down = Vec::with_capacity(d.ch_mult.len());
        for (i, &mult) in d.ch_mult.iter().enumerate() {
            let li = l.sub("down").sub(i);
            let block_out = d.ch * mult;
            let mut block = Vec::new();
            let mut attn = Vec::new();
            for j in 0..d.num_res_blocks {
                block.push(ResnetBlock::load(
                    &li.sub("block").sub(j),
                    block_in,
                    block_out,
                )?);
                block_in = block_out;
                if d.attn_resolutions.contains(&curr_res) {
                    attn.push(AttnBlock::load(&li.sub("attn").sub(j), block_in)?);
                }
            }
            let downsample = if i + 1 != d.ch_mult.len() {
                curr_res /= 2;
                Some(Conv2d::load(
                    &li.sub("downsample").sub("conv"),
                    block_in,
                    block_in,
                    3,
                )?)
            } else {
                None
            };
            down.push(DownLevel {
                level: Level { block, attn },
                downsample,
            });
        }
        Ok(Encoder {
            conv_in,
            down,
            mid: Mid::load(&l.sub("mid"), block_in)?,
            norm_out: normalize(&l.sub("norm_out"), block_in)?,
            conv_out: Conv2d::load(&l.sub("conv_out"), block_in, d.z_channels, 3)?,
        })
    }

    /// `x`: `[N, in_channels, H, W]` -> `[N, z_channels, H/f, W/f]`.
    pub fn forward(&self, tape: &Tape, x: &Var) -> Result<Var> {
        let mut h = self.conv_in.forward(tape, x, None)?;
        for lvl in &self.down {
            h = lvl.level.forward(tape, &h)?;
            if let Some(ds) = &lvl.downsample {
                let opts = Conv2dOpts {
                    stride: 2,
                    pad: [0, 1, 0, 1],
                    ..Default::default()
                };
                h = ds.forward_opts(tape, &h, &opts, None)?;
            }
        }
        let h = self.mid.forward(tape, &h)?;
        let h = self.norm_out.forward(tape, &h, Act::Silu)?;
        self.conv_out.forward(tape, &h, None)
    }
}
