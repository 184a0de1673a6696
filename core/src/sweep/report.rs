//! The sweep report: every variant's metrics as CSV and Markdown.

use std::path::Path;

use super::run::{failure, VariantFailure};
use super::{spec, Diagonal, Sweep, RESULTS_FILE};

/// One row of the sweep report.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub variant: String,
    pub changes: String,
    pub finished: bool,
    /// Why it has no results, when it failed or diverged.
    pub failure: Option<VariantFailure>,
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

/// One metric over the seeds of a variant: mean and sample standard deviation (n - 1) of the
/// runs that have it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stat {
    pub mean: f64,
    /// `None` with a single value.
    pub sd: Option<f64>,
    pub n: usize,
}

impl Stat {
    fn of(values: &[f64]) -> Option<Stat> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let sd =
            (n > 1).then(|| (values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt());
        Some(Stat { mean, sd, n })
    }

    /// `58.40 ± 1.52` (or `58.40` from one run).
    fn show(&self) -> String {
        match self.sd {
            Some(sd) => format!("{:.2} ± {sd:.2}", self.mean),
            None => format!("{:.2}", self.mean),
        }
    }
}

/// A variant's runs over the sweep's `seeds:`, summarized.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    /// The variant's name without the seed.
    pub variant: String,
    pub changes: String,
    /// Indices into [`Report::rows`], one per seed.
    pub rows: Vec<usize>,
    pub finished: usize,
    /// One per metric, over the runs that have it.
    pub stats: Vec<Option<Stat>>,
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
                failure: if results.is_some() { None } else { failure(&dir.join(&v.name)) },
                values: sweep.metrics.iter().map(|m| results.as_ref().and_then(|r| metric(r, m))).collect(),
            }
        })
        .collect();
    Report { metrics: sweep.metrics.clone(), rows, warnings }
}

pub(super) fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn number(v: Option<f64>) -> String {
    v.map(|x| x.to_string()).unwrap_or_default()
}

impl Row {
    /// `finished`, `diverged at step N`, `failed: REASON` or `not finished`.
    pub fn status(&self) -> String {
        match (&self.failure, self.finished) {
            (_, true) => "finished".into(),
            (Some(f), false) => f.describe(),
            (None, false) => "not finished".into(),
        }
    }
}

impl Report {
    /// With `seeds:`, one group per variant (its runs over the seeds), in sweep order; else
    /// empty.
    pub fn groups(&self, sweep: &Sweep) -> Vec<Group> {
        if sweep.seeds.is_empty() {
            return Vec::new();
        }
        let mut out: Vec<Group> = Vec::new();
        for (i, v) in sweep.variants.iter().enumerate() {
            if i >= self.rows.len() {
                break;
            }
            match out.iter_mut().find(|g| g.variant == v.base) {
                Some(g) => g.rows.push(i),
                None => out.push(Group {
                    variant: v.base.clone(),
                    // The changes without the seed, which the runs do not share.
                    changes: v
                        .changes
                        .iter()
                        .filter(|c| !(c.target.value == "seed" && v.seed.is_some()))
                        .map(super::Change::describe)
                        .collect::<Vec<_>>()
                        .join("; "),
                    rows: vec![i],
                    finished: 0,
                    stats: Vec::new(),
                }),
            }
        }
        for g in &mut out {
            g.finished = g.rows.iter().filter(|&&i| self.rows[i].finished).count();
            g.stats = (0..self.metrics.len())
                .map(|m| {
                    let vals: Vec<f64> = g.rows.iter().filter_map(|&i| self.rows[i].values[m]).collect();
                    Stat::of(&vals)
                })
                .collect();
        }
        out
    }

    /// The first metric of variant `idx` as a chart or matrix shows it: with `seeds:`, the
    /// mean over its seeds.
    pub fn shown_value(&self, sweep: &Sweep, idx: usize) -> Option<f64> {
        if sweep.seeds.is_empty() {
            return self.rows.get(idx)?.values.first().copied().flatten();
        }
        let base = &sweep.variants.get(idx)?.base;
        let group = self.groups(sweep).into_iter().find(|g| &g.variant == base)?;
        group.stats.first().copied().flatten().map(|s| s.mean)
    }

