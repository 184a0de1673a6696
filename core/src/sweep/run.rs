//! Running a sweep's variants into one directory, resuming after an interruption.

use std::path::{Path, PathBuf};

use super::{Sweep, Variant, RESULTS_FILE};
use crate::yaml::{Node, Spanned};

/// Why a sweep could not go on (other than a variant's own run failing).
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("cannot {what} {}: {source}", path.display())]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error(
        "{}: finished variant{} {} ran with a different pipeline than the sweep gives now (the file or --set changed since); remove {} to run {} again, or sweep into a new --out",
        dir.display(),
        if variants.len() == 1 { "" } else { "s" },
        variants.iter().map(|v| format!("'{v}'")).collect::<Vec<_>>().join(", "),
        if variants.len() == 1 { "that folder" } else { "those folders" },
        if variants.len() == 1 { "it" } else { "them" },
    )]
    Stale { dir: PathBuf, variants: Vec<String> },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SweepError + 'a {
    move |source| SweepError::Io { what, path: path.to_path_buf(), source }
}

/// How a variant's run ended without results, when the sweep can go on past it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum VariantFailure {
    /// Training stopped on a non-finite loss at `step`.
    Diverged { step: u64, reason: String },
    /// Anything else that ended the run (a stage error, a write that failed).
    Failed { reason: String },
}

impl VariantFailure {
    /// `diverged at step 11` / `failed: REASON` (the reason's first line).
    pub fn describe(&self) -> String {
        match self {
            VariantFailure::Diverged { step, .. } => format!("diverged at step {step}"),
            VariantFailure::Failed { reason } => {
                format!("failed: {}", reason.lines().next().unwrap_or_default().trim_start_matches("error: "))
            }
        }
    }
}

/// The file in a variant directory that records why it has no results.
pub use crate::run_dir::FAILURE_FILE;

