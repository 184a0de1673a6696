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

/// The results table: method x dataset, linear (top-1 / top-5), kNN top-1, and fine-tuned top-1
/// for each label fraction.
pub fn table(results: &Map<String, Value>) -> String {
    let list = |key: &str| -> Vec<&Value> {
        results.get(key).and_then(Value::as_array).map(|a| a.iter().collect()).unwrap_or_default()
    };
    let (evals, finetunes) = (list("evals"), list("finetunes"));
    let mut datasets: Vec<String> = Vec::new();
    for e in evals.iter().chain(&finetunes) {
        if let Some(d) = e["dataset"].as_str() {
            if !datasets.iter().any(|x| x == d) {
                datasets.push(d.to_string());
            }
        }
    }
    // (dataset, percent) pairs of fine-tuning runs, in order.
    let mut ft_cols: Vec<(String, f64)> = Vec::new();
    for f in &finetunes {
        if let (Some(d), Some(p)) = (f["dataset"].as_str(), f["label_fraction"].as_f64()) {
            let pct = (p * 100.0).round();
            if !ft_cols.iter().any(|(x, q)| x == d && *q == pct) {
                ft_cols.push((d.to_string(), pct));
            }
        }
    }
    let mut s = String::new();
    let _ = write!(s, "| method |");
    for d in &datasets {
        let _ = write!(s, " {d} linear top-1 | {d} linear top-5 | {d} kNN top-1 |");
    }
    for (d, pct) in &ft_cols {
        let _ = write!(s, " {d} fine-tuned ({pct}% labels) top-1 |");
    }
    s.push('\n');
    s.push_str("|---|");
    s.push_str(&"---:|".repeat(3 * datasets.len() + ft_cols.len()));
    s.push('\n');
    let mut methods = methods(results);
    for f in &finetunes {
        if let Some(m) = f["method"].as_str() {
            if !methods.iter().any(|x| x == m) {
                methods.push(m.to_string());
            }
        }
    }
    for m in methods {
        let _ = write!(s, "| {} |", label(&m));
        for d in &datasets {
            // The last evaluation of this method on this dataset holds its final figures.
            let metrics = evals
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
                " {} | {} | {} |",
                pct(metrics.get("linear_top1")),
                pct(metrics.get("linear_top5")),
                pct(metrics.get("knn_top1"))
            );
        }
        for (d, p) in &ft_cols {
            let key = format!("finetune_{p}pct_top1");
            let v = finetunes
                .iter()
                .rev()
                .find(|f| f["method"].as_str() == Some(&m) && f["dataset"].as_str() == Some(d))
                .and_then(|f| f["metrics"].get(&key));
            let _ = write!(s, " {} |", pct(v));
        }
        s.push('\n');
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
            "Accuracy (%) on the held-out split, frozen encoders (the paper's Table 8 shape: linear \
                    evaluation next to the baselines from the same backbone).\n\n",
        );
        s.push_str(&table(results));
        s.push('\n');
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
        "Files: `pipeline.yaml` (the resolved pipeline), `metrics.jsonl` (one line per step and epoch), \
                `results.json` (every final metric).\n",
    );
    std::fs::write(dir.join("report.md"), s)
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
    let lines: Vec<Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
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
            match simclr_stages::report::preview::write_png(&img, &dir.join("views.png")) {
                Ok(()) => out.push("views.png".into()),
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
                {"method": "simclr", "dataset": "cifar10", "metrics": {"linear_top1": 70.25, "knn_top1": 60.0}},
            ],
            "finetunes": [
                {"method": "simclr", "dataset": "cifar10", "label_fraction": 0.1, "metrics": {"finetune_10pct_top1": 80.0}},
            ]
        });
        let t = table(r.as_object().unwrap_or(&Map::new()));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].contains("cifar10 linear top-1") && lines[0].contains("fine-tuned (10% labels)"));
        assert_eq!(lines[2], "| SimCLR (ours) | 70.2 | - | 60.0 | 80.0 |");
        assert_eq!(lines[3], "| Random init | 30.0 | 80.0 | - | - |");
    }
}
