//! The run report: `results.json` (every final metric), `report.md` (the paper-shaped table),
//! plots of the training curves and the preview grid.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Map, Value};

/// Methods in the order the paper's tables list them.
const ORDER: &[&str] = &["simclr", "supervised", "random_init"];

fn label(method: &str) -> String {
    match method {
        "simclr" => "SimCLR (ours)".into(),
        "supervised" => "Supervised".into(),
        "random_init" => "Random init".into(),
        m => m.to_string(),
    }
}

fn methods(results: &Map<String, Value>) -> Vec<String> {
    let evaluated: Vec<String> = results
        .get("evals")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|e| e["method"].as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let mut out: Vec<String> =
        ORDER.iter().filter(|m| evaluated.iter().any(|e| e == *m)).map(|m| m.to_string()).collect();
    for m in evaluated {
        if !out.contains(&m) {
            out.push(m);
        }
    }
    out
}

fn pct(v: Option<&Value>) -> String {
    v.and_then(Value::as_f64).map_or_else(|| "-".into(), |x| format!("{x:.1}"))
}

fn list<'a>(results: &'a Map<String, Value>, key: &str) -> Vec<&'a Value> {
    results.get(key).and_then(Value::as_array).map(|a| a.iter().collect()).unwrap_or_default()
}

fn fraction(e: &Value) -> f64 {
    e["label_fraction"].as_f64().unwrap_or(1.0)
}

/// The results tables: linear evaluation with every label (the paper's Table 8 shape: method x
/// dataset, linear top-1 / top-5 / train top-1, kNN top-1), then, when the run has them, the
/// semi-supervised comparison on a share of the labels (Table 7's shape: from scratch, linear
/// probe and fine-tuned, top-1 with the training accuracy in brackets).
pub fn table(results: &Map<String, Value>) -> String {
    let (evals, finetunes) = (list(results, "evals"), list(results, "finetunes"));
    let full: Vec<&Value> = evals.iter().copied().filter(|e| fraction(e) >= 1.0).collect();
    let mut datasets: Vec<String> = Vec::new();
    for e in &full {
        if let Some(d) = e["dataset"].as_str() {
            if !datasets.iter().any(|x| x == d) {
                datasets.push(d.to_string());
            }
        }
    }
    let mut s = String::new();
    if !datasets.is_empty() {
        let _ = write!(s, "| method |");
        for d in &datasets {
            let _ = write!(s, " {d} linear top-1 | top-5 | train top-1 | kNN top-1 |");
        }
        s.push_str("\n|---|");
        s.push_str(&"---:|".repeat(4 * datasets.len()));
        s.push('\n');
        for m in methods(results) {
            let _ = write!(s, "| {} |", label(&m));
            for d in &datasets {
                // The last evaluation of this method on this dataset holds its final figures.
                let metrics = full
                    .iter()
                    .rev()
                    .filter(|e| e["method"].as_str() == Some(&m) && e["dataset"].as_str() == Some(d))
                    .fold(Map::new(), |mut acc, e| {
                        if let Some(o) = e["metrics"].as_object() {
                            for (k, v) in o {
                                acc.entry(k.clone()).or_insert_with(|| v.clone());
                            }
                        }
                        acc
                    });
                let _ = write!(
                    s,
                    " {} | {} | {} | {} |",
                    pct(metrics.get("linear_top1")),
                    pct(metrics.get("linear_top5")),
                    pct(metrics.get("linear_train_top1")),
                    pct(metrics.get("knn_top1"))
                );
            }
            s.push('\n');
        }
    }
    // The supervised baseline's own fit: a baseline stopped early would say so here.
    for (method, v) in results {
        if let Some(acc) = v.get("train_top1").and_then(Value::as_f64) {
            let _ = writeln!(
                s,
                "\n{} training accuracy (last epoch, augmented images): {acc:.1}%",
                label(method)
            );
        }
    }
    let semi = semi_supervised(&evals, &finetunes);
    if !semi.is_empty() {
        if !s.is_empty() {
            s.push('\n');
        }
        s.push_str(&semi);
    }
    s
}

