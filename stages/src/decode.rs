//! `decode`: JPEG / PNG / WebP bytes to one RGB8 image.
//!
//! Grayscale, alpha (dropped), 16-bit and CMYK inputs are all normalized to RGB8. The header is
//! read first and images over `max_pixels` are refused before any pixel buffer is allocated
//! (decompression bombs); a corrupt file is a data error, handled by the source's `on_error`.

use std::io::Cursor;
use std::sync::Arc;

use image::{ImageReader, Limits};
use serde::Deserialize;
use simclr_core::{
    Context, Image, MapStage, Payload, PortType, Problem, Role, Sample, SampleCtx, Stage, StageConfig,
    StageError,
};

#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Decode {
    /// Largest image accepted, in pixels (default 100 megapixels).
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
}

fn default_max_pixels() -> u64 {
    100_000_000
}

impl StageConfig for Decode {
    const KIND: &'static str = "decode";
    const ABOUT: &'static str = "decodes JPEG/PNG/WebP bytes to an RGB8 image";
    const ROLE: Role = Role::Map;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Encoded, PortType::Views)
    }
    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        if self.max_pixels == 0 {
            out.push(Problem::new(
                "max_pixels",
                "`max_pixels` must be positive",
                "remove it for the default of 100 megapixels",
            ));
        }
    }
    fn build(&self, _cx: &Context) -> Result<Stage, StageError> {
        Ok(Stage::Map(Arc::new(self.clone())))
    }
}

/// Decodes one encoded image, refusing more than `max_pixels`.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<Image, String> {
    if bytes.is_empty() {
        return Err("empty file".into());
    }
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        if let Some(img) = decode_jpeg_rgb(bytes, max_pixels)? {
            return Ok(img);
        }
    }
    let reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| e.to_string())?;
    if reader.format().is_none() {
        return Err("not a JPEG, PNG or WebP file".into());
    }
    let (w, h) = reader.into_dimensions().map_err(|e| format!("cannot read the header: {e}"))?;
    let pixels = u64::from(w) * u64::from(h);
    if let Some(e) = too_many_pixels(u64::from(w), u64::from(h), max_pixels) {
        return Err(e);
    }
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(|e| e.to_string())?;
    let mut limits = Limits::default();
    // RGBA16 is the widest layout a decoder may allocate, plus slack for its own buffers.
    limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let img = reader.decode().map_err(|e| format!("cannot decode: {e}"))?;
    let rgb = img.into_rgb8();
    let (w, h) = rgb.dimensions();
    Image::from_raw(w, h, rgb.into_raw())
        .ok_or_else(|| "decoder returned a buffer of the wrong size".to_string())
}

fn too_many_pixels(w: u64, h: u64, max_pixels: u64) -> Option<String> {
    let pixels = w * h;
    (pixels > max_pixels).then(|| {
        format!(
            "{w}x{h} = {pixels} pixels is over max_pixels = {max_pixels} (raise `max_pixels` if it is real)"
        )
    })
}

/// JPEG straight through zune-jpeg (the decoder `image` wraps, with the options `image` sets),
/// for the common YCbCr and RGB files: their headers are parsed once and the bytes are not
/// copied, where `image` parses them for the size check and again for decoding, copying the
/// file each time; and the bytes come through our inlined reader (`jpeg_reader`: ~8% faster
/// decoding). The pixels are the same. `None`: another colour space (grayscale, CMYK), left to
/// `image` for its conversions.
fn decode_jpeg_rgb(bytes: &[u8], max_pixels: u64) -> Result<Option<Image>, String> {
    use zune_core::colorspace::ColorSpace;
    let options = zune_core::options::DecoderOptions::default()
        .set_strict_mode(false)
        .set_max_width(usize::MAX)
        .set_max_height(usize::MAX)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut decoder =
        zune_jpeg::JpegDecoder::new_with_options(crate::jpeg_reader::SliceReader::new(bytes), options);
    decoder.decode_headers().map_err(|e| format!("cannot read the header: {e}"))?;
    if !matches!(decoder.input_colorspace(), Some(ColorSpace::YCbCr | ColorSpace::RGB)) {
        return Ok(None);
    }
    let Some((w, h)) = decoder.dimensions() else {
        return Err("cannot read the header: no size".into());
    };
    if let Some(e) = too_many_pixels(w as u64, h as u64, max_pixels) {
        return Err(e);
    }
    let len = decoder.output_buffer_size().ok_or("cannot read the header: size overflows")?;
    let mut data = vec![0u8; len];
    decoder.decode_into(&mut data).map_err(|e| format!("cannot decode: {e}"))?;
    let (w, h) = (u32::try_from(w).map_err(|e| e.to_string())?, u32::try_from(h).map_err(|e| e.to_string())?);
    Image::from_raw(w, h, data).map(Some).ok_or_else(|| "decoder returned a buffer of the wrong size".into())
}

