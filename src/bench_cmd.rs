//! `simclr bench`: the data pipeline's throughput (and, with a training stage, real steps).

use simclr_core::driver::{has_sinks, Mode};
use simclr_core::{run_plan, Plan};

use crate::failure::Failure;
use crate::options::{options, with_progress, Common};

pub fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("`{s}` is not a positive number of seconds (e.g. `--min-seconds 2`)")),
    }
}

/// How much `simclr bench` measures.
pub enum BenchLength {
    /// This many samples from a cold start.
    Samples(u64),
    /// Whole epochs after an untimed warm-up epoch.
    Epochs(u32),
    /// Whole epochs lasting at least this many seconds, after an untimed warm-up epoch.
    AtLeast(f64),
}

pub fn bench(
    plan: &Plan,
    common: &Common,
    length: BenchLength,
    json: bool,
    digest: bool,
    train: Option<serde_json::Value>,
) -> Result<(), Failure> {
    if has_sinks(plan) && !json {
        eprintln!("bench: training and evaluation stages are left out; measuring the data pipeline");
    }
    let mut opts = options(plan, common);
    opts.digest = digest;
    match length {
        BenchLength::Samples(n) => opts.max_samples = Some(n),
        BenchLength::Epochs(_) | BenchLength::AtLeast(_) => {
            // A warm-up epoch first, as the Python anchors warm up: the file cache, the
            // allocator's heap and the start-up of threads and pools are not what we measure.
            let mut warm = options(plan, common);
            warm.epochs = Some(1);
            let warm_s = run_plan(plan, &warm, Mode::DataOnly)?.first().map_or(0.0, |(_, r)| r.seconds);
            opts.epochs = Some(match length {
                BenchLength::AtLeast(min) if warm_s > 0.0 => {
                    (min / warm_s).ceil().clamp(1.0, 10_000.0) as u32
                }
                BenchLength::Epochs(e) => e,
                _ => 1,
            });
        }
    }
    let reports = with_progress(&opts, || run_plan(plan, &opts, Mode::DataOnly))?;
    // The first chain is the data pipeline being measured.
    let Some((_, r)) = reports.into_iter().next() else {
        return Err(Failure::Invalid("the pipeline has no source stage to measure".into()));
    };
    // The table (print_report) lists skipped samples itself; JSON output lists them here.
    if json {
        crate::run_cmd::print_skipped(&r);
    }
    if json {
        let mut v = serde_json::json!({
            "pipeline": plan.spec.name,
            "samples": r.samples,
            "seconds": r.seconds,
            "samples_per_s": r.samples as f64 / r.seconds.max(1e-9),
            "threads": opts.threads,
            "chunk": r.chunk,
            "skipped": r.skipped.len(),
            "stages": r.stages,
        });
        if let Some(d) = &r.digest {
            v["digest"] = serde_json::Value::String(d.clone());
        }
        if let Some(t) = &train {
            v["train"] = t.clone();
        }
        println!("{v}");
    } else {
        crate::run_cmd::print_report(&r);
        if let Some(d) = &r.digest {
            println!("digest: {d}");
        }
        if let Some(t) = &train {
            println!(
                "train: {:.3} s/step (median of {}), {:.1} images/s, data wait {:.1}% of step time",
                t["step_s_median"].as_f64().unwrap_or(0.0),
                t["steps"],
                t["images_per_s"].as_f64().unwrap_or(0.0),
                100.0 * t["data_wait_frac"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}
