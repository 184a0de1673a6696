//! `simclr sweep`: validate every variant, run the unfinished ones one after another (each as
//! `simclr run` would), then write the report: results.csv, results.md and chart.png.

use std::path::{Path, PathBuf};

use simclr_core::sweep::{
    self, Diagonal, Event, Report, RunOptions, Sweep, SweepError, Variant, VariantFailure, VariantRunner,
};
use simclr_core::Plan;

use crate::failure::Failure;
use crate::load::check;
use crate::options::Common;
use crate::run_cmd::run_in;

impl From<SweepError> for Failure {
    fn from(e: SweepError) -> Self {
        match e {
            e @ SweepError::Stale { .. } => Failure::Invalid(format!("error: {e}")),
            e => Failure::Runtime(format!("error: {e}")),
        }
    }
}

/// Runs each variant's validated plan as `simclr run` would.
struct CliRunner<'a> {
    plans: Vec<Plan>,
    common: &'a Common,
}

impl VariantRunner for CliRunner<'_> {
    type Error = Failure;

    fn run(
        &mut self,
        index: usize,
        variant: &Variant,
        dir: &Path,
    ) -> Result<Result<(), VariantFailure>, Failure> {
        let plan = self.plans.get(index).ok_or_else(|| {
            Failure::Runtime(format!("internal error: no plan for variant '{}'", variant.name))
        })?;
        // Ctrl-C stops the sweep; any other failure is the variant's own.
        match run_in(plan, self.common, dir.to_path_buf(), false) {
            Ok(()) => Ok(Ok(())),
            Err(Failure::Interrupted) => Err(Failure::Interrupted),
            Err(Failure::Diverged { step, message }) => {
                Ok(Err(VariantFailure::Diverged { step, reason: message }))
            }
            Err(Failure::Invalid(reason) | Failure::Runtime(reason)) => {
                Ok(Err(VariantFailure::Failed { reason }))
            }
        }
    }

    fn saved_form(&self, index: usize, variant: &Variant) -> serde_json::Value {
        match self.plans.get(index) {
            Some(plan) => crate::run_cmd::resolved(plan),
            None => variant.doc.value.to_json(),
        }
    }
}

pub(crate) fn sweep(
    file: &Path,
    common: &Common,
    out: Option<PathBuf>,
    fail_fast: bool,
) -> Result<(), Failure> {
    let mut set = common.set.clone();
    if let Some(s) = common.seed {
        set.push(format!("seed={s}"));
    }
    let base = simclr_core::spec::load(file, &set)?;
    let Some(sw) = sweep::parse(file, &base.doc)? else {
        return Err(Failure::Invalid(format!(
            "{}:1:1: no `sweep:` section (add one listing variants, see the README's \"Sweeps\"; `simclr run` runs a single pipeline)",
            file.display()
        )));
    };
    if common.seed.is_some() && !sw.seeds.is_empty() {
        println!("note: the sweep's `seeds:` set each variant's seed; --seed is not used");
    }
    // Every variant must validate before anything runs.
    let plans = sw.check(|_, spec| check(spec))?;
    let dir = out.unwrap_or_else(|| {
        PathBuf::from("runs").join(&base.name).join(format!("sweep-{}", crate::timestamp()))
    });
    let n = sw.variants.len();
    println!("sweep: {n} variant{} into {}", if n == 1 { "" } else { "s" }, dir.display());
    let mut runner = CliRunner { plans, common };
    let result = sweep::run(&sw, &dir, &mut runner, RunOptions { fail_fast }, |e| match e {
        Event::Skipped { variant, dir } => {
            println!(
                "variant '{}': finished earlier ({}), skipped",
                variant.name,
                dir.join(sweep::RESULTS_FILE).display()
            )
        }
        Event::MovedAside { variant, to } => {
            println!("variant '{}': the unfinished earlier run was moved to {}", variant.name, to.display())
        }
        Event::Starting { index, total, variant, dir } => {
            let changes = variant.describe();
            println!(
                "\n== variant {}/{total} '{}'{} -> {}",
                index + 1,
                variant.name,
                if changes.is_empty() { String::new() } else { format!(" ({changes})") },
                dir.display()
            );
        }
        Event::Failed { variant, failure } => {
            let reason = match failure {
                VariantFailure::Diverged { reason, .. } | VariantFailure::Failed { reason } => reason,
            };
            eprintln!("{reason}");
            println!(
                "variant '{}': {}; {}",
                variant.name,
                failure.describe(),
                if fail_fast { "stopping (--fail-fast)" } else { "going on with the next" }
            );
        }
        Event::SameAs { variant, of } => {
            println!(
                "variant '{}': the same pipeline as '{}', not run again (its results are copied)",
                variant.name, of.name
            )
        }
    });
    // Failed variants are in the report; the sweep fails once everything else has run.
    let result = result.and_then(|failed| {
        if failed.is_empty() {
            return Ok(());
        }
        let list: Vec<String> =
            failed.iter().map(|(v, f)| format!("'{}' ({})", v.name, f.describe())).collect();
        Err(Failure::Runtime(format!(
            "error: {} of {n} variant{} did not finish: {}",
            failed.len(),
            if n == 1 { "" } else { "s" },
            list.join(", ")
        )))
    });
    // The report covers what finished, also after a failure or Ctrl-C (then rerun to resume).
    if !matches!(result, Err(Failure::Invalid(_))) && dir.is_dir() {
        let reported = write_report(&sw, &dir);
        result?;
        return reported;
    }
    result
}

