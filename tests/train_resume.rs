//! Training through the real pipeline: it learns on `synthetic_shapes`, is deterministic, and a
//! run stopped (Ctrl-C, SIGTERM, kill -9), mid-epoch or after an epoch, and resumed gives the
//! uninterrupted run's losses and encoder bit for bit.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use simclr_core::driver::{build_chain, Mode};
use simclr_core::{run_chain, run_plan, Plan, RunError, RunOptions, Sample, Sink, StageError};

/// 16 x 16 shapes, mild augmentation, a width-0.125 ResNet-18: ~50 ms a step in debug builds.
fn pipeline(count: u32, epochs: u32) -> String {
    format!(
        "name: learn\nseed: 5\nstages:\n\
         \x20 - {{ id: data, kind: synthetic_shapes, count: {count}, size: 16, classes: 4, shuffle: true }}\n\
         \x20 - {{ id: views, kind: views, count: 2 }}\n\
         \x20 - {{ id: crop, kind: random_resized_crop, size: 16, scale: [0.5, 1.0] }}\n\
         \x20 - {{ id: flip, kind: horizontal_flip }}\n\
         \x20 - {{ id: tensor, kind: to_tensor }}\n\
         \x20 - {{ id: batch, kind: batch, batch_size: 16 }}\n\
         \x20 - id: train\n\
         \x20   kind: simclr_train\n\
         \x20   width: 0.125\n\
         \x20   head: {{ hidden_dim: 32, out_dim: 16 }}\n\
         \x20   loss: {{ reduction: paper, temperature: 0.1 }}\n\
         \x20   optimizer: {{ kind: lars, lr: 4.0, lr_scaling: none }}\n\
         \x20   epochs: {epochs}\n\
         \x20   warmup_epochs: 1\n"
    )
}

fn plan(src: &str) -> Plan {
    let spec = simclr_core::spec::parse(Path::new("learn.yaml"), src, &[]).unwrap();
    let mut registry = simclr_stages::registry();
    simclr_train::register(&mut registry);
    simclr_core::validate(spec, &registry).unwrap()
}

fn options(dir: &Path) -> RunOptions {
    RunOptions { seed: 5, threads: 2, run_dir: Some(dir.to_path_buf()), ..RunOptions::default() }
}

/// The `type` lines of metrics.jsonl as (key, loss, contrast_acc).
fn lines(dir: &Path, kind: &str) -> Vec<(u64, f64, f64)> {
    let key = if kind == "epoch" { "epoch" } else { "step" };
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == kind)
        .map(|v| (v[key].as_u64().unwrap(), v["loss"].as_f64().unwrap(), v["contrast_acc"].as_f64().unwrap()))
        .collect()
}

#[test]
fn training_lowers_the_loss_raises_contrast_acc_and_repeats_exactly() {
    let t = Instant::now();
    let p = plan(&pipeline(128, 5));
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run_plan(&p, &options(a.path()), Mode::Full).unwrap();
    run_plan(&p, &options(b.path()), Mode::Full).unwrap();
    let epochs = lines(a.path(), "epoch");
    assert_eq!(epochs.len(), 5);
    // N = 16 pairs per batch: a network that cannot tell images apart scores ln(2N - 1).
    let chance = 31f64.ln();
    let (first, last) = (epochs[0], epochs[4]);
    eprintln!("epochs (epoch, loss, contrast_acc): {epochs:?}; ln(2N-1) = {chance:.3}; {:?}", t.elapsed());
    assert!(last.1 < 0.5 * chance, "final loss {} not well below ln(2N-1) = {chance}", last.1);
    assert!(last.1 < 0.5 * first.1, "loss fell from {} only to {}", first.1, last.1);
    assert!(last.2 > 0.6 && last.2 > first.2 + 0.3, "contrast_acc {} -> {}", first.2, last.2);
    assert_eq!(lines(a.path(), "step"), lines(b.path(), "step"), "same seed and threads, same losses");
}

/// Passes batches on, and raises the interrupt flag after `after` of them (a Ctrl-C at a known
/// point). With `tell`, passes the runtime's positions on too (as the real sink gets them).
struct StopAfter {
    inner: Box<dyn Sink>,
    after: u32,
    flag: Arc<AtomicBool>,
    tell: bool,
}

