//! Stops leave no thread behind. One test in its own binary: it counts the process's threads,
//! which tests running in parallel would disturb.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use simclr_core::runtime::{run_chain, ChainStages, RunOptions, StageInfo};
use simclr_core::{MapStage, RunError, Sample, SampleCtx, Sink, Source, SourceOptions, StageError};

struct Count(u64);

impl Source for Count {
    fn len(&self) -> u64 {
        self.0
    }
    fn options(&self) -> SourceOptions {
        SourceOptions::default()
    }
    fn read(&self, index: u64, _ctx: &SampleCtx) -> Result<Sample, StageError> {
        Ok(Sample { index, ..Sample::default() })
    }
}

struct FailAt(u64);

impl MapStage for FailAt {
    fn apply(&self, sample: &mut Sample, _ctx: &SampleCtx) -> Result<(), StageError> {
        if sample.index == self.0 {
            return Err(StageError::fatal("boom"));
        }
        Ok(())
    }
}

struct Drop_;

impl Sink for Drop_ {
    fn consume(&mut self, _s: Sample) -> Result<(), StageError> {
        Ok(())
    }
}

fn info(id: &str) -> StageInfo {
    StageInfo { id: id.into(), kind: id.into(), workers: None, capacity: None }
}

fn chain(n: u64, fail_at: Option<u64>) -> ChainStages {
    let maps: Vec<(StageInfo, Arc<dyn MapStage>)> =
        fail_at.map(|f| (info("bad"), Arc::new(FailAt(f)) as Arc<dyn MapStage>)).into_iter().collect();
    ChainStages {
        source: (info("data"), Arc::new(Count(n))),
        maps,
        batch: None,
        sink: (info("sink"), Box::new(Drop_)),
    }
}

fn threads_now() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// Runs `f` on a thread and waits for it, failing (instead of hanging) if it never returns.
fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    let out = rx.recv_timeout(Duration::from_secs(30)).expect("the run hung");
    let _ = h.join();
    out
}

#[test]
fn failures_and_interrupts_join_every_thread() {
    let before = threads_now();

    // A stage failing on sample 1000 of a practically endless source.
    let (result, took) = bounded(|| {
        let t = Instant::now();
        let opts = RunOptions { threads: 2, chunk: Some(4), ..RunOptions::default() };
        (run_chain(chain(u64::MAX / 4, Some(1000)), &opts).map(|r| r.samples), t.elapsed())
    });
    match result {
        Err(RunError::Sample { stage, sample, message, .. }) => {
            assert_eq!((stage.as_str(), sample), ("bad", 1000));
            assert!(message.contains("boom"));
        }
        other => panic!("expected a sample error, got {other:?}"),
    }
    eprintln!("failure to return: {took:?}");
    assert_eq!(threads_now(), before, "a thread was left running after a failure");

    // An interrupt while running.
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    let setter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        flag.store(true, Ordering::SeqCst);
    });
    let result = bounded(move || {
        let opts = RunOptions { threads: 2, interrupt, ..RunOptions::default() };
        run_chain(chain(u64::MAX / 4, None), &opts).map(|r| r.samples)
    });
    let _ = setter.join();
    assert!(matches!(result, Err(RunError::Interrupted)), "{result:?}");
    assert_eq!(threads_now(), before, "a thread was left running after an interrupt");
}
