//! The byte reader the JPEG decoder pulls its input through.
//!
//! `image` turns on zune-core's `std` feature, and with it `ZCursor` reads through the
//! `BufRead + Seek` path: every 4-byte refill of the Huffman bit buffer becomes an out-of-line
//! `memcpy`, and every single-byte read asks `fill_buf` first. This reader is the same cursor
//! over a byte slice with every method inlined, so the decoder's hot loop sees plain loads:
//! decoding the anchor JPEGs takes 0.54 ms instead of 0.62 ms per image (BENCHMARKS.md).
//! The position semantics are those of `ZCursor` under `std` (a read at the end yields zero
//! bytes and does not move; a failed exact read does not move), so the decoder behaves the same
//! on every input, corrupt ones included (tested below against `ZCursor`).

use zune_core::bytestream::{ZByteIoError, ZByteReaderTrait, ZSeekFrom};

/// A cursor over an in-memory JPEG.
pub(crate) struct SliceReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> SliceReader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }
}

impl ZByteReaderTrait for SliceReader<'_> {
    #[inline(always)]
    fn read_byte_no_error(&mut self) -> u8 {
        match self.bytes.get(self.pos) {
            Some(&b) => {
                self.pos += 1;
                b
            }
            None => 0,
        }
    }

    #[inline(always)]
    fn read_exact_bytes(&mut self, buf: &mut [u8]) -> Result<(), ZByteIoError> {
        let end = self.pos.saturating_add(buf.len());
        match self.bytes.get(self.pos..end) {
            Some(s) => {
                buf.copy_from_slice(s);
                self.pos = end;
                Ok(())
            }
            None => Err(ZByteIoError::NotEnoughBytes(self.bytes.len().saturating_sub(self.pos), buf.len())),
        }
    }

    #[inline(always)]
    fn read_bytes(&mut self, buf: &mut [u8]) -> Result<usize, ZByteIoError> {
        let n = self.peek_bytes(buf)?;
        self.pos = self.pos.saturating_add(n);
        Ok(n)
    }

    #[inline(always)]
    fn peek_bytes(&mut self, buf: &mut [u8]) -> Result<usize, ZByteIoError> {
        let start = self.pos.min(self.bytes.len());
        let end = self.pos.saturating_add(buf.len()).min(self.bytes.len());
        let s = self.bytes.get(start..end).unwrap_or(&[]);
        let n = s.len();
        if let Some(dst) = buf.get_mut(..n) {
            dst.copy_from_slice(s);
        }
        Ok(n)
    }

    #[inline(always)]
    fn peek_exact_bytes(&mut self, buf: &mut [u8]) -> Result<(), ZByteIoError> {
        let start = self.pos;
        self.read_exact_bytes(buf)?;
        self.pos = start;
        Ok(())
    }

    #[inline(always)]
    fn z_seek(&mut self, from: ZSeekFrom) -> Result<u64, ZByteIoError> {
        let (base, offset) = match from {
            ZSeekFrom::Start(n) => {
                self.pos = usize::try_from(n).map_err(ZByteIoError::TryFromIntError)?;
                return Ok(n);
            }
            ZSeekFrom::End(n) => (self.bytes.len(), n),
            ZSeekFrom::Current(n) => (self.pos, n),
        };
        let offset = isize::try_from(offset).map_err(ZByteIoError::TryFromIntError)?;
        match base.checked_add_signed(offset) {
            Some(p) => {
                self.pos = p;
                Ok(p as u64)
            }
            None => Err(ZByteIoError::SeekError("cannot seek before the start of the file")),
        }
    }

    #[inline(always)]
    fn is_eof(&mut self) -> Result<bool, ZByteIoError> {
        Ok(self.pos >= self.bytes.len())
    }

    #[inline(always)]
    fn z_position(&mut self) -> Result<u64, ZByteIoError> {
        Ok(self.pos as u64)
    }

    fn read_remaining(&mut self, sink: &mut Vec<u8>) -> Result<usize, ZByteIoError> {
        let s = self.bytes.get(self.pos..).unwrap_or(&[]);
        sink.extend_from_slice(s);
        self.pos = self.pos.saturating_add(s.len());
        Ok(s.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use zune_core::bytestream::ZCursor;
    use zune_core::colorspace::ColorSpace;
    use zune_core::options::DecoderOptions;

    /// Decodes with the given reader and the options `decode` uses: the pixels, or that it failed.
    fn decode_with<R: ZByteReaderTrait>(reader: R) -> Option<Vec<u8>> {
        let options = DecoderOptions::default()
            .set_strict_mode(false)
            .set_max_width(4096)
            .set_max_height(4096)
            .jpeg_set_out_colorspace(ColorSpace::RGB);
        let mut d = zune_jpeg::JpegDecoder::new_with_options(reader, options);
        d.decode_headers().ok()?;
        let mut out = vec![0u8; d.output_buffer_size()?];
        d.decode_into(&mut out).ok()?;
        Some(out)
    }

    fn sample_jpeg(w: u32, h: u32, quality: u8) -> Vec<u8> {
        let rgb = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 13 + y) as u8, (y * 7) as u8, ((x * y) % 253) as u8])
        });
        let mut out = Vec::new();
        let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
        image::DynamicImage::ImageRgb8(rgb).write_with_encoder(enc).unwrap();
        out
    }

    #[test]
    fn reads_like_zcursor() {
        let data: Vec<u8> = (0..10).collect();
        let mut a = SliceReader::new(&data);
        let mut b = ZCursor::new(&data[..]);
        let mut four = [0u8; 4];
        assert_eq!(a.read_exact_bytes(&mut four).is_ok(), b.read_exact_bytes(&mut [0u8; 4]).is_ok());
        assert_eq!(four, [0, 1, 2, 3]);
        let mut big = [0u8; 16];
        assert!(a.read_exact_bytes(&mut big).is_err(), "only 6 bytes are left");
        assert!(b.read_exact_bytes(&mut [0u8; 16]).is_err());
        assert_eq!(a.z_position().unwrap(), b.z_position().unwrap(), "a failed read does not move");
        let (mut x, mut y) = ([0u8; 8], [0u8; 8]);
        assert_eq!(a.peek_bytes(&mut x).unwrap(), b.peek_bytes(&mut y).unwrap());
        assert_eq!(x, y);
        for _ in 0..8 {
            assert_eq!(a.read_byte_no_error(), b.read_byte_no_error());
        }
        assert_eq!(a.is_eof().unwrap(), b.is_eof().unwrap());
        assert_eq!(a.z_position().unwrap(), b.z_position().unwrap(), "reads at the end do not advance");
        assert_eq!(a.z_seek(ZSeekFrom::End(-3)).unwrap(), b.z_seek(ZSeekFrom::End(-3)).unwrap());
        let (mut ra, mut rb) = (Vec::new(), Vec::new());
        assert_eq!(a.read_remaining(&mut ra).unwrap(), b.read_remaining(&mut rb).unwrap());
        assert_eq!(ra, rb);
        assert!(a.z_seek(ZSeekFrom::Current(-100)).is_err());
    }

    #[test]
    fn decodes_the_bits_zcursor_decodes() {
        for (w, h, q) in [(1, 1, 90), (37, 23, 75), (64, 48, 95), (129, 67, 40)] {
            let jpeg = sample_jpeg(w, h, q);
            let ours = decode_with(SliceReader::new(&jpeg));
            assert!(ours.is_some(), "{w}x{h} q{q} decodes");
            assert_eq!(ours, decode_with(ZCursor::new(&jpeg[..])), "{w}x{h} q{q}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Corrupt files (bytes overwritten, the file cut short) fail or decode exactly as through
        /// `ZCursor`, and never panic.
        #[test]
        fn corrupt_jpegs_behave_as_through_zcursor(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let mut jpeg = sample_jpeg(40, 24, 80);
            for (at, byte) in &edits {
                let i = at.index(jpeg.len());
                jpeg[i] = *byte;
            }
            if truncate {
                jpeg.truncate(cut.index(jpeg.len()));
            }
            prop_assert_eq!(decode_with(SliceReader::new(&jpeg)), decode_with(ZCursor::new(&jpeg[..])));
        }
    }
}
