//! `simclr bench --train-steps N` on a pipeline with a training stage: real steps fed by the
//! pipeline, timed from the trainer's own per-step metrics.

use simclr_core::driver::{build_chain, Mode};
use simclr_core::yaml::Node;
use simclr_core::{run_chain, Plan, RunOptions};

use crate::failure::Failure;

/// The training stage kinds whose steps can be timed.
const TRAINERS: &[&str] = &["simclr_train"];

/// Runs `steps` + 1 training steps (the first is a warm-up and not counted) and summarizes
/// them; `None` when the pipeline has no training stage or `steps` is 0.
pub fn measure(plan: &Plan, opts: &RunOptions, steps: u64) -> Result<Option<serde_json::Value>, Failure> {
    if steps == 0 {
        return Ok(None);
    }
    let Some(chain) = plan
        .chains()
        .into_iter()
        .find(|c| c.sink.is_some_and(|s| TRAINERS.contains(&plan.stages[s].kind.as_str())))
    else {
        return Ok(None);
    };
    let batch_size = chain
        .batch
        .and_then(|b| plan.stages[b].fields.value.get("batch_size").cloned())
        .and_then(|n| match n.value {
            Node::Int(i) if i > 0 => Some(i as u64),
            _ => None,
        })
        .ok_or_else(|| {
            Failure::Invalid("the training stage needs a `batch` stage with a `batch_size`".into())
        })?;
    let dir = std::env::temp_dir().join(format!("simclr-bench-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Failure::Runtime(format!("cannot create {}: {e}", dir.display())))?;
    let mut o = opts.clone();
    o.run_dir = Some(dir.clone());
    o.max_samples = Some((steps + 1) * batch_size);
    o.epochs = None;
    o.digest = false;
    eprintln!("bench: timing {steps} training steps (+1 warm-up) of {batch_size} pairs");
    // Sources the training stage reads besides its stream (a kNN monitor's data).
    simclr_core::driver::data_sources(plan, &o)?;
    let stages = build_chain(plan, &chain, Mode::Full, Some(&dir), &o.artifacts)?;
    let result = run_chain(stages, &o);
    let metrics = std::fs::read_to_string(dir.join(simclr_core::run_dir::METRICS_FILE)).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    let rows: Vec<serde_json::Value> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("type").and_then(serde_json::Value::as_str) == Some("step"))
        .collect();
    let timed: Vec<&serde_json::Value> = rows.iter().skip(1).collect();
    if timed.is_empty() {
        return Err(Failure::Runtime(
            "the training stage logged no steps to time: it logs every `log_every` steps; \
             add `--set TRAIN.log_every=1` (TRAIN: the training stage's id)"
                .into(),
        ));
    }
    let field = |v: &serde_json::Value, k: &str| v.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
    let mut step_s: Vec<f64> = timed.iter().map(|v| field(v, "step_s")).collect();
    step_s.sort_by(f64::total_cmp);
    let median = step_s[step_s.len() / 2];
    let wait: f64 = timed.iter().map(|v| field(v, "data_wait_s")).sum();
    let busy: f64 = step_s.iter().sum();
    let gflop = timed.first().map_or(0.0, |v| field(v, "gflop"));
    let gflops = gflop / median.max(1e-12);
    let sink = chain.sink.map(|s| &plan.stages[s]);
    let device = sink
        .and_then(|s| s.fields.value.get("device"))
        .and_then(|n| match &n.value {
            Node::Str(d) => Some(d.clone()),
            _ => None,
        })
        .unwrap_or_else(|| "cpu".to_string());
    let mut out = serde_json::json!({
        "steps": timed.len(),
        "pairs_per_batch": batch_size,
        "device": device,
        "step_s_median": median,
        "images_per_s": 2.0 * batch_size as f64 / median.max(1e-12),
        "data_wait_frac": wait / (wait + busy).max(1e-12),
        "gflop_per_step": gflop,
        "gflops": gflops,
        "peak_gflops": null,
        "peak_frac": null,
        "kernel": null,
        "step_s": step_s,
    });
    // On the CPU: achieved GFLOP/s against the GEMM microkernel's own speed on every thread of
    // the budget. A GPU's peak is not known from here (scripts/gpu-check.sh has a table).
    if device == "cpu" {
        let (kernel_gflops, kernel) = simclr_train::cpu::kernel_peak_gflops();
        let cores = opts.threads.min(simclr_core::runtime::default_threads()).max(1);
        let peak = kernel_gflops * cores as f64;
        out["peak_gflops"] = peak.into();
        out["peak_frac"] = (gflops / peak.max(1e-12)).into();
        out["kernel"] = kernel.into();
    }
    Ok(Some(out))
}
