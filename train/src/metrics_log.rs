//! The training stages' metrics: one JSON line per step and epoch in `metrics.jsonl` (the
//! record resume and the report read), and the same numbers as TensorBoard scalars in `tb/`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use simclr_core::tensorboard::EventWriter;
use simclr_core::StageError;

/// The open metrics files of one stage (opened on its first line).
pub(crate) struct MetricsLog {
    jsonl: BufWriter<File>,
    /// `None` once writing events failed (warned once; `metrics.jsonl` stays the record).
    tb: Option<EventWriter>,
}

/// Appends one line to `metrics.jsonl` in `run_dir` (none: no run directory, nothing written),
/// opening it on first use; flushed per line so a crash loses nothing written. Its numbers also
/// go to TensorBoard (see [`tb_prefix`]).
pub(crate) fn append_metrics(
    log: &mut Option<MetricsLog>,
    run_dir: Option<&Path>,
    line: &serde_json::Value,
) -> Result<(), StageError> {
    let Some(dir) = run_dir else { return Ok(()) };
    let path = dir.join(simclr_core::run_dir::METRICS_FILE);
    let log = match log {
        Some(l) => l,
        None => {
            let f = File::options()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| StageError::fatal(format!("cannot open {}: {e}", path.display())))?;
            let tb = EventWriter::create(dir)
                .map_err(|e| {
                    tracing::warn!("cannot write TensorBoard events in {}: {e}", dir.join("tb").display())
                })
                .ok();
            log.insert(MetricsLog { jsonl: BufWriter::new(f), tb })
        }
    };
    writeln!(log.jsonl, "{line}")
        .and_then(|_| log.jsonl.flush())
        .map_err(|e| StageError::fatal(format!("cannot write {}: {e}", path.display())))?;
    if let Some(tb) = log.tb.as_mut() {
        if let Err(e) = write_scalars(tb, line) {
            tracing::warn!("cannot write {}: {e}; TensorBoard events stop here", tb.path().display());
            log.tb = None;
        }
    }
    Ok(())
}

/// The TensorBoard group of a metrics line: `train` (steps), `train_epoch`, `monitor` (kNN
/// during training), `<stage>` and `<stage>_epoch` for a supervised stage; `None` for lines
/// that are not measurements (`resume`).
fn tb_prefix(line: &serde_json::Value) -> Option<String> {
    let stage = line.get("stage").and_then(|s| s.as_str());
    Some(match (line.get("type")?.as_str()?, stage) {
        ("step", _) => "train".into(),
        ("epoch", _) => "train_epoch".into(),
        ("monitor", _) => "monitor".into(),
        ("supervised_step", Some(s)) => s.to_string(),
        ("supervised_epoch", Some(s)) => format!("{s}_epoch"),
        _ => return None,
    })
}

/// Every number of the line but its position (`step`, `epoch`, `steps`) as `<prefix>/<key>`.
fn write_scalars(tb: &mut EventWriter, line: &serde_json::Value) -> std::io::Result<()> {
    let (Some(prefix), Some(fields)) = (tb_prefix(line), line.as_object()) else { return Ok(()) };
    let step = line.get("step").and_then(|s| s.as_u64()).unwrap_or(0);
    for (key, v) in fields {
        if matches!(key.as_str(), "step" | "epoch" | "steps") {
            continue;
        }
        if let Some(x) = v.as_f64() {
            tb.scalar(&format!("{prefix}/{key}"), step, x)?;
        }
    }
    tb.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_grouped_scalars() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = None;
        let lines = [
            serde_json::json!({"type": "step", "step": 1, "epoch": 0, "loss": 4.5, "lr": 0.1}),
            serde_json::json!({"type": "resume", "step": 1, "epoch": 0}),
            serde_json::json!({"type": "supervised_epoch", "stage": "sup", "step": 3, "epoch": 0, "train_acc": 50.0}),
        ];
        for l in &lines {
            append_metrics(&mut log, Some(dir.path()), l).unwrap();
        }
        let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 3);
        let files: Vec<_> = std::fs::read_dir(dir.path().join("tb")).unwrap().collect();
        assert_eq!(files.len(), 1);
        let bytes = std::fs::read(files[0].as_ref().unwrap().path()).unwrap();
        let has = |tag: &str| bytes.windows(tag.len()).any(|w| w == tag.as_bytes());
        assert!(has("train/loss") && has("train/lr") && has("sup_epoch/train_acc"));
        assert!(!has("train/step") && !has("resume"));
        assert_eq!(tb_prefix(&lines[1]), None);
    }

    #[test]
    fn no_run_directory_writes_nothing() {
        let mut log = None;
        append_metrics(&mut log, None, &serde_json::json!({"type": "step", "loss": 1.0})).unwrap();
        assert!(log.is_none());
    }
}
