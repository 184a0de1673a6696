//! simclr-train: the SimCLR training stage (`simclr_train`) on burn, generic over its backend:
//! `flex` on the CPU, CUDA and wgpu with the `cuda` and `wgpu` features, chosen at run time by
//! `device:` ([`device`]); [`selftest`] checks a device against the CPU.
//!
//! - [`model`]: ResNet-18/34/50 encoders (CIFAR or ImageNet stem, width multiplier) and the
//!   projection head, with torchvision's parameter names.
//! - [`loss`]: NT-Xent, NT-Logistic, margin triplet, contrast accuracy and entropy.
//! - [`optim`]: LARS, SGD, AdamW and the warmup + cosine schedule.
//! - [`export`]: `encoder.safetensors` (torchvision names).
//! - [`checkpoint`]: `checkpoint.safetensors` (model, optimizer and schedule state) for resuming.
//! - [`stage`]: the sink, its metrics and checkpoint files.

pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod device;
pub mod dist;
pub mod eval;
pub mod export;
pub mod loss;
mod metrics_log;
pub mod model;
pub mod optim;
pub mod selftest;
pub mod stage;
pub mod trainer;

use std::time::Instant;

use rand::{Rng, SeedableRng};

pub use config::SimclrTrain;
pub use trainer::{make_engine, Engine, StepError, StepStats};

/// Registers the stage kinds of this crate.
pub fn register(registry: &mut simclr_core::Registry) {
    registry.register::<SimclrTrain>();
    eval::register(registry);
}

