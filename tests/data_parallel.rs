//! Data-parallel training (issue 16) on the CPU: one device, two devices in one process
//! (`devices: [cpu, cpu]`) and two processes over loopback (`--world-size 2`) train the same
//! network on the same global batches, so their per-step losses agree; local BatchNorm does not.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Synthetic shapes, width-0.25 ResNet-18, global batch 64, 2 epochs (4 steps each). LARS at a
/// small learning rate: at larger ones this tiny network is chaotic (a 1e-7 relative change of
/// the learning rate alone moves the 5th step's loss by ~1e-3), and the test is about the data
/// parallelism, not about that.
const PIPELINE: &str = "name: dp\n\
seed: 3\n\
stages:\n\
\x20 - { id: data, kind: synthetic_shapes, count: 256, size: 32, classes: 4, shuffle: true }\n\
\x20 - { id: views, kind: views, count: 2 }\n\
\x20 - { id: crop, kind: random_resized_crop, size: 32, scale: [0.3, 1.0] }\n\
\x20 - { id: flip, kind: horizontal_flip }\n\
\x20 - { id: color, kind: color_distort, strength: 0.5 }\n\
\x20 - { id: tensor, kind: to_tensor }\n\
\x20 - { id: batch, kind: batch, batch_size: 64 }\n\
\x20 - id: train\n\
\x20   kind: simclr_train\n\
\x20   width: 0.25\n\
\x20   epochs: 2\n\
\x20   warmup_epochs: 1\n\
\x20   head: { hidden_dim: 64, out_dim: 32 }\n\
\x20   optimizer: { kind: lars, lr: 0.01, lr_scaling: none }\n";

fn simclr() -> Command {
    Command::new(env!("CARGO_BIN_EXE_simclr"))
}

fn pipeline(dir: &Path, epochs: u32) -> PathBuf {
    let path = dir.join("dp.yaml");
    std::fs::write(&path, PIPELINE.replace("epochs: 2\n", &format!("epochs: {epochs}\n"))).unwrap();
    path
}

/// Multi-process tests take turns: a port found free stays free until its run binds it.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

/// A coordinator port whose two data ports (port + 1, port + 2) are free too.
fn free_ports() -> u16 {
    for _ in 0..200 {
        let Ok(l) = TcpListener::bind("127.0.0.1:0") else { continue };
        let p = l.local_addr().unwrap().port();
        if p < 65000 && (1..=2).all(|k| TcpListener::bind(("0.0.0.0", p + k)).is_ok()) {
            return p;
        }
    }
    panic!("no free ports");
}

fn run(file: &Path, out: &Path, extra: &[&str]) {
    let o = simclr()
        .arg("run")
        .arg(file)
        .arg("--out")
        .arg(out)
        .args(["--threads", "2"])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `simclr run FILE` as rank `r` of 2 (1 thread), coordinator on `port`; the caller adds
/// `--out` or `--resume`.
fn rank_command(file: &Path, r: usize, port: u16, extra: &[&str]) -> Command {
    let mut c = simclr();
    c.arg("run")
        .arg(file)
        .args(["--threads", "1", "--world-size", "2", "--rank", &r.to_string()])
        .args(["--coordinator", &format!("127.0.0.1:{port}")])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn rank(file: &Path, out: &Path, r: usize, port: u16, extra: &[&str]) -> Child {
    rank_command(file, r, port, extra).arg("--out").arg(out).spawn().unwrap()
}

fn step_losses(dir: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "step")
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / x.abs().max(y.abs())).fold(0.0, f64::max)
}

#[test]
fn one_device_two_devices_and_two_processes_give_the_same_losses_and_local_bn_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let file = pipeline(tmp.path(), 2);
    let one = tmp.path().join("one");
    run(&file, &one, &[]);
    let two = tmp.path().join("two");
    run(&file, &two, &["--set", "train.devices=[cpu, cpu]"]);
    let local = tmp.path().join("local");
    run(&file, &local, &["--set", "train.devices=[cpu, cpu]", "--set", "train.batch_norm=local"]);

    let _turn = turn();
    let port = free_ports();
    let (r0, r1) = (tmp.path().join("rank0"), tmp.path().join("rank1"));
    let p0 = rank(&file, &r0, 0, port, &[]);
    let p1 = rank(&file, &r1, 1, port, &[]);
    for (r, p) in [(1, p1), (0, p0)] {
        let o = p.wait_with_output().unwrap();
        assert!(o.status.success(), "rank {r}: {}", String::from_utf8_lossy(&o.stderr));
    }

    let base = step_losses(&one);
    assert_eq!(base.len(), 8);
    let (t, p, l) = (step_losses(&two), step_losses(&r0), step_losses(&local));
    assert!(max_rel(&base, &t) < 1e-3, "devices [cpu, cpu]: {t:?} vs one device {base:?}");
    assert!(max_rel(&base, &p) < 1e-3, "two processes: {p:?} vs one device {base:?}");
    assert!(max_rel(&t, &p) < 1e-3, "two processes {p:?} vs two devices {t:?}");
    // Local BatchNorm normalizes each half by its own statistics: the very first loss differs.
    assert!(max_rel(&base[..1], &l[..1]) > 1e-3, "local BN {l:?} vs global {base:?}");

    // Rank 0 alone writes the run directory.
    assert!(r0.join("encoder.safetensors").is_file() && one.join("encoder.safetensors").is_file());
    assert!(!r1.join("encoder.safetensors").exists() && !r1.join("metrics.jsonl").exists());
}