    /// With `seeds:`: `variant,changes,runs,finished,METRIC_mean,METRIC_sd,...`, one row per
    /// variant (`results-mean.csv`); `None` without seeds.
    pub fn to_mean_csv(&self, sweep: &Sweep) -> Option<String> {
        if sweep.seeds.is_empty() {
            return None;
        }
        let mut header = vec!["variant".to_string(), "changes".into(), "runs".into(), "finished".into()];
        for m in &self.metrics {
            header.push(format!("{m}_mean"));
            header.push(format!("{m}_sd"));
        }
        let mut out = header.iter().map(|h| csv_field(h)).collect::<Vec<_>>().join(",");
        out.push('\n');
        for g in self.groups(sweep) {
            let mut cells = vec![
                csv_field(&g.variant),
                csv_field(&g.changes),
                g.rows.len().to_string(),
                g.finished.to_string(),
            ];
            for s in &g.stats {
                cells.push(number(s.map(|s| s.mean)));
                cells.push(number(s.and_then(|s| s.sd)));
            }
            out.push_str(&cells.join(","));
            out.push('\n');
        }
        Some(out)
    }

    /// `variant,changes,METRIC...`, one row per variant; a missing value is an empty cell.
    pub fn to_csv(&self) -> String {
        let mut out = String::new();
        let header: Vec<String> = ["variant", "changes", "status"]
            .iter()
            .map(|s| s.to_string())
            .chain(self.metrics.iter().cloned())
            .collect();
        out.push_str(&header.iter().map(|h| csv_field(h)).collect::<Vec<_>>().join(","));
        out.push('\n');
        for r in &self.rows {
            let mut cells = vec![csv_field(&r.variant), csv_field(&r.changes), csv_field(&r.status())];
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
        let failed = self.rows.iter().filter(|r| r.failure.is_some()).count();
        let failed = if failed > 0 { format!(", {failed} failed or diverged") } else { String::new() };
        out.push_str(&format!("{} variants, {done} finished{failed}.\n\n", self.rows.len()));
        out.push_str(&format!(
            "| variant | changes | {} |\n",
            self.metrics.iter().map(|m| md(m)).collect::<Vec<_>>().join(" | ")
        ));
        out.push_str(&format!("| --- | --- |{}\n", " ---: |".repeat(self.metrics.len())));
        for r in &self.rows {
            let changes =
                if r.changes.is_empty() { "(base)".to_string() } else { format!("`{}`", md(&r.changes)) };
            let status = if r.finished { String::new() } else { format!(" ({})", md(&r.status())) };
            out.push_str(&format!(
                "| {}{status} | {changes} | {} |\n",
                md(&r.variant),
                r.values.iter().map(|v| fmt(*v)).collect::<Vec<_>>().join(" | ")
            ));
        }
        let groups = self.groups(sweep);
        if !groups.is_empty() {
            let seeds: Vec<String> = sweep.seeds.iter().map(u64::to_string).collect();
            out.push_str(&format!(
                "\n## Mean ± standard deviation over seeds {}\n\n| variant | changes | runs | {} |\n",
                seeds.join(", "),
                self.metrics.iter().map(|m| md(m)).collect::<Vec<_>>().join(" | ")
            ));
            out.push_str(&format!("| --- | --- | ---: |{}\n", " ---: |".repeat(self.metrics.len())));
            for g in &groups {
                let changes =
                    if g.changes.is_empty() { "(base)".to_string() } else { format!("`{}`", md(&g.changes)) };
                let cells: Vec<String> =
                    g.stats.iter().map(|s| s.map(|s| s.show()).unwrap_or_default()).collect();
                out.push_str(&format!(
                    "| {} | {changes} | {}/{} | {} |\n",
                    md(&g.variant),
                    g.finished,
                    g.rows.len(),
                    cells.join(" | ")
                ));
            }
        }
        if let (Some(m), Some(first)) = (sweep.matrix(), self.metrics.first()) {
            out.push_str(&format!(
                "\n## {}{} (rows: first axis, columns: second axis{})\n\n",
                md(first),
                if groups.is_empty() { "" } else { ", mean over the seeds" },
                if sweep.diagonal == Diagonal::Alone { "; diagonal: the op alone" } else { "" }
            ));
            out.push_str(&format!(
                "| | {} |\n",
                m.cols.iter().map(|c| md(c)).collect::<Vec<_>>().join(" | ")
            ));
            out.push_str(&format!("| --- |{}\n", " ---: |".repeat(m.cols.len())));
            for (i, row) in m.cells.iter().enumerate() {
                let cells: Vec<String> =
                    row.iter().map(|c| fmt(c.and_then(|idx| self.shown_value(sweep, idx)))).collect();
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
