//! Sweeps: one pipeline file, many variants of it, run one after another into one directory.
//!
//! The `sweep:` section of a pipeline file names variants, each a list of changes applied to
//! the pipeline document (the same changes `--set` makes, plus whole-stage swaps):
//!
//! ```yaml
//! sweep:
//!   metrics: [simclr.linear_top1, simclr.knn_top1]   # dotted paths into results.json
//!   variants:                                        # a list: name -> changes
//!     s0.25: { color.strength: 0.25 }
//!     jitter: { color: { kind: color_jitter, brightness: 0.4 } }   # a swap
//!     no-blur: { blur: off }                                        # a removal
//! ```
//!
//! or a grid, the cartesian product of axes (each a mapping of variants, or
//! `{stage: ID, ops: [NAME, ...]}` to swap one stage for each of the named `ops:`), with
//! `diagonal: alone` (a cell that picks the same name on every axis is that variant alone)
//! and `unordered: true` (run (a,b), skip (b,a)) for the paper's Figure 5 layout.
//!
//! `seeds: [42, 7, 123]` runs every variant once per seed (`NAME+seed7`, the pipeline's `seed`
//! set to 7) and adds the mean and standard deviation over the seeds to the report: at a small
//! scale the spread between seeds can be larger than the difference an ablation measures.
//!
//! Everything works on the positioned YAML tree, so a bad change or a variant that does not
//! validate is reported at the line and column where it is written, naming the variant.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::error::{Diagnostic, Diagnostics};
use crate::spec::{self, PipelineSpec};
use crate::yaml::{Node, Spanned};

mod parse;
mod report;
mod run;
#[cfg(test)]
mod tests;

pub use parse::{parse, valid_name};
pub use report::{metric, report, Group, Report, Row, Stat};
pub use run::{
    failure, finished, run, Event, RunOptions, SweepError, VariantFailure, VariantRunner, FAILURE_FILE,
};

const SWEEP_KEYS: &[&str] = &["metrics", "variants", "grid", "ops", "diagonal", "unordered", "seeds"];

/// Metrics a sweep reports when `metrics:` is not given.
pub const DEFAULT_METRICS: &[&str] = &["simclr.linear_top1", "simclr.knn_top1"];

/// The file that marks a variant as finished (written last, atomically, by a run).
pub use crate::run_dir::{write_atomic, RESULTS_FILE};

/// One change to the pipeline: `target` is `STAGE.FIELD[.SUB]`, `STAGE` or a top-level key.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub target: Spanned<String>,
    pub value: Spanned<Node>,
    /// The `sweep.ops` entry the value comes from, if any.
    pub op: Option<String>,
}

impl Change {
    /// `color.strength=0.5`, `blur=off`, `color={kind: color_jitter, ...}`, or `first=crop`
    /// for a swap to the op `crop`.
    pub fn describe(&self) -> String {
        match &self.op {
            Some(op) => format!("{}={op}", self.target.value),
            None => format!("{}={}", self.target.value, spec::describe(&self.value.value)),
        }
    }
}

/// What a cell whose axes all pick the same name means.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Diagonal {
    /// The changes of every axis, applied in turn (`a+a`).
    #[default]
    Combine,
    /// The first axis's changes only, named `a`: "a alone" (Figure 5's diagonal).
    Alone,
}

/// One axis of a grid (a `variants:` list is a sweep of one axis).
#[derive(Clone, Debug, PartialEq)]
pub struct Axis {
    /// The stage an `{stage, ops}` axis swaps, else `None`.
    pub stage: Option<String>,
    /// Its named choices, in file order.
    pub choices: Vec<(Spanned<String>, Vec<Change>)>,
}

impl Axis {
    pub fn names(&self) -> Vec<&str> {
        self.choices.iter().map(|(n, _)| n.value.as_str()).collect()
    }
}

/// One pipeline of the sweep.
#[derive(Clone, Debug)]
pub struct Variant {
    /// Its directory name: the axis choices joined with `+` (then `+seedN` with `seeds:`).
    pub name: String,
    /// The name without the seed: the variant whose seeds are averaged together.
    pub base: String,
    /// The seed it runs with, when the sweep lists `seeds:`.
    pub seed: Option<u64>,
    /// Its choice on each axis (an index into that axis's choices).
    pub cell: Vec<usize>,
    /// The changes applied to the base pipeline, in order.
    pub changes: Vec<Change>,
    /// The variant's pipeline document (without the `sweep:` section).
    pub doc: Spanned<Node>,
}

impl Variant {
    /// The changes as text, `; `-separated (empty for the base pipeline).
    pub fn describe(&self) -> String {
        self.changes.iter().map(Change::describe).collect::<Vec<_>>().join("; ")
    }
}