/// Table 7's shape: rows from scratch / linear probe / fine-tuned, one column per (dataset,
/// label share); each cell `top-1 (train top-1)`.
fn semi_supervised(evals: &[&Value], finetunes: &[&Value]) -> String {
    let partial: Vec<&Value> = evals.iter().copied().filter(|e| fraction(e) < 1.0).collect();
    let mut cols: Vec<(String, f64)> = Vec::new();
    for e in partial.iter().chain(finetunes) {
        if let Some(d) = e["dataset"].as_str() {
            let f = fraction(e);
            if !cols.iter().any(|(x, g)| x == d && *g == f) {
                cols.push((d.to_string(), f));
            }
        }
    }
    if cols.is_empty() {
        return String::new();
    }
    let cell = |rows: &[&Value], method: Option<&str>, prefix: &str, d: &str, f: f64| -> String {
        let p = simclr_train::eval::subset::pct(f);
        let found = rows.iter().rev().find(|e| {
            e["dataset"].as_str() == Some(d)
                && fraction(e) == f
                && method.is_none_or(|m| e["method"].as_str() == Some(m))
                && e["metrics"].get(format!("{prefix}_{p}pct_top1")).is_some()
        });
        match found {
            Some(e) => {
                let top1 = pct(e["metrics"].get(format!("{prefix}_{p}pct_top1")));
                let train = e["metrics"].get(format!("{prefix}_{p}pct_train_top1"));
                match train {
                    Some(t) => format!("{top1} ({})", pct(Some(t))),
                    None => top1,
                }
            }
            None => "-".into(),
        }
    };
    let mut s = String::from("| with a share of the labels |");
    for (d, f) in &cols {
        let _ = write!(s, " {d}, {}% labels: top-1 (train) |", simclr_train::eval::subset::pct(*f));
    }
    s.push_str("\n|---|");
    s.push_str(&"---:|".repeat(cols.len()));
    s.push('\n');
    let rows: [(&str, &[&Value], Option<&str>, &str); 3] = [
        ("Supervised, from scratch", finetunes, Some("supervised"), "scratch"),
        ("SimCLR (ours), linear probe", &partial, Some("simclr"), "linear"),
        ("SimCLR (ours), fine-tuned", finetunes, Some("simclr"), "finetune"),
    ];
    for (name, source, method, prefix) in rows {
        let cells: Vec<String> = cols.iter().map(|(d, f)| cell(source, method, prefix, d, *f)).collect();
        if cells.iter().all(|c| c == "-") {
            continue;
        }
        let _ = writeln!(s, "| {name} | {} |", cells.join(" | "));
    }
    s
}

/// Writes `report.md` into `dir`.
pub fn write_markdown(
    dir: &Path,
    name: &str,
    results: &Map<String, Value>,
    plots: &[String],
) -> std::io::Result<()> {
    let mut s = format!("# {name}: run report\n\n");
    if results.get("evals").is_some() || results.get("finetunes").is_some() {
        s.push_str(
            "Accuracy (%) on the held-out split. First frozen encoders with every label (the paper's \
                    Table 8 shape: linear evaluation next to the baselines from the same backbone), then, \
                    when the run has them, a share of the labels (Table 7's shape: the same network trained \
                    from scratch, a linear probe on frozen SimCLR features and SimCLR fine-tuned, all on \
                    the same class-balanced subset). Training accuracy is in brackets, so overfitting \
                    shows.\n\n",
        );
        s.push_str(&table(results));
        s.push('\n');
        let warnings = list(results, "warnings");
        if !warnings.is_empty() {
            s.push_str("Warnings (results that may not support a claim):\n\n");
            for w in warnings {
                let _ = writeln!(
                    s,
                    "- '{}': {}",
                    w["stage"].as_str().unwrap_or("?"),
                    w["message"].as_str().unwrap_or("")
                );
            }
            s.push('\n');
        }
        if let Some(e) = results.get("evals").and_then(Value::as_array).and_then(|a| a.first()) {
            let _ = writeln!(
                s,
                "Features: {} training / {} test images, {} classes, dimension {}.\n",
                e["train_size"], e["test_size"], e["classes"], e["feature_dim"]
            );
        }
    } else {
        s.push_str("No evaluation stage ran (add `linear_eval` or `knn_eval` to get accuracies).\n\n");
    }
    for p in plots {
        let _ = writeln!(s, "![{p}]({p})\n");
    }
    s.push_str(
        "Files: `pipeline.yaml` (the resolved pipeline: `simclr run` it to reproduce this run), `metrics.jsonl` (one line per step and epoch), \
                `tb/` (the same as TensorBoard events: `tensorboard --logdir` this folder), `results.json` (every final metric).\n",
    );
    std::fs::write(dir.join(simclr_core::run_dir::REPORT_FILE), s)
}

/// Series of `key` against the step, from `metrics.jsonl` lines of type `kind`.
fn series(lines: &[Value], kind: &str, key: &str) -> Vec<(f64, f64)> {
    lines
        .iter()
        .filter(|l| l["type"].as_str() == Some(kind))
        .filter_map(|l| Some((l["step"].as_f64()?, l[key].as_f64()?)))
        .collect()
}