impl Sink for StopAfter {
    fn epochs(&self) -> u32 {
        self.inner.epochs()
    }
    fn position(&mut self, epoch: u32, consumed: u64) {
        if self.tell {
            self.inner.position(epoch, consumed);
        }
    }
    fn consume(&mut self, sample: Sample) -> Result<(), StageError> {
        self.inner.consume(sample)?;
        self.after = self.after.saturating_sub(1);
        if self.after == 0 {
            self.flag.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
    fn finish(&mut self) -> Result<(), StageError> {
        self.inner.finish()
    }
    fn interrupted(&mut self) -> Result<(), StageError> {
        self.inner.interrupted()
    }
}

/// Stops a 3-epoch run (4 steps an epoch) after 6 batches, then resumes it: from the end of
/// epoch 0 when the sink is not told positions, else from step 6, half-way through epoch 1.
fn stop_after_6_and_resume(tell: bool) {
    let t = Instant::now();
    // 64 samples, batches of 16: 4 steps an epoch, 3 epochs.
    let p = plan(&pipeline(64, 3));
    let whole = tempfile::tempdir().unwrap();
    run_plan(&p, &options(whole.path()), Mode::Full).unwrap();

    let cut = tempfile::tempdir().unwrap();
    let mut opts = options(cut.path());
    opts.chunk = Some(16); // chunks end with batches: the flag stops right after batch 6
    let chain = p.chains().remove(0);
    let mut stages =
        build_chain(&p, &chain, Mode::Full, Some(cut.path()), &simclr_core::Artifacts::default()).unwrap();
    let inner = std::mem::replace(&mut stages.sink.1, Box::new(simclr_core::driver::Discard));
    stages.sink.1 = Box::new(StopAfter { inner, after: 6, flag: opts.interrupt.clone(), tell });
    assert!(matches!(run_chain(stages, &opts), Err(RunError::Interrupted)));
    let ckpt = simclr_train::checkpoint::Checkpoint::read(cut.path()).unwrap();
    let m = &ckpt.meta;
    if tell {
        assert_eq!((m.epochs_done, m.step), (1, 6), "mid-epoch, at the last trained step");
        let partial = m.partial.as_ref().unwrap();
        assert_eq!((partial.consumed, partial.steps), (32, 2), "2 batches of 16 into epoch 1");
    } else {
        assert_eq!((m.epochs_done, m.step, m.partial.is_none()), (1, 4, true), "the last completed epoch");
    }
    assert!(!cut.path().join("encoder.safetensors").exists());

    opts.interrupt = Arc::new(AtomicBool::new(false));
    opts.resume = true;
    let reports = run_plan(&p, &opts, Mode::Full).unwrap();
    let rest = if tell { 96 } else { 128 };
    assert_eq!(reports[0].1.samples, rest, "only the samples after the checkpoint are read");

    let (want, got) = (lines(whole.path(), "epoch"), lines(cut.path(), "epoch"));
    eprintln!(
        "epoch losses uninterrupted {want:?}\n              resumed       {got:?}\n({:?})",
        t.elapsed()
    );
    assert_eq!(got, want, "epoch lines, bit for bit");
    assert_eq!(lines(cut.path(), "step"), lines(whole.path(), "step"), "step lines, bit for bit");
    let enc = |d: &Path| std::fs::read(d.join("encoder.safetensors")).unwrap();
    assert_eq!(enc(cut.path()), enc(whole.path()), "the same encoder");

    // Finished now: a second resume says so.
    let err = run_plan(&p, &opts, Mode::Full).unwrap_err().to_string();
    assert!(err.contains("already finished its 3 epochs") && err.contains("stage 'train'"), "{err}");
}

#[test]
fn a_run_stopped_in_epoch_1_and_resumed_matches_the_uninterrupted_run() {
    stop_after_6_and_resume(false);
}

#[test]
fn a_run_stopped_mid_epoch_resumes_there_and_matches_the_uninterrupted_run() {
    stop_after_6_and_resume(true);
}

fn simclr() -> std::process::Command {
    std::process::Command::new(assert_cmd::cargo::cargo_bin("simclr"))
}

#[test]
fn ctrl_c_during_training_checkpoints_and_exits_130_and_resume_checks_its_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("learn.yaml");
    std::fs::write(&file, pipeline(64, 50)).unwrap();
    let run = dir.path().join("run");
    let mut child = simclr()
        .args(["run", "--threads", "2", "--out"])
        .arg(&run)
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The first checkpoint appears when epoch 0 ends (~0.2 s of training); 49 epochs remain.
    let ckpt = run.join(simclr_train::checkpoint::FILE);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ckpt.exists() {
        assert!(Instant::now() < deadline, "no checkpoint after the first epoch");
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("--resume"), "{err}");
    // Saved at the last trained step: `consumed` positions into epoch `epochs_done`.
    let meta = simclr_train::checkpoint::Checkpoint::read(&run).unwrap().meta;
    let consumed = meta.partial.as_ref().map_or(0, |p| p.consumed);
    assert!((1..50).contains(&meta.epochs_done), "{meta:?}");
    assert_eq!(meta.step, 4 * u64::from(meta.epochs_done) + consumed / 16, "{meta:?}");

    // Another architecture: refused before anything runs.
    let out = simclr()
        .arg("run")
        .arg(&file)
        .arg("--resume")
        .arg(&run)
        .args(["--set", "train.width=0.25"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("stages.train.width") && err.contains("not the pipeline the run started with"),
        "{err}"
    );
    // A directory without a checkpoint.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::copy(run.join("pipeline.yaml"), empty.join("pipeline.yaml")).unwrap();
    let out = simclr().arg("run").arg(&file).arg("--resume").arg(&empty).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no checkpoint.safetensors") && err.contains("without --resume"), "{err}");
}

/// The checkpoint's metadata once the file exists and holds a mid-epoch position.
fn mid_epoch_meta(run: &Path) -> Option<simclr_train::checkpoint::CheckpointMeta> {
    let meta = simclr_train::checkpoint::Checkpoint::read(run).ok()?.meta;
    meta.partial.as_ref().is_some_and(|p| p.consumed < 64).then_some(meta)
}

/// `kill -9` after a mid-epoch checkpoint (`checkpoint_every_steps`), or SIGTERM at any step;
/// then `--resume`: the encoder and the step losses of the uninterrupted run.
#[test]
fn killed_or_terminated_mid_epoch_then_resumed_gives_the_same_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("learn.yaml");
    // 64 samples in batches of 16: 4 steps an epoch, a checkpoint every 3 steps (mid-epoch).
    std::fs::write(&file, pipeline(64, 6) + "    checkpoint_every_steps: 3\n").unwrap();
    let run = |out: &Path, extra: &[&str]| {
        simclr()
            .args(["run", "--threads", "2", "--out"])
            .arg(out)
            .arg(&file)
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let whole = dir.path().join("whole");
    let out = run(&whole, &[]).wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    for signal in ["KILL", "TERM"] {
        let cut = dir.path().join(signal);
        let mut child = run(&cut, &[]);
        let deadline = Instant::now() + Duration::from_secs(120);
        let meta = loop {
            assert!(
                child.try_wait().unwrap().is_none(),
                "{signal}: the run ended before a mid-epoch checkpoint"
            );
            if let Some(m) = mid_epoch_meta(&cut) {
                break m;
            }
            assert!(Instant::now() < deadline, "{signal}: no mid-epoch checkpoint");
            std::thread::sleep(Duration::from_millis(2));
        };
        let _ = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        if signal == "KILL" {
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(out.status.signal(), Some(9), "{signal}: {meta:?} {err}");
            assert!(!cut.join("encoder.safetensors").exists(), "killed before the end");
        } else {
            assert_eq!(out.status.code(), Some(143), "{err}");
            assert!(err.contains(&format!("--resume {}", cut.display())), "{err}");
            let m = simclr_train::checkpoint::Checkpoint::read(&cut).unwrap().meta;
            assert!(m.partial.is_some() && m.step >= meta.step, "saved at the last step: {m:?}");
        }
        let out = simclr().arg("run").arg(&file).arg("--resume").arg(&cut).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{signal}: resume: {err}");
        let enc = |d: &Path| std::fs::read(d.join("encoder.safetensors")).unwrap();
        assert!(enc(&cut) == enc(&whole), "{signal}: the resumed encoder differs (checkpoint {meta:?})");
        assert_eq!(lines(&cut, "step"), lines(&whole, "step"), "{signal}: step lines, bit for bit");
        assert_eq!(lines(&cut, "epoch"), lines(&whole, "epoch"), "{signal}: epoch lines");
    }
}
