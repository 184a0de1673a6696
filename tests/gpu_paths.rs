//! The device paths from the shell: `simclr selftest`, a backend left out of the build or a
//! device that is not there (fast, clear errors), and with the `wgpu` feature the whole GPU code
//! path on a software Vulkan device (lavapipe): selftest plus a pipeline trained and evaluated
//! on it. Without an adapter the wgpu tests say so and pass, unless `SIMCLR_REQUIRE_WGPU=1`
//! (CI sets it after installing lavapipe).

use std::time::{Duration, Instant};

use assert_cmd::Command;

fn simclr() -> Command {
    let mut c = Command::cargo_bin("simclr").unwrap();
    // Each candidate kernel is compiled by LLVM inside lavapipe: tune as little as possible.
    c.env("CUBECL_AUTOTUNE_LEVEL", "minimal");
    c
}

fn selftest(device: &str) -> (std::process::Output, Duration) {
    let t = Instant::now();
    let out = simclr().args(["selftest", "--device", device, "--json", "--steps", "2"]).output().unwrap();
    (out, t.elapsed())
}

#[test]
fn the_cpu_agrees_with_itself_exactly() {
    let (out, _) = selftest("cpu");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((r["ok"].as_bool(), r["max_rel_diff"].as_f64()), (Some(true), Some(0.0)), "{r}");
    assert_eq!(r["steps"], 2);
    assert_eq!(r["device"], "cpu");
    assert!(r["per_step"][1]["loss_cpu"].as_f64().is_some_and(|l| l > 0.0), "{r}");
}

/// `--device cuda` here (no NVIDIA driver, or a build without the feature): exit 1 within
/// seconds, naming CUDA and what is missing, no panic. On a machine with a working GPU the
/// selftest passes instead, and that is checked too.
#[test]
fn cuda_without_a_gpu_fails_fast_and_names_cuda() {
    let (out, took) = selftest("cuda");
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["ok"], true, "{r}");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(err.contains("CUDA") && !err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{err}");
    if cfg!(feature = "cuda") {
        assert!(err.contains("driver") || err.contains("device") || err.contains("toolkit"), "{err}");
    } else {
        assert!(err.contains("--features cuda"), "{err}");
    }
}

#[test]
fn an_unknown_device_is_a_usage_error() {
    let (out, _) = selftest("tpu:0");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wgpu:N"));
}

/// The wgpu selftest's report, or `None` (after saying why) when this machine has no adapter and
/// CI did not ask for one.
fn wgpu_report() -> Option<serde_json::Value> {
    let (out, took) = selftest("wgpu");
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("wgpu selftest: {took:?}\n{err}");
    if !cfg!(feature = "wgpu") || err.contains("no Vulkan adapter") {
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            std::env::var_os("SIMCLR_REQUIRE_WGPU").is_none(),
            "no wgpu adapter, but CI requires one: {err}"
        );
        eprintln!("skipped: no wgpu adapter or built without `wgpu`");
        return None;
    }
    assert!(out.status.success(), "{err}\n{}", String::from_utf8_lossy(&out.stdout));
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

/// The GPU code path (cubecl kernels, fusion, autodiff, BatchNorm reductions, the optimizer)
/// agrees with the CPU, and a pipeline trains and evaluates on it: its first losses are the
/// CPU run's (same data, same initial weights) up to f32 rounding.
#[test]
fn wgpu_selftest_then_a_pipeline_on_wgpu() {
    let Some(r) = wgpu_report() else { return };
    assert_eq!((r["ok"].as_bool(), r["backend"].as_str()), (Some(true), Some("wgpu")), "{r}");
    assert!(r["max_rel_diff"].as_f64().is_some_and(|d| d < 2e-2), "{r}");
    assert_eq!(r["initial_weights_equal"], true);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    let shapes = |id: &str, split: &str| {
        format!("  - {{ id: {id}, kind: synthetic_shapes, name: s, count: 32, size: 16, classes: 3, split: {split} }}\n")
    };
    let mut src = String::from("name: wgpu-e2e\nseed: 3\nstages:\n");
    src += &shapes("data", "train");
    src +=
        "  - { id: views, kind: views, count: 2 }\n  - { id: crop, kind: random_resized_crop, size: 16 }\n";
    src += "  - { id: tensor, kind: to_tensor }\n  - { id: batch, kind: batch, batch_size: 8 }\n";
    src += "  - { id: train, kind: simclr_train, width: 0.125, epochs: 1, warmup_epochs: 0, checkpoint_every: 0, device: cpu }\n";
    src += &shapes("eval_train", "train");
    src += &shapes("eval_test", "test");
    src += "  - { id: linear, kind: linear_eval, encoders: [train], train_data: eval_train, test_data: eval_test }\n";
    std::fs::write(&file, src).unwrap();
    let run = |device: &str| {
        let out_dir = dir.path().join(device.replace(':', "_"));
        let out = simclr()
            .arg("run")
            .arg(&file)
            .arg("--out")
            .arg(&out_dir)
            .args(["--set", &format!("train.device={device}")])
            .output()
            .unwrap();
        assert!(out.status.success(), "{device}: {}", String::from_utf8_lossy(&out.stderr));
        let results: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out_dir.join("results.json")).unwrap()).unwrap();
        let top1 = results["simclr"]["linear_top1"].as_f64().unwrap_or(-1.0);
        assert!((0.0..=100.0).contains(&top1), "{device}: {results}");
        assert!(out_dir.join("encoder.safetensors").exists());
        let losses: Vec<f64> = std::fs::read_to_string(out_dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["type"] == "step")
            .filter_map(|v| v["loss"].as_f64())
            .collect();
        assert!(!losses.is_empty(), "{device}: no step losses");
        losses
    };
    let cpu = run("cpu");
    let gpu = run("wgpu");
    assert_eq!(cpu.len(), gpu.len());
    let first = (cpu[0] - gpu[0]).abs() / cpu[0];
    assert!(first < 1e-3, "first step loss: cpu {} vs wgpu {}", cpu[0], gpu[0]);
}