/// A parsed and expanded `sweep:` section.
#[derive(Clone, Debug)]
pub struct Sweep {
    pub file: PathBuf,
    /// Dotted paths into each variant's results.json.
    pub metrics: Vec<String>,
    /// `grid:` (else a `variants:` list).
    pub grid: bool,
    pub axes: Vec<Axis>,
    pub diagonal: Diagonal,
    pub unordered: bool,
    /// The named stage bodies of `sweep.ops`, in file order.
    pub ops: Vec<(String, Node)>,
    /// `seeds:`: every variant runs once per seed (empty: once, with the pipeline's seed).
    pub seeds: Vec<u64>,
    /// With `seeds:`, each base variant's runs are consecutive, one per seed in list order.
    pub variants: Vec<Variant>,
}

/// A 2-D grid laid out as a matrix: rows are the first axis, columns the second.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub rows: Vec<String>,
    pub cols: Vec<String>,
    /// The variant shown in each cell: with `unordered`, (b,a) shows the (a,b) variant.
    pub cells: Vec<Vec<Option<usize>>>,
}

impl Sweep {
    /// The grid as a matrix when it has exactly two axes.
    pub fn matrix(&self) -> Option<Matrix> {
        let [a, b] = self.axes.as_slice() else { return None };
        if !self.grid {
            return None;
        }
        // With `seeds:` a cell has one run per seed: the first stands for the cell.
        let mut by_cell: HashMap<&[usize], usize> = HashMap::new();
        for (i, v) in self.variants.iter().enumerate() {
            by_cell.entry(v.cell.as_slice()).or_insert(i);
        }
        let key = |i: usize, j: usize| {
            let mut k = [a.choices[i].0.value.as_str(), b.choices[j].0.value.as_str()];
            k.sort_unstable();
            k
        };
        let mut by_names: HashMap<[&str; 2], usize> = HashMap::new();
        for (idx, v) in self.variants.iter().enumerate() {
            if let [i, j] = v.cell.as_slice() {
                by_names.entry(key(*i, *j)).or_insert(idx);
            }
        }
        let cells = (0..a.choices.len())
            .map(|i| {
                (0..b.choices.len())
                    .map(|j| {
                        by_cell.get([i, j].as_slice()).copied().or_else(|| {
                            if self.unordered {
                                by_names.get(&key(i, j)).copied()
                            } else {
                                None
                            }
                        })
                    })
                    .collect()
            })
            .collect();
        Some(Matrix {
            rows: a.names().into_iter().map(String::from).collect(),
            cols: b.names().into_iter().map(String::from).collect(),
            cells,
        })
    }

    /// Checks every variant's pipeline with `check` (parse is already done; this is where the
    /// registry comes in) and returns what it made of each, or every problem of every variant,
    /// each naming its variant(s).
    pub fn check<P>(
        &self,
        mut check: impl FnMut(&Variant, PipelineSpec) -> Result<P, Diagnostics>,
    ) -> Result<Vec<P>, Diagnostics> {
        let mut problems = Collector::default();
        let mut out = Vec::with_capacity(self.variants.len());
        for v in &self.variants {
            match self.spec(v).and_then(|spec| check(v, spec)) {
                Ok(p) => out.push(p),
                Err(d) => problems.add(&v.name, d),
            }
        }
        problems.into_result(self.variants.len(), out)
    }

    /// A variant's pipeline, shape-checked (not yet against the registry).
    pub fn spec(&self, v: &Variant) -> Result<PipelineSpec, Diagnostics> {
        let mut diags = Diagnostics::default();
        let spec = spec::from_doc(&self.file, v.doc.clone(), &mut diags);
        diags.into_result(spec)
    }
}

/// Gathers problems of many variants, merging the ones that are the same in several.
#[derive(Default)]
struct Collector {
    items: Vec<(Diagnostic, Vec<String>)>,
}

impl Collector {
    fn add(&mut self, variant: &str, diags: Diagnostics) {
        for d in diags.0 {
            match self.items.iter_mut().find(|(e, _)| *e == d) {
                Some((_, names)) => names.push(variant.to_string()),
                None => self.items.push((d, vec![variant.to_string()])),
            }
        }
    }

    fn into_result<T>(self, total: usize, value: T) -> Result<T, Diagnostics> {
        let mut out = Diagnostics::default();
        for (d, names) in self.items {
            let context = if names.len() == total && total > 1 {
                "every variant".to_string()
            } else if names.len() == 1 {
                format!("variant '{}'", names[0])
            } else {
                let shown: Vec<String> = names.iter().take(4).map(|n| format!("'{n}'")).collect();
                let more = names.len().saturating_sub(4);
                let tail = if more > 0 { format!(" and {more} more") } else { String::new() };
                format!("variants {}{tail}", shown.join(", "))
            };
            out.push(d.context(context));
        }
        out.into_result(value)
    }
}
