//! `vqclip reconstruct`: encode an image with a VQGAN, quantise, decode, write the result.

use super::DeviceArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use vqclip::models::vqgan::{self, VqGan};
use vqclip::Tensor;

#[derive(Args, Debug)]
pub struct ReconstructArgs {
    /// VQGAN weights: a taming-transformers .ckpt or a .safetensors with the same keys
    /// [default: the shipped weights/vqgan/shapes.safetensors].
    #[arg(long, env = "VQCLIP_VQGAN")]
    vqgan: Option<PathBuf>,
    /// The model's taming .yaml config (default: the .yaml next to the weights, same name).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Input image (PNG, JPEG, WebP, ...).
    image: PathBuf,
    /// Output PNG.
    #[arg(short, long)]
    output: PathBuf,
    /// Also write the codebook indices as JSON {"codes": [[..]]} (one row per latent row).
    #[arg(long)]
    codes: Option<PathBuf>,
    /// Resize the image (Lanczos) down to the nearest multiple of the VQGAN's downsampling
    /// factor instead of refusing sizes that are not multiples of it.
    #[arg(long)]
    resize: bool,
}

/// The config to use: `--config`, else the .yaml beside the weights.
pub fn resolve_config(weights: &Path, config: Option<&Path>) -> Result<PathBuf> {
    match config {
        Some(c) => Ok(c.to_path_buf()),
        None => vqgan::config_beside(weights).with_context(|| {
            format!(
                "no config for {}: pass --config MODEL.yaml (taming's model config), or put it \
                 next to the weights as {}",
                weights.display(),
                weights.with_extension("yaml").display()
            )
        }),
    }
}

/// Runs `write` on a temporary path beside `path` and moves the result to `path` (synced and
/// renamed by [`vqclip::atomic`]), so that a failure never leaves a partial file behind.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let file = vqclip::atomic::AtomicFile::create(path)?;
    write(file.temp_path())?;
    Ok(file.commit()?)
}

fn check_parent(path: &Path) -> Result<()> {
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !d.is_dir() {
            bail!(
                "cannot write {}: folder {} does not exist",
                path.display(),
                d.display()
            );
        }
    }
    Ok(())
}

pub fn run(dev: &DeviceArgs, a: ReconstructArgs) -> Result<()> {
    let weights = vqclip::weights::shipped::vqgan_file_or(a.vqgan.as_deref())?;
    let config = resolve_config(&weights, a.config.as_deref())?;
    check_parent(&a.output)?;
    if let Some(c) = &a.codes {
        check_parent(c)?;
    }
    // Decoded with the header size checked before allocation, as every image vqclip reads.
    let img = vqclip::models::clip::preprocess::decode_image(&a.image)
        .with_context(|| format!("reading image {}", a.image.display()))?
        .to_rgb8();
    let gpu = dev.open()?;
    let model = VqGan::load(&weights, &config, &gpu)?;
    let f = model.downsampling_factor() as u32;
    let (mut w, mut h) = img.dimensions();
    let img = if w % f != 0 || h % f != 0 {
        if !a.resize {
            bail!(
                "{} is {w}x{h}, but this VQGAN needs sides that are multiples of {f}; crop or \
                 resize it (e.g. to {}x{}), or pass --resize",
                a.image.display(),
                (w / f).max(1) * f,
                (h / f).max(1) * f
            );
        }
        let (nw, nh) = ((w / f).max(1) * f, (h / f).max(1) * f);
        eprintln!("resizing {w}x{h} to {nw}x{nh}");
        (w, h) = (nw, nh);
        image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Lanczos3)
    } else {
        img
    };
    let (wu, hu) = (w as usize, h as usize);
    let x = Tensor::from_slice(
        &gpu,
        &vqgan::rgb8_to_input(img.as_raw(), wu, hu),
        &[1, 3, hu, wu],
    )?;
    let z = model.encode(&x)?;
    let (zq, codes) = model.quantize(&z)?;
    let y = model.decode(&zq)?;
    if y.dim(1) != 3 {
        bail!("the VQGAN outputs {} channels, not RGB", y.dim(1));
    }
    let rgb = vqgan::output_to_rgb8(&y.to_vec()?, wu, hu);
    let out = image::RgbImage::from_raw(w, h, rgb).context("output image size")?;
    write_atomic(&a.output, |tmp| {
        out.save_with_format(tmp, image::ImageFormat::Png)
            .with_context(|| format!("writing {}", a.output.display()))
    })?;
    if let Some(path) = &a.codes {
        let (gh, gw) = (codes.dim(1), codes.dim(2));
        let flat = codes.to_vec_u32()?;
        let grid: Vec<&[u32]> = flat.chunks(gw).take(gh).collect();
        let text = serde_json::to_string(&serde_json::json!({ "codes": grid }))?;
        write_atomic(path, |tmp| {
            std::fs::write(tmp, text).with_context(|| format!("writing {}", path.display()))
        })?;
    }
    eprintln!(
        "wrote {} ({w}x{h}, {}x{} codes)",
        a.output.display(),
        codes.dim(2),
        codes.dim(1)
    );
    Ok(())
}
