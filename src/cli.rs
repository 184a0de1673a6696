use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use simclr_core::driver::{has_sinks, Mode};
use simclr_core::{run_plan, Diagnostics, Plan, RunError, RunOptions, RunReport};

#[path = "plugins_cmd.rs"]
mod plugins_cmd;
#[path = "sweep_cmd.rs"]
mod sweep_cmd;

/// The demo pipeline, embedded so `simclr demo` needs no files.
const DEMO: &str = include_str!("../pipelines/demo.yaml");

#[derive(Parser)]
#[command(
    name = "simclr",
    version,
    about = "SimCLR as a reproducible data pipeline with plugin stages",
    after_help = "Start with `simclr demo`: it runs the embedded demo pipeline end to end.\n\
                  Exit codes: 0 ok, 1 runtime failure, 2 invalid input or config, 130 interrupted."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Args, Clone, Default)]
pub(crate) struct Common {
    /// Override a field (`crop.size=64`), a top-level key (`seed=3`) or switch a stage off
    /// (`color=off`). Repeatable; applied in order before validation.
    #[arg(long = "set", value_name = "STAGE.FIELD=VALUE")]
    pub(crate) set: Vec<String>,
    /// Worker threads for per-sample stages [default: all cores].
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Pipeline seed (overrides the file's `seed`).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
}

#[derive(Subcommand)]
enum Command {
    /// Check a pipeline file; print every problem with FILE:LINE:COL.
    Validate {
        file: PathBuf,
        #[arg(long = "set", value_name = "STAGE.FIELD=VALUE")]
        set: Vec<String>,
    },
    /// Print the stage graph (Graphviz dot or Mermaid).
    Graph {
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
        #[arg(long = "set", value_name = "STAGE.FIELD=VALUE")]
        set: Vec<String>,
    },
    /// Run a pipeline end to end.
    Run {
        file: PathBuf,
        #[command(flatten)]
        common: Common,
        /// Run directory [default: runs/<name>/<timestamp>].
        #[arg(long, conflicts_with = "resume")]
        out: Option<PathBuf>,
        /// Continue the run in DIR from its checkpoint (give the same FILE and --set options
        /// it started with).
        #[arg(long, value_name = "DIR")]
        resume: Option<PathBuf>,
    },
    /// Run every variant of a pipeline's `sweep:` section, then write a report
    /// (results.csv, results.md, chart.png). Rerun with the same --out to resume.
    Sweep {
        file: PathBuf,
        #[command(flatten)]
        common: Common,
        /// Sweep directory [default: runs/<name>/sweep-<timestamp>]; variants run in
        /// DIR/<variant>/, and finished ones (with results.json) are skipped on a rerun.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Stop at the first variant that fails or diverges (by default the sweep goes on,
        /// records it in the report, and exits 1 at the end).
        #[arg(long)]
        fail_fast: bool,
    },
    /// Run the embedded demo pipeline.
    Demo {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Measure the data pipeline (training and evaluation stages left out).
    Bench {
        file: PathBuf,
        #[command(flatten)]
        common: Common,
        /// Samples to push through, timed from a cold start. Default: one untimed warm-up
        /// epoch, then whole epochs lasting at least `--min-seconds` (exactly one with
        /// `--digest`, so the digest does not depend on the machine's speed).
        #[arg(long)]
        samples: Option<u64>,
        /// Without `--samples`: the least time the measured epochs last.
        #[arg(long, default_value_t = 2.0, value_parser = positive_seconds)]
        min_seconds: f64,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Add a hash of every output in dataset order (to check determinism).
        #[arg(long)]
        digest: bool,
        /// With a training stage: also time this many real training steps (fed by the
        /// pipeline) and report `train` (median step time, images/s, data-wait share).
        #[arg(long, default_value_t = 10)]
        train_steps: u64,
    },
    /// Write a grid of source images and their augmented views (PNG).
    Preview {
        file: PathBuf,
        /// Images (rows).
        #[arg(short = 'n', long, default_value_t = 16)]
        n: usize,
        /// Output PNG.
        #[arg(short = 'o', long, default_value = "views.png")]
        out: PathBuf,
        /// Side of each tile in pixels.
        #[arg(long, default_value_t = 128)]
        cell: u32,
        #[arg(long = "set", value_name = "STAGE.FIELD=VALUE")]
        set: Vec<String>,
        #[arg(long)]
        seed: Option<u64>,
    },
    /// List stage kinds: the built-in ones, and those of `--plugin` libraries (marked).
    Kinds {
        /// A plugin library whose kinds to list too (a path, or a bare name looked up in
        /// SIMCLR_PLUGIN_PATH); repeatable.
        #[arg(long = "plugin", value_name = "LIB")]
        plugins: Vec<String>,
    },
    /// Plugin libraries (more stage kinds): `simclr plugins inspect LIB`.
    Plugins {
        #[command(subcommand)]
        command: plugins_cmd::PluginsCommand,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum GraphFormat {
    Dot,
    Mermaid,
}

/// Why the command failed, mapped to an exit code.
pub(crate) enum Failure {
    Invalid(String),
    Runtime(String),
    /// Training met a non-finite loss at `step` (exit 1, as a runtime error).
    Diverged {
        step: u64,
        message: String,
    },
    Interrupted,
}

impl From<Diagnostics> for Failure {
    fn from(d: Diagnostics) -> Self {
        let n = d.len();
        Failure::Invalid(format!("{d}\n{n} error{} found", if n == 1 { "" } else { "s" }))
    }
}

impl From<RunError> for Failure {
    fn from(e: RunError) -> Self {
        match e {
            RunError::Interrupted => Failure::Interrupted,
            RunError::Diverged { step, .. } => Failure::Diverged { step, message: format!("error: {e}") },
            e @ RunError::Refused { .. } => Failure::Invalid(format!("error: {e}")),
            e => Failure::Runtime(format!("error: {e}")),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Runtime(format!("error: {e:#}"))
    }
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SIMCLR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal, and never with NO_COLOR set (https://no-color.org): logs
        // redirected to a file or a pipe stay plain text.
        .with_ansi(
            std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        )
        .with_target(false)
        .without_time()
        .try_init();
    if matches!(
        cli.command,
        Some(Command::Run { .. } | Command::Sweep { .. } | Command::Demo { .. } | Command::Bench { .. })
    ) {
        // Install the Ctrl-C handler before any slow work, so an early Ctrl-C is handled too.
        interrupt_flag();
    }
    let Some(command) = cli.command else {
        use clap::CommandFactory;
        let _ = Cli::command().print_help();
        println!("\nNew here? Run `simclr demo`.");
        return 0;
    };
    match dispatch(command) {
        Ok(()) => 0,
        Err(Failure::Invalid(msg)) => {
            eprintln!("{msg}");
            2
        }
        Err(Failure::Runtime(msg) | Failure::Diverged { message: msg, .. }) => {
            eprintln!("{msg}");
            1
        }
        Err(Failure::Interrupted) => {
            eprintln!("interrupted");
            interrupted_exit_code()
        }
    }
}

/// Every built-in stage kind: data and augmentation stages, then training.
pub(crate) fn registry() -> simclr_core::Registry {
    let mut r = simclr_stages::registry();
    simclr_train::register(&mut r);
    r
}

fn load(file: &Path, set: &[String], seed: Option<u64>) -> Result<Plan, Failure> {
    let mut set = set.to_vec();
    if let Some(s) = seed {
        set.push(format!("seed={s}"));
    }
    let spec = simclr_core::spec::load(file, &set)?;
    Ok(check(spec)?)
}

/// Validates a parsed pipeline against the built-in kinds and its plugins.
pub(crate) fn check(spec: simclr_core::PipelineSpec) -> Result<Plan, Diagnostics> {
    let mut registry = registry();
    plugins_cmd::load_plugins(&spec, &mut registry)?;
    simclr_core::validate(spec, &registry)
}

fn load_str(name: &Path, src: &str, set: &[String], seed: Option<u64>) -> Result<Plan, Failure> {
    let mut set = set.to_vec();
    if let Some(s) = seed {
        set.push(format!("seed={s}"));
    }
    let spec = simclr_core::spec::parse(name, src, &set)?;
    let mut registry = registry();
    plugins_cmd::load_plugins(&spec, &mut registry)?;
    Ok(simclr_core::validate(spec, &registry)?)
}

fn dispatch(command: Command) -> Result<(), Failure> {
    match command {
        Command::Validate { file, set } => {
            let plan = load(&file, &set, None)?;
            let sweep = match simclr_core::sweep::parse(&file, &plan.spec.doc)? {
                Some(sw) => {
                    sw.check(|_, spec| check(spec))?;
                    format!(
                        ", sweep of {} variant{}",
                        sw.variants.len(),
                        if sw.variants.len() == 1 { "" } else { "s" }
                    )
                }
                None => String::new(),
            };
            println!(
                "{}: valid ({} stages, {} chain{}{sweep})",
                file.display(),
                plan.stages.len(),
                plan.chains().len(),
                if plan.chains().len() == 1 { "" } else { "s" }
            );
            Ok(())
        }
        Command::Graph { file, format, set } => {
            let plan = load(&file, &set, None)?;
            print!("{}", crate::graph_text(&plan, matches!(format, GraphFormat::Mermaid)));
            Ok(())
        }
        Command::Run { file, common, out, resume: None } => {
            let plan = load(&file, &common.set, common.seed)?;
            if plan.spec.sweep.is_some() {
                eprintln!(
                    "note: {} has a `sweep:` section; `run` runs the base pipeline, `simclr sweep` its variants",
                    file.display()
                );
            }
            run(&plan, &common, out)
        }
        Command::Run { file, common, resume: Some(dir), .. } => {
            let plan = load(&file, &common.set, common.seed)?;
            check_resume(&plan, &file, &dir)?;
            run_in(&plan, &common, dir, true)
        }
        Command::Sweep { file, common, out, fail_fast } => sweep_cmd::sweep(&file, &common, out, fail_fast),
        Command::Demo { common, out } => {
            let plan = load_str(Path::new("pipelines/demo.yaml"), DEMO, &common.set, common.seed)?;
            run(&plan, &common, out)
        }
        Command::Bench { file, common, samples, min_seconds, json, digest, train_steps } => {
            let plan = load(&file, &common.set, common.seed)?;
            let train = crate::train_bench::measure(&plan, &options(&plan, &common), train_steps)?;
            let length = match samples {
                Some(n) => BenchLength::Samples(n),
                None if digest => BenchLength::Epochs(1),
                None => BenchLength::AtLeast(min_seconds),
            };
            bench(&plan, &common, length, json, digest, train)
        }
        Command::Preview { file, n, out, cell, set, seed } => {
            let plan = load(&file, &set, seed)?;
            let rows = simclr_stages::report::preview::collect(&plan, n.max(1))?;
            let img = simclr_stages::report::preview::grid(&rows, cell.clamp(16, 1024));
            simclr_stages::report::preview::write_png(&img, &out).map_err(Failure::Runtime)?;
            println!("wrote {} ({} rows: source, then its views)", out.display(), rows.len());
            Ok(())
        }
        Command::Kinds { plugins } => {
            let mut registry = registry();
            let from = plugins_cmd::register_libraries(&plugins, &mut registry).map_err(Failure::Invalid)?;
            for f in registry.kinds() {
                let origin = from.get(f.kind()).map(|lib| format!("  [plugin: {lib}]")).unwrap_or_default();
                println!("{:<22} {:?}  {}{origin}", f.kind(), f.role(), f.about());
            }
            Ok(())
        }
        Command::Plugins { command } => plugins_cmd::run(command).map_err(Failure::Invalid),
    }
}

/// The process's Ctrl-C flag; the handler is installed on first use.
fn interrupt_flag() -> Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        install_signal_handler(flag.clone());
        flag
    })
    .clone()
}

/// The signal that stopped the run (SIGINT unless SIGTERM came): its exit code is 128 + it.
static STOP_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(2);

/// The exit code of an interrupted run: 130 after SIGINT (Ctrl-C), 143 after SIGTERM.
fn interrupted_exit_code() -> i32 {
    128 + STOP_SIGNAL.load(Ordering::SeqCst)
}

/// First SIGINT or SIGTERM: set `flag` (the run finishes its current step or samples, saves a
/// checkpoint and stops); a second one exits at once.
#[cfg(unix)]
fn install_signal_handler(flag: Arc<AtomicBool>) {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot install the SIGINT/SIGTERM handler ({e}): a signal stops the run at once");
            return;
        }
    };
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if flag.swap(true, Ordering::SeqCst) {
                // A second signal: the user (or the scheduler) wants out now.
                std::process::exit(128 + sig);
            }
            STOP_SIGNAL.store(sig, Ordering::SeqCst);
            let name = if sig == SIGTERM { "SIGTERM" } else { "interrupt" };
            eprintln!(
                "\n{name}: finishing the current step or samples, then saving (send it again to quit now)"
            );
        }
    });
}

