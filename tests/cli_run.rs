//! `simclr bench` / `run`: determinism from the shell, failures and interrupts as exit codes.

use std::time::{Duration, Instant};

use assert_cmd::Command;

fn simclr() -> Command {
    Command::cargo_bin("simclr").unwrap()
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn bench_json(file: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let out = simclr().arg("bench").arg(file).args(["--json", "--digest"]).args(extra).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn digest_is_the_same_for_1_2_and_8_threads() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "p.yaml",
        "name: p\nseed: 5\nstages:\n  - { id: data, kind: synthetic_shapes, count: 300, size: 24, shuffle: true }\n  - { id: views, kind: views }\n  - { id: pass, kind: identity }\n",
    );
    let one = bench_json(&file, &["--threads", "1"]);
    assert_eq!(one["samples"], 300);
    for t in ["2", "8"] {
        let other = bench_json(&file, &["--threads", t]);
        assert_eq!(one["digest"], other["digest"], "threads {t}");
    }
    let fused_off = bench_json(&file, &["--threads", "2", "--set", "fuse=false"]);
    assert_eq!(one["digest"], fused_off["digest"]);
    let reseeded = bench_json(&file, &["--threads", "2", "--seed", "6"]);
    assert_ne!(one["digest"], reseeded["digest"]);
    // The JSON carries the documented keys.
    for key in ["samples", "seconds", "samples_per_s", "stages"] {
        assert!(one.get(key).is_some(), "missing {key}");
    }
    for key in ["id", "kind", "items", "busy_s", "starved_s", "blocked_s"] {
        assert!(one["stages"][0].get(key).is_some(), "missing stages[].{key}");
    }
}

#[test]
fn a_stage_failing_on_sample_1000_exits_1_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "f.yaml",
        "name: f\nstages:\n  - { id: data, kind: counter, count: 100000000 }\n  - { id: boom, kind: fail, at: 1000 }\n  - { id: sink, kind: null }\n",
    );
    let t = Instant::now();
    let out = simclr().arg("run").arg(&file).arg("--out").arg(dir.path().join("run")).output().unwrap();
    eprintln!("failed run returned after {:?}", t.elapsed());
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stage 'boom'") && err.contains("sample 1000"), "{err}");
}

#[test]
fn a_run_whose_epochs_have_no_batch_is_refused_naming_the_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "big.yaml",
        "name: big\nstages:\n  - { id: data, kind: synthetic_shapes, count: 64, size: 16 }\n  - { id: views, kind: views, count: 2 }\n  - { id: tensor, kind: to_tensor }\n  - { id: batch, kind: batch, batch_size: 1000 }\n  - { id: train, kind: simclr_train, width: 0.0625, epochs: 1, warmup_epochs: 0 }\n",
    );
    let run_dir = dir.path().join("run");
    let out = simclr().arg("run").arg(&file).arg("--out").arg(&run_dir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for want in ["stage 'batch'", "64 samples", "`batch_size: 1000`", "drop_last", "'train'"] {
        assert!(err.contains(want), "missing {want:?} in {err}");
    }
    assert!(!run_dir.join("encoder.safetensors").exists() && !run_dir.join("results.json").exists());
    // Keeping the partial batch makes it a real (one-step) run.
    let file = write(
        dir.path(),
        "big.yaml",
        &std::fs::read_to_string(&file)
            .unwrap()
            .replace("batch_size: 1000", "batch_size: 1000, drop_last: false"),
    );
    let out = simclr().arg("run").arg(&file).arg("--out").arg(dir.path().join("run2")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn output_to_a_pipe_has_no_escape_codes() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "p.yaml",
        "name: p\nstages:\n  - { id: data, kind: counter, count: 10 }\n  - { id: sink, kind: null }\n",
    );
    let out = simclr().arg("run").arg(&file).arg("--out").arg(dir.path().join("run")).output().unwrap();
    assert!(out.status.success());
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // A pipeline without images warns that it has no views to draw: a coloured WARN on a terminal.
    assert!(stderr.contains("WARN"), "{stderr}");
    assert!(!stdout.contains('\x1b') && !stderr.contains('\x1b'), "{stdout:?}\n{stderr:?}");
}

