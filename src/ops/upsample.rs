//! Nearest-neighbour x2 upsampling in NCHW (`shaders/upsample.wgsl`), as
//! `torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")`.
//!
//! [`crate::ops::conv2d::conv2d`] can fuse this into the convolution that follows it
//! (`Conv2dOpts::upsample`), which is what the VQGAN decoder does.

use crate::gpu::{grid_1d, Kernel, Shader};
use crate::tensor::{DType, Tensor};
use crate::{Error, Result};

pub(crate) static SHADER: Shader<Params> = crate::shader!("upsample", "grid");

crate::shader_params! {
    /// Mirrors `struct Params` in `shaders/upsample.wgsl`.
    pub(crate) struct Params {
        total: u32,
        h: u32,
        w: u32,
        _pad: u32,
    }
}

/// `x`: `[N, C, H, W]` -> `[N, C, 2H, 2W]`, each input pixel repeated in a 2x2 block.
pub fn upsample_nearest2(x: &Tensor) -> Result<Tensor> {
    x.expect_f32("upsample input")?;
    if x.rank() != 4 {
        return Err(Error::shape(format!(
            "upsample needs [N, C, H, W], got {:?}",
            x.shape()
        )));
    }
    let (n, c, h, w) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    run("upsample_nearest2", x, [n, c, 2 * h, 2 * w], [h, w])
}

/// Runs `entry` on `src` with one invocation per element of a new `out_shape` tensor, which
/// it returns; `hw` is the small side's height and width (the upsample's input, its
/// gradient's output).
fn run(entry: &'static str, src: &Tensor, out_shape: [usize; 4], hw: [usize; 2]) -> Result<Tensor> {
    let out = Tensor::empty(src.gpu(), &out_shape, DType::F32)?;
    let total = out.numel();
    if total == 0 {
        return Ok(out);
    }
    // The large side has 4 × the small side's elements.
    if 4 * total.min(src.numel()) > u32::MAX as usize {
        return Err(Error::shape(format!(
            "upsample {:?} -> {out_shape:?} has more than 2^32 elements",
            src.shape()
        )));
    }
    let p = Params {
        total: total as u32,
        h: hw[0] as u32,
        w: hw[1] as u32,
        _pad: 0,
    };
    src.gpu().dispatch(
        &Kernel::new(&SHADER, entry),
        &p,
        &[src.binding(), out.binding()],
        grid_1d((total as u32).div_ceil(256)),
    );
    Ok(out)
}

/// Backward of [`upsample_nearest2`]'s `y[n, c, i, j] = x[n, c, i/2, j/2]`: each input pixel
/// gets the sum of the 2×2 block it was copied to, in one pass over `g` (a permuted copy and
/// a row sum before: 4 of a generation step's per-step permutes). `g` is `[N, C, 2H, 2W]` →
/// `[N, C, H, W]`.
pub fn upsample_nearest2_backward(g: &Tensor) -> Result<Tensor> {
    g.expect_f32("upsample gradient")?;
    if g.rank() != 4 || !g.dim(2).is_multiple_of(2) || !g.dim(3).is_multiple_of(2) {
        return Err(Error::shape(format!(
            "upsample backward needs [N, C, 2H, 2W], got {:?}",
            g.shape()
        )));
    }
    let (n, c, h, w) = (g.dim(0), g.dim(1), g.dim(2) / 2, g.dim(3) / 2);
    run("upsample_nearest2_backward", g, [n, c, h, w], [h, w])
}

/// CPU reference of [`upsample_nearest2_backward`] on `[N·C, 2H, 2W]` data, in f64.
pub fn reference_backward(g: &[f32], nc: usize, h: usize, w: usize) -> Vec<f64> {
    let at = |p: usize, i: usize, j: usize| g[(p * 2 * h + i) * 2 * w + j] as f64;
    let mut dx = Vec::with_capacity(nc * h * w);
    for p in 0..nc {
        for i in 0..h {
            for j in 0..w {
                dx.push(
                    at(p, 2 * i, 2 * j)
                        + at(p, 2 * i, 2 * j + 1)
                        + at(p, 2 * i + 1, 2 * j)
                        + at(p, 2 * i + 1, 2 * j + 1),
                );
            }
        }
    }
    dx
}

