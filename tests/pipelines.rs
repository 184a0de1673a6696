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
    std::fs::write(cifar.join("data_batch_1.bin"), &bytes).unwrap();
    std::fs::write(cifar.join("test_batch.bin"), bytes).unwrap();
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

/// `--set ID.path=...` for every `image_folder` and `cifar10` source of `file`.
fn fixture_sets(file: &Path, jpeg: &Path, cifar: &Path) -> Vec<String> {
    let spec = simclr_core::spec::load(file, &[]).unwrap();
    spec.stages
        .iter()
        .filter_map(|s| match s.kind.value.as_str() {
            "image_folder" => Some(format!("{}.path={}", s.id.value, jpeg.display())),
            "cifar10" => Some(format!("{}.path={}", s.id.value, cifar.display())),
            // The GPU benchmarks (scripts/gpu-check.sh) train on `cuda`; here on the CPU.
            "simclr_train" if s.config.value.get("device").is_some() => {
                Some(format!("{}.device=cpu", s.id.value))
            }
            _ => None,
        })
        .collect()
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
        // Point every file-based source at the fixtures.
        let sets = fixture_sets(&file, &jpeg, &cifar);
        let mut validate = Command::cargo_bin("simclr").unwrap();
        validate.arg("validate").arg(&file).args(sets.iter().flat_map(|s| ["--set", s.as_str()]));
        validate.assert().success();
        let one = digest(&file, &sets, "1");
        assert_eq!(one, digest(&file, &sets, "2"), "{}", file.display());
    }
}

/// The paper-scale pipelines run end to end (training, baselines, linear evaluation) on the
/// fixtures, shrunk by overrides to a few seconds.
#[test]
fn cifar10_and_imagenet_pipelines_run_on_tiny_fixtures() {
    let tmp = tempfile::tempdir().unwrap();
    let (jpeg, cifar) = fixtures(tmp.path());
    let tiny = [
        "train.backbone=resnet18",
        "train.width=0.0625",
        "train.epochs=1",
        "train.warmup_epochs=0",
        "batch.batch_size=8",
    ];
    for (file, extra) in [
        (
            "pipelines/cifar10.yaml",
            &[
                "supervised.backbone=resnet18",
                "supervised.width=0.0625",
                "supervised.epochs=1",
                "sup_batch.batch_size=8",
                "train.monitor.every=1",
                "fine_tune.epochs=1",
                "fine_tune.label_fraction=0.5",
                "ft_batch.batch_size=8",
            ][..],
        ),
        ("pipelines/imagenet.yaml", &["crop.size=32", "linear.transform.size=32"][..]),
    ] {
        let out = tmp.path().join(file.replace(['/', '.'], "_"));
        let mut sets = fixture_sets(Path::new(file), &jpeg, &cifar);
        sets.extend(tiny.iter().chain(extra).map(|s| s.to_string()));
        let run = Command::cargo_bin("simclr")
            .unwrap()
            .arg("run")
            .arg(file)
            .arg("--out")
            .arg(&out)
            .args(sets.iter().flat_map(|s| ["--set", s.as_str()]))
            .output()
            .unwrap();
        assert!(run.status.success(), "{file}: {}", String::from_utf8_lossy(&run.stderr));
        let results: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
        for method in ["simclr", "random_init"] {
            let top1 = results[method]["linear_top1"].as_f64().unwrap_or(-1.0);
            assert!((0.0..=100.0).contains(&top1), "{file}: {method} {results}");
        }
        assert!(out.join("report.md").exists() && out.join("encoder.safetensors").exists());
        // TensorBoard events: the trainer's curves and the final results, each a file of tb/
        // (python/tests/test_tensorboard.py reads them with TensorBoard's own reader).
        let events: Vec<Vec<u8>> = std::fs::read_dir(out.join("tb"))
            .unwrap()
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        let has = |tag: &str| events.iter().any(|b| b.windows(tag.len()).any(|w| w == tag.as_bytes()));
        assert!(events.len() >= 2 && has("train/loss") && has("results/simclr/linear_top1"), "{file}");
        if file.contains("cifar10") {
            let ft = results["simclr"]["finetune_50pct_top1"].as_f64().unwrap_or(-1.0);
            assert!((0.0..=100.0).contains(&ft), "{results}");
        }
    }
}

