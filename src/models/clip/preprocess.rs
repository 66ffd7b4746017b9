//! Image preprocessing as transformers' `CLIPImageProcessor` (`image_processing_clip.py`, the
//! PIL backend): convert to RGB, resize the shortest side to `size` with PIL's bicubic
//! filter, centre crop (top = (H − crop) // 2), rescale by 1/255, normalise with the OpenAI
//! mean and std. Output is `[3, crop, crop]`, channel-major.
//!
//! The resize is Pillow's separable resampling re-implemented exactly (filters scaled by the
//! downscale factor, coefficients in 22-bit fixed point, horizontal pass then vertical, each
//! rounded to 8 bits), so the result matches the PIL backend bit for bit; an image already at
//! the target size is not resampled at all.
//!
//! Only the pixels the centre crop keeps are computed ([`PreprocessConfig::plan`]). Each
//! output pixel of Pillow's separable resize depends only on its own row of horizontal
//! coefficients and its own column of vertical ones, so computing the cropped window alone,
//! from the source rows and columns its coefficients touch, gives exactly the bytes that
//! resize-then-crop gives, but the work and memory are bounded by the crop and not by the
//! resized image: a 1x20000 strip, whose resized image would be 224x4,480,000 (3 GB), costs
//! one 224x224 window.
//!
//! Decoding is bounded too ([`load_image`]): a header that claims more than
//! [`MAX_IMAGE_PIXELS`] pixels or a side over [`MAX_IMAGE_SIDE`] is refused before any pixel
//! buffer is allocated.

use crate::{Error, Result};
use image::RgbImage;
use serde_json::Value;
use std::path::Path;

/// `OPENAI_CLIP_MEAN` in transformers.
pub const OPENAI_CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// `OPENAI_CLIP_STD` in transformers (its digits kept, though f32 holds fewer).
#[allow(clippy::excessive_precision)]
pub const OPENAI_CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// Largest image side [`load_image`] decodes, in pixels.
pub const MAX_IMAGE_SIDE: u32 = 1 << 15;
/// Largest image [`load_image`] decodes, in pixels (128 megapixels: 512 MiB as RGBA8).
pub const MAX_IMAGE_PIXELS: u64 = 1 << 27;
/// Most bytes a decoder may allocate: the largest image at 16-bit RGBA.
const MAX_DECODE_BYTES: u64 = MAX_IMAGE_PIXELS * 8;

/// Which part of the resized image preprocessing computes, and from which source pixels
/// (see the module doc). Ranges are half-open `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizePlan {
    /// `(height, width)` of the resized image (never materialised).
    pub resized: (u32, u32),
    /// `(top, left)` of the crop in resized coordinates; negative where the crop is larger
    /// than the image and is padded with zeros, as transformers pads it.
    pub crop_origin: (i64, i64),
    /// Rows of the resized image computed: the crop's rows inside the image.
    pub rows: (u32, u32),
    /// Columns of the resized image computed.
    pub cols: (u32, u32),
    /// Source rows read (those the vertical filter of `rows` touches).
    pub src_rows: (u32, u32),
    /// Source columns read.
    pub src_cols: (u32, u32),
}

impl ResizePlan {
    /// Bytes of the horizontal pass's intermediate image: source rows read × columns
    /// computed × 3.
    pub fn intermediate_bytes(&self) -> u64 {
        (self.src_rows.1 - self.src_rows.0) as u64 * (self.cols.1 - self.cols.0) as u64 * 3
    }
    /// Pixels computed.
    pub fn window_pixels(&self) -> u64 {
        (self.rows.1 - self.rows.0) as u64 * (self.cols.1 - self.cols.0) as u64
    }
}

/// The span of source indices Pillow's filter reads for outputs `[o0, o1)` of a resize from
/// `in_size` to `out_size` (the outputs themselves when the axis is not resized).
fn source_span(in_size: u32, out_size: u32, f: Resample, (o0, o1): (u32, u32)) -> (u32, u32) {
    if in_size == out_size || o0 >= o1 {
        return (o0, o1);
    }
    let (bounds, _, _) = coeffs(in_size, out_size, f, (o0, o1));
    let lo = bounds.iter().map(|&(m, _)| m).min().unwrap_or(0);
    let hi = bounds.iter().map(|&(m, n)| m + n).max().unwrap_or(0);
    (lo as u32, hi as u32)
}