/// CPU reference of [`upsample_nearest2`] on `[N, C, H, W]` data.
pub fn reference(x: &[f32], nc: usize, h: usize, w: usize) -> Vec<f32> {
    let mut y = Vec::with_capacity(nc * 4 * h * w);
    for p in 0..nc {
        for i in 0..2 * h {
            for j in 0..2 * w {
                y.push(x[(p * h + i / 2) * w + j / 2]);
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{gpu, rand_vec};

    #[test]
    fn matches_reference_over_shapes() {
        let g = gpu();
        for (i, &(n, c, h, w)) in [
            (1, 1, 1, 1),
            (1, 3, 5, 7),
            (2, 17, 3, 1),
            (1, 4, 65, 33),
            (3, 2, 16, 16),
        ]
        .iter()
        .enumerate()
        {
            let xv = rand_vec(n * c * h * w, i as u64);
            let x = Tensor::from_slice(&g, &xv, &[n, c, h, w]).unwrap();
            let y = upsample_nearest2(&x).unwrap();
            assert_eq!(y.shape(), &[n, c, 2 * h, 2 * w]);
            // A copy: exact.
            assert_eq!(
                y.to_vec().unwrap(),
                reference(&xv, n * c, h, w),
                "{n} {c} {h} {w}"
            );
        }
    }

    #[test]
    fn more_than_65535_workgroups() {
        // 4.2M input -> 16.8M outputs = 65,625 workgroups of 256.
        let g = gpu();
        let (h, w) = (1025, 4096);
        let xv: Vec<f32> = (0..h * w).map(|i| (i % 4099) as f32).collect();
        let x = Tensor::from_slice(&g, &xv, &[1, 1, h, w]).unwrap();
        let y = upsample_nearest2(&x).unwrap().to_vec().unwrap();
        assert_eq!(y, reference(&xv, 1, h, w));
    }

    #[test]
    fn backward_sums_each_block() {
        // Three additions of f32 values: within 3 ulp of the largest partial sum.
        let g = gpu();
        for (i, &(n, c, h, w)) in [(1, 1, 1, 1), (2, 3, 5, 7), (1, 4, 33, 17), (1, 2, 300, 300)]
            .iter()
            .enumerate()
        {
            let gv = rand_vec(n * c * 4 * h * w, 50 + i as u64);
            let gt = Tensor::from_slice(&g, &gv, &[n, c, 2 * h, 2 * w]).unwrap();
            let dx = upsample_nearest2_backward(&gt).unwrap();
            assert_eq!(dx.shape(), &[n, c, h, w]);
            let got = dx.to_vec().unwrap();
            let want = reference_backward(&gv, n * c, h, w);
            for (k, (&a, &b)) in got.iter().zip(&want).enumerate() {
                let tol = 3.0 * f32::EPSILON as f64 * 4.0;
                assert!(
                    (a as f64 - b).abs() <= tol,
                    "{n} {c} {h} {w}: {k}: {a} vs {b}"
                );
            }
        }
        let odd = Tensor::zeros(&g, &[1, 1, 3, 4]).unwrap();
        let e = upsample_nearest2_backward(&odd).unwrap_err().to_string();
        assert!(e.contains("[1, 1, 3, 4]"), "{e}");
    }

    #[test]
    fn rank_is_checked() {
        let g = gpu();
        let x = Tensor::zeros(&g, &[3, 4]).unwrap();
        assert!(upsample_nearest2(&x)
            .unwrap_err()
            .to_string()
            .contains("[3, 4]"));
    }
}
