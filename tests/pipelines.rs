//! Every shipped pipeline validates, and its data pipeline gives the same `--digest` with 1 and
//! 2 threads, on small fixtures written here in the real formats.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use assert_cmd::Command;

/// A folder of JPEGs in two class folders, and a CIFAR-10 binary file.
fn fixtures(dir: &Path) -> (PathBuf, PathBuf) {
    let jpeg = dir.join("jpeg");
    for (i, class) in ["a", "b"].iter().enumerate() {
        std::fs::create_dir_all(jpeg.join(class)).unwrap();
        for k in 0..6u32 {
            let (w, h) = (60 + 13 * k, 90 - 7 * k);
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([(x * 3 + k * 20) as u8, (y * 2 + i as u32 * 90) as u8, ((x ^ y) * 5) as u8])
            });
            let mut out = Cursor::new(Vec::new());
            image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
            std::fs::write(jpeg.join(class).join(format!("{k}.jpg")), out.into_inner()).unwrap();
        }
    }
    let cifar = dir.join("cifar");
    std::fs::create_dir_all(&cifar).unwrap();
    let mut bytes = Vec::new();
    for r in 0..40u32 {
        bytes.push((r % 10) as u8);
        bytes.extend((0..3072u32).map(|i| (i.wrapping_mul(31) ^ r.wrapping_mul(97)) as u8));
    }
    std::fs::write(cifar.join("data_batch_1.bin"), bytes).unwrap();
    (jpeg, cifar)
}

fn digest(file: &Path, sets: &[String], threads: &str) -> String {
    let out = Command::cargo_bin("simclr")
        .unwrap()
        .arg("bench")
        .arg(file)
        .args(["--json", "--digest", "--samples", "24", "--threads", threads, "--train-steps", "0"])
        .args(sets.iter().flat_map(|s| ["--set", s.as_str()]))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}: {}", file.display(), String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["samples"].as_u64().unwrap() > 0);
    v["digest"].as_str().unwrap().to_string()
}

#[test]
fn shipped_pipelines_validate_and_are_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let (jpeg, cifar) = fixtures(tmp.path());
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in ["pipelines", "pipelines/bench"] {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "yaml") {
                files.push(e.path());
            }
        }
    }
    assert!(files.len() >= 4, "{files:?}");
    for file in files {
        // Plugin pipelines need their libraries built first: tests/plugins.rs covers them.
        if file.file_name().is_some_and(|n| n.to_string_lossy().starts_with("plugin-")) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        // Point file-based sources (stage id `data`) at the fixtures.
        let sets: Vec<String> = if text.contains("kind: image_folder") {
            vec![format!("data.path={}", jpeg.display())]
        } else if text.contains("kind: cifar10") {
            vec![format!("data.path={}", cifar.display())]
        } else {
            vec![]
        };
        let mut validate = Command::cargo_bin("simclr").unwrap();
        validate.arg("validate").arg(&file).args(sets.iter().flat_map(|s| ["--set", s.as_str()]));
        validate.assert().success();
        let one = digest(&file, &sets, "1");
        assert_eq!(one, digest(&file, &sets, "2"), "{}", file.display());
    }
}