/// Resampling filters by PIL's numbering (`resample` in `preprocessor_config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// 1: Lanczos (a = 3).
    Lanczos,
    /// 2: bilinear (triangle).
    Bilinear,
    /// 3: bicubic (a = −0.5), CLIP's choice.
    Bicubic,
    /// 4: box.
    Box,
    /// 5: Hamming.
    Hamming,
}

impl Resample {
    fn from_pil(code: i64) -> std::result::Result<Resample, String> {
        Ok(match code {
            1 => Resample::Lanczos,
            2 => Resample::Bilinear,
            3 => Resample::Bicubic,
            4 => Resample::Box,
            5 => Resample::Hamming,
            other => {
                return Err(format!(
                    "resample {other} is not supported (use 1-5; 3 = bicubic)"
                ))
            }
        })
    }

    fn support(self) -> f64 {
        match self {
            Resample::Box => 0.5,
            Resample::Bilinear | Resample::Hamming => 1.0,
            Resample::Bicubic => 2.0,
            Resample::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let px = std::f64::consts::PI * x;
                px.sin() / px
            }
        }
        match self {
            Resample::Box => {
                if (-0.5..0.5).contains(&x) {
                    1.0
                } else {
                    0.0
                }
            }
            Resample::Bilinear => (1.0 - x.abs()).max(0.0),
            Resample::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let px = x * std::f64::consts::PI;
                    px.sin() / px * (0.54 + 0.46 * px.cos())
                }
            }
            Resample::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Resample::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// How to resize before cropping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    /// Shortest side to this many pixels, aspect ratio kept (long side truncated).
    ShortestEdge(u32),
    /// Exactly this height and width.
    Exact {
        /// Height.
        height: u32,
        /// Width.
        width: u32,
    },
}

/// `preprocessor_config.json` of a `CLIPImageProcessor`.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    /// Resize step (None = `do_resize: false`).
    pub resize: Option<ResizeTo>,
    /// Filter of the resize step.
    pub resample: Resample,
    /// Centre crop `(height, width)` (None = `do_center_crop: false`).
    pub crop: Option<(u32, u32)>,
    /// Multiplier applied to 8-bit values (None = `do_rescale: false`).
    pub rescale_factor: Option<f64>,
    /// Per-channel `(mean, std)` (None = `do_normalize: false`).
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

impl PreprocessConfig {
    /// transformers' defaults for a model whose images are `size`×`size` (224 for the
    /// OpenAI checkpoints).
    pub fn for_size(size: u32) -> PreprocessConfig {
        PreprocessConfig {
            resize: Some(ResizeTo::ShortestEdge(size)),
            resample: Resample::Bicubic,
            crop: Some((size, size)),
            rescale_factor: Some(1.0 / 255.0),
            normalize: Some((OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)),
        }
    }

    /// Reads `preprocessor_config.json`; absent fields take the `CLIPImageProcessor`
    /// defaults for `default_size`.
    pub fn from_file(path: impl AsRef<Path>, default_size: u32) -> Result<PreprocessConfig> {
        let p = path.as_ref();
        let text = std::fs::read_to_string(p).map_err(|source| Error::Io {
            path: p.display().to_string(),
            source,
        })?;
        PreprocessConfig::from_json(&text, default_size).map_err(|msg| Error::Format {
            path: p.display().to_string(),
            msg,
        })
    }

