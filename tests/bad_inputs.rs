//! A corpus of broken and unusual files, made at test time: `on_error: skip` runs to the end
//! naming each bad file; `on_error: fail` stops with exit 1 naming the first.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use assert_cmd::Command;

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A PNG whose header claims 100000 x 100000 pixels (a decompression bomb's shape).
fn png_bomb() -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend(100_000u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    out.extend(13u32.to_be_bytes());
    out.extend(&ihdr);
    out.extend(crc32(&ihdr).to_be_bytes());
    let mut idat = b"IDAT".to_vec();
    idat.extend([0x78, 0x9c, 0, 0, 0, 0]);
    out.extend(6u32.to_be_bytes());
    out.extend(&idat);
    out.extend(crc32(&idat).to_be_bytes());
    out
}

fn encode(img: image::DynamicImage, fmt: image::ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, fmt).unwrap();
    out.into_inner()
}

fn gradient(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8]))
}

/// Writes the corpus; returns the names that must be reported as bad.
fn corpus(dir: &Path) -> Vec<String> {
    let good = encode(image::DynamicImage::ImageRgb8(gradient(64, 48)), image::ImageFormat::Jpeg);
    std::fs::write(dir.join("good.jpg"), &good).unwrap();
    // Unusual but valid: grayscale, RGBA, 16-bit PNG, CMYK JPEG.
    let gray =
        image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(40, 30, |x, _| image::Luma([x as u8 * 6])));
    std::fs::write(dir.join("gray.png"), encode(gray, image::ImageFormat::Png)).unwrap();
    let rgba =
        image::DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(20, 20, image::Rgba([9, 8, 7, 100])));
    std::fs::write(dir.join("rgba.png"), encode(rgba, image::ImageFormat::Png)).unwrap();
    let deep =
        image::ImageBuffer::<image::Rgb<u16>, _>::from_pixel(20, 20, image::Rgb([1000u16, 40000, 65535]));
    std::fs::write(
        dir.join("deep16.png"),
        encode(image::DynamicImage::ImageRgb16(deep), image::ImageFormat::Png),
    )
    .unwrap();
    let mut cmyk = Vec::new();
    let pixels: Vec<u8> = (0..32 * 32).flat_map(|i| [(i % 255) as u8, 40, 80, 10]).collect();
    jpeg_encoder::Encoder::new(&mut cmyk, 90).encode(&pixels, 32, 32, jpeg_encoder::ColorType::Cmyk).unwrap();
    std::fs::write(dir.join("cmyk.jpg"), &cmyk).unwrap();
    // A valid file with a name that is not UTF-8.
    use std::os::unix::ffi::OsStrExt;
    std::fs::write(dir.join(std::ffi::OsStr::from_bytes(b"latin1-\xe9t\xe9.jpg")), &good).unwrap();

    // Bad ones.
    std::fs::write(dir.join("truncated.jpg"), &good[..good.len() / 3]).unwrap();
    std::fs::write(dir.join("empty.jpg"), b"").unwrap();
    let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(dir.join("noise.jpg"), noise).unwrap();
    std::fs::write(dir.join("bomb.png"), png_bomb()).unwrap();
    // Unreadable even for root: a link to nowhere.
    std::os::unix::fs::symlink(dir.join("does-not-exist"), dir.join("dangling.jpg")).unwrap();
    ["truncated.jpg", "empty.jpg", "noise.jpg", "bomb.png", "dangling.jpg"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn pipeline(dir: &Path, data: &Path, on_error: &str) -> PathBuf {
    let p = dir.join(format!("bad-{on_error}.yaml"));
    std::fs::write(
        &p,
        format!(
            "name: bad\nstages:\n  - {{ id: data, kind: image_folder, path: {}, on_error: {on_error} }}\n  - {{ id: decode, kind: decode }}\n  - {{ id: views, kind: views }}\n  - {{ id: sink, kind: null }}\n",
            data.display()
        ),
    )
    .unwrap();
    p
}

#[test]
fn skip_names_every_bad_file_and_fail_stops_on_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("images");
    std::fs::create_dir(&data).unwrap();
    let bad = corpus(&data);

    let out = Command::cargo_bin("simclr")
        .unwrap()
        .arg("run")
        .arg(pipeline(tmp.path(), &data, "skip"))
        .arg("--out")
        .arg(tmp.path().join("run-skip"))
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    for name in &bad {
        assert!(
            stderr.lines().any(|l| l.contains("skipped") && l.contains(name.as_str())),
            "{name} not named:\n{stderr}"
        );
    }
    // 6 good + 5 bad files: the 6 good ones (CMYK, 16-bit, gray, RGBA, non-UTF-8 name) get through.
    assert!(stdout.contains("6 samples") && stdout.contains("5 skipped"), "{stdout}");

    let out = Command::cargo_bin("simclr")
        .unwrap()
        .arg("run")
        .arg(pipeline(tmp.path(), &data, "fail"))
        .arg("--out")
        .arg(tmp.path().join("run-fail"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(bad.iter().any(|n| stderr.contains(n.as_str())), "{stderr}");
}

#[test]
fn a_cifar_file_of_wrong_length_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = vec![0u8; 3073 * 3];
    bytes.truncate(3073 * 2 + 1000);
    std::fs::write(tmp.path().join("data_batch_1.bin"), &bytes).unwrap();
    for (policy, code) in [("skip", 0), ("fail", 1)] {
        let p = tmp.path().join(format!("c-{policy}.yaml"));
        std::fs::write(
            &p,
            format!("name: c\nstages:\n  - {{ id: data, kind: cifar10, path: ., on_error: {policy} }}\n  - {{ id: sink, kind: null }}\n"),
        )
        .unwrap();
        let out = Command::cargo_bin("simclr")
            .unwrap()
            .arg("run")
            .arg(&p)
            .arg("--out")
            .arg(tmp.path().join(policy))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(code), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("data_batch_1.bin"));
    }
}
