//! The pictures of `inspect`: heat maps laid over the model's view of an image, grids of
//! per-head attention, token-to-token attention, VQGAN code maps; PNG encoding.

use crate::{Error, Result};
use image::{imageops, Rgb, RgbImage};

/// Smallest side a picture of an image is shown at (small models see 32-64 px images).
pub const MIN_SIDE: u32 = 256;
/// Gap between the cells of a grid, in pixels.
const GAP: u32 = 2;
const GAP_COLOUR: Rgb<u8> = Rgb([255, 255, 255]);

/// Viridis at nine evenly spaced points (matplotlib's table, rounded to 8 bits).
const VIRIDIS: [[u8; 3]; 9] = [
    [68, 1, 84],
    [71, 44, 122],
    [59, 81, 139],
    [44, 113, 142],
    [33, 144, 141],
    [39, 173, 129],
    [92, 200, 99],
    [170, 220, 50],
    [253, 231, 37],
];

/// The viridis colour of `v` in [0, 1] (clamped; NaN as 0).
pub fn colour(v: f32) -> Rgb<u8> {
    let v = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
    let x = v * (VIRIDIS.len() - 1) as f32;
    let i = (x.floor() as usize).min(VIRIDIS.len() - 2);
    let f = x - i as f32;
    let mix =
        |c: usize| (VIRIDIS[i][c] as f32 * (1.0 - f) + VIRIDIS[i + 1][c] as f32 * f).round() as u8;
    Rgb([mix(0), mix(1), mix(2)])
}

/// `m` rescaled to [0, 1] by its minimum and maximum (all zeros when it is constant).
pub fn normalise(m: &[f32]) -> Vec<f32> {
    let lo = m.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = m.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if hi <= lo || !hi.is_finite() || !lo.is_finite() {
        return vec![0.0; m.len()];
    }
    m.iter().map(|&x| (x - lo) / (hi - lo)).collect()
}

/// `img` enlarged by the smallest whole factor that makes it at least [`MIN_SIDE`] wide
/// (nearest neighbour: the model's pixels stay visible).
pub fn enlarge(img: &RgbImage) -> RgbImage {
    let k = MIN_SIDE.div_ceil(img.width().max(1)).max(1);
    if k == 1 {
        return img.clone();
    }
    imageops::resize(
        img,
        img.width() * k,
        img.height() * k,
        imageops::FilterType::Nearest,
    )
}

/// Bilinear sample of the `[g, g]` map at pixel centre `(x, y)` of a `side`-pixel square
/// (half-pixel centres, edges clamped).
fn sample(map: &[f32], g: usize, side: u32, x: u32, y: u32) -> f32 {
    let at = |p: u32| ((p as f32 + 0.5) * g as f32 / side as f32 - 0.5).clamp(0.0, (g - 1) as f32);
    let (fx, fy) = (at(x), at(y));
    let (x0, y0) = (fx.floor() as usize, fy.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(g - 1), (y0 + 1).min(g - 1));
    let (tx, ty) = (fx - x0 as f32, fy - y0 as f32);
    let row = |y: usize| map[y * g + x0] * (1.0 - tx) + map[y * g + x1] * tx;
    row(y0) * (1.0 - ty) + row(y1) * ty
}

/// The `[g, g]` map (any scale; shown min-max normalised) laid over the enlarged `view`:
/// half the image, half the map's colour.
pub fn overlay(view: &RgbImage, map: &[f32], g: usize) -> Result<RgbImage> {
    if g == 0 || map.len() != g * g {
        return Err(Error::shape(format!(
            "overlay: a map of {} values is not {g}x{g}",
            map.len()
        )));
    }
    let base = enlarge(view);
    let m = normalise(map);
    let side = base.width();
    let mut out = base.clone();
    for (x, y, px) in out.enumerate_pixels_mut() {
        let c = colour(sample(&m, g, side, x, y.min(side - 1)));
        for i in 0..3 {
            px.0[i] = ((base.get_pixel(x, y).0[i] as f32 + c.0[i] as f32) / 2.0).round() as u8;
        }
    }
    Ok(out)
}

/// A square `[n, n]` matrix (normalised) as a picture of `cell`-pixel squares.
fn matrix(m: &[f32], rows: usize, cols: usize, cell: u32) -> RgbImage {
    let v = normalise(m);
    RgbImage::from_fn(cols as u32 * cell, rows as u32 * cell, |x, y| {
        colour(v[(y / cell) as usize * cols + (x / cell) as usize])
    })
}

/// Pictures laid out in a grid of `cols` columns with a white gap between them (every
/// picture the size of the first).
pub fn tile(pictures: &[RgbImage], cols: usize) -> RgbImage {
    let Some(first) = pictures.first() else {
        return RgbImage::new(1, 1);
    };
    let (w, h) = first.dimensions();
    let cols = cols.max(1);
    let rows = pictures.len().div_ceil(cols);
    let mut out = RgbImage::from_pixel(
        cols as u32 * (w + GAP) - GAP,
        rows as u32 * (h + GAP) - GAP,
        GAP_COLOUR,
    );
    for (i, p) in pictures.iter().enumerate() {
        let (r, c) = ((i / cols) as u32, (i % cols) as u32);
        imageops::replace(&mut out, p, (c * (w + GAP)) as i64, (r * (h + GAP)) as i64);
    }
    out
}