    /// Parses the text of a `preprocessor_config.json`. Both the current form
    /// (`size: {"shortest_edge": 224}`, `crop_size: {"height", "width"}`) and the old one
    /// (`size: 224`, `crop_size: 224`) are understood.
    pub fn from_json(
        text: &str,
        default_size: u32,
    ) -> std::result::Result<PreprocessConfig, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let d = PreprocessConfig::for_size(default_size);
        let flag = |k: &str| -> std::result::Result<bool, String> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(true),
                Some(Value::Bool(b)) => Ok(*b),
                Some(o) => Err(format!("{k} must be true or false, got {o}")),
            }
        };
        let uint = |x: &Value, what: &str| -> std::result::Result<u32, String> {
            x.as_u64()
                .filter(|&n| n > 0 && n <= 65536)
                .map(|n| n as u32)
                .ok_or_else(|| format!("{what} must be a positive integer, got {x}"))
        };
        let resize = if flag("do_resize")? {
            match v.get("size") {
                None | Some(Value::Null) => d.resize,
                Some(Value::Number(_)) => Some(ResizeTo::ShortestEdge(uint(&v["size"], "size")?)),
                Some(Value::Object(m)) => {
                    if let Some(s) = m.get("shortest_edge") {
                        Some(ResizeTo::ShortestEdge(uint(s, "size.shortest_edge")?))
                    } else if let (Some(h), Some(w)) = (m.get("height"), m.get("width")) {
                        Some(ResizeTo::Exact {
                            height: uint(h, "size.height")?,
                            width: uint(w, "size.width")?,
                        })
                    } else {
                        return Err(format!(
                            "size must have shortest_edge or height and width, got {}",
                            v["size"]
                        ));
                    }
                }
                Some(o) => return Err(format!("size must be an integer or an object, got {o}")),
            }
        } else {
            None
        };
        let resample = match v.get("resample") {
            None | Some(Value::Null) => d.resample,
            Some(x) => Resample::from_pil(
                x.as_i64()
                    .ok_or_else(|| format!("resample must be an integer, got {x}"))?,
            )?,
        };
        let crop = if flag("do_center_crop")? {
            match v.get("crop_size") {
                None | Some(Value::Null) => d.crop,
                Some(x @ Value::Number(_)) => {
                    let s = uint(x, "crop_size")?;
                    Some((s, s))
                }
                Some(Value::Object(m)) => match (m.get("height"), m.get("width")) {
                    (Some(h), Some(w)) => {
                        Some((uint(h, "crop_size.height")?, uint(w, "crop_size.width")?))
                    }
                    _ => return Err("crop_size must have height and width".into()),
                },
                Some(o) => {
                    return Err(format!(
                        "crop_size must be an integer or an object, got {o}"
                    ))
                }
            }
        } else {
            None
        };
        let rescale_factor = if flag("do_rescale")? {
            match v.get("rescale_factor") {
                None | Some(Value::Null) => d.rescale_factor,
                Some(x) => Some(
                    x.as_f64()
                        .ok_or_else(|| format!("rescale_factor must be a number, got {x}"))?,
                ),
            }
        } else {
            None
        };
        let triple = |k: &str, def: [f32; 3]| -> std::result::Result<[f32; 3], String> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(def),
                Some(Value::Number(n)) => {
                    let x = n.as_f64().unwrap_or(f64::NAN) as f32;
                    Ok([x; 3])
                }
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut out = [0f32; 3];
                    for (o, x) in out.iter_mut().zip(a) {
                        *o = x
                            .as_f64()
                            .ok_or_else(|| format!("{k} must hold numbers, got {x}"))?
                            as f32;
                    }
                    Ok(out)
                }
                Some(o) => Err(format!("{k} must be 3 numbers, got {o}")),
            }
        };
        let normalize = if flag("do_normalize")? {
            let std = triple("image_std", OPENAI_CLIP_STD)?;
            if std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
                return Err(format!(
                    "image_std must be finite and non-zero, got {std:?}"
                ));
            }
            Some((triple("image_mean", OPENAI_CLIP_MEAN)?, std))
        } else {
            None
        };
        Ok(PreprocessConfig {
            resize,
            resample,
            crop,
            rescale_factor,
            normalize,
        })
    }

    /// The `(height, width)` of the output for an input of `(height, width)`.
    pub fn output_size(&self, h: u32, w: u32) -> (u32, u32) {
        let (h, w) = self.resized_size(h, w);
        self.crop.unwrap_or((h, w))
    }

    fn resized_size(&self, h: u32, w: u32) -> (u32, u32) {
        match self.resize {
            None => (h, w),
            Some(ResizeTo::Exact { height, width }) => (height, width),
            Some(ResizeTo::ShortestEdge(s)) => {
                // transformers get_resize_output_image_size: int(size * long / short).
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                let new_long = ((s as f64 * long as f64 / short as f64) as u32).max(1);
                if w <= h {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
        }
    }

    /// Which window of the resized image an `h`×`w` input needs, and which source pixels
    /// that window reads (pure arithmetic; nothing is allocated).
    pub fn plan(&self, h: u32, w: u32) -> ResizePlan {
        let (rh, rw) = self.resized_size(h, w);
        let (ch, cw) = self.crop.unwrap_or((rh, rw));
        // transformers center_crop: top = (H - crop) // 2; when the image is smaller than the
        // crop it is first padded with zeros, placed at ceil((crop - H) / 2).
        let origin = |size: u32, crop: u32| -> i64 {
            let (size, crop) = (size as i64, crop as i64);
            if size >= crop {
                (size - crop) / 2
            } else {
                -((crop - size + 1) / 2)
            }
        };
        let (top, left) = (origin(rh, ch), origin(rw, cw));
        let span = |o: i64, crop: u32, size: u32| -> (u32, u32) {
            let a = o.clamp(0, size as i64) as u32;
            let b = (o + crop as i64).clamp(0, size as i64) as u32;
            (a, b.max(a))
        };
        let rows = span(top, ch, rh);
        let cols = span(left, cw, rw);
        ResizePlan {
            resized: (rh, rw),
            crop_origin: (top, left),
            rows,
            cols,
            src_rows: source_span(h, rh, self.resample, rows),
            src_cols: source_span(w, rw, self.resample, cols),
        }
    }

    /// Preprocesses one RGB image to `[3, H, W]` values.
    pub fn apply(&self, img: &RgbImage) -> Result<Vec<f32>> {
        if img.width() == 0 || img.height() == 0 {
            return Err(Error::invalid("image has no pixels"));
        }
        let plan = self.plan(img.height(), img.width());
        // Only a config without a crop can ask for a window larger than the crop; bound it
        // as decoding is bounded.
        if plan.window_pixels() > MAX_IMAGE_PIXELS {
            return Err(Error::invalid(format!(
                "a {}x{} image resizes to {}x{} pixels, over the limit of {MAX_IMAGE_PIXELS} \
                 (set crop_size in preprocessor_config.json)",
                img.width(),
                img.height(),
                plan.resized.1,
                plan.resized.0
            )));
        }
        let window = resize_window(img, &plan, self.resample);
        let (ch, cw) = self
            .crop
            .map_or((plan.resized.0 as i64, plan.resized.1 as i64), |(a, b)| {
                (a as i64, b as i64)
            });
        let (top, left) = plan.crop_origin;
        let (wy0, wx0) = (plan.rows.0 as i64, plan.cols.0 as i64);
        let (wh, ww) = (window.height() as i64, window.width() as i64);
        let mut out = vec![0f32; (3 * ch * cw) as usize];
        let plane = (ch * cw) as usize;
        for y in 0..ch {
            for x in 0..cw {
                let (sy, sx) = (y + top - wy0, x + left - wx0);
                let px = if sy >= 0 && sy < wh && sx >= 0 && sx < ww {
                    window.get_pixel(sx as u32, sy as u32).0
                } else {
                    [0, 0, 0]
                };
                for c in 0..3 {
                    out[c * plane + (y * cw + x) as usize] = self.value(px[c], c);
                }
            }
        }
        Ok(out)
    }

    /// One channel value, rounded as transformers' numpy path rounds: rescale in f64 then
    /// cast to f32, normalise in f32.
    fn value(&self, v: u8, c: usize) -> f32 {
        let mut x = match self.rescale_factor {
            Some(s) => (v as f64 * s) as f32,
            None => v as f32,
        };
        if let Some((mean, std)) = &self.normalize {
            x = (x - mean[c]) / std[c];
        }
        x
    }
}

/// Checks an image's header dimensions against [`MAX_IMAGE_SIDE`] and [`MAX_IMAGE_PIXELS`].
pub fn check_image_size(width: u32, height: u32) -> std::result::Result<(), String> {
    let pixels = width as u64 * height as u64;
    if width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE {
        return Err(format!(
            "the image claims {width}x{height} pixels; vqclip decodes at most {MAX_IMAGE_SIDE} \
             per side"
        ));
    }
    if pixels > MAX_IMAGE_PIXELS {
        return Err(format!(
            "the image claims {width}x{height} = {pixels} pixels; vqclip decodes at most \
             {MAX_IMAGE_PIXELS} ({} megapixels)",
            MAX_IMAGE_PIXELS >> 20
        ));
    }
    if pixels == 0 {
        return Err(format!("the image is {width}x{height}: it has no pixels"));
    }
    Ok(())
}

/// Decodes an image file (PNG, JPEG, WebP, BMP, GIF, TIFF; the format is guessed from the
/// content) with its size checked by [`check_image_size`] from the header, before the pixel
/// buffer is allocated, and the decoders' own allocations capped.
pub fn decode_image(path: impl AsRef<Path>) -> Result<image::DynamicImage> {
    let p = path.as_ref();
    let io = |source| Error::Io {
        path: p.display().to_string(),
        source,
    };
    let format = |msg: String| Error::Format {
        path: p.display().to_string(),
        msg,
    };
    let mut reader = image::ImageReader::open(p)
        .map_err(io)?
        .with_guessed_format()
        .map_err(io)?;
    // The sides are checked below, with the numbers in the message; the decoders' own
    // allocations are capped here.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(|e| match e {
        image::ImageError::Limits(_) => format(format!(
            "cannot decode image: {e} (vqclip lets a decoder allocate at most \
             {MAX_DECODE_BYTES} bytes)"
        )),
        e => format(format!("cannot decode image: {e}")),
    })?;
    let (w, h) = image::ImageDecoder::dimensions(&decoder);
    check_image_size(w, h).map_err(format)?;
    image::DynamicImage::from_decoder(decoder)
        .map_err(|e| format(format!("cannot decode image: {e}")))
}