/// Times `steps` real training steps (forward, loss, backward, optimizer update) of the model
/// a `simclr_train` config describes, on a fixed random batch of `pairs` pairs of `side` x `side`
/// images, at the config's base learning rate. Returns the seconds of each step (the first
/// includes any one-off set-up of the backend; take the median).
pub fn bench_train_step(
    config_json: &serde_json::Value,
    pairs: usize,
    side: usize,
    steps: usize,
) -> Result<Vec<f64>, String> {
    let cfg: SimclrTrain =
        serde_json::from_value(config_json.clone()).map_err(|e| format!("simclr_train config: {e}"))?;
    if let Some(p) = cfg.problems().into_iter().next() {
        return Err(format!("simclr_train config: {} ({})", p.message, p.fix));
    }
    if pairs == 0 || side == 0 {
        return Err("need at least one pair of at least 1 x 1 pixels".into());
    }
    let mut engine = make_engine(&cfg, 0)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x00BE_4C11);
    let len = pairs * 3 * side * side;
    let v1: Vec<f32> = (0..len).map(|_| rng.random::<f32>()).collect();
    let v2: Vec<f32> = (0..len).map(|_| rng.random::<f32>()).collect();
    let lr = optim::base_lr(&cfg.optimizer, pairs);
    let mut times = Vec::with_capacity(steps);
    for s in 0..steps {
        let t = Instant::now();
        match engine.step(&v1, &v2, [pairs, 3, side, side], lr) {
            Ok(_) => times.push(t.elapsed().as_secs_f64()),
            Err(StepError::NonFinite(l)) => return Err(format!("loss is {l} at step {s}")),
            Err(StepError::Other(e)) => return Err(e),
        }
    }
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::*;
    use simclr_core::{Batch, Context, Payload, Sample, Stage, StageConfig, Tensor};

    fn tiny() -> SimclrTrain {
        serde_json::from_value(serde_json::json!({
            "width": 0.125, "epochs": 3, "warmup_epochs": 1,
            "head": {"hidden_dim": 16, "out_dim": 8},
            "optimizer": {"lr": 1.0, "lr_scaling": "none"}
        }))
        .unwrap()
    }

    /// Deterministic pseudo-images: 8 pairs of 16 x 16.
    fn views(seed: u64, n: usize, side: usize) -> (Vec<f32>, Vec<f32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let len = n * 3 * side * side;
        let a: Vec<f32> = (0..len).map(|_| rng.random::<f32>()).collect();
        let b: Vec<f32> = a.iter().map(|x| (x + 0.1 * rng.random::<f32>()).min(1.0)).collect();
        (a, b)
    }

    fn losses(seed: u64) -> Vec<f64> {
        let mut engine = make_engine(&tiny(), seed).unwrap();
        (0..3)
            .map(|s| {
                let (a, b) = views(s, 8, 16);
                engine.step(&a, &b, [8, 3, 16, 16], 0.5).unwrap().loss
            })
            .collect()
    }

    #[test]
    fn tiny_model_trains_finitely_and_deterministically() {
        let first = losses(42);
        assert!(first.iter().all(|l| l.is_finite() && *l > 0.0), "{first:?}");
        // code reduction at init: about 2 ln(2N - 1) = 2 ln 15.
        assert!((first[0] - 2.0 * 15f64.ln()).abs() < 1.5, "initial loss {}", first[0]);
        assert_eq!(first, losses(42), "same seed, same losses");
        assert_ne!(first, losses(43), "another seed, another network");
    }

    fn batch_sample(epoch: u32, index: u64, data: (Vec<f32>, Vec<f32>), n: usize, side: usize) -> Sample {
        let shape = vec![n, 3, side, side];
        let views = vec![Tensor { shape: shape.clone(), data: data.0 }, Tensor { shape, data: data.1 }];
        let batch = Batch { views, indices: (0..n as u64).collect(), labels: vec![None; n], pool: None };
        Sample { index, epoch, payload: Payload::Batch(batch), ..Sample::default() }
    }

    #[test]
    fn stage_logs_metrics_counts_steps_and_saves_the_encoder() {
        let dir = tempfile::tempdir().unwrap();
        let cx = Context { seed: 1, run_dir: Some(dir.path().to_path_buf()), ..Context::default() };
        let cfg = tiny();
        let Stage::Sink(mut sink) = cfg.build(&cx).unwrap() else { panic!("not a sink") };
        assert_eq!(sink.epochs(), 3);
        for epoch in 0..2 {
            for b in 0..2 {
                sink.consume(batch_sample(epoch, b, views(u64::from(epoch * 2 + b as u32), 4, 8), 4, 8))
                    .unwrap();
            }
        }
        sink.finish().unwrap();
        let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let steps: Vec<&serde_json::Value> = lines.iter().filter(|l| l["type"] == "step").collect();
        let epochs: Vec<&serde_json::Value> = lines.iter().filter(|l| l["type"] == "epoch").collect();
        assert_eq!((steps.len(), epochs.len()), (4, 2));
        for key in [
            "step",
            "epoch",
            "loss",
            "contrast_acc",
            "contrast_entropy",
            "lr",
            "images_per_s",
            "data_wait_s",
            "step_s",
        ] {
            assert!(steps.iter().all(|l| l.get(key).is_some()), "step lines lack {key}");
        }
        // First epoch: length unknown, lr = s/(s+1) / warmup_epochs; then the exact schedule
        // with 2 steps per epoch: warmup 2 steps, cosine over steps 2..6.
        let lr: Vec<f64> = steps.iter().map(|l| l["lr"].as_f64().unwrap()).collect();
        assert_eq!(lr[0], 0.0);
        assert!((lr[1] - 0.5).abs() < 1e-12);
        assert!((lr[2] - 1.0).abs() < 1e-12, "end of warmup: {lr:?}");
        assert!((lr[3] - 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())).abs() < 1e-12);
        assert_eq!(epochs[1]["steps"], 2);
        let enc = export::read_safetensors(&dir.path().join("encoder.safetensors")).unwrap();
        assert_eq!(enc.len(), 120);
        let tracked = enc.iter().find(|t| t.name == "bn1.num_batches_tracked").unwrap();
        assert_eq!(tracked.data, export::Data::I64(vec![4]));
    }

    #[test]
    fn non_finite_loss_stops_with_the_step() {
        let cx = Context { seed: 1, ..Context::default() };
        // A temperature that overflows f32 similarities to infinity gives a NaN loss.
        let mut cfg = tiny();
        cfg.loss.temperature = 1e-45;
        let Stage::Sink(mut sink) = cfg.build(&cx).unwrap() else { panic!("not a sink") };
        let err = sink.consume(batch_sample(0, 0, views(0, 4, 8), 4, 8)).unwrap_err().to_string();
        assert!(err.contains("step 0") && err.contains("lower `optimizer.lr`"), "{err}");
        let (a, b) = views(0, 4, 8);
        let one_view = Sample {
            payload: Payload::Batch(Batch {
                views: vec![Tensor { shape: vec![4, 3, 8, 8], data: a }],
                indices: Vec::new(),
                labels: Vec::new(),
                pool: None,
            }),
            ..Sample::default()
        };
        drop(b);
        assert!(sink.consume(one_view).unwrap_err().to_string().contains("2 views"));
    }

    #[test]
    fn registers_its_kind() {
        let mut r = simclr_core::Registry::new();
        register(&mut r);
        let f = r.get("simclr_train").expect("registered");
        assert!(f.parse(serde_json::json!({"epochs": 2})).is_ok());
        assert!(f.parse(serde_json::json!({"epoch": 2})).is_err());
    }

    #[test]
    fn bench_runs_a_tiny_model() {
        let t = bench_train_step(&serde_json::json!({"width": 0.125}), 2, 8, 2).unwrap();
        assert_eq!(t.len(), 2);
        assert!(bench_train_step(&serde_json::json!({"width": -1}), 2, 8, 1).is_err());
    }

    /// The CUDA backend gives the CPU's first loss and initial features (same seed, same batch):
    /// `CUBECL_AUTOTUNE_LEVEL=minimal cargo test --release --features cuda -p simclr-train -- --ignored cuda_matches_cpu`.
    /// CUDA runs f32 matmuls in TF32 (a 64x64 product differs from the CPU's by ~4e-4, measured on
    /// an H200), and training these tiny random batches is chaotic (1e-4 relative input noise moves
    /// the third loss by ~1% even at lr 0.01), so later steps are only checked loosely; the
    /// per-parameter gradient comparison is `trainer::cuda_tests::cuda_gradients_match_cpu`.
    #[test]
    #[ignore]
    fn cuda_matches_cpu() {
        let mut cfg = tiny();
        cfg.width = 0.5;
        let mut cpu = make_engine(&cfg, 5).unwrap();
        cfg.device = "cuda".into();
        let mut gpu = make_engine(&cfg, 5).unwrap();
        println!("device: {}", gpu.device_name());
        let (x, _) = views(99, 4, 16);
        let hc = cpu.encode(&x, [4, 3, 16, 16]).unwrap();
        let hg = gpu.encode(&x, [4, 3, 16, 16]).unwrap();
        let scale = hc.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = hc.iter().zip(&hg).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        println!("initial eval features: max |h_cpu - h_cuda| = {err:.3e} (max |h| = {scale:.3e})");
        assert!(err <= 1e-2 * scale.max(1.0));
        for s in 0..3 {
            let (a, b) = views(s, 8, 16);
            let lc = cpu.step(&a, &b, [8, 3, 16, 16], 0.01).unwrap().loss;
            let lg = gpu.step(&a, &b, [8, 3, 16, 16], 0.01).unwrap().loss;
            println!("step {s}: cpu loss {lc:.6}, cuda loss {lg:.6}");
            let tol = if s == 0 { 2e-3 } else { 0.1 };
            assert!((lc - lg).abs() < tol * lc.abs(), "step {s}: cpu {lc} vs cuda {lg}");
        }
    }

    /// Full ResNet-18 CIFAR (width 1), 128 pairs of 32x32: run with
    /// `RAYON_NUM_THREADS=2 cargo test --release -p simclr-train -- --ignored --nocapture bench_resnet18`.
    #[test]
    #[ignore]
    fn bench_resnet18_cifar() {
        let steps: usize = std::env::var("BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
        let device = std::env::var("BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
        let pairs: usize = std::env::var("BENCH_PAIRS").ok().and_then(|s| s.parse().ok()).unwrap_or(128);
        let t = bench_train_step(&serde_json::json!({"device": device}), pairs, 32, steps).unwrap();
        let mut sorted = t.clone();
        sorted.sort_by(f64::total_cmp);
        let med = sorted[sorted.len() / 2];
        println!(
            "resnet18 cifar, {pairs} pairs, {device}: steps {t:?}, median {med:.3} s, {:.1} images/s",
            2.0 * pairs as f64 / med
        );
    }
}