#[cfg(not(unix))]
fn install_signal_handler(flag: Arc<AtomicBool>) {
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing the current samples (Ctrl-C again to quit now)");
    });
}

fn options(plan: &Plan, common: &Common) -> RunOptions {
    let interrupt = interrupt_flag();
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
fn with_progress<T>(opts: &RunOptions, f: impl FnOnce() -> T) -> T {
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

fn run(plan: &Plan, common: &Common, out: Option<PathBuf>) -> Result<(), Failure> {
    let dir = out.unwrap_or_else(|| simclr_core::run_dir::default_dir(&plan.spec.name));
    run_in(plan, common, dir, false)
}

/// Runs `plan` in `dir` as `simclr run` does: a new run, or (`resume`) the continuation of the
/// one there. `results.json` is written last and atomically, so its presence means the run
/// finished (sweeps rely on it).
pub(crate) fn run_in(plan: &Plan, common: &Common, dir: PathBuf, resume: bool) -> Result<(), Failure> {
    let mut opts = options(plan, common);
    opts.run_dir = Some(dir.clone());
    opts.resume = resume;
    if !resume {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the run directory {}", dir.display()))?;
        let resolved = plan.spec.doc.value.to_json();
        // JSON is YAML: the resolved pipeline (overrides applied) can be run again as is.
        std::fs::write(
            dir.join("pipeline.yaml"),
            serde_json::to_string_pretty(&resolved).unwrap_or_default(),
        )
        .with_context(|| format!("cannot write into {}", dir.display()))?;
    }
    let reports = match with_progress(&opts, || run_plan(plan, &opts, Mode::Full)) {
        Err(RunError::Interrupted) if dir.join(simclr_train::checkpoint::FILE).is_file() => {
            eprintln!(
                "checkpoint saved in {}; to continue:\n  {}",
                dir.display(),
                resume_command(plan, common, &dir)
            );
            return Err(Failure::Interrupted);
        }
        r => r?,
    };
    for (_, r) in &reports {
        print_report(r);
    }
    let mut results = opts.artifacts.results();
    results.insert(
        "chains".into(),
        serde_json::to_value(reports.iter().map(|(_, r)| r).collect::<Vec<_>>()).unwrap_or_default(),
    );
    let plots = crate::report::plots(&dir, plan);
    crate::report::write_markdown(&dir, &plan.spec.name, &results, &plots)
        .with_context(|| format!("cannot write into {}", dir.display()))?;
    if results.contains_key("evals") {
        println!("\n{}", crate::report::table(&results));
    }
    // Written last and atomically: its presence means the run finished.
    let path = dir.join(simclr_core::sweep::RESULTS_FILE);
    simclr_core::sweep::write_atomic(
        &path,
        serde_json::to_string_pretty(&results).unwrap_or_default().as_bytes(),
    )
    .with_context(|| format!("cannot write {}", path.display()))?;
    println!("run directory: {}", dir.display());
    Ok(())
}

/// The exact command that continues an interrupted run in `dir`.
fn resume_command(plan: &Plan, common: &Common, dir: &Path) -> String {
    let quote = |s: &str| {
        if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:+,@%".contains(c)) {
            s.to_string()
        } else {
            format!("'{}'", s.replace('\'', "'\\''"))
        }
    };
    let mut cmd = format!("simclr run {}", quote(&plan.spec.file.display().to_string()));
    for set in &common.set {
        cmd += &format!(" --set {}", quote(set));
    }
    if let Some(seed) = common.seed {
        cmd += &format!(" --seed {seed}");
    }
    if let Some(t) = common.threads {
        cmd += &format!(" --threads {t}");
    }
    cmd + &format!(" --resume {}", quote(&dir.display().to_string()))
}

/// Fields that may differ between a run and its resumption (they do not change the results).
const RESUME_FREE: [&str; 3] = ["device", "log_every", "checkpoint_every"];

/// Before `--resume DIR`: DIR is a run directory with a checkpoint, and FILE (with its --set
/// options) is the pipeline it was started with.
fn check_resume(plan: &Plan, file: &Path, dir: &Path) -> Result<(), Failure> {
    let saved_path = dir.join("pipeline.yaml");
    let text = std::fs::read_to_string(&saved_path).map_err(|e| {
        Failure::Invalid(format!(
            "--resume {}: cannot read {} ({e}): give the directory of an earlier `simclr run`",
            dir.display(),
            saved_path.display()
        ))
    })?;
    let saved: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        Failure::Invalid(format!(
            "{}: {e} (it is written by `simclr run`; do not edit it)",
            saved_path.display()
        ))
    })?;
    let mut diffs = Vec::new();
    json_diff(&saved, &plan.spec.doc.value.to_json(), "", &mut diffs);
    if !diffs.is_empty() {
        diffs.truncate(5);
        return Err(Failure::Invalid(format!(
            "--resume {}: {} (with its --set options) is not the pipeline the run started with ({}): {}; resume with the same file and options (only {} may change)",
            dir.display(),
            file.display(),
            saved_path.display(),
            diffs.join("; "),
            RESUME_FREE.join(", ")
        )));
    }
    let ckpt = dir.join(simclr_train::checkpoint::FILE);
    if !ckpt.is_file() {
        return Err(Failure::Invalid(format!(
            "--resume {}: no {} there: the run stopped before its first checkpoint (the end of its first epoch), so there is nothing to resume; start it again without --resume",
            dir.display(),
            simclr_train::checkpoint::FILE
        )));
    }
    Ok(())
}

