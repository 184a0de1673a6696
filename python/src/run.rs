//! `run()`: a whole pipeline, training and evaluation included, as `simclr run` runs it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::PyDict;
use simclr_core::{run_plan, Mode, RunError, RunOptions};

use crate::{failed, load, override_strings, PipelineError};

/// Runs the whole pipeline (training and evaluation stages included) in the run directory
/// `out` (default `runs/<name>/<timestamp>`, as the CLI) and returns the results dict that
/// `simclr run` writes to `results.json` there. The GIL is released while it runs; Ctrl-C stops
/// it after the current step (a training stage saves its checkpoint first).
#[pyfunction]
#[pyo3(signature = (path, overrides = None, out = None, threads = None, seed = None))]
pub fn run<'py>(
    py: Python<'py>,
    path: PathBuf,
    overrides: Option<&Bound<'py, PyDict>>,
    out: Option<PathBuf>,
    threads: Option<usize>,
    seed: Option<u64>,
) -> PyResult<Bound<'py, PyAny>> {
    init_logging();
    let mut set = override_strings(overrides)?;
    if let Some(s) = seed {
        set.push(format!("seed={s}"));
    }
    let plan = load(&path, &set)?;
    let dir = out.unwrap_or_else(|| simclr_core::run_dir::default_dir(&plan.spec.name));
    let io = |what: &str, e: std::io::Error| {
        PipelineError::new_err(format!("cannot {what} {}: {e}", dir.display()))
    };
    std::fs::create_dir_all(&dir).map_err(|e| io("create the run directory", e))?;
    // As the CLI: the resolved pipeline (overrides applied, defaults written out, paths
    // absolute), which `simclr run` or `run()` runs again as is.
    let mut registry = crate::registry();
    let search = std::env::var_os(simclr_core::plugin::SEARCH_PATH_VAR);
    let _ = simclr_core::plugin::load_spec_plugins(&plan.spec, &mut registry, search.as_deref());
    let producer = concat!("simclr_pipeline ", env!("CARGO_PKG_VERSION"));
    simclr_core::run_dir::write_pipeline(&dir, &plan, &registry, producer)
        .map_err(|e| io("write into", e))?;

    let threads = threads.unwrap_or_else(simclr_core::runtime::default_threads).max(1);
    simclr_train::cpu::set_threads(threads);
    let interrupt = Arc::new(AtomicBool::new(false));
    let opts = RunOptions {
        seed: plan.spec.seed,
        threads,
        fuse: plan.spec.fuse,
        chunk: plan.spec.chunk,
        interrupt: interrupt.clone(),
        run_dir: Some(dir.clone()),
        ..RunOptions::default()
    };
    let outcome = std::thread::scope(|scope| -> PyResult<Result<_, RunError>> {
        let handle = scope.spawn(|| run_plan(&plan, &opts, Mode::Full));
        let mut signal = None;
        while !handle.is_finished() {
            py.detach(|| std::thread::sleep(Duration::from_millis(50)));
            if signal.is_none() {
                if let Err(e) = py.check_signals() {
                    // Let the run stop cleanly (checkpoint saved), then raise.
                    interrupt.store(true, Ordering::SeqCst);
                    signal = Some(e);
                }
            }
        }
        let result = py
            .detach(|| handle.join())
            .map_err(|_| PipelineError::new_err("internal error: the run's thread panicked"))?;
        match signal {
            Some(e) => Err(e),
            None => Ok(result),
        }
    })?;
    let reports = outcome.map_err(|e| failed(&e))?;
    let mut results = opts.artifacts.results();
    results.insert(
        "chains".into(),
        serde_json::to_value(reports.iter().map(|(_, r)| r).collect::<Vec<_>>()).unwrap_or_default(),
    );
    results.insert("run_dir".into(), serde_json::Value::String(dir.display().to_string()));
    if let Err(e) = simclr_core::tensorboard::write_results(&dir, &results, 0) {
        tracing::warn!("cannot write the results' TensorBoard events in {}: {e}", dir.display());
    }
    let text = serde_json::to_string_pretty(&results).unwrap_or_default();
    let path = dir.join(simclr_core::sweep::RESULTS_FILE);
    simclr_core::sweep::write_atomic(&path, text.as_bytes())
        .map_err(|e| PipelineError::new_err(format!("cannot write {}: {e}", path.display())))?;
    py.import("json")?.call_method1("loads", (text,))
}

/// Progress lines of long runs (training epochs, evaluations) on stderr, as in the CLI;
/// `SIMCLR_LOG` sets the level. Installed once; a host that set its own subscriber keeps it.
fn init_logging() {
    use std::io::IsTerminal;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("SIMCLR_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .with_writer(std::io::stderr)
            .with_ansi(
                std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
            )
            .with_target(false)
            .without_time()
            .try_init();
    });
}
