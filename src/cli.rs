//! The command line: arguments, the dispatch to each command's module, exit codes.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

use crate::bench_cmd::{bench, positive_seconds, BenchLength};
use crate::failure::Failure;
use crate::load::{check, load, load_str, registry};
use crate::options::{options, Common};
use crate::run_cmd::{check_resume, run, run_in};
use crate::signals::{interrupt_flag, interrupted_exit_code};
use crate::{plugins_cmd, sweep_cmd};

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
        #[command(flatten)]
        dist: crate::dist_args::DistArgs,
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
    /// List stage kinds (the built-in ones, and those of `--plugin` libraries, marked), or
    /// describe one: `simclr kinds random_resized_crop`.
    Kinds {
        /// Describe this kind: its fields, their types, defaults and docs.
        kind: Option<String>,
        /// A plugin library whose kinds to list too (a path, or a bare name looked up in
        /// SIMCLR_PLUGIN_PATH); repeatable.
        #[arg(long = "plugin", value_name = "LIB")]
        plugins: Vec<String>,
    },
    /// Print the JSON Schema (draft 2020-12) of pipeline files, for editors: every built-in
    /// kind's fields, types, defaults and docs, plus those of `--plugin` libraries. The
    /// repository ships it as schema/pipeline.schema.json.
    Schema {
        /// A plugin library whose kinds to include (a path, or a bare name looked up in
        /// SIMCLR_PLUGIN_PATH); repeatable.
        #[arg(long = "plugin", value_name = "LIB")]
        plugins: Vec<String>,
    },
    /// Check a training device against the CPU: a small SimCLR model trained a few steps on
    /// DEVICE and on the CPU from the same weights and batches, loss, gradients and weights
    /// compared. Exit 0 when they agree within the tolerance (f32 1e-2, TF32 on CUDA 2e-2), 1
    /// when not or when the device cannot be used (the reason is printed).
    Selftest {
        /// `cuda`, `cuda:N`, `wgpu`, `wgpu:N`, `wgpu:cpu` (or `cpu`, which must agree exactly).
        #[arg(long)]
        device: String,
        /// Training steps compared (each from identical weights).
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
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

pub fn main() -> i32 {
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SIMCLR_LOG")
                // cubecl logs every kernel it autotunes at info level: noise for a user.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new(
                        "info,cubecl_runtime=warn,burn_collective=warn,burn_communication=warn",
                    )
                }),
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
        Command::Run { file, common, out, resume: None, dist } => {
            let plan = load(&file, &common.set, common.seed)?;
            crate::dist_args::setup(&dist)?;
            if plan.spec.sweep.is_some() {
                eprintln!(
                    "note: {} has a `sweep:` section; `run` runs the base pipeline, `simclr sweep` its variants",
                    file.display()
                );
            }
            run(&plan, &common, out)
        }
        Command::Run { file, common, resume: Some(dir), dist, .. } => {
            let plan = load(&file, &common.set, common.seed)?;
            check_resume(&plan, &file, &dir)?;
            crate::dist_args::setup(&dist)?;
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
        Command::Kinds { kind, plugins } => crate::kinds_cmd::run(kind.as_deref(), &plugins),
        Command::Schema { plugins } => {
            let mut registry = registry();
            plugins_cmd::register_libraries(&plugins, &mut registry).map_err(Failure::Invalid)?;
            let schema = simclr_core::schema::pipeline_schema(&registry);
            println!("{}", serde_json::to_string_pretty(&schema).unwrap_or_default());
            Ok(())
        }
        Command::Plugins { command } => plugins_cmd::run(command).map_err(Failure::Invalid),
        Command::Selftest { device, steps, json } => crate::selftest_cmd::run(&device, steps, json),
    }
}
