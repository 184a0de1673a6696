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
//! Everything works on the positioned YAML tree, so a bad change or a variant that does not
//! validate is reported at the line and column where it is written, naming the variant.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Diagnostic, Diagnostics};
use crate::spec::{self, PipelineSpec};
use crate::yaml::{Node, Pos, Spanned};

const SWEEP_KEYS: &[&str] = &["metrics", "variants", "grid", "ops", "diagonal", "unordered"];

/// Metrics a sweep reports when `metrics:` is not given.
pub const DEFAULT_METRICS: &[&str] = &["simclr.linear_top1", "simclr.knn_top1"];

/// The file that marks a variant as finished (written last, atomically, by a run).
pub const RESULTS_FILE: &str = "results.json";

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
    /// Its directory name: the axis choices joined with `+`.
    pub name: String,
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
        let by_cell: HashMap<&[usize], usize> =
            self.variants.iter().enumerate().map(|(i, v)| (v.cell.as_slice(), i)).collect();
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

/// Reads the `sweep:` section of a pipeline document (after `--set`) and expands it into
/// variants with their changes applied. `Ok(None)` when the document has no `sweep:`.
pub fn parse(file: &Path, doc: &Spanned<Node>) -> Result<Option<Sweep>, Diagnostics> {
    let Some(section) = doc.value.get("sweep") else { return Ok(None) };
    let mut diags = Diagnostics::default();
    let d = |pos: Pos, msg: String| Diagnostic::new(file, pos, format!("sweep: {msg}"));
    let Node::Map(entries) = &section.value else {
        diags.push(
            d(section.pos, format!("`sweep` must be a mapping, found {}", section.value.type_name())).fix(
                "write `sweep: {variants: {NAME: {STAGE.FIELD: VALUE}, ...}}` or `sweep: {grid: [...]}`",
            ),
        );
        return Err(sorted(diags));
    };
    for (k, _) in entries {
        if !SWEEP_KEYS.contains(&k.value.as_str()) {
            let hint = match crate::suggest(&k.value, SWEEP_KEYS.iter().copied()) {
                Some(s) => format!("did you mean `{s}`? the sweep keys are {}", SWEEP_KEYS.join(", ")),
                None => format!("the sweep keys are {}", SWEEP_KEYS.join(", ")),
            };
            diags.push(d(k.pos, format!("unknown key `{}`", k.value)).fix(hint));
        }
    }

    let metrics = match section.value.get("metrics") {
        None => DEFAULT_METRICS.iter().map(|s| s.to_string()).collect(),
        Some(m) => {
            let items: Vec<&Spanned<Node>> = match &m.value {
                Node::Seq(items) => items.iter().collect(),
                _ => vec![m],
            };
            let mut out = Vec::new();
            for it in items {
                match &it.value {
                    Node::Str(s) if !s.is_empty() && s.split('.').all(|p| !p.is_empty()) => {
                        out.push(s.clone())
                    }
                    other => diags.push(
                        d(
                            it.pos,
                            format!(
                                "a metric is a dotted path into results.json, found {}",
                                describe_found(other)
                            ),
                        )
                        .fix("write e.g. `metrics: [simclr.linear_top1, simclr.knn_top1]`"),
                    ),
                }
            }
            if out.is_empty() && matches!(&m.value, Node::Seq(items) if items.is_empty()) {
                diags.push(
                    d(m.pos, "`metrics` is empty".into())
                        .fix("list at least one, e.g. `metrics: [simclr.linear_top1]`, or remove the key"),
                );
            }
            out
        }
    };

    let ops = parse_ops(file, section.value.get("ops"), &mut diags);

    let variants_node = section.value.get("variants");
    let grid_node = section.value.get("grid");
    let grid = grid_node.is_some();
    let mut axes = Vec::new();
    match (variants_node, grid_node) {
        (Some(v), Some(_)) => diags.push(
            d(v.pos, "both `variants` and `grid` given".into())
                .fix("keep one: `variants` is a list of variants, `grid` the product of axes"),
        ),
        (None, None) => diags.push(
            d(section.pos, "no `variants` or `grid`".into())
                .fix("add e.g. `variants: {weak: {color.strength: 0.25}, strong: {color.strength: 1.0}}`"),
        ),
        (Some(v), None) => {
            if let Some(axis) = parse_axis(file, v, &ops, &mut diags) {
                axes.push(axis);
            }
        }
        (None, Some(g)) => match &g.value {
            Node::Seq(items) if !items.is_empty() => {
                for it in items {
                    if let Some(axis) = parse_axis(file, it, &ops, &mut diags) {
                        axes.push(axis);
                    }
                }
            }
            other => diags.push(
                d(g.pos, format!("`grid` must be a non-empty list of axes, found {}", describe_found(other)))
                    .fix("write `grid: [{a: {...}, b: {...}}, {stage: ID, ops: [NAME, ...]}]`"),
            ),
        },
    }

    let mut diagonal = Diagonal::Combine;
    if let Some(v) = section.value.get("diagonal") {
        match v.value.as_str() {
            Some("combine") => {}
            Some("alone") => diagonal = Diagonal::Alone,
            _ => diags.push(
                d(
                    v.pos,
                    format!("`diagonal` must be `alone` or `combine`, found {}", describe_found(&v.value)),
                )
                .fix("`alone`: a cell that picks the same name on every axis is that variant alone"),
            ),
        }
        if grid_node.is_none() || axes.len() < 2 {
            diags.push(
                d(v.pos, "`diagonal` applies to a grid of two or more axes".into())
                    .fix("remove it, or add a second axis under `grid`"),
            );
        }
    }
    let mut unordered = false;
    if let Some(v) = section.value.get("unordered") {
        match v.value {
            Node::Bool(b) => unordered = b,
            _ => diags.push(
                d(v.pos, format!("`unordered` must be true or false, found {}", describe_found(&v.value)))
                    .fix("`unordered: true` runs (a,b) and skips (b,a)"),
            ),
        }
        if grid_node.is_none() || axes.len() < 2 {
            diags.push(
                d(v.pos, "`unordered` applies to a grid of two or more axes".into())
                    .fix("remove it, or add a second axis under `grid`"),
            );
        }
    }
    if !diags.is_empty() {
        return Err(sorted(diags));
    }

    let mut base = doc.clone();
    if let Node::Map(top) = &mut base.value {
        top.retain(|(k, _)| k.value != "sweep");
    }
    let cells = expand(&axes, diagonal, unordered);
    if diagonal == Diagonal::Alone && !cells.iter().any(|c| c.alone) {
        if let Some(v) = section.value.get("diagonal") {
            diags.push(
                d(v.pos, "`diagonal: alone` but no cell picks the same name on every axis".into())
                    .fix("give the axes the same choice names (e.g. the same `ops`)"),
            );
            return Err(sorted(diags));
        }
    }
    let mut problems = Collector::default();
    let mut variants: Vec<Variant> = Vec::with_capacity(cells.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for c in cells {
        let name = c.name(&axes);
        let changes: Vec<Change> = c
            .cell
            .iter()
            .enumerate()
            .take(if c.alone { 1 } else { axes.len() })
            .flat_map(|(a, &i)| axes[a].choices[i].1.iter().cloned())
            .collect();
        let first_pos =
            axes.first().and_then(|a| a.choices.get(c.cell[0])).map_or(section.pos, |(n, _)| n.pos);
        if let Some(&prev) = seen.get(&name) {
            diags.push(
                d(
                    first_pos,
                    format!(
                        "two variants are named `{name}` (cells {:?} and {:?})",
                        variants[prev].cell, c.cell
                    ),
                )
                .fix("rename a choice so every variant name is unique (names are joined with `+`)"),
            );
            continue;
        }
        let mut vdoc = base.clone();
        let mut errs = Diagnostics::default();
        for ch in &changes {
            if let Err((what, fix)) =
                spec::apply_change(&mut vdoc, &ch.target.value, ch.value.clone(), Some(ch.target.pos))
            {
                errs.push(
                    Diagnostic::new(file, ch.target.pos, format!("`{}`: {what}", ch.target.value)).fix(fix),
                );
            }
        }
        if !errs.is_empty() {
            problems.add(&name, errs);
        }
        seen.insert(name.clone(), variants.len());
        variants.push(Variant { name, cell: c.cell, changes, doc: vdoc });
    }
    if !diags.is_empty() {
        return Err(sorted(diags));
    }
    let total = variants.len();
    let ops = ops.into_iter().map(|(k, v)| (k.value, v.value)).collect();
    let sweep = Sweep { file: file.to_path_buf(), metrics, grid, axes, diagonal, unordered, ops, variants };
    problems.into_result(total, Some(sweep))
}

fn sorted(mut d: Diagnostics) -> Diagnostics {
    d.0.sort_by_key(|d| d.pos);
    d
}

fn describe_found(node: &Node) -> String {
    match node {
        Node::Seq(_) | Node::Map(_) | Node::Null => node.type_name().to_string(),
        other => format!("`{}`", spec::describe(other)),
    }
}

/// Names usable as directory names: letters, digits, `_`, `-`, `.`, `+`; not starting with `.`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && !s.starts_with('.')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '+'))
}

