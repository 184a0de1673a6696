//! `simclr run` and `simclr demo`: a run directory, the run, its report; `--resume`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use simclr_core::driver::Mode;
use simclr_core::{run_plan, Plan, RunError, RunReport};

use crate::failure::Failure;
use crate::options::{options, with_progress, Common};

pub fn run(plan: &Plan, common: &Common, out: Option<PathBuf>) -> Result<(), Failure> {
    let dir = out.unwrap_or_else(|| simclr_core::run_dir::default_dir(&plan.spec.name));
    run_in(plan, common, dir, false)
}

/// Runs `plan` in `dir` as `simclr run` does: a new run, or (`resume`) the continuation of the
/// one there. `results.json` is written last and atomically, so its presence means the run
/// finished (sweeps rely on it).
pub fn run_in(plan: &Plan, common: &Common, dir: PathBuf, resume: bool) -> Result<(), Failure> {
    let mut opts = options(plan, common);
    if let Some(stop) = simclr_train::dist::runtime_stop_flag() {
        opts.interrupt = stop;
    }
    opts.run_dir = Some(dir.clone());
    opts.resume = resume;
    // A data-parallel run: rank 0 writes the run directory and evaluates; the others train.
    let rank = simclr_train::dist::process_rank();
    if rank > 0 {
        opts.primary = false;
        with_progress(&opts, || run_plan(plan, &opts, Mode::Full))?;
        println!("rank {rank}: training done (rank 0 writes the run directory and evaluates)");
        return Ok(());
    }
    if !resume {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the run directory {}", dir.display()))?;
        let mut registry = crate::load::registry();
        let _ = crate::load::load_plugins(&plan.spec, &mut registry);
        let producer = concat!("simclr ", env!("CARGO_PKG_VERSION"));
        simclr_core::run_dir::write_pipeline(&dir, plan, &registry, producer)
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
    // The final numbers next to the training curves in TensorBoard.
    if let Err(e) = simclr_core::tensorboard::write_results(&dir, &results, 0) {
        tracing::warn!("cannot write the results' TensorBoard events in {}: {e}", dir.display());
    }
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
    if let Some(g) = simclr_train::dist::process_group() {
        cmd +=
            &format!(" --world-size {} --rank {} --coordinator {}", g.world, g.rank, quote(&g.coordinator));
    }
    cmd + &format!(" --resume {}", quote(&dir.display().to_string()))
}

/// Fields that may differ between a run and its resumption (they do not change the results).
const RESUME_FREE: [&str; 4] = ["device", "log_every", "checkpoint_every", "checkpoint_every_steps"];

/// The resolved form of `plan` (see `simclr_core::run_dir::resolved_pipeline`), with the
/// built-in kinds and the file's plugins.
pub fn resolved(plan: &Plan) -> serde_json::Value {
    let mut registry = crate::load::registry();
    let _ = crate::load::load_plugins(&plan.spec, &mut registry);
    simclr_core::run_dir::resolved_pipeline(plan, &registry)
}

/// Before `--resume DIR`: DIR is a run directory with a checkpoint, and FILE (with its --set
/// options) is the pipeline it was started with.
pub fn check_resume(plan: &Plan, file: &Path, dir: &Path) -> Result<(), Failure> {
    let saved_path = dir.join(simclr_core::run_dir::PIPELINE_FILE);
    let text = std::fs::read_to_string(&saved_path).map_err(|e| {
        Failure::Invalid(format!(
            "--resume {}: cannot read {} ({e}): give the directory of an earlier `simclr run`",
            dir.display(),
            saved_path.display()
        ))
    })?;
    let saved = simclr_core::yaml::parse(&text).map(|d| d.value.to_json()).map_err(|e| {
        Failure::Invalid(format!(
            "{}: {} (it is written by `simclr run`; do not edit it)",
            saved_path.display(),
            e.message
        ))
    })?;
    let mut diffs = Vec::new();
    json_diff(&saved, &resolved(plan), "", &mut diffs);
    if !diffs.is_empty() {
        // A run directory from before the resolved YAML form held the document as written.
        let mut old = Vec::new();
        json_diff(&saved, &plan.spec.doc.value.to_json(), "", &mut old);
        if old.is_empty() {
            diffs.clear();
        }
    }
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
            "--resume {}: no {} there: the run stopped before its first checkpoint (the end of its first epoch, or its first `checkpoint_every_steps` steps), so there is nothing to resume; start it again without --resume",
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

/// One stderr line per sample a source's `on_error: skip` dropped.
pub fn print_skipped(r: &RunReport) {
    for s in &r.skipped {
        eprintln!(
            "skipped sample {} ({}) at stage '{}': {}",
            s.index,
            s.name.as_deref().unwrap_or("-"),
            s.stage,
            s.message
        );
    }
}

pub fn print_report(r: &RunReport) {
    print_skipped(r);
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