/// Where two resolved pipelines differ (`stages.3.size: 32 then, 64 now`), ignoring the
/// fields in [`RESUME_FREE`].
fn json_diff(then: &serde_json::Value, now: &serde_json::Value, at: &str, out: &mut Vec<String>) {
    use serde_json::Value;
    let key = |k: &str| if at.is_empty() { k.to_string() } else { format!("{at}.{k}") };
    match (then, now) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys.into_iter().filter(|k| !RESUME_FREE.contains(&k.as_str())) {
                json_diff(a.get(k).unwrap_or(&Value::Null), b.get(k).unwrap_or(&Value::Null), &key(k), out);
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                // Name stages by their id rather than their index.
                let name = y.get("id").and_then(Value::as_str).map_or_else(|| i.to_string(), str::to_string);
                json_diff(x, y, &key(&name), out);
            }
        }
        (a, b) if a != b => {
            out.push(format!("`{}`: {a} then, {b} now", if at.is_empty() { "." } else { at }))
        }
        _ => {}
    }
}

fn print_report(r: &RunReport) {
    for s in &r.skipped {
        eprintln!(
            "skipped sample {} ({}) at stage '{}': {}",
            s.index,
            s.name.as_deref().unwrap_or("-"),
            s.stage,
            s.message
        );
    }
    println!(
        "{} samples in {:.2} s ({:.0} samples/s){}",
        r.samples,
        r.seconds,
        r.samples as f64 / r.seconds.max(1e-9),
        if r.skipped.is_empty() { String::new() } else { format!(", {} skipped", r.skipped.len()) }
    );
    println!(
        "{:<16} {:<20} {:>10} {:>9} {:>10} {:>10} {:>8}",
        "stage", "kind", "items", "busy_s", "starved_s", "blocked_s", "workers"
    );
    for s in &r.stages {
        println!(
            "{:<16} {:<20} {:>10} {:>9.3} {:>10.3} {:>10.3} {:>8}",
            s.id, s.kind, s.items, s.busy_s, s.starved_s, s.blocked_s, s.workers
        );
    }
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("`{s}` is not a positive number of seconds (e.g. `--min-seconds 2`)")),
    }
}

