//! The VQGAN decoder, mirroring `Decoder` in `taming/modules/diffusionmodules/model.py`:
//! `conv_in` from `z_channels`, the middle blocks, then the levels from the lowest resolution
//! up (`num_res_blocks + 1` residual blocks, attention at the configured resolutions, a
//! nearest x2 upsample + 3x3 conv on all but level 0), then `norm_out` -> swish ->
//! `conv_out`. No tanh and no clamp: the output is in roughly [-1, 1].

use super::blocks::{normalize, AttnBlock, Level, Mid, ResnetBlock};
use super::config::VqGanConfig;
use crate::autodiff::{Tape, Var};
use crate::nn::{Conv2d, GroupNorm};
use crate::ops::conv2d::Conv2dOpts;
use crate::ops::Act;
use crate::weights::Loader;
use crate::Result;

/// One decoder level (`decoder.up.{i}`; index i is the level, as taming builds the list with
/// `insert(0, ..)`).
#[derive(Clone)]
pub struct UpLevel {
    /// Blocks and attention.
    pub level: Level,
    /// `Upsample`: nearest x2 then 3x3 (absent on level 0).
    pub upsample: Option<Conv2d>,
}

/// `decoder.*`
#[derive(Clone)]
pub struct Decoder {
    /// 3x3, z_channels -> ch * ch_mult[-1].
    pub conv_in: Conv2d,
    /// Middle blocks.
    pub mid: Mid,
    /// Levels indexed as in the checkpoint (0 = full resolution); run from the last down.
    pub up: Vec<UpLevel>,
    /// Final GroupNorm.
    pub norm_out: GroupNorm,
    /// 3x3 to out_ch.
    pub conv_out: Conv2d,
}

impl Decoder {
    /// Loads the decoder under `l` (`decoder`).
    pub fn load(l: &Loader, cfg: &VqGanConfig) -> Result<Decoder> {
        let d = &cfg.dd;
        let levels = d.ch_mult.len();
        let mut block_in = d.ch * d.ch_mult[levels - 1];
        let mut curr_res = d.resolution >> (levels - 1);
        let conv_in = Conv2d::load(&l.sub("conv_in"), d.z_channels, block_in, 3)?;
        let mid = Mid::load(&l.sub("mid"), block_in)?;
        let mut up: Vec<UpLevel> = Vec::with_capacity(levels);
        for i in (0..levels).rev() {
            let li = l.sub("up").sub(i);
            let block_out = d.ch * d.ch_mult[i];
            let mut block = Vec::new();
            let mut attn = Vec::new();
            for j in 0..=d.num_res_blocks {
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
            let upsample = if i != 0 {
                curr_res *= 2;
                Some(Conv2d::load(
                    &li.sub("upsample").sub("conv"),
                    block_in,
                    block_in,
                    3,
                )?)
            } else {
                None
            };
            up.insert(
                0,
                UpLevel {
                    level: Level { block, attn },
                    upsample,
                },
            );
        }
        Ok(Decoder {
            conv_in,
            mid,
            up,
            norm_out: normalize(&l.sub("norm_out"), block_in)?,
            conv_out: Conv2d::load(&l.sub("conv_out"), block_in, d.out_ch, 3)?,
        })
    }

    /// `z`: `[N, z_channels, h, w]` -> `[N, out_ch, h·f, w·f]`. With `recompute` the
    /// middle blocks and each level's blocks are [`Tape::checkpoint`]s.
    pub fn forward(&self, tape: &Tape, z: &Var, recompute: bool) -> Result<Var> {
        let h = self.conv_in.forward(tape, z, None)?;
        let mut h = self.mid.forward_maybe_recomputed(tape, &h, recompute)?;
        for lvl in self.up.iter().rev() {
            h = lvl.level.forward_maybe_recomputed(tape, &h, recompute)?;
            if let Some(us) = &lvl.upsample {
                // interpolate(scale_factor=2, mode="nearest") fused into the 3x3 conv
                let opts = Conv2dOpts {
                    pad: [1; 4],
                    upsample: true,
                    ..Default::default()
                };
                h = us.forward_opts(tape, &h, &opts, None)?;
            }
        }
        let h = self.norm_out.forward(tape, &h, Act::Silu)?;
        self.conv_out.forward(tape, &h, None)
    }
}