/// Decodes an image file with [`decode_image`] and converts it to 8-bit RGB as transformers
/// does: grey is replicated, transparency is composited onto white.
pub fn load_image(path: impl AsRef<Path>) -> Result<RgbImage> {
    Ok(to_rgb(decode_image(path)?))
}

/// 8-bit RGB as transformers converts: grey replicated, transparency composited onto white.
pub fn to_rgb(img: image::DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    composite_on_white(&img.to_rgba8())
}

/// transformers' `convert_to_rgb`: transparency is composited onto white with Pillow's
/// `alpha_composite` integer arithmetic (`AlphaComposite.c`, 7 extra bits of precision).
/// Over an opaque background the output alpha is 255 and its weights reduce to `a` and
/// `255 - a` (times 128).
pub fn composite_on_white(img: &image::RgbaImage) -> RgbImage {
    let shift_div255 = |a: u32| ((a >> 8) + a) >> 8;
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let [r, g, b, a] = img.get_pixel(x, y).0;
        let (a, px) = (a as u32, [r as u32, g as u32, b as u32]);
        if a == 0 {
            return image::Rgb([255, 255, 255]);
        }
        let coef1 = a * 128;
        let coef2 = 255 * 128 - coef1;
        image::Rgb(px.map(|c| (shift_div255(c * coef1 + 255 * coef2 + (0x80 << 7)) >> 7) as u8))
    })
}