/// How much `simclr bench` measures.
enum BenchLength {
    /// This many samples from a cold start.
    Samples(u64),
    /// Whole epochs after an untimed warm-up epoch.
    Epochs(u32),
    /// Whole epochs lasting at least this many seconds, after an untimed warm-up epoch.
    AtLeast(f64),
}

fn bench(
    plan: &Plan,
    common: &Common,
    length: BenchLength,
    json: bool,
    digest: bool,
    train: Option<serde_json::Value>,
) -> Result<(), Failure> {
    if has_sinks(plan) && !json {
        eprintln!("bench: training and evaluation stages are left out; measuring the data pipeline");
    }
    let mut opts = options(plan, common);
    opts.digest = digest;
    match length {
        BenchLength::Samples(n) => opts.max_samples = Some(n),
        BenchLength::Epochs(_) | BenchLength::AtLeast(_) => {
            // A warm-up epoch first, as the Python anchors warm up: the file cache, the
            // allocator's heap and the start-up of threads and pools are not what we measure.
            let mut warm = options(plan, common);
            warm.epochs = Some(1);
            let warm_s = run_plan(plan, &warm, Mode::DataOnly)?.first().map_or(0.0, |(_, r)| r.seconds);
            opts.epochs = Some(match length {
                BenchLength::AtLeast(min) if warm_s > 0.0 => {
                    (min / warm_s).ceil().clamp(1.0, 10_000.0) as u32
                }
                BenchLength::Epochs(e) => e,
                _ => 1,
            });
        }
    }
    let reports = with_progress(&opts, || run_plan(plan, &opts, Mode::DataOnly))?;
    // The first chain is the data pipeline being measured.
    let Some((_, r)) = reports.into_iter().next() else {
        return Err(Failure::Invalid("the pipeline has no source stage to measure".into()));
    };
    // The table (print_report) lists skipped samples itself; JSON output lists them here.
    for s in r.skipped.iter().filter(|_| json) {
        eprintln!(
            "skipped sample {} ({}) at stage '{}': {}",
            s.index,
            s.name.as_deref().unwrap_or("-"),
            s.stage,
            s.message
        );
    }
    if json {
        let mut v = serde_json::json!({
            "pipeline": plan.spec.name,
            "samples": r.samples,
            "seconds": r.seconds,
            "samples_per_s": r.samples as f64 / r.seconds.max(1e-9),
            "threads": opts.threads,
            "chunk": r.chunk,
            "skipped": r.skipped.len(),
            "stages": r.stages,
        });
        if let Some(d) = &r.digest {
            v["digest"] = serde_json::Value::String(d.clone());
        }
        if let Some(t) = &train {
            v["train"] = t.clone();
        }
        println!("{v}");
    } else {
        print_report(&r);
        if let Some(d) = &r.digest {
            println!("digest: {d}");
        }
        if let Some(t) = &train {
            println!(
                "train: {:.3} s/step (median of {}), {:.1} images/s, data wait {:.1}% of step time",
                t["step_s_median"].as_f64().unwrap_or(0.0),
                t["steps"],
                t["images_per_s"].as_f64().unwrap_or(0.0),
                100.0 * t["data_wait_frac"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}
