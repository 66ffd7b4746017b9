//! Writing results: PNGs with the generation's settings in text chunks, and an animated GIF of
//! the progress, streamed frame by frame. Both go through [`crate::atomic`]: a failure or a
//! kill never leaves a partial image under the final name.

use crate::atomic::AtomicFile;
use crate::{Error, Result};
use std::io::Write;
use std::path::Path;

fn png_err(path: &Path) -> impl Fn(png::EncodingError) -> Error + '_ {
    move |e| Error::Format {
        path: path.display().to_string(),
        msg: e.to_string(),
    }
}

/// Writes `f`'s output to `path` atomically (see [`crate::atomic`]): on error `path` is
/// untouched and no temporary file is left.
pub fn write_atomic(path: &Path, f: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    crate::atomic::write_with(path, f)
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

/// An animated GIF (10 frames per second, looping) written frame by frame: each frame is
/// encoded into the temporary file as it is pushed, so memory does not grow with the number
/// of frames; the GIF appears under its name only on [`GifFrames::finish`].
pub struct GifFrames {
    width: u16,
    height: u16,
    frames: usize,
    enc: gif::Encoder<AtomicFile>,
}

impl GifFrames {
    /// Starts an animation of `width`×`height` to be written to `path`.
    pub fn create(path: &Path, width: usize, height: usize) -> Result<Self> {
        let (Ok(w), Ok(h)) = (u16::try_from(width), u16::try_from(height)) else {
            return Err(Error::invalid(format!(
                "{width}x{height} is too large for a GIF (at most 65535 per side)"
            )));
        };
        let file = AtomicFile::create(path)?;
        let mut enc = gif::Encoder::new(file, w, h, &[]).map_err(gif_err(path))?;
        enc.set_repeat(gif::Repeat::Infinite)
            .map_err(gif_err(path))?;
        Ok(GifFrames {
            width: w,
            height: h,
            frames: 0,
            enc,
        })
    }
    /// Encodes an RGB8 frame (`width * height * 3` bytes).
    pub fn push(&mut self, rgb: &[u8]) -> Result<()> {
        let (w, h) = (self.width as usize, self.height as usize);
        if rgb.len() != w * h * 3 {
            return Err(Error::shape(format!(
                "{} bytes are not a {w}x{h} RGB frame",
                rgb.len()
            )));
        }
        let mut frame = gif::Frame::from_rgb_speed(self.width, self.height, rgb, 10);
        frame.delay = 10;
        let path = self.enc.get_ref().path().to_path_buf();
        self.enc.write_frame(&frame).map_err(gif_err(&path))?;
        self.frames += 1;
        Ok(())
    }
    /// Frames so far.
    pub fn len(&self) -> usize {
        self.frames
    }
    /// True when no frame was added.
    pub fn is_empty(&self) -> bool {
        self.frames == 0
    }
    /// Writes the trailer and moves the GIF to its name. Dropped without this, the
    /// temporary file is removed and nothing appears.
    pub fn finish(self) -> Result<()> {
        let path = self.enc.get_ref().path().to_path_buf();
        let file = self.enc.into_inner().map_err(gif_err(&path))?;
        file.commit()
    }
}

fn gif_err(path: &Path) -> impl Fn(gif::EncodingError) -> Error + '_ {
    move |e| Error::Format {
        path: path.display().to_string(),
        msg: e.to_string(),
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
        let gpath = dir.join("p.gif");
        let mut gif = GifFrames::create(&gpath, 4, 3).unwrap();
        gif.push(&rgb).unwrap();
        assert!(gif.push(&rgb[1..]).is_err());
        gif.push(&rgb).unwrap();
        assert_eq!(gif.len(), 2);
        // Nothing under the final name until the animation is finished.
        assert!(!gpath.exists());
        gif.finish().unwrap();
        assert!(std::fs::read(&gpath).unwrap().starts_with(b"GIF89a"));
        // Abandoned (an error in the run): no GIF and no temporary file.
        let dropped = dir.join("q.gif");
        let mut gif = GifFrames::create(&dropped, 4, 3).unwrap();
        gif.push(&rgb).unwrap();
        drop(gif);
        assert!(!dropped.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