fn parse_ops(
    file: &Path,
    node: Option<&Spanned<Node>>,
    diags: &mut Diagnostics,
) -> Vec<(Spanned<String>, Spanned<Node>)> {
    let Some(node) = node else { return Vec::new() };
    let d = |pos: Pos, msg: String| Diagnostic::new(file, pos, format!("sweep: {msg}"));
    let Node::Map(entries) = &node.value else {
        diags.push(
            d(
                node.pos,
                format!("`ops` must be a mapping of stage bodies, found {}", describe_found(&node.value)),
            )
            .fix("write e.g. `ops: {cutout: {kind: cutout, views: [0]}}`"),
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    for (k, v) in entries {
        if !valid_name(&k.value) {
            diags.push(d(k.pos, format!("invalid op name `{}`", k.value)).fix(NAME_FIX));
            continue;
        }
        match &v.value {
            Node::Map(_) if v.value.get("kind").is_some() => out.push((k.clone(), v.clone())),
            other => diags.push(
                d(
                    v.pos,
                    format!(
                        "op `{}` must be a stage body with a `kind`, found {}",
                        k.value,
                        describe_found(other)
                    ),
                )
                .fix("write e.g. `cutout: {kind: cutout, views: [0]}`"),
            ),
        }
    }
    out
}

const NAME_FIX: &str = "use letters, digits, `_`, `-`, `.` and `+` (it names a directory)";

fn parse_axis(
    file: &Path,
    node: &Spanned<Node>,
    ops: &[(Spanned<String>, Spanned<Node>)],
    diags: &mut Diagnostics,
) -> Option<Axis> {
    let d = |pos: Pos, msg: String| Diagnostic::new(file, pos, format!("sweep: {msg}"));
    let Node::Map(entries) = &node.value else {
        diags.push(
            d(node.pos, format!("an axis is a mapping of variants, found {}", describe_found(&node.value)))
                .fix("write `{NAME: {STAGE.FIELD: VALUE, ...}, ...}` or `{stage: ID, ops: [NAME, ...]}`"),
        );
        return None;
    };
    if entries.is_empty() {
        diags.push(d(node.pos, "an axis without variants".into()).fix("add at least one, e.g. `base: {}`"));
        return None;
    }
    // `{stage: ID, ops: [...]}`: a variant's value is a mapping or null, never a string, so a
    // string `stage` marks this form.
    let ops_form = entries.len() == 2
        && matches!(node.value.get("stage").map(|s| &s.value), Some(Node::Str(_)))
        && node.value.get("ops").is_some();
    if ops_form {
        let (stage, list) = (node.value.get("stage")?, node.value.get("ops")?);
        let stage_name = Spanned::new(stage.value.as_str().unwrap_or_default().to_string(), stage.pos);
        let Node::Seq(items) = &list.value else {
            diags.push(
                d(
                    list.pos,
                    format!("`ops` of an axis is a list of op names, found {}", describe_found(&list.value)),
                )
                .fix("write e.g. `ops: [crop, cutout, color]` naming entries of `sweep.ops`"),
            );
            return None;
        };
        let mut choices: Vec<(Spanned<String>, Vec<Change>)> = Vec::new();
        for it in items {
            let Some(name) = it.value.as_str() else {
                diags.push(
                    d(it.pos, format!("an op is named by a string, found {}", describe_found(&it.value)))
                        .fix("name an entry of `sweep.ops`"),
                );
                continue;
            };
            if choices.iter().any(|(n, _)| n.value == name) {
                diags.push(d(it.pos, format!("op `{name}` listed twice")).fix("keep one"));
                continue;
            }
            match ops.iter().find(|(k, _)| k.value == name) {
                Some((_, body)) => choices.push((
                    Spanned::new(name.to_string(), it.pos),
                    vec![Change {
                        target: stage_name.clone(),
                        value: body.clone(),
                        op: Some(name.to_string()),
                    }],
                )),
                None => {
                    let names: Vec<&str> = ops.iter().map(|(k, _)| k.value.as_str()).collect();
                    let fix = match crate::suggest(name, names.iter().copied()) {
                        Some(s) => format!("did you mean `{s}`? ops: {}", names.join(", ")),
                        None if names.is_empty() => {
                            "define it under `sweep.ops`, e.g. `ops: {cutout: {kind: cutout}}`".into()
                        }
                        None => format!("define it under `sweep.ops` (ops: {})", names.join(", ")),
                    };
                    diags.push(d(it.pos, format!("no op `{name}`")).fix(fix));
                }
            }
        }
        if choices.is_empty() {
            if items.is_empty() {
                diags.push(d(list.pos, "an axis without ops".into()).fix("list at least one op"));
            }
            return None;
        }
        return Some(Axis { stage: Some(stage_name.value), choices });
    }
    let mut choices = Vec::new();
    for (name, body) in entries {
        if !valid_name(&name.value) {
            diags.push(d(name.pos, format!("invalid variant name `{}`", name.value)).fix(NAME_FIX));
            continue;
        }
        let changes = match &body.value {
            Node::Null => Vec::new(),
            Node::Map(changes) => changes
                .iter()
                .map(|(k, v)| Change { target: k.clone(), value: v.clone(), op: None })
                .collect(),
            other => {
                diags.push(
                    d(body.pos, format!("variant `{}` must be a mapping of changes, found {}", name.value, describe_found(other)))
                        .fix("write e.g. `{color.strength: 0.5}`, `{blur: off}`, `{color: {kind: color_jitter}}`, or `{}` for the base pipeline"),
                );
                continue;
            }
        };
        choices.push((name.clone(), changes));
    }
    if choices.is_empty() {
        return None;
    }
    Some(Axis { stage: None, choices })
}

struct Cell {
    cell: Vec<usize>,
    alone: bool,
}

impl Cell {
    fn name(&self, axes: &[Axis]) -> String {
        let names: Vec<&str> =
            self.cell.iter().enumerate().map(|(a, &i)| axes[a].choices[i].0.value.as_str()).collect();
        if self.alone {
            names[0].to_string()
        } else {
            names.join("+")
        }
    }
}

/// The cells of the grid, first axis outermost; with `unordered`, a cell whose names are a
/// permutation of an earlier cell's is left out.
fn expand(axes: &[Axis], diagonal: Diagonal, unordered: bool) -> Vec<Cell> {
    let mut out = Vec::new();
    if axes.is_empty() {
        return out;
    }
    let mut seen: Vec<Vec<&str>> = Vec::new();
    let mut idx = vec![0usize; axes.len()];
    loop {
        let names: Vec<&str> =
            idx.iter().enumerate().map(|(a, &i)| axes[a].choices[i].0.value.as_str()).collect();
        let alone = diagonal == Diagonal::Alone && axes.len() > 1 && names.iter().all(|n| *n == names[0]);
        let mut sorted = names.clone();
        sorted.sort_unstable();
        if !(unordered && seen.contains(&sorted)) {
            seen.push(sorted);
            out.push(Cell { cell: idx.clone(), alone });
        }
        // Odometer: the last axis turns fastest.
        let mut a = axes.len();
        loop {
            if a == 0 {
                return out;
            }
            a -= 1;
            idx[a] += 1;
            if idx[a] < axes[a].choices.len() {
                break;
            }
            idx[a] = 0;
        }
    }
}

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

/// Runs one variant's pipeline into its directory, as `simclr run` would; behind a trait so
/// tests can use a fake.
pub trait VariantRunner {
    type Error: From<SweepError>;
    /// Runs `variant` (the `index`-th) into `dir`, which exists; a finished run leaves
    /// `dir/results.json` (written last, atomically).
    fn run(&mut self, index: usize, variant: &Variant, dir: &Path) -> Result<(), Self::Error>;
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
}

/// Whether a variant directory holds a finished run.
pub fn finished(variant_dir: &Path) -> bool {
    variant_dir.join(RESULTS_FILE).is_file()
}

/// Runs every variant not yet finished into `dir/<variant>/`, one after another, stopping at
/// the first failure. Before anything runs, every finished variant is checked to have run the
/// pipeline it has now (its `pipeline.yaml`).
pub fn run<R: VariantRunner>(
    sweep: &Sweep,
    dir: &Path,
    runner: &mut R,
    mut on: impl FnMut(Event<'_>),
) -> Result<(), R::Error> {
    std::fs::create_dir_all(dir).map_err(io("create the sweep directory", dir))?;
    let stale: Vec<String> = sweep
        .variants
        .iter()
        .filter(|v| {
            let vdir = dir.join(&v.name);
            finished(&vdir) && !same_pipeline(&vdir.join("pipeline.yaml"), &v.doc)
        })
        .map(|v| v.name.clone())
        .collect();
    if !stale.is_empty() {
        return Err(SweepError::Stale { dir: dir.to_path_buf(), variants: stale }.into());
    }
    let total = sweep.variants.len();
    for (index, v) in sweep.variants.iter().enumerate() {
        let vdir = dir.join(&v.name);
        if finished(&vdir) {
            on(Event::Skipped { variant: v, dir: vdir });
            continue;
        }
        if vdir.exists() {
            // An interrupted run: keep its files (logs, metrics) but out of the new run's way.
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
        on(Event::Starting { index, total, variant: v, dir: vdir.clone() });
        runner.run(index, v, &vdir)?;
    }
    Ok(())
}

/// Whether the resolved pipeline a run wrote (JSON) is `doc`. A missing or unreadable file
/// counts as the same: there is nothing to compare against.
fn same_pipeline(path: &Path, doc: &Spanned<Node>) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else { return true };
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) => v == doc.value.to_json(),
        Err(_) => true,
    }
}

/// Writes a file so that it exists either whole or not at all: a temporary file beside it,
/// synced, then renamed over it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut tmp_name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// One row of the sweep report.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub variant: String,
    pub changes: String,
    pub finished: bool,
    /// One per metric; `None` where the variant has not finished or lacks the metric.
    pub values: Vec<Option<f64>>,
}