impl MapStage for Decode {
    fn apply(&self, sample: &mut Sample, _ctx: &SampleCtx) -> Result<(), StageError> {
        let Payload::Encoded(bytes) = &sample.payload else {
            return Err(StageError::fatal("`decode` needs encoded bytes (from `image_folder`)"));
        };
        let name = sample.name.as_deref().unwrap_or("sample");
        let img = decode(bytes, self.max_pixels).map_err(|e| StageError::data(format!("{name}: {e}")))?;
        sample.payload = Payload::Views(vec![img]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(img: image::DynamicImage, fmt: image::ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, fmt).unwrap();
        out.into_inner()
    }

    #[test]
    fn gray_alpha_and_16_bit_become_rgb8() {
        let gray = image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(3, 2, image::Luma([77])));
        let img = decode(&encode(gray, image::ImageFormat::Png), 1000).unwrap();
        assert_eq!((img.width, img.height), (3, 2));
        assert!(img.data.iter().all(|&b| b == 77));

        let rgba = image::RgbaImage::from_pixel(2, 2, image::Rgba([10, 20, 30, 0]));
        let img =
            decode(&encode(image::DynamicImage::ImageRgba8(rgba), image::ImageFormat::Png), 1000).unwrap();
        assert_eq!(&img.data[..3], &[10, 20, 30]);

        let deep =
            image::ImageBuffer::<image::Rgb<u16>, _>::from_pixel(2, 2, image::Rgb([65535u16, 0, 32896]));
        let img =
            decode(&encode(image::DynamicImage::ImageRgb16(deep), image::ImageFormat::Png), 1000).unwrap();
        assert_eq!(&img.data[..3], &[255, 0, 128]);
    }

    #[test]
    fn jpeg_round_trips_approximately() {
        let rgb = image::RgbImage::from_pixel(16, 16, image::Rgb([200, 100, 50]));
        let img =
            decode(&encode(image::DynamicImage::ImageRgb8(rgb), image::ImageFormat::Jpeg), 1000).unwrap();
        assert!(img
            .data
            .chunks(3)
            .all(|p| p[0].abs_diff(200) < 6 && p[1].abs_diff(100) < 6 && p[2].abs_diff(50) < 6));
    }

    #[test]
    fn direct_jpeg_path_gives_the_pixels_image_gives() {
        let rgb = image::RgbImage::from_fn(37, 23, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 11) as u8, ((x * y) % 251) as u8])
        });
        let jpeg = encode(image::DynamicImage::ImageRgb8(rgb), image::ImageFormat::Jpeg);
        let direct = decode_jpeg_rgb(&jpeg, 1000).unwrap().expect("a YCbCr JPEG takes the direct path");
        let via_image = image::load_from_memory(&jpeg).unwrap().into_rgb8();
        assert_eq!((direct.width, direct.height), via_image.dimensions());
        assert_eq!(direct.data, via_image.into_raw());
        assert_eq!(decode(&jpeg, 1000).unwrap(), direct);

        let gray = image::GrayImage::from_fn(9, 5, |x, y| image::Luma([(x * 20 + y) as u8]));
        let jpeg = encode(image::DynamicImage::ImageLuma8(gray), image::ImageFormat::Jpeg);
        assert!(decode_jpeg_rgb(&jpeg, 1000).unwrap().is_none(), "grayscale is left to `image`");
        let img = decode(&jpeg, 1000).unwrap();
        assert!(img.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
        assert!(decode_jpeg_rgb(&jpeg[..20], 1000).is_err() || decode(&jpeg[..20], 1000).is_err());
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        assert!(decode(&[], 1000).is_err());
        assert!(decode(b"definitely not an image", 1000).is_err());
        let rgb = image::RgbImage::from_pixel(64, 64, image::Rgb([1, 2, 3]));
        let jpeg = encode(image::DynamicImage::ImageRgb8(rgb), image::ImageFormat::Jpeg);
        assert!(decode(&jpeg, 100).unwrap_err().contains("max_pixels"));
    }
}