/// Draws the training curves of the run in `dir` (from its `metrics.jsonl`) and the preview grid
/// of the plan's first chain; returns the files written. A plot that cannot be drawn is logged
/// and left out: the run itself succeeded.
pub fn plots(dir: &Path, plan: &simclr_core::Plan) -> Vec<String> {
    let lines: Vec<Value> = std::fs::read_to_string(dir.join(simclr_core::run_dir::METRICS_FILE))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let mut out = Vec::new();
    let mut draw = |file: &str, title: &str, y: &str, s: Vec<(&str, Vec<(f64, f64)>)>| {
        if s.iter().all(|(_, pts)| pts.is_empty()) {
            return;
        }
        match crate::plot::line_chart(&dir.join(file), title, "step", y, &s) {
            Ok(()) => out.push(file.to_string()),
            Err(e) => tracing::warn!("cannot draw {file}: {e}"),
        }
    };
    draw(
        "loss.png",
        "SimCLR loss",
        "loss",
        vec![("per step", series(&lines, "step", "loss")), ("epoch mean", series(&lines, "epoch", "loss"))],
    );
    draw(
        "contrast_acc.png",
        "Contrastive accuracy (positive ranked first)",
        "contrast_acc",
        vec![
            ("per step", series(&lines, "step", "contrast_acc")),
            ("epoch mean", series(&lines, "epoch", "contrast_acc")),
        ],
    );
    draw("lr.png", "Learning rate", "lr", vec![("lr", series(&lines, "step", "lr"))]);
    draw(
        "knn.png",
        "kNN monitor accuracy (held-out split)",
        "top-1 %",
        vec![("kNN top-1", series(&lines, "monitor", "knn_top1"))],
    );
    draw(
        "supervised_loss.png",
        "Supervised baseline loss",
        "cross-entropy",
        vec![("per step", series(&lines, "supervised_step", "loss"))],
    );
    match simclr_stages::report::preview::collect(plan, 8) {
        Ok(rows) if !rows.is_empty() => {
            let img = simclr_stages::report::preview::grid(&rows, 96);
            match simclr_stages::report::preview::write_png(
                &img,
                &dir.join(simclr_core::run_dir::PREVIEW_FILE),
            ) {
                Ok(()) => out.push(simclr_core::run_dir::PREVIEW_FILE.into()),
                Err(e) => tracing::warn!("{e}"),
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot draw views.png: {e}"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_a_row_per_method_in_paper_order() {
        let r = serde_json::json!({
            "random_init": {"linear_top1": 30.0},
            "simclr": {"linear_top1": 70.0},
            "evals": [
                {"method": "random_init", "dataset": "cifar10", "metrics": {"linear_top1": 30.0, "linear_top5": 80.0}},
                {"method": "simclr", "dataset": "cifar10", "metrics": {"linear_top1": 70.25, "knn_top1": 60.0, "linear_train_top1": 75.0}},
                {"method": "simclr", "dataset": "cifar10", "label_fraction": 0.1,
                 "metrics": {"linear_10pct_top1": 61.0, "linear_10pct_train_top1": 90.0}},
            ],
            "finetunes": [
                {"method": "simclr", "dataset": "cifar10", "label_fraction": 0.1,
                 "metrics": {"finetune_10pct_top1": 80.0, "finetune_10pct_train_top1": 99.0}},
                {"method": "supervised", "dataset": "cifar10", "label_fraction": 0.1,
                 "metrics": {"scratch_10pct_top1": 50.0}},
            ]
        });
        let t = table(r.as_object().unwrap_or(&Map::new()));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 10, "{t}");
        assert!(
            lines[0].starts_with("| method | cifar10 linear top-1 | top-5 | train top-1 | kNN top-1 |"),
            "{t}"
        );
        assert_eq!(lines[2], "| SimCLR (ours) | 70.2 | - | 75.0 | 60.0 |");
        assert_eq!(lines[3], "| Random init | 30.0 | 80.0 | - | - |");
        assert_eq!(lines[5], "| with a share of the labels | cifar10, 10% labels: top-1 (train) |");
        assert_eq!(lines[7], "| Supervised, from scratch | 50.0 |");
        assert_eq!(lines[8], "| SimCLR (ours), linear probe | 61.0 (90.0) |");
        assert_eq!(lines[9], "| SimCLR (ours), fine-tuned | 80.0 (99.0) |");
    }
}
