//! Writing results: PNGs with the generation's settings in text chunks, and an animated GIF of
//! the progress. Files are written next to their destination under a temporary name and
//! renamed when complete, so a failure never leaves a partial image.

use crate::{Error, Result};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

fn png_err(path: &Path) -> impl Fn(png::EncodingError) -> Error + '_ {
    move |e| Error::Format {
        path: path.display().to_string(),
        msg: e.to_string(),
    }
}

/// A temporary path beside `path` (same directory, so the final rename is atomic).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Writes `f`'s output to a temporary file and renames it to `path` on success; on error the
/// temporary file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, f: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(io_err(path))?;
        let mut w = BufWriter::new(file);
        f(&mut w)?;
        w.flush().map_err(io_err(path))?;
        w.into_inner()
            .map_err(|e| io_err(path)(e.into_error()))?
            .sync_all()
            .map_err(io_err(path))?;
        std::fs::rename(&tmp, path).map_err(io_err(path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes an RGB8 PNG (`rgb` row-major HWC) with `tEXt` chunks, atomically.
pub fn write_png(
    path: &Path,
    width: usize,
    height: usize,
    rgb: &[u8],
    text: &[(&str, String)],
) -> Result<()> {
    if rgb.len() != width * height * 3 {
        return Err(Error::shape(format!(
            "{} bytes are not a {width}x{height} RGB image",
            rgb.len()
        )));
    }
    write_atomic(path, |w| {
        let mut enc = png::Encoder::new(w, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            enc.add_text_chunk(k.to_string(), v.clone())
                .map_err(png_err(path))?;
        }
        let mut writer = enc.write_header().map_err(png_err(path))?;
        writer.write_image_data(rgb).map_err(png_err(path))?;
        writer.finish().map_err(png_err(path))
    })
}

/// An animated GIF built frame by frame (kept in memory, written atomically by
/// [`GifFrames::write`]).
pub struct GifFrames {
    width: u16,
    height: u16,
    frames: Vec<Vec<u8>>,
}

impl GifFrames {
    /// An empty animation of `width`×`height`.
    pub fn new(width: usize, height: usize) -> Result<Self> {
        let (w, h) = (u16::try_from(width), u16::try_from(height));
        match (w, h) {
            (Ok(w), Ok(h)) => Ok(GifFrames {
                width: w,
                height: h,
                frames: Vec::new(),
            }),
            _ => Err(Error::invalid(format!(
                "{width}x{height} is too large for a GIF"
            ))),
        }
    }
    /// Adds an RGB8 frame.
    pub fn push(&mut self, rgb: &[u8]) {
        self.frames.push(rgb.to_vec());
    }
    /// Frames so far.
    pub fn len(&self) -> usize {
        self.frames.len()
    }
    /// True when no frame was added.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
    /// Writes the animation (10 frames per second, looping).
    pub fn write(&self, path: &Path) -> Result<()> {
        let gif_err = |e: gif::EncodingError| Error::Format {
            path: path.display().to_string(),
            msg: e.to_string(),
        };
        write_atomic(path, |w| {
            let mut enc = gif::Encoder::new(w, self.width, self.height, &[]).map_err(gif_err)?;
            enc.set_repeat(gif::Repeat::Infinite).map_err(gif_err)?;
            for f in &self.frames {
                let mut frame = gif::Frame::from_rgb_speed(self.width, self.height, f, 10);
                frame.delay = 10;
                enc.write_frame(&frame).map_err(gif_err)?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trips_with_text_and_failures_leave_nothing() {
        let dir = std::env::temp_dir().join(format!("vqclip-out-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.png");
        let rgb: Vec<u8> = (0..4 * 3 * 3).map(|i| i as u8 * 7).collect();
        write_png(
            &path,
            4,
            3,
            &rgb,
            &[("prompt", "a red circle".into()), ("seed", "5".into())],
        )
        .unwrap();
        let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
        let mut reader = dec.read_info().unwrap();
        let texts: Vec<(String, String)> = reader
            .info()
            .uncompressed_latin1_text
            .iter()
            .map(|t| (t.keyword.clone(), t.text.clone()))
            .collect();
        assert!(texts.contains(&("prompt".into(), "a red circle".into())));
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buf).unwrap();
        assert_eq!(&buf[..rgb.len()], &rgb[..]);
        // A wrong-size image fails before anything is written.
        let bad = dir.join("b.png");
        assert!(write_png(&bad, 5, 5, &rgb, &[]).is_err());
        assert!(!bad.exists());
        // A write error (directory missing) leaves no file and no temporary.
        let missing = dir.join("no-such-dir").join("c.png");
        assert!(write_png(&missing, 4, 3, &rgb, &[]).is_err());
        let leftovers = std::fs::read_dir(&dir).unwrap().filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".tmp")
        });
        assert_eq!(leftovers.count(), 0);
        let mut gif = GifFrames::new(4, 3).unwrap();
        gif.push(&rgb);
        gif.push(&rgb);
        let gpath = dir.join("p.gif");
        gif.write(&gpath).unwrap();
        assert!(std::fs::read(&gpath).unwrap().starts_with(b"GIF89a"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