/// The sweep's results: one row per variant, in sweep order.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub metrics: Vec<String>,
    pub rows: Vec<Row>,
    /// Problems reading results (unreadable files); the report still has every row.
    pub warnings: Vec<String>,
}

/// Follows a dotted path (`simclr.linear_top1`, `chains.0.samples`) to a number.
pub fn metric(results: &serde_json::Value, path: &str) -> Option<f64> {
    let mut cur = results;
    for seg in path.split('.') {
        cur = match cur {
            serde_json::Value::Object(m) => m.get(seg)?,
            serde_json::Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    cur.as_f64()
}

/// Reads every variant's `results.json` under `dir`.
pub fn report(sweep: &Sweep, dir: &Path) -> Report {
    let mut warnings = Vec::new();
    let rows = sweep
        .variants
        .iter()
        .map(|v| {
            let path = dir.join(&v.name).join(RESULTS_FILE);
            let results = match std::fs::read_to_string(&path) {
                Ok(text) => match serde_json::from_str::<serde_json::Value>(&text) {
                    Ok(j) => Some(j),
                    Err(e) => {
                        warnings.push(format!("{}: not JSON ({e}); its cells are empty", path.display()));
                        None
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    warnings.push(format!("cannot read {}: {e}", path.display()));
                    None
                }
            };
            Row {
                variant: v.name.clone(),
                changes: v.describe(),
                finished: results.is_some(),
                values: sweep.metrics.iter().map(|m| results.as_ref().and_then(|r| metric(r, m))).collect(),
            }
        })
        .collect();
    Report { metrics: sweep.metrics.clone(), rows, warnings }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn number(v: Option<f64>) -> String {
    v.map(|x| x.to_string()).unwrap_or_default()
}

impl Report {
    /// `variant,changes,METRIC...`, one row per variant; a missing value is an empty cell.
    pub fn to_csv(&self) -> String {
        let mut out = String::new();
        let header: Vec<String> = ["variant", "changes"]
            .iter()
            .map(|s| s.to_string())
            .chain(self.metrics.iter().cloned())
            .collect();
        out.push_str(&header.iter().map(|h| csv_field(h)).collect::<Vec<_>>().join(","));
        out.push('\n');
        for r in &self.rows {
            let mut cells = vec![csv_field(&r.variant), csv_field(&r.changes)];
            cells.extend(r.values.iter().map(|v| number(*v)));
            out.push_str(&cells.join(","));
            out.push('\n');
        }
        out
    }

    /// A Markdown page: the table of every variant, and for a 2-D grid the first metric as
    /// a matrix (rows: first axis, columns: second axis).
    pub fn to_markdown(&self, sweep: &Sweep, chart: Option<&str>) -> String {
        let md = |s: &str| s.replace('|', "\\|");
        let fmt = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_default();
        let mut out = format!("# Sweep of {}\n\n", sweep.file.display());
        let done = self.rows.iter().filter(|r| r.finished).count();
        out.push_str(&format!("{} variants, {done} finished.\n\n", self.rows.len()));
        out.push_str(&format!(
            "| variant | changes | {} |\n",
            self.metrics.iter().map(|m| md(m)).collect::<Vec<_>>().join(" | ")
        ));
        out.push_str(&format!("| --- | --- |{}\n", " ---: |".repeat(self.metrics.len())));
        for r in &self.rows {
            let changes =
                if r.changes.is_empty() { "(base)".to_string() } else { format!("`{}`", md(&r.changes)) };
            let status = if r.finished { "" } else { " (not finished)" };
            out.push_str(&format!(
                "| {}{status} | {changes} | {} |\n",
                md(&r.variant),
                r.values.iter().map(|v| fmt(*v)).collect::<Vec<_>>().join(" | ")
            ));
        }
        if let (Some(m), Some(first)) = (sweep.matrix(), self.metrics.first()) {
            out.push_str(&format!(
                "\n## {} (rows: first axis, columns: second axis{})\n\n",
                md(first),
                if sweep.diagonal == Diagonal::Alone { "; diagonal: the op alone" } else { "" }
            ));
            out.push_str(&format!(
                "| | {} |\n",
                m.cols.iter().map(|c| md(c)).collect::<Vec<_>>().join(" | ")
            ));
            out.push_str(&format!("| --- |{}\n", " ---: |".repeat(m.cols.len())));
            for (i, row) in m.cells.iter().enumerate() {
                let cells: Vec<String> = row
                    .iter()
                    .map(|c| fmt(c.and_then(|idx| self.rows.get(idx)).and_then(|r| r.values[0])))
                    .collect();
                out.push_str(&format!("| **{}** | {} |\n", md(&m.rows[i]), cells.join(" | ")));
            }
        }
        if !sweep.ops.is_empty() {
            out.push_str("\n## Ops\n\n| op | stage |\n| --- | --- |\n");
            for (name, body) in &sweep.ops {
                out.push_str(&format!("| {} | `{}` |\n", md(name), md(&spec::describe(body))));
            }
        }
        if let Some(chart) = chart {
            out.push_str(&format!(
                "\n![{}]({chart})\n",
                self.metrics.first().map(|s| md(s)).unwrap_or_default()
            ));
        }
        if !self.warnings.is_empty() {
            out.push_str("\n## Warnings\n\n");
            for w in &self.warnings {
                out.push_str(&format!("- {}\n", md(w)));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "name: t\nstages:\n  - { id: data, kind: counter, count: 10 }\n  - { id: first, kind: identity }\n  - { id: second, kind: identity, workers: 2 }\n  - { id: color, kind: color_distort, strength: 0.5 }\n  - { id: sink, kind: null }\n";

    fn sweep_of(section: &str) -> Result<Option<Sweep>, Diagnostics> {
        let src = format!("{BASE}{section}");
        let doc = crate::yaml::parse(&src).unwrap();
        parse(Path::new("p.yaml"), &doc)
    }

    fn ok(section: &str) -> Sweep {
        match sweep_of(section) {
            Ok(Some(s)) => s,
            Ok(None) => panic!("no sweep"),
            Err(d) => panic!("{d}"),
        }
    }

    fn err(section: &str) -> String {
        match sweep_of(section) {
            Err(d) => d.to_string(),
            Ok(_) => panic!("expected errors for {section}"),
        }
    }

    fn names(s: &Sweep) -> Vec<&str> {
        s.variants.iter().map(|v| v.name.as_str()).collect()
    }

    fn stage<'a>(doc: &'a Spanned<Node>, id: &str) -> Option<&'a Spanned<Node>> {
        let Node::Seq(items) = &doc.value.get("stages")?.value else { return None };
        items.iter().find(|s| s.value.get("id").and_then(|i| i.value.as_str()) == Some(id))
    }

    fn stage_ids(doc: &Spanned<Node>) -> Vec<String> {
        let Some(Node::Seq(items)) = doc.value.get("stages").map(|s| &s.value) else { return vec![] };
        items.iter().filter_map(|s| s.value.get("id")?.value.as_str().map(String::from)).collect()
    }

    const FIG5: &str = "sweep:\n  ops:\n    crop: { kind: random_resized_crop, size: 8, views: [0] }\n    cutout: { kind: cutout, views: [0] }\n    color: { kind: color_distort, views: [0] }\n  grid:\n    - { stage: first, ops: [crop, cutout, color] }\n    - { stage: second, ops: [crop, cutout, color] }\n  diagonal: alone\n";

    #[test]
    fn no_sweep_section_is_none() {
        assert!(sweep_of("").unwrap().is_none());
    }

    #[test]
    fn a_list_keeps_file_order_and_names() {
        let s = ok("sweep:\n  metrics: [simclr.knn_top1]\n  variants:\n    base: {}\n    weak: { color.strength: 0.25 }\n    none: { color: off }\n");
        assert_eq!(names(&s), ["base", "weak", "none"]);
        assert_eq!(s.metrics, ["simclr.knn_top1"]);
        assert!(s.variants[0].changes.is_empty());
        assert_eq!(s.variants[1].describe(), "color.strength=0.25");
        assert_eq!(s.variants[2].describe(), "color=off");
        assert!(s.matrix().is_none());
        // The sweep section is not part of the variants' pipelines.
        assert!(s.variants[0].doc.value.get("sweep").is_none());
    }

    #[test]
    fn metrics_default() {
        let s = ok("sweep:\n  variants: { a: {} }\n");
        assert_eq!(s.metrics, DEFAULT_METRICS);
    }

    #[test]
    fn a_grid_is_the_cartesian_product_first_axis_outermost() {
        let s = ok("sweep:\n  grid:\n    - { crop: {}, nocrop: { first: off } }\n    - { s1: { color.strength: 1.0 }, s2: { color.strength: 2.0 }, s3: { color: off } }\n");
        assert_eq!(s.variants.len(), 6);
        assert_eq!(names(&s), ["crop+s1", "crop+s2", "crop+s3", "nocrop+s1", "nocrop+s2", "nocrop+s3"]);
        assert_eq!(s.variants[4].cell, [1, 1]);
        assert_eq!(s.variants[4].describe(), "first=off; color.strength=2.0");
        assert_eq!(stage_ids(&s.variants[5].doc), ["data", "second", "sink"]);
        let three = ok("sweep:\n  grid:\n    - { a: {}, b: {} }\n    - { c: {}, d: {} }\n    - { e: {}, f: {}, g: {} }\n");
        assert_eq!(three.variants.len(), 12);
        assert_eq!(three.variants[11].name, "b+d+g");
    }

    #[test]
    fn figure5_diagonal_is_the_op_alone() {
        let s = ok(FIG5);
        assert_eq!(s.variants.len(), 9);
        assert_eq!(
            names(&s),
            [
                "crop",
                "crop+cutout",
                "crop+color",
                "cutout+crop",
                "cutout",
                "cutout+color",
                "color+crop",
                "color+cutout",
                "color"
            ]
        );
        // (cutout, cutout) swaps `first` only; `second` stays the base identity.
        let alone = &s.variants[4];
        assert_eq!(alone.cell, [1, 1]);
        assert_eq!(
            stage(&alone.doc, "first").unwrap().value.get("kind").unwrap().value.as_str(),
            Some("cutout")
        );
        assert_eq!(
            stage(&alone.doc, "second").unwrap().value.get("kind").unwrap().value.as_str(),
            Some("identity")
        );
        let pair = &s.variants[5];
        assert_eq!(
            stage(&pair.doc, "second").unwrap().value.get("kind").unwrap().value.as_str(),
            Some("color_distort")
        );
        let m = s.matrix().unwrap();
        assert_eq!(m.rows, ["crop", "cutout", "color"]);
        assert_eq!(m.cols, m.rows);
        assert_eq!(m.cells[1][1], Some(4));
        assert_eq!(m.cells[2][0], Some(6));
        // Without `alone` the diagonal applies both.
        let both = ok(&FIG5.replace("  diagonal: alone\n", ""));
        assert_eq!(both.variants[4].name, "cutout+cutout");
        assert_eq!(
            stage(&both.variants[4].doc, "second").unwrap().value.get("kind").unwrap().value.as_str(),
            Some("cutout")
        );
    }

    #[test]
    fn unordered_skips_the_mirror_and_the_matrix_shows_it() {
        let s = ok(&format!("{FIG5}  unordered: true\n"));
        assert_eq!(names(&s), ["crop", "crop+cutout", "crop+color", "cutout", "cutout+color", "color"]);
        let m = s.matrix().unwrap();
        // (cutout, crop) was not run: the cell shows (crop, cutout).
        assert_eq!(m.cells[1][0], Some(1));
        assert_eq!(m.cells[0][1], Some(1));
        assert_eq!(m.cells[2][2], Some(5));
        let plain = ok(FIG5);
        assert_eq!(plain.matrix().unwrap().cells[1][0], Some(3));
    }

    #[test]
    fn a_swap_keeps_id_position_and_wiring() {
        let s = ok("sweep:\n  variants:\n    j: { second: { kind: color_jitter, brightness: 0.4 } }\n    k: { second: { kind: cutout, workers: 1 } }\n");
        let doc = &s.variants[0].doc;
        assert_eq!(stage_ids(doc), ["data", "first", "second", "color", "sink"]);
        let st = stage(doc, "second").unwrap();
        assert_eq!(st.value.get("kind").unwrap().value.as_str(), Some("color_jitter"));
        assert_eq!(st.value.get("brightness").unwrap().value, Node::Float(0.4));
        // Threading carries over unless the swap gives it.
        assert_eq!(st.value.get("workers").unwrap().value, Node::Int(2));
        assert_eq!(
            stage(&s.variants[1].doc, "second").unwrap().value.get("workers").unwrap().value,
            Node::Int(1)
        );
        // The swapped stage points at where the swap is written (line 10 of the file).
        assert_eq!(st.pos.line, 10);
        // The base's own fields of the old stage are gone.
        assert!(stage(doc, "second").unwrap().value.get("strength").is_none());
    }

    #[test]
    fn the_command_line_can_swap_a_stage_too() {
        let mut doc = crate::yaml::parse(BASE).unwrap();
        spec::apply_override(&mut doc, "second={kind: cutout, p: 0.5}").unwrap();
        let st = stage(&doc, "second").unwrap();
        assert_eq!(st.value.get("kind").unwrap().value.as_str(), Some("cutout"));
        assert_eq!(st.value.get("workers").unwrap().value, Node::Int(2));
        // A command-line value has no place in the file: it keeps the replaced stage's.
        assert_eq!(st.pos.line, 5);
        let e = spec::apply_override(&mut doc, "second={p: 1}").unwrap_err();
        assert!(e.0.contains("can only be switched `off` or swapped"), "{e:?}");
        let e = spec::apply_override(&mut doc, "second={kind: cutout, id: other}").unwrap_err();
        assert!(e.0.contains("keeps the stage id"), "{e:?}");
    }

    #[test]
    fn the_command_line_reaches_into_the_sweep_section() {
        let src = format!("{BASE}sweep:\n  variants: {{ a: {{}} }}\n");
        let mut doc = crate::yaml::parse(&src).unwrap();
        spec::apply_override(&mut doc, "sweep.metrics=[simclr.knn_top1]").unwrap();
        spec::apply_override(&mut doc, "sweep.variants.b={color: off}").unwrap();
        let s = parse(Path::new("p.yaml"), &doc).unwrap().unwrap();
        assert_eq!(s.metrics, ["simclr.knn_top1"]);
        assert_eq!(names(&s), ["a", "b"]);
    }

    #[test]
    fn overrides_set_nested_fields_and_top_level_keys() {
        let s = ok("sweep:\n  variants:\n    a: { color.strength: 0.125, color.extra.deep: 3, seed: 7 }\n");
        let doc = &s.variants[0].doc;
        let color = stage(doc, "color").unwrap();
        assert_eq!(color.value.get("strength").unwrap().value, Node::Float(0.125));
        assert_eq!(color.value.get("extra").unwrap().value.get("deep").unwrap().value, Node::Int(3));
        assert_eq!(doc.value.get("seed").unwrap().value, Node::Int(7));
        // The new value is positioned where the variant writes it.
        assert_eq!(color.value.get("strength").unwrap().pos, Pos { line: 10, col: 26 });
    }

    #[test]
    fn bad_changes_point_at_the_change_and_name_the_variant() {
        let e = err("sweep:\n  variants:\n    a: {}\n    b: { colr.strength: 1 }\n    c: { color: 3 }\n");
        assert!(e.contains("p.yaml:11:10: variant 'b': `colr.strength`: no stage `colr`"), "{e}");
        assert!(e.contains("did you mean `color`"), "{e}");
        assert!(
            e.contains(
                "p.yaml:12:10: variant 'c': `color`: a whole stage can only be switched `off` or swapped"
            ),
            "{e}"
        );
        // The same bad change in several cells is reported once, naming them.
        let e = err("sweep:\n  grid:\n    - { x: { nope: off } }\n    - { a: {}, b: {} }\n");
        assert_eq!(e.lines().count(), 1, "{e}");
        assert!(e.contains("every variant: `nope`: no stage `nope`"), "{e}");
    }

    #[test]
    fn shape_errors_are_all_reported_with_positions() {
        let e = err("sweep:\n  variants: { a: 3, .bad: {} }\n  metric: [x]\n  diagonal: alone\n");
        assert!(e.contains("p.yaml:9:18: sweep: variant `a` must be a mapping of changes"), "{e}");
        assert!(e.contains("p.yaml:9:21: sweep: invalid variant name `.bad`"), "{e}");
        assert!(e.contains("p.yaml:10:3: sweep: unknown key `metric`"), "{e}");
        assert!(e.contains("did you mean `metrics`"), "{e}");
        assert!(e.contains("p.yaml:11:13: sweep: `diagonal` applies to a grid of two or more axes"), "{e}");
        let e = err(
            "sweep:\n  ops: { crop: { kind: cutout } }\n  grid:\n    - { stage: first, ops: [crop, crp] }\n",
        );
        assert!(e.contains("p.yaml:11:35: sweep: no op `crp` (did you mean `crop`?"), "{e}");
        assert!(err("sweep: {}\n").contains("no `variants` or `grid`"));
        let e = err("sweep:\n  grid:\n    - { a: {}, b: {} }\n    - { a: {}, b: {} }\n  unordered: 3\n");
        assert!(e.contains("p.yaml:12:14: sweep: `unordered` must be true or false, found `3`"), "{e}");
        let e = err("sweep:\n  grid:\n    - { a: {} }\n    - { b: {} }\n  diagonal: alone\n");
        assert!(e.contains("no cell picks the same name"), "{e}");
    }

    #[test]
    fn duplicate_variant_names_are_refused() {
        let e = err("sweep:\n  grid:\n    - { a+b: {}, a: {} }\n    - { c: {}, b+c: {} }\n");
        assert!(e.contains("two variants are named `a+b+c`"), "{e}");
    }

    #[test]
    fn check_reports_every_variant_with_its_name() {
        let s = ok("sweep:\n  variants:\n    good: {}\n    bad: { color.strength: -1 }\n    worse: { color.strength: -2 }\n");
        let e = s
            .check(|v, spec| {
                let node = spec.stages[3].config.value.get("strength").cloned();
                match node.as_ref().map(|n| &n.value) {
                    Some(Node::Float(f)) if *f >= 0.0 => Ok(v.name.clone()),
                    _ => {
                        let pos = node.map_or(Pos::default(), |n| n.pos);
                        Err(Diagnostics(vec![Diagnostic::new("p.yaml", pos, "out of range").stage("color")]))
                    }
                }
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.yaml:11:28: variant 'bad': stage 'color': out of range"), "{e}");
        assert!(e.contains("p.yaml:12:30: variant 'worse': stage 'color': out of range"), "{e}");
        assert!(!e.contains("'good'"), "{e}");
    }

    struct Fake {
        ran: Vec<String>,
        fail_on: Option<String>,
    }

    impl VariantRunner for Fake {
        type Error = String;
        fn run(&mut self, index: usize, v: &Variant, dir: &Path) -> Result<(), String> {
            self.ran.push(v.name.clone());
            if self.fail_on.as_deref() == Some(v.name.as_str()) {
                std::fs::write(dir.join("metrics.jsonl"), "{}\n").map_err(|e| e.to_string())?;
                return Err(format!("{} failed", v.name));
            }
            let json = serde_json::to_string_pretty(&v.doc.value.to_json()).map_err(|e| e.to_string())?;
            std::fs::write(dir.join("pipeline.yaml"), json).map_err(|e| e.to_string())?;
            let results = serde_json::json!({
                "simclr": { "linear_top1": 50.0 + index as f64, "knn_top1": 40.0 + index as f64 },
                "chains": [],
            });
            write_atomic(&dir.join(RESULTS_FILE), results.to_string().as_bytes()).map_err(|e| e.to_string())
        }
    }

    impl From<SweepError> for String {
        fn from(e: SweepError) -> String {
            e.to_string()
        }
    }

    #[test]
    fn resume_skips_finished_variants_and_reruns_unfinished_ones() {
        let s =
            ok("sweep:\n  variants:\n    a: {}\n    b: { color.strength: 0.25 }\n    c: { color: off }\n");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("sweep");
        let mut fake = Fake { ran: vec![], fail_on: Some("b".into()) };
        let e = run(&s, &dir, &mut fake, |_| {}).unwrap_err();
        assert_eq!(e, "b failed");
        assert_eq!(fake.ran, ["a", "b"]);
        assert!(finished(&dir.join("a")) && !finished(&dir.join("b")));

        let mut fake = Fake { ran: vec![], fail_on: None };
        let mut events = Vec::new();
        run(&s, &dir, &mut fake, |e| {
            events.push(match e {
                Event::Skipped { variant, .. } => format!("skip {}", variant.name),
                Event::MovedAside { variant, to } => {
                    format!("aside {} {}", variant.name, to.file_name().unwrap().to_string_lossy())
                }
                Event::Starting { index, total, variant, .. } => {
                    format!("start {} {index}/{total}", variant.name)
                }
            })
        })
        .unwrap();
        assert_eq!(fake.ran, ["b", "c"]);
        assert_eq!(events, ["skip a", "aside b b.1", "start b 1/3", "start c 2/3"]);
        // The interrupted run's files were kept, out of the way.
        assert!(dir.join(".partial/b.1/metrics.jsonl").is_file());
        assert!(!dir.join("b/metrics.jsonl").exists());

        // Everything finished: nothing runs.
        let mut fake = Fake { ran: vec![], fail_on: None };
        run(&s, &dir, &mut fake, |_| {}).unwrap();
        assert!(fake.ran.is_empty());

        // The report has a row per variant with the metrics.
        let rep = report(&s, &dir);
        assert_eq!(rep.rows.len(), 3);
        assert_eq!(rep.rows[1].values, [Some(51.0), Some(41.0)]);
        let csv = rep.to_csv();
        assert_eq!(
            csv,
            "variant,changes,simclr.linear_top1,simclr.knn_top1\na,,50,40\nb,color.strength=0.25,51,41\nc,color=off,52,42\n"
        );
        let md = rep.to_markdown(&s, Some("chart.png"));
        assert!(md.contains("| b | `color.strength=0.25` | 51.00 | 41.00 |"), "{md}");
        assert!(md.contains("| a | (base) | 50.00 | 40.00 |"), "{md}");

        // A finished variant whose pipeline changed since is refused before anything runs.
        let changed = ok("sweep:\n  variants:\n    a: {}\n    b: { color.strength: 0.5 }\n    c: { color: off }\n    d: {}\n");
        let mut fake = Fake { ran: vec![], fail_on: None };
        let e = run(&changed, &dir, &mut fake, |_| {}).unwrap_err();
        assert!(e.contains("finished variant 'b' ran with a different pipeline"), "{e}");
        assert!(fake.ran.is_empty());
    }

    #[test]
    fn report_leaves_missing_metrics_empty() {
        let s = ok("sweep:\n  metrics: [simclr.linear_top1, chains.0.samples, nope.x]\n  variants: { a: {}, b: {}, c: {} }\n");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        std::fs::create_dir_all(dir.join("a")).unwrap();
        std::fs::create_dir_all(dir.join("c")).unwrap();
        std::fs::write(dir.join("a/results.json"), r#"{"chains": [{"samples": 50}]}"#).unwrap();
        std::fs::write(dir.join("c/results.json"), "{not json").unwrap();
        let rep = report(&s, &dir);
        assert_eq!(rep.rows[0].values, [None, Some(50.0), None]);
        assert!(rep.rows[0].finished && !rep.rows[1].finished);
        assert_eq!(rep.rows[2].values, [None, None, None]);
        assert_eq!(rep.warnings.len(), 1);
        assert!(rep.to_csv().contains("\na,,,50,\nb,,,,\n"));
        let md = rep.to_markdown(&s, None);
        assert!(md.contains("| b (not finished) |"), "{md}");
        assert!(md.contains("## Warnings"), "{md}");
    }

    #[test]
    fn markdown_has_the_matrix_for_a_2d_grid() {
        let s = ok(FIG5);
        let rows = s
            .variants
            .iter()
            .enumerate()
            .map(|(i, v)| Row {
                variant: v.name.clone(),
                changes: v.describe(),
                finished: true,
                values: vec![Some(i as f64), None],
            })
            .collect();
        let rep = Report { metrics: s.metrics.clone(), rows, warnings: vec![] };
        let md = rep.to_markdown(&s, Some("chart.png"));
        assert!(md.contains("| | crop | cutout | color |"), "{md}");
        assert!(md.contains("| **cutout** | 3.00 | 4.00 | 5.00 |"), "{md}");
        assert!(md.contains("![simclr.linear_top1](chart.png)"), "{md}");
    }

    #[test]
    fn csv_quotes_what_needs_it() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"x\""), "\"say \"\"x\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }

    #[test]
    fn write_atomic_replaces_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let p = dir.join("results.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "two");
        assert!(!dir.join("results.json.tmp").exists());
    }
}