/// Starts an endless run, sends `signal` once it is running, and returns its exit status and
/// stderr.
fn stop_with(signal: &str) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "long.yaml",
        "name: long\nstages:\n  - { id: data, kind: counter, count: 100000000000 }\n  - { id: sink, kind: null }\n",
    );
    let bin = assert_cmd::cargo::cargo_bin("simclr");
    let err_path = dir.path().join("stderr.txt");
    let mut child = std::process::Command::new(bin)
        .arg("run")
        .arg(&file)
        .arg("--out")
        .arg(dir.path().join("run"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    // Wait until the run has started (its signal handler is installed before the run
    // directory is written): a signal that arrives earlier may be ignored, e.g. when the test
    // itself runs in a background job, where SIGINT starts out ignored.
    let started = dir.path().join("run").join("pipeline.yaml");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !started.exists() {
        assert!(Instant::now() < deadline, "the run never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let _ = std::process::Command::new("kill").args([signal, &child.id().to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the run did not stop after {signal}");
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, std::fs::read_to_string(&err_path).unwrap_or_default())
}

#[test]
fn ctrl_c_exits_130() {
    let (status, err) = stop_with("-INT");
    assert_eq!(status.code(), Some(130), "{err}");
}

#[test]
fn sigterm_stops_cleanly_with_143() {
    let (status, err) = stop_with("-TERM");
    assert_eq!(status.code(), Some(143), "{err}");
    assert!(err.contains("SIGTERM: finishing"), "{err}");
}

#[test]
fn graph_prints_dot_and_mermaid() {
    let dot = simclr().args(["graph", "pipelines/demo.yaml"]).output().unwrap();
    assert!(dot.status.success());
    let text = String::from_utf8_lossy(&dot.stdout);
    assert!(text.starts_with("digraph") && text.contains("->"), "{text}");
    let mm = simclr().args(["graph", "pipelines/demo.yaml", "--format", "mermaid"]).output().unwrap();
    assert!(String::from_utf8_lossy(&mm.stdout).starts_with("flowchart"));
}

/// The run directory's `pipeline.yaml` is YAML: the resolved pipeline (overrides applied,
/// defaults written out, paths absolute) under a header, and running it elsewhere gives the
/// same encoder, byte for byte.
#[test]
fn the_resolved_pipeline_is_yaml_and_reproduces_the_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let file = data.join("tiny.yaml");
    std::fs::write(
        &file,
        "name: tiny\nseed: 5\nstages:\n  - { id: data, kind: synthetic_shapes, count: 32, size: 16, shuffle: true }\n  - { id: views, kind: views, count: 2 }\n  - { id: crop, kind: random_resized_crop, size: 16 }\n  - { id: color, kind: color_distort }\n  - { id: tensor, kind: to_tensor }\n  - { id: batch, kind: batch, batch_size: 16 }\n  - { id: train, kind: simclr_train, width: 0.0625, epochs: 1, warmup_epochs: 0, checkpoint_every: 0 }\n",
    )
    .unwrap();
    let first = dir.path().join("run1");
    let out = simclr()
        .arg("run")
        .arg(&file)
        .args(["--set", "crop.scale=[0.3, 1.0]"])
        .arg("--out")
        .arg(&first)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(first.join("pipeline.yaml")).unwrap();
    assert!(text.starts_with("# The pipeline this run ran, resolved: "), "{text}");
    assert!(text.contains("\nstages:\n  - { id: data, kind: synthetic_shapes, "), "{text}");
    assert!(!text.trim_start().starts_with('{'), "{text}");
    let doc = simclr_core::yaml::parse(&text).unwrap().value.to_json();
    let crop = doc["stages"].as_array().unwrap().iter().find(|s| s["id"] == "crop").unwrap();
    assert_eq!(crop["scale"], serde_json::json!([0.3, 1.0]), "the override is applied");
    assert_eq!(crop["ratio"], serde_json::json!([0.75, 1.3333334]), "defaults are written out");
    assert_eq!(doc["seed"], 5);
    // Run it again from the run directory (another working directory, another place).
    let second = dir.path().join("run2");
    let out = simclr()
        .current_dir(&first)
        .arg("run")
        .arg("pipeline.yaml")
        .arg("--out")
        .arg(&second)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let a = std::fs::read(first.join("encoder.safetensors")).unwrap();
    let b = std::fs::read(second.join("encoder.safetensors")).unwrap();
    assert!(a == b, "the encoders differ");
    // And its own resolved pipeline is the same document.
    let again =
        simclr_core::yaml::parse(&std::fs::read_to_string(second.join("pipeline.yaml")).unwrap()).unwrap();
    assert_eq!(again.value.to_json(), doc);
}