#[test]
fn a_killed_rank_stops_the_other_with_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let file = pipeline(tmp.path(), 50);
    let _turn = turn();
    let port = free_ports();
    let extra = ["--peer-timeout", "30"];
    let p0 = rank(&file, &tmp.path().join("rank0"), 0, port, &extra);
    let mut p1 = rank(&file, &tmp.path().join("rank1"), 1, port, &extra);
    // Wait until training is under way (rank 0's metrics have a step), then kill rank 1.
    let metrics = tmp.path().join("rank0").join("metrics.jsonl");
    let t = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(true, |s| !s.contains("\"step\"")) {
        assert!(t.elapsed() < Duration::from_secs(120), "training did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    p1.kill().unwrap();
    let killed = Instant::now();
    let _ = p1.wait();
    let o = p0.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(killed.elapsed() < Duration::from_secs(30 + 20), "rank 0 took {:?}", killed.elapsed());
    assert!(err.contains("rank 1") && err.contains("rank 0 of 2"), "{err}");
    assert!(!err.contains("stack backtrace"), "{err}");
}

#[test]
fn bad_ranks_and_missing_coordinators_are_refused_with_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let file = pipeline(tmp.path(), 2);
    let cases: [(&[&str], &str); 4] = [
        (&["--world-size", "2", "--rank", "2", "--coordinator", "127.0.0.1:1"], "not below --world-size 2"),
        (&["--world-size", "2", "--coordinator", "127.0.0.1:1"], "needs --rank"),
        (&["--world-size", "2", "--rank", "0"], "--coordinator HOST:PORT"),
        (
            &["--world-size", "2", "--rank", "1", "--coordinator", "127.0.0.1:9", "--peer-timeout", "1"],
            "did not answer",
        ),
    ];
    for (args, want) in cases {
        let o = simclr()
            .arg("run")
            .arg(&file)
            .arg("--out")
            .arg(tmp.path().join("x"))
            .args(args)
            .env_remove("MASTER_ADDR")
            .env_remove("MASTER_PORT")
            .env_remove("WORLD_SIZE")
            .env_remove("RANK")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// Both ranks of a two-process run; `resume`: continue rank 0's directory.
fn two_ranks(file: &Path, dir0: &Path, dir1: &Path, extra: &[&str], resume: bool) -> (Child, Child) {
    let port = free_ports();
    let start = |r: usize, dir: &Path| {
        let mut c = rank_command(file, r, port, extra);
        if resume {
            c.arg("--resume").arg(dir0);
        } else {
            c.arg("--out").arg(dir);
        }
        c.spawn().unwrap()
    };
    (start(0, dir0), start(1, dir1))
}

fn wait_ok(p: Child, what: &str) {
    let o = p.wait_with_output().unwrap();
    assert!(o.status.success(), "{what}: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_two_process_run_killed_mid_epoch_resumes_to_the_same_encoder() {
    let tmp = tempfile::tempdir().unwrap();
    let file = pipeline(tmp.path(), 2);
    let extra = ["--set", "train.checkpoint_every_steps=3"];
    let _turn = turn();
    let (full, other) = (tmp.path().join("full"), tmp.path().join("full1"));
    let (a, b) = two_ranks(&file, &full, &other, &extra, false);
    wait_ok(a, "rank 0");
    wait_ok(b, "rank 1");

    let (dir, dir1) = (tmp.path().join("cut"), tmp.path().join("cut1"));
    let (mut a, mut b) = two_ranks(&file, &dir, &dir1, &extra, false);
    let t = Instant::now();
    // Step 4 is logged after the checkpoint of step 3 (epoch 0 has 4 steps): kill mid-epoch 1.
    while std::fs::read_to_string(dir.join("metrics.jsonl")).map_or(true, |s| !s.contains("\"step\":4")) {
        assert!(t.elapsed() < Duration::from_secs(120), "training did not get to step 4");
        std::thread::sleep(Duration::from_millis(20));
    }
    a.kill().unwrap();
    b.kill().unwrap();
    let _ = (a.wait(), b.wait());
    assert!(!dir.join("encoder.safetensors").exists(), "killed before the end");
    let (a, b) = two_ranks(&file, &dir, &dir1, &extra, true);
    wait_ok(a, "resumed rank 0");
    wait_ok(b, "resumed rank 1");
    let enc = |d: &Path| std::fs::read(d.join("encoder.safetensors")).unwrap();
    assert!(enc(&full) == enc(&dir), "the resumed encoder differs from the uninterrupted run's");
    assert_eq!(step_losses(&full), step_losses(&dir));
}

#[test]
fn two_processes_of_two_devices_each_train_as_one_device() {
    let tmp = tempfile::tempdir().unwrap();
    let file = pipeline(tmp.path(), 1);
    let one = tmp.path().join("one");
    run(&file, &one, &[]);
    let _turn = turn();
    let port = free_ports();
    let (r0, r1) = (tmp.path().join("rank0"), tmp.path().join("rank1"));
    let devices = ["--set", "train.devices=[cpu, cpu]"];
    let p0 = rank(&file, &r0, 0, port, &devices);
    let p1 = rank(&file, &r1, 1, port, &devices);
    wait_ok(p1, "rank 1");
    let o = p0.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "rank 0: {err}");
    assert!(err.contains("ranks 0-1 of 4"), "{err}");
    let (base, four) = (step_losses(&one), step_losses(&r0));
    assert_eq!(base.len(), 4);
    assert!(max_rel(&base, &four) < 1e-3, "4 ranks: {four:?} vs one device {base:?}");
}

#[test]
fn ranks_started_with_different_seeds_are_refused_naming_the_other_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let file = pipeline(tmp.path(), 2);
    let _turn = turn();
    let port = free_ports();
    let p0 = rank(&file, &tmp.path().join("rank0"), 0, port, &[]);
    let p1 = rank(&file, &tmp.path().join("rank1"), 1, port, &["--seed", "9"]);
    for (r, other, p) in [(1, 0, p1), (0, 1, p0)] {
        let o = p.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "rank {r}: {err}");
        assert!(
            err.contains(&format!("rank {other} trains something else than rank {r}")),
            "rank {r}: {err}"
        );
    }
}

