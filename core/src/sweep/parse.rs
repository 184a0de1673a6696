//! The `sweep:` section: parsing its keys and changes, and expanding a grid into variants.

use std::path::Path;

use super::*;
use crate::yaml::Pos;

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
    let seeds = parse_seeds(file, section.value.get("seeds"), &mut diags);

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
        // One run per seed (or one with the pipeline's seed), the seed set last.
        let runs: Vec<Option<&Spanned<u64>>> =
            if seeds.is_empty() { vec![None] } else { seeds.iter().map(Some).collect() };
        for seed in runs {
            let (run_name, mut run_changes, mut run_doc) = (name.clone(), changes.clone(), vdoc.clone());
            let run_name = match seed {
                None => run_name,
                Some(sd) => {
                    let value = Spanned { value: Node::Int(sd.value as i64), pos: sd.pos };
                    // `seed` is a top-level key of every pipeline: this cannot fail on a
                    // document the sweep parsed, but an error is still reported, not dropped.
                    if let Err((what, fix)) =
                        spec::apply_change(&mut run_doc, "seed", value.clone(), Some(sd.pos))
                    {
                        errs.push(Diagnostic::new(file, sd.pos, format!("`seed`: {what}")).fix(fix));
                    }
                    run_changes.push(Change {
                        target: Spanned { value: "seed".into(), pos: sd.pos },
                        value,
                        op: None,
                    });
                    format!("{run_name}+seed{}", sd.value)
                }
            };
            if let Some(&prev) = seen.get(&run_name) {
                diags.push(
                    d(
                        first_pos,
                        format!(
                            "two variants are named `{run_name}` (cells {:?} and {:?})",
                            variants[prev].cell, c.cell
                        ),
                    )
                    .fix("rename a choice so every variant name is unique (names are joined with `+`)"),
                );
                continue;
            }
            seen.insert(run_name.clone(), variants.len());
            variants.push(Variant {
                name: run_name,
                base: name.clone(),
                seed: seed.map(|s| s.value),
                cell: c.cell.clone(),
                changes: run_changes,
                doc: run_doc,
            });
        }
        if !errs.is_empty() {
            problems.add(&name, errs);
        }
    }
    if !diags.is_empty() {
        return Err(sorted(diags));
    }
    let total = variants.len();
    let ops = ops.into_iter().map(|(k, v)| (k.value, v.value)).collect();
    let seeds = seeds.into_iter().map(|s| s.value).collect();
    let sweep =
        Sweep { file: file.to_path_buf(), metrics, grid, axes, diagonal, unordered, ops, seeds, variants };
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

/// `seeds: [42, 7, 123]`: whole numbers from 0, each once.
fn parse_seeds(file: &Path, node: Option<&Spanned<Node>>, diags: &mut Diagnostics) -> Vec<Spanned<u64>> {
    let Some(node) = node else { return Vec::new() };
    let d = |pos: Pos, msg: String| Diagnostic::new(file, pos, format!("sweep: {msg}"));
    let items = match &node.value {
        Node::Seq(items) if !items.is_empty() => items,
        other => {
            diags.push(
                d(
                    node.pos,
                    format!("`seeds` must be a non-empty list of seeds, found {}", describe_found(other)),
                )
                .fix(
                    "write e.g. `seeds: [42, 7, 123]` (every variant runs once per seed), or remove the key",
                ),
            );
            return Vec::new();
        }
    };
    let mut out: Vec<Spanned<u64>> = Vec::new();
    for it in items {
        match it.value {
            Node::Int(n) if n >= 0 => {
                let n = n as u64;
                if out.iter().any(|s| s.value == n) {
                    diags.push(
                        d(it.pos, format!("seed {n} is listed twice"))
                            .fix("list each seed once: the same seed gives the same run"),
                    );
                } else {
                    out.push(Spanned { value: n, pos: it.pos });
                }
            }
            ref other => diags.push(
                d(it.pos, format!("a seed is a whole number from 0, found {}", describe_found(other)))
                    .fix("write e.g. `seeds: [42, 7, 123]`"),
            ),
        }
    }
    out
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