/// The failure a variant directory records, if any.
pub fn failure(variant_dir: &Path) -> Option<VariantFailure> {
    let text = std::fs::read_to_string(variant_dir.join(FAILURE_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Runs one variant's pipeline into its directory, as `simclr run` would; behind a trait so
/// tests can use a fake.
pub trait VariantRunner {
    type Error: From<SweepError>;
    /// Runs `variant` (the `index`-th) into `dir`, which exists; a finished run leaves
    /// `dir/results.json` (written last, atomically). `Ok(Err(_))`: the variant failed and the
    /// sweep may go on; `Err(_)`: the sweep stops (Ctrl-C, an error that is not the variant's).
    fn run(
        &mut self,
        index: usize,
        variant: &Variant,
        dir: &Path,
    ) -> Result<Result<(), VariantFailure>, Self::Error>;

    /// The document a run of the `index`-th variant saves as its `pipeline.yaml` (as read
    /// back), to tell whether a finished variant ran the pipeline it has now. By default the
    /// variant's document as written; a runner that saves a resolved form (defaults written
    /// out) returns that.
    fn saved_form(&self, _index: usize, variant: &Variant) -> serde_json::Value {
        variant.doc.value.to_json()
    }
}

/// What the sweep is doing, for the caller to print.
#[derive(Debug)]
pub enum Event<'a> {
    /// Finished in an earlier invocation: not run again.
    Skipped {
        variant: &'a Variant,
        dir: PathBuf,
    },
    /// An unfinished run's leftovers were moved out of the way.
    MovedAside {
        variant: &'a Variant,
        to: PathBuf,
    },
    Starting {
        index: usize,
        total: usize,
        variant: &'a Variant,
        dir: PathBuf,
    },
    /// The variant failed; the sweep goes on (unless `fail_fast`).
    Failed {
        variant: &'a Variant,
        failure: &'a VariantFailure,
    },
    /// The variant's pipeline is the same as an earlier variant's: that run's outcome is
    /// reported under this name too, without running it again.
    SameAs {
        variant: &'a Variant,
        of: &'a Variant,
    },
}

/// How [`run`] goes about it.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// Stop at the first variant that fails (else go on and report every failure at the end).
    pub fail_fast: bool,
}

/// Whether a variant directory holds a finished run.
pub fn finished(variant_dir: &Path) -> bool {
    variant_dir.join(RESULTS_FILE).is_file()
}

/// Runs every variant not yet finished into `dir/<variant>/`, one after another. A variant
/// that fails is recorded (`failure.json`) and the sweep goes on, unless `opts.fail_fast`; a
/// variant whose pipeline document is the same as an earlier one's is not run again, its
/// outcome is copied. Before anything runs, every finished variant is checked to have run the
/// pipeline it has now (its `pipeline.yaml`). Returns the variants that failed, in order.
pub fn run<'s, R: VariantRunner>(
    sweep: &'s Sweep,
    dir: &Path,
    runner: &mut R,
    opts: RunOptions,
    mut on: impl FnMut(Event<'_>),
) -> Result<Vec<(&'s Variant, VariantFailure)>, R::Error> {
    std::fs::create_dir_all(dir).map_err(io("create the sweep directory", dir))?;
    let stale: Vec<String> = sweep
        .variants
        .iter()
        .enumerate()
        .filter(|(i, v)| {
            let vdir = dir.join(&v.name);
            finished(&vdir)
                && !same_pipeline(
                    &vdir.join(crate::run_dir::PIPELINE_FILE),
                    &runner.saved_form(*i, v),
                    &v.doc,
                )
        })
        .map(|(_, v)| v.name.clone())
        .collect();
    if !stale.is_empty() {
        return Err(SweepError::Stale { dir: dir.to_path_buf(), variants: stale }.into());
    }
    let total = sweep.variants.len();
    let mut failures = Vec::new();
    // The first variant with each pipeline document (as JSON text).
    let mut first_of: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (index, v) in sweep.variants.iter().enumerate() {
        let vdir = dir.join(&v.name);
        let key = v.doc.value.to_json().to_string();
        let earlier = *first_of.entry(key).or_insert(index);
        if finished(&vdir) {
            on(Event::Skipped { variant: v, dir: vdir });
            continue;
        }
        if vdir.exists() {
            // An interrupted or failed run: keep its files (logs, metrics) but out of the way.
            let parking = dir.join(".partial");
            std::fs::create_dir_all(&parking).map_err(io("create", &parking))?;
            let to = (1..)
                .map(|n| parking.join(format!("{}.{n}", v.name)))
                .find(|p| !p.exists())
                .unwrap_or_else(|| parking.join(&v.name));
            std::fs::rename(&vdir, &to).map_err(io("move aside the unfinished run", &vdir))?;
            on(Event::MovedAside { variant: v, to });
        }
        std::fs::create_dir_all(&vdir).map_err(io("create the variant directory", &vdir))?;
        let outcome = if earlier != index {
            let of = &sweep.variants[earlier];
            on(Event::SameAs { variant: v, of });
            copy_outcome(&dir.join(&of.name), &vdir)?
        } else {
            on(Event::Starting { index, total, variant: v, dir: vdir.clone() });
            runner.run(index, v, &vdir)?
        };
        if let Err(failure) = outcome {
            let text = serde_json::to_string_pretty(&failure).unwrap_or_default();
            let path = vdir.join(FAILURE_FILE);
            crate::run_dir::write_atomic(&path, text.as_bytes()).map_err(io("write", &path))?;
            on(Event::Failed { variant: v, failure: &failure });
            failures.push((v, failure));
            if opts.fail_fast {
                break;
            }
        }
    }
    Ok(failures)
}

/// Gives `to` the outcome of the run in `from` (the same pipeline): its results and resolved
/// pipeline, or its failure.
fn copy_outcome(from: &Path, to: &Path) -> Result<Result<(), VariantFailure>, SweepError> {
    if let Some(f) = failure(from) {
        return Ok(Err(f));
    }
    if !finished(from) {
        return Ok(Err(VariantFailure::Failed {
            reason: format!("the run it repeats ({}) did not finish", from.display()),
        }));
    }
    // results.json last: its presence marks the copy finished.
    for name in [crate::run_dir::PIPELINE_FILE, RESULTS_FILE] {
        let (src, dst) = (from.join(name), to.join(name));
        if src.is_file() {
            let bytes = std::fs::read(&src).map_err(io("read", &src))?;
            crate::run_dir::write_atomic(&dst, &bytes).map_err(io("write", &dst))?;
        }
    }
    let note = format!("same pipeline as {}: not run again, its results copied here\n", from.display());
    let path = to.join("SAME_AS");
    std::fs::write(&path, note).map_err(io("write", &path))?;
    Ok(Ok(()))
}

/// Whether the resolved pipeline a run wrote (JSON) is `doc`. A missing or unreadable file
/// counts as the same: there is nothing to compare against.
fn same_pipeline(path: &Path, saved_form: &serde_json::Value, doc: &Spanned<Node>) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else { return true };
    // YAML (a JSON file from an earlier version reads as YAML too); the document as written
    // also matches, for runs from before the resolved form.
    match crate::yaml::parse(&text) {
        Ok(v) => {
            let v = v.value.to_json();
            v == *saved_form || v == doc.value.to_json()
        }
        Err(_) => true,
    }
}
