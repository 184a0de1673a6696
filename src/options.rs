//! The options every running command shares (`--set`, `--threads`, `--seed`), how they become
//! the runtime's options, and the progress bar.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use simclr_core::{Plan, RunOptions};

#[derive(clap::Args, Clone, Default)]
pub struct Common {
    /// Override a field (`crop.size=64`), a top-level key (`seed=3`) or switch a stage off
    /// (`color=off`). Repeatable; applied in order before validation.
    #[arg(long = "set", value_name = "STAGE.FIELD=VALUE")]
    pub set: Vec<String>,
    /// Worker threads for per-sample stages [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Pipeline seed (overrides the file's `seed`).
    #[arg(long)]
    pub seed: Option<u64>,
}

pub fn options(plan: &Plan, common: &Common) -> RunOptions {
    let interrupt = crate::signals::interrupt_flag();
    let threads = common.threads.unwrap_or_else(simclr_core::runtime::default_threads).max(1);
    // One budget: the trainer's and evaluation's thread pool gets the same count as the
    // pipeline's workers (which wait, blocked, while a step runs).
    simclr_train::cpu::set_threads(threads);
    RunOptions {
        seed: plan.spec.seed,
        threads,
        fuse: plan.spec.fuse,
        chunk: plan.spec.chunk,
        interrupt,
        ..RunOptions::default()
    }
}

/// Shows a progress bar (only on a terminal) while `f` runs.
pub fn with_progress<T>(opts: &RunOptions, f: impl FnOnce() -> T) -> T {
    if !std::io::stderr().is_terminal() {
        return f();
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} samples  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let done = Arc::new(AtomicBool::new(false));
    let (progress, total, d2, b2) =
        (opts.progress.clone(), opts.progress_total.clone(), done.clone(), bar.clone());
    let ticker = std::thread::spawn(move || {
        while !d2.load(Ordering::Relaxed) {
            b2.set_length(total.load(Ordering::Relaxed));
            b2.set_position(progress.load(Ordering::Relaxed));
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let out = f();
    done.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    bar.finish_and_clear();
    out
}