fn write_report(sw: &Sweep, dir: &Path) -> Result<(), Failure> {
    let rep = sweep::report(sw, dir);
    for w in &rep.warnings {
        eprintln!("warning: {w}");
    }
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text)
            .map_err(|e| Failure::Runtime(format!("error: cannot write {}: {e}", path.display())))
    };
    write("results.csv", rep.to_csv())?;
    if let Some(mean) = rep.to_mean_csv(sw) {
        write("results-mean.csv", mean)?;
    }
    let chart = match chart(sw, &rep, &dir.join("chart.png")) {
        Ok(()) => Some("chart.png"),
        Err(e) => {
            eprintln!("warning: no chart: {e:#}");
            None
        }
    };
    write("results.md", rep.to_markdown(sw, chart))?;
    let done = rep.rows.iter().filter(|r| r.finished).count();
    println!(
        "\nsweep report ({done}/{} variants finished): {}",
        rep.rows.len(),
        dir.join("results.md").display()
    );
    Ok(())
}

/// Bars for a list (or a grid of 1 or 3+ axes), a heatmap for a 2-D grid; the first metric.
fn chart(sw: &Sweep, rep: &Report, path: &Path) -> anyhow::Result<()> {
    let metric = rep.metrics.first().map(String::as_str).unwrap_or("value");
    let value = |idx: usize| rep.shown_value(sw, idx);
    if let Some(m) = sw.matrix() {
        let values: Vec<Vec<Option<f64>>> =
            m.cells.iter().map(|row| row.iter().map(|c| c.and_then(value)).collect()).collect();
        // An `{stage, ops}` axis is named by its stage (Figure 5: `first`, `second`).
        let axis = |a: usize, fallback: &str| {
            sw.axes.get(a).and_then(|x| x.stage.clone()).unwrap_or(fallback.into())
        };
        let title = if sw.diagonal == Diagonal::Alone {
            format!("{metric}; diagonal: the op alone")
        } else {
            metric.to_string()
        };
        crate::plot::heatmap(path, &title, &axis(0, "axis 1"), &axis(1, "axis 2"), &m.rows, &m.cols, &values)
    } else if !sw.seeds.is_empty() {
        // One bar per variant: the mean over its seeds, the spread in the label.
        let bars: Vec<(String, Option<f64>)> = rep
            .groups(sw)
            .iter()
            .map(|g| {
                let stat = g.stats.first().copied().flatten();
                let spread = match stat {
                    Some(s) => match s.sd {
                        Some(sd) => format!("mean of {}, sd {sd:.2}", s.n),
                        None => format!("{} run", s.n),
                    },
                    None => format!("0 of {} runs", g.rows.len()),
                };
                (format!("{} ({spread})", g.variant), stat.map(|s| s.mean))
            })
            .collect();
        crate::plot::bar_chart(path, &format!("{metric} by variant, mean over seeds"), metric, &bars)
    } else {
        let bars: Vec<(String, Option<f64>)> = rep
            .rows
            .iter()
            .enumerate()
            .map(|(i, r)| match &r.failure {
                // A failed variant's bar is its status ("n/a" and why).
                Some(f) => (format!("{} ({})", r.variant, f.describe()), value(i)),
                None => (r.variant.clone(), value(i)),
            })
            .collect();
        crate::plot::bar_chart(path, &format!("{metric} by variant"), metric, &bars)
    }
}