/// Pillow's coefficients for one axis: per output index the first input index, the count,
/// and fixed-point weights (`PRECISION_BITS` = 22), as `precompute_coeffs` and
/// `normalize_coeffs_8bpc` in Pillow's `Resample.c` compute them.
///
/// Only the outputs `o0..o1` are computed (entry `i` is output `o0 + i`); each output's
/// coefficients depend on its own index alone, so a range gives the same values as the
/// full axis.
fn coeffs(
    in_size: u32,
    out_size: u32,
    f: Resample,
    (o0, o1): (u32, u32),
) -> (Vec<(usize, usize)>, Vec<i32>, usize) {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = f.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let count = o1.saturating_sub(o0) as usize;
    let mut bounds = Vec::with_capacity(count);
    let mut kk = vec![0i32; count * ksize];
    let mut w = vec![0f64; ksize];
    for (i, xx) in (o0 as usize..o1 as usize).enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut total = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(n) {
            *wx = f.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            total += *wx;
        }
        for x in 0..n {
            let v = if total != 0.0 { w[x] / total } else { w[x] };
            let fixed = v * (1u32 << 22) as f64;
            kk[i * ksize + x] = if v < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        bounds.push((xmin, n));
    }
    (bounds, kk, ksize)
}

fn clip8(acc: i64) -> u8 {
    (acc >> 22).clamp(0, 255) as u8
}

