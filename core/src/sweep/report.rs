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