/// The semi-supervised protocol end to end on a tiny run: fine-tuning, training from scratch
/// (fine-tuning the random-init encoder) and the linear probe use one labeled subset, report
/// under the paper's keys, and the report names the data by its `name:`.
#[test]
fn the_semi_supervised_protocol_shares_one_subset_and_names_the_data() {
    let tmp = tempfile::tempdir().unwrap();
    let shapes = |id: &str, rest: &str| {
        format!("  - {{ id: {id}, kind: synthetic_shapes, name: blobs, count: 48, size: 16, classes: 3{rest} }}\n")
    };
    let chain = |p: &str| {
        format!(
            "  - {{ id: {p}_crop, kind: random_resized_crop, size: 16 }}\n  - {{ id: {p}_tensor, kind: to_tensor }}\n  - {{ id: {p}_batch, kind: batch, batch_size: 8, drop_last: false }}\n"
        )
    };
    let mut src = String::from("name: semi\nseed: 9\nstages:\n");
    src += &shapes("data", ", shuffle: true");
    src += "  - { id: views, kind: views, count: 2 }\n  - { id: crop, kind: random_resized_crop, size: 16 }\n  - { id: tensor, kind: to_tensor }\n  - { id: batch, kind: batch, batch_size: 8 }\n";
    src += "  - { id: train, kind: simclr_train, width: 0.0625, epochs: 1, warmup_epochs: 0, checkpoint_every: 0 }\n";
    src += "  - { id: random, kind: random_init, like: train }\n";
    src += &shapes("ft_data", ", shuffle: true");
    src += &chain("ft");
    src += "  - { id: fine_tune, kind: fine_tune, encoder: train, classes: 3, label_fraction: 0.25, test_data: eval_test, epochs: 1 }\n";
    src += &shapes("sc_data", ", shuffle: true");
    src += &chain("sc");
    src += "  - { id: scratch, kind: fine_tune, encoder: random, classes: 3, label_fraction: 0.25, test_data: eval_test, epochs: 1 }\n";
    src += &shapes("eval_train", ", split: train");
    src += &shapes("eval_test", ", split: test");
    src += "  - { id: probe, kind: linear_eval, encoders: [train], train_data: eval_train, test_data: eval_test, label_fraction: 0.25, k: 3 }\n";
    let file = tmp.path().join("semi.yaml");
    std::fs::write(&file, src).unwrap();
    let out = tmp.path().join("run");
    let run =
        Command::cargo_bin("simclr").unwrap().arg("run").arg(&file).arg("--out").arg(&out).output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    for (method, key) in [
        ("simclr", "finetune_25pct_top1"),
        ("simclr", "finetune_25pct_train_top1"),
        ("simclr", "linear_25pct_top1"),
        ("supervised", "scratch_25pct_top1"),
    ] {
        let v = r[method][key].as_f64().unwrap_or(-1.0);
        assert!((0.0..=100.0).contains(&v), "{method}.{key}: {r}");
    }
    // One subset: 25% of 48 images over 3 classes, the same count in all three.
    let ft = &r["finetunes"];
    let probe = r["evals"].as_array().unwrap().iter().find(|e| e["stage"] == "probe").unwrap();
    assert_eq!(ft[0]["labeled"], ft[1]["labeled"], "{ft}");
    assert_eq!(ft[0]["labeled"], probe["train_size"], "{r}");
    let n = probe["train_size"].as_u64().unwrap();
    assert!((9..=15).contains(&n), "{n}");
    assert_eq!(probe["dataset"], "blobs");
    assert_eq!(ft[0]["dataset"], "blobs");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("blobs, 25% labels"), "{report}");
    assert!(
        report.contains("| SimCLR (ours), fine-tuned |") && report.contains("| Supervised, from scratch |"),
        "{report}"
    );
}
