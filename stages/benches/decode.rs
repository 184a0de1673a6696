//! JPEG decoding, three ways, on the same files: our `decode` stage (zune-jpeg through the
//! inlined slice reader, `stages/src/jpeg_reader.rs`), zune-jpeg through its own `ZCursor`
//! (what `decode` did before), and the `image` crate (the usual Rust route, zune-jpeg inside).
//!
//!   cargo bench -p simclr-stages --bench decode
//!   SIMCLR_BENCH_JPEGS=~/.cache/simclr-anchor-data/jpeg cargo bench -p simclr-stages --bench decode
//!
//! Without `SIMCLR_BENCH_JPEGS` it encodes 24 textured 430 x 430 JPEGs (quality 90) itself.
//! Compare the three lines of one run (ratios), not figures across runs: the machine is shared.

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;

/// Up to 200 JPEGs from the folder in `SIMCLR_BENCH_JPEGS`, or generated ones.
fn jpegs() -> Vec<Vec<u8>> {
    if let Some(dir) = std::env::var_os("SIMCLR_BENCH_JPEGS") {
        let mut paths: Vec<_> = std::fs::read_dir(Path::new(&dir))
            .unwrap_or_else(|e| panic!("SIMCLR_BENCH_JPEGS={}: {e}", dir.to_string_lossy()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|x| x.eq_ignore_ascii_case("jpg") || x.eq_ignore_ascii_case("jpeg"))
            })
            .collect();
        paths.sort();
        paths.truncate(200);
        assert!(!paths.is_empty(), "no .jpg files in {}", dir.to_string_lossy());
        return paths
            .iter()
            .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
            .collect();
    }
    (0..24u32)
        .map(|k| {
            let img = image::RgbImage::from_fn(430, 430, |x, y| {
                let h = (x.wrapping_mul(2654435761) ^ y.wrapping_mul(40503) ^ k.wrapping_mul(97)) >> 7;
                let wave =
                    ((x as f32 * 0.05 + k as f32).sin() * 60.0 + (y as f32 * 0.03).cos() * 60.0) as i32;
                image::Rgb([
                    (128 + wave + (h & 31) as i32).clamp(0, 255) as u8,
                    (x * 255 / 430) as u8,
                    (96 + (h >> 5 & 63) as i32 - wave / 2).clamp(0, 255) as u8,
                ])
            });
            let mut out = Vec::new();
            let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90);
            image::DynamicImage::ImageRgb8(img).write_with_encoder(enc).expect("encodes");
            out
        })
        .collect()
}

fn zcursor(bytes: &[u8]) -> Vec<u8> {
    let options = DecoderOptions::default()
        .set_strict_mode(false)
        .set_max_width(usize::MAX)
        .set_max_height(usize::MAX)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut d = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    d.decode().expect("decodes")
}

fn bench(c: &mut Criterion) {
    let files = jpegs();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(files.len() as u64));
    g.sample_size(30);
    g.bench_function("simclr decode (slice reader)", |b| {
        b.iter(|| {
            for f in &files {
                black_box(simclr_stages::decode::decode(black_box(f), u64::MAX).expect("decodes"));
            }
        })
    });
    g.bench_function("zune-jpeg via ZCursor", |b| {
        b.iter(|| {
            for f in &files {
                black_box(zcursor(black_box(f)));
            }
        })
    });
    g.bench_function("image::load_from_memory", |b| {
        b.iter(|| {
            for f in &files {
                black_box(image::load_from_memory(black_box(f)).expect("decodes").into_rgb8());
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