/// Resizes like Pillow's `Image.resize((w, h), resample)` on an RGB image (no
/// `reducing_gap`): horizontal pass, then vertical pass, each rounded to 8 bits.
pub fn resize_pil(img: &RgbImage, w: u32, h: u32, f: Resample) -> RgbImage {
    let (iw, ih) = (img.width(), img.height());
    let plan = ResizePlan {
        resized: (h, w),
        crop_origin: (0, 0),
        rows: (0, h),
        cols: (0, w),
        src_rows: source_span(ih, h, f, (0, h)),
        src_cols: source_span(iw, w, f, (0, w)),
    };
    resize_window(img, &plan, f)
}

/// The window `plan.rows` × `plan.cols` of Pillow's resize of `img` to `plan.resized`,
/// reading only `plan.src_rows` × `plan.src_cols` (see the module doc for why this is
/// exact).
fn resize_window(img: &RgbImage, plan: &ResizePlan, f: Resample) -> RgbImage {
    let (iw, ih) = (img.width(), img.height());
    let (h, w) = plan.resized;
    let (x0, x1) = plan.cols;
    let (y0, y1) = plan.rows;
    let (sy0, sy1) = plan.src_rows;
    let (ww, wh) = ((x1 - x0) as usize, (y1 - y0) as usize);
    let src = img.as_raw();
    let row_of = |y: usize| &src[y * iw as usize * 3..(y + 1) * iw as usize * 3];
    // Horizontal pass over the source rows the vertical pass reads: `tmp` row r is source
    // row sy0 + r, column c is output column x0 + c.
    let tmp: Vec<u8> = if w != iw {
        let (bounds, kk, ksize) = coeffs(iw, w, f, (x0, x1));
        let mut out = Vec::with_capacity((sy1 - sy0) as usize * ww * 3);
        for y in sy0 as usize..sy1 as usize {
            let row = row_of(y);
            for (i, &(xmin, n)) in bounds.iter().enumerate() {
                let k = &kk[i * ksize..i * ksize + n];
                let mut acc = [1i64 << 21; 3];
                for (j, &kv) in k.iter().enumerate() {
                    let p = &row[(xmin + j) * 3..(xmin + j) * 3 + 3];
                    for c in 0..3 {
                        acc[c] += p[c] as i64 * kv as i64;
                    }
                }
                out.extend(acc.map(clip8));
            }
        }
        out
    } else {
        let mut out = Vec::with_capacity((sy1 - sy0) as usize * ww * 3);
        for y in sy0 as usize..sy1 as usize {
            out.extend_from_slice(&row_of(y)[x0 as usize * 3..x1 as usize * 3]);
        }
        out
    };
    let stride = ww * 3;
    // Vertical pass: output row y0 + i from tmp rows shifted by sy0.
    let out = if h != ih {
        let (bounds, kk, ksize) = coeffs(ih, h, f, (y0, y1));
        let mut out = vec![0u8; wh * stride];
        for (i, &(ymin, n)) in bounds.iter().enumerate() {
            let k = &kk[i * ksize..i * ksize + n];
            let base = ymin - sy0 as usize;
            for c in 0..stride {
                let mut acc = 1i64 << 21;
                for (j, &kv) in k.iter().enumerate() {
                    acc += tmp[(base + j) * stride + c] as i64 * kv as i64;
                }
                out[i * stride + c] = clip8(acc);
            }
        }
        out
    } else {
        // Not resized vertically: src_rows == rows.
        tmp
    };
    // Sizes match by construction.
    RgbImage::from_raw(ww as u32, wh as u32, out)
        .unwrap_or_else(|| RgbImage::new(ww as u32, wh as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_forms() {
        let old = r#"{"crop_size": 224, "do_center_crop": true, "do_normalize": true,
            "do_resize": true, "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}"#;
        assert_eq!(
            PreprocessConfig::from_json(old, 999).unwrap(),
            PreprocessConfig::for_size(224)
        );
        let c = PreprocessConfig::from_json(
            r#"{"size": {"height": 30, "width": 40}, "do_center_crop": false, "do_rescale": false}"#,
            224,
        )
        .unwrap();
        assert_eq!(c.output_size(100, 100), (30, 40));
        assert_eq!(c.rescale_factor, None);
        for (bad, want) in [
            (r#"{"resample": 0}"#, "resample 0"),
            (r#"{"size": "big"}"#, "size must be"),
            (r#"{"image_std": [1, 0, 1]}"#, "image_std"),
            (r#"{"do_resize": "yes"}"#, "do_resize"),
        ] {
            let e = PreprocessConfig::from_json(bad, 224).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn shortest_edge_sizes_like_transformers() {
        let c = PreprocessConfig::for_size(224);
        assert_eq!(c.resized_size(240, 320), (224, 298)); // int(224 * 320 / 240) = 298
        assert_eq!(c.resized_size(45, 30), (336, 224));
        assert_eq!(c.output_size(45, 30), (224, 224));
    }

    #[test]
    fn same_size_passes_through_exactly() {
        let mut img = RgbImage::new(7, 5);
        for (i, p) in img.pixels_mut().enumerate() {
            p.0 = [
                (i * 37 % 256) as u8,
                (i * 11 % 256) as u8,
                (i * 3 % 256) as u8,
            ];
        }
        for f in [Resample::Bicubic, Resample::Bilinear, Resample::Lanczos] {
            assert_eq!(resize_pil(&img, 7, 5, f), img);
        }
        // Identity-sized config: only rescale + normalise.
        let mut c = PreprocessConfig::for_size(5);
        c.crop = Some((5, 7));
        c.resize = None;
        let v = c.apply(&img).unwrap();
        let p = img.get_pixel(3, 2).0;
        let plane = 35;
        for ch in 0..3 {
            let want = ((p[ch] as f64 / 255.0) as f32 - OPENAI_CLIP_MEAN[ch]) / OPENAI_CLIP_STD[ch];
            assert_eq!(v[ch * plane + 2 * 7 + 3], want);
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        // Normalised weights sum to 1 in fixed point up to rounding: a flat image survives
        // any resize exactly.
        let img = RgbImage::from_pixel(37, 23, image::Rgb([200, 13, 255]));
        for f in [
            Resample::Bicubic,
            Resample::Bilinear,
            Resample::Lanczos,
            Resample::Box,
            Resample::Hamming,
        ] {
            for (w, h) in [(10, 7), (80, 50), (37, 9), (1, 1)] {
                let r = resize_pil(&img, w, h, f);
                assert!(r.pixels().all(|p| p.0 == [200, 13, 255]), "{f:?} {w}x{h}");
            }
        }
    }

    /// Resize-then-crop done the plain way: the whole resized image, then the crop.
    fn full_then_crop(c: &PreprocessConfig, img: &RgbImage) -> Vec<f32> {
        let (rh, rw) = c.resized_size(img.height(), img.width());
        let full = resize_pil(img, rw, rh, c.resample);
        let mut plain = c.clone();
        plain.resize = None;
        plain.apply(&full).unwrap()
    }

    fn noise(w: u32, h: u32) -> RgbImage {
        let mut s = 12345u32;
        RgbImage::from_fn(w, h, |_, _| {
            let mut b = [0u8; 3];
            for v in &mut b {
                s = s.wrapping_mul(1_103_515_245).wrapping_add(12345);
                *v = (s >> 16) as u8;
            }
            image::Rgb(b)
        })
    }

    #[test]
    fn cropped_window_equals_resize_then_crop_exactly() {
        for f in [Resample::Bicubic, Resample::Lanczos, Resample::Box] {
            for (w, h, size, crop) in [
                (3, 200, 24, (24, 24)),  // tall strip, upscaled
                (200, 3, 24, (24, 24)),  // wide strip
                (97, 61, 24, (24, 24)),  // downscaled both ways
                (61, 97, 24, (20, 16)),  // non-square crop
                (40, 30, 24, (30, 40)),  // crop larger than the resized image: padded
                (24, 500, 24, (24, 24)), // short side already at size: no horizontal pass
            ] {
                let mut c = PreprocessConfig::for_size(size);
                c.resample = f;
                c.crop = Some(crop);
                let img = noise(w, h);
                assert_eq!(
                    c.apply(&img).unwrap(),
                    full_then_crop(&c, &img),
                    "{f:?} {w}x{h}"
                );
            }
        }
        // Exact-size resizes and no crop at all take the same path.
        let img = noise(50, 20);
        let mut c = PreprocessConfig::for_size(16);
        c.resize = Some(ResizeTo::Exact {
            height: 13,
            width: 31,
        });
        assert_eq!(c.apply(&img).unwrap(), full_then_crop(&c, &img));
        c.crop = None;
        assert_eq!(c.apply(&img).unwrap(), full_then_crop(&c, &img));
    }

    #[test]
    fn an_extreme_strip_reads_a_bounded_window() {
        let c = PreprocessConfig::for_size(224);
        // 1 wide, 20000 tall: the resized image would be 4,480,000 x 224.
        let plan = c.plan(20000, 1);
        assert_eq!(plan.resized, (4_480_000, 224));
        assert_eq!(plan.window_pixels(), 224 * 224);
        assert_eq!(plan.src_cols, (0, 1));
        // 224 resized rows are 1/224 of a source row each: a handful of source rows.
        let rows = plan.src_rows.1 - plan.src_rows.0;
        assert!(rows <= 6, "{plan:?}");
        assert!(plan.intermediate_bytes() <= 6 * 224 * 3, "{plan:?}");
        // The same for the wide strip, and it runs.
        let plan = c.plan(1, 20000);
        assert_eq!(plan.window_pixels(), 224 * 224);
        assert!(plan.src_cols.1 - plan.src_cols.0 <= 6, "{plan:?}");
        let img = noise(20000, 1);
        let v = c.apply(&img).unwrap();
        assert_eq!(v.len(), 3 * 224 * 224);
        assert!(v.iter().all(|x| x.is_finite()));
        // Without a crop the whole resized image is the window, and that is refused.
        let mut nocrop = c.clone();
        nocrop.crop = None;
        let e = nocrop.apply(&img).unwrap_err().to_string();
        assert!(e.contains("over the limit"), "{e}");
    }

    #[test]
    fn header_sizes_are_checked() {
        assert!(check_image_size(1, 20000).is_ok());
        assert!(check_image_size(16384, 8192).is_ok());
        let e = check_image_size(65535, 65535).unwrap_err();
        assert!(e.contains("65535x65535") && e.contains("at most"), "{e}");
        let e = check_image_size(MAX_IMAGE_SIDE + 1, 1).unwrap_err();
        assert!(e.contains("per side"), "{e}");
        assert!(check_image_size(0, 5).is_err());
    }

    #[test]
    fn small_image_is_padded_like_transformers() {
        let img = RgbImage::from_pixel(3, 2, image::Rgb([255, 255, 255]));
        let c = PreprocessConfig {
            resize: None,
            resample: Resample::Bicubic,
            crop: Some((5, 6)),
            rescale_factor: Some(1.0 / 255.0),
            normalize: None,
        };
        let v = c.apply(&img).unwrap();
        // Rows: pad top ceil(3/2) = 2; columns: pad left ceil(3/2) = 2.
        let row = |y: usize| &v[y * 6..(y + 1) * 6];
        assert_eq!(row(0), &[0.0; 6]);
        assert_eq!(row(1), &[0.0; 6]);
        assert_eq!(row(2), &[0.0, 0.0, 1.0, 1.0, 1.0, 0.0]);
        assert_eq!(row(4), &[0.0; 6]);
    }
}