#[test]
fn a_sigterm_to_one_rank_stops_both_after_the_same_step_and_the_run_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let file = pipeline(tmp.path(), 3);
    let _turn = turn();
    let (full, full1) = (tmp.path().join("full"), tmp.path().join("full1"));
    let (a, b) = two_ranks(&file, &full, &full1, &[], false);
    wait_ok(a, "rank 0");
    wait_ok(b, "rank 1");

    let (dir, dir1) = (tmp.path().join("cut"), tmp.path().join("cut1"));
    let (a, b) = two_ranks(&file, &dir, &dir1, &[], false);
    let t = Instant::now();
    while std::fs::read_to_string(dir.join("metrics.jsonl")).map_or(true, |s| !s.contains("\"step\":5")) {
        assert!(t.elapsed() < Duration::from_secs(120), "training did not get to step 5");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: sending SIGTERM to a child process this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(b.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let (o1, o0) = (b.wait_with_output().unwrap(), a.wait_with_output().unwrap());
    assert_eq!(o1.status.code(), Some(143), "rank 1: {}", String::from_utf8_lossy(&o1.stderr));
    let err0 = String::from_utf8_lossy(&o0.stderr);
    assert_eq!(o0.status.code(), Some(130), "rank 0 stops with it: {err0}");
    assert!(err0.contains("--resume"), "{err0}");
    assert!(dir.join("checkpoint.safetensors").is_file() && !dir.join("encoder.safetensors").exists());

    let (a, b) = two_ranks(&file, &dir, &dir1, &[], true);
    wait_ok(a, "resumed rank 0");
    wait_ok(b, "resumed rank 1");
    let enc = |d: &Path| std::fs::read(d.join("encoder.safetensors")).unwrap();
    assert!(enc(&full) == enc(&dir), "the resumed encoder differs from the uninterrupted run's");
    assert_eq!(step_losses(&full), step_losses(&dir));
}