/// Every head's class-token attention over the patches, one row per layer, one column per
/// head (each cell normalised on its own). `layers`: `[H, T, T]` each, `T = g² + 1`.
pub fn head_grid(layers: &[Vec<f32>], heads: usize, g: usize) -> Result<RgbImage> {
    let t = g * g + 1;
    let cell = (64 / g.max(1)).max(4) as u32;
    let mut cells = Vec::with_capacity(layers.len() * heads);
    for layer in layers {
        if layer.len() != heads * t * t {
            return Err(Error::shape(format!(
                "head grid: a layer of {} values is not {heads}x{t}x{t}",
                layer.len()
            )));
        }
        for h in 0..heads {
            let cls = &layer[h * t * t + 1..h * t * t + t];
            cells.push(matrix(cls, g, g, cell));
        }
    }
    Ok(tile(&cells, heads))
}

/// Token-to-token attention `[H, T, T]` (query rows, key columns), heads side by side.
pub fn token_attention(p: &[f32], heads: usize, t: usize) -> Result<RgbImage> {
    if t == 0 || p.len() != heads * t * t {
        return Err(Error::shape(format!(
            "token attention: {} values are not {heads}x{t}x{t}",
            p.len()
        )));
    }
    let cell = (192 / t).clamp(3, 24) as u32;
    let cells: Vec<RgbImage> = (0..heads)
        .map(|h| matrix(&p[h * t * t..(h + 1) * t * t], t, t, cell))
        .collect();
    Ok(tile(&cells, heads))
}

/// A colour per code index: a fixed hash to hue, saturation and value, so neighbouring
/// indices get unrelated colours and the same code the same colour in every picture.
pub fn code_colour(code: u32) -> Rgb<u8> {
    let mut h = code.wrapping_mul(0x9E37_79B9) ^ 0x5bd1_e995;
    h ^= h >> 15;
    h = h.wrapping_mul(0x2c1b_3c6d);
    h ^= h >> 12;
    let hue = (h % 360) as f32;
    let sat = 0.55 + ((h >> 9) % 40) as f32 / 100.0;
    let val = 0.65 + ((h >> 17) % 35) as f32 / 100.0;
    let c = val * sat;
    let x = c * (1.0 - ((hue / 60.0) % 2.0 - 1.0).abs());
    let (r, g, b) = match (hue / 60.0) as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = val - c;
    let to8 = |v: f32| ((v + m) * 255.0).round().clamp(0.0, 255.0) as u8;
    Rgb([to8(r), to8(g), to8(b)])
}

/// The `[h, w]` code grid as a `width`×`height` picture, one colour per code.
pub fn code_map(codes: &[u32], grid: (usize, usize), width: u32, height: u32) -> Result<RgbImage> {
    let (gh, gw) = grid;
    if gh == 0 || gw == 0 || codes.len() != gh * gw {
        return Err(Error::shape(format!(
            "code map: {} codes are not {gh}x{gw}",
            codes.len()
        )));
    }
    Ok(RgbImage::from_fn(width, height, |x, y| {
        let (r, c) = (
            (y as usize * gh / height as usize).min(gh - 1),
            (x as usize * gw / width as usize).min(gw - 1),
        );
        code_colour(codes[r * gw + c])
    }))
}

/// PNG bytes of `img`.
pub fn png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| Error::invalid(format!("encoding a PNG: {e}")))?;
    Ok(out.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_runs_from_dark_purple_to_yellow() {
        assert_eq!(colour(0.0), Rgb(VIRIDIS[0]));
        assert_eq!(colour(1.0), Rgb(VIRIDIS[8]));
        assert_eq!(colour(f32::NAN), Rgb(VIRIDIS[0]));
        assert_eq!(colour(0.5), Rgb(VIRIDIS[4]));
    }

    #[test]
    fn overlay_puts_the_hot_patch_where_the_map_has_it() {
        let view = RgbImage::from_pixel(32, 32, Rgb([0, 0, 0]));
        // 2x2 map, hot in the top-right patch.
        let out = overlay(&view, &[0.0, 1.0, 0.0, 0.0], 2).unwrap();
        assert_eq!(out.width(), MIN_SIDE);
        let (w, h) = out.dimensions();
        let hot = out.get_pixel(w - 1, 0).0;
        let cold = out.get_pixel(0, h - 1).0;
        // Yellow (253, 231, 37) halved against purple (68, 1, 84) halved.
        assert!(hot[0] > 120 && hot[1] > 110, "{hot:?}");
        assert!(cold[0] < 40 && cold[1] < 5, "{cold:?}");
        assert!(overlay(&view, &[0.0; 3], 2).is_err());
    }

    #[test]
    fn head_grid_has_a_cell_per_layer_and_head() {
        let (g, heads) = (2, 3);
        let t = g * g + 1;
        let layers = vec![vec![0.2f32; heads * t * t]; 4];
        let img = head_grid(&layers, heads, g).unwrap();
        // Each cell is g patches of 64 / g pixels.
        let cell = 64;
        assert_eq!(img.width(), 3 * cell + 2 * GAP);
        assert_eq!(img.height(), 4 * cell + 3 * GAP);
    }

    #[test]
    fn code_map_gives_each_code_its_colour() {
        let img = code_map(&[5, 7, 7, 5], (2, 2), 4, 4).unwrap();
        assert_eq!(img.get_pixel(0, 0), &code_colour(5));
        assert_eq!(img.get_pixel(3, 0), &code_colour(7));
        assert_eq!(img.get_pixel(3, 3), &code_colour(5));
        assert_ne!(code_colour(5), code_colour(7));
        assert!(code_map(&[1, 2], (2, 2), 4, 4).is_err());
    }
}
