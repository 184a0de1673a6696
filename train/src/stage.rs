//! The `simclr_train` stage: a sink that trains on each incoming batch of view pairs, logs
//! `metrics.jsonl` and saves `encoder.safetensors` and `checkpoint.safetensors` in the run
//! directory (checkpoints and resuming: [`resume`]).

mod resume;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use simclr_core::{
    Artifacts, Context, Payload, PortType, Problem, Role, Sample, Sink, Stage, StageConfig, StageError,
};

use crate::config::{MonitorConfig, SimclrTrain};
use crate::eval::features::{extract, source_of, EvalTransform};
use crate::eval::features::{EncoderArtifact, EngineEncoder};
use crate::eval::knn::knn_accuracy;
use crate::export::write_safetensors;
use crate::optim::{base_lr, first_epoch_lr, Schedule};
use crate::trainer::{checkpoint_metadata, make_engine, Engine, StepError};
use simclr_core::driver::DataSource;
use simclr_core::StageRef;

impl StageConfig for SimclrTrain {
    const KIND: &'static str = "simclr_train";
    const ABOUT: &'static str =
        "sink: trains a ResNet encoder + projection head with a contrastive loss (SimCLR)";
    const ROLE: Role = Role::Sink;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Batch, PortType::Encoder)
    }
    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        out.extend(self.problems());
    }
    fn refs(&self) -> Vec<StageRef> {
        let data = |field: &str, stage: &str| StageRef {
            field: field.into(),
            stage: stage.into(),
            expects: PortType::Any,
        };
        self.monitor
            .iter()
            .flat_map(|m| [data("monitor", &m.train_data), data("monitor", &m.test_data)])
            .collect()
    }
    fn build(&self, cx: &Context) -> Result<Stage, StageError> {
        if let Some(p) = self.problems().into_iter().next() {
            return Err(StageError::fatal(format!("{} ({})", p.message, p.fix)));
        }
        let engine = make_engine(self, cx.seed).map_err(StageError::fatal)?;
        let mut sink = TrainSink::new(self.clone(), engine, cx.run_dir.clone())
            .publishing(&cx.stage_id, cx.artifacts.clone());
        (sink.ckpt.seed, sink.ckpt.stage) = (cx.seed, cx.stage_id.clone());
        if let Some(m) = &self.monitor {
            sink.monitor = Some(Monitor {
                train: source_of(cx, "monitor.train_data", &m.train_data)?,
                test: source_of(cx, "monitor.test_data", &m.test_data)?,
                cfg: m.clone(),
                seed: cx.seed,
            });
        }
        Ok(Stage::Sink(Box::new(sink)))
    }
}

/// Running sums of one epoch, for its metrics line.
#[derive(Default)]
struct EpochSums {
    steps: u64,
    images: u64,
    loss: f64,
    acc: f64,
    entropy: f64,
    step_s: f64,
    data_wait_s: f64,
    lr: f64,
    started: Option<Instant>,
}

/// The sink behind `simclr_train`.
pub struct TrainSink {
    cfg: SimclrTrain,
    engine: Box<dyn Engine>,
    run_dir: Option<PathBuf>,
    metrics: Option<crate::metrics_log::MetricsLog>,
    /// Global step index (0-based) of the next step.
    step: u64,
    /// The epoch (as carried by the samples) being trained.
    epoch: Option<u32>,
    /// Batches per epoch: configured, or counted in the first epoch.
    steps_per_epoch: Option<u64>,
    base_lr: Option<f64>,
    sums: EpochSums,
    last_end: Option<Instant>,
    /// Where the trained encoder goes at the end, under this stage's id (for evaluation stages).
    publish: Option<(String, Artifacts)>,
    monitor: Option<Monitor>,
    ckpt: resume::CkptState,
    /// Processes of a data-parallel run and this one's rank: only rank 0 writes the run
    /// directory (metrics, checkpoints, encoder) and runs the monitor.
    world: usize,
    rank: usize,
}

/// The kNN monitor's data.
struct Monitor {
    train: Arc<DataSource>,
    test: Arc<DataSource>,
    cfg: MonitorConfig,
    seed: u64,
}

impl TrainSink {
    pub fn new(cfg: SimclrTrain, engine: Box<dyn Engine>, run_dir: Option<PathBuf>) -> Self {
        let steps_per_epoch = cfg.steps_per_epoch;
        Self {
            cfg,
            engine,
            run_dir,
            metrics: None,
            step: 0,
            epoch: None,
            steps_per_epoch,
            base_lr: None,
            sums: EpochSums::default(),
            last_end: None,
            publish: None,
            monitor: None,
            ckpt: resume::CkptState::default(),
            world: crate::dist::process_world(),
            rank: crate::dist::process_rank(),
        }
    }

    /// Hands the trained encoder to later stages as the artifact of stage `id`.
    pub fn publishing(mut self, id: &str, artifacts: Artifacts) -> Self {
        self.publish = Some((id.to_string(), artifacts));
        self
    }

    /// The learning rate of the next step.
    fn lr(&self, base: f64) -> f64 {
        let warmup = self.cfg.warmup_epochs_clamped();
        match self.steps_per_epoch {
            Some(spe) => Schedule::new(base, warmup, self.cfg.epochs, spe).lr(self.step),
            None => first_epoch_lr(base, warmup, self.step),
        }
    }

    /// Whether this process writes the run directory (rank 0 of a data-parallel run).
    pub(crate) fn writes(&self) -> bool {
        self.rank == 0
    }

    fn write_line(&mut self, line: serde_json::Value) -> Result<(), StageError> {
        if !self.writes() {
            return Ok(());
        }
        crate::metrics_log::append_metrics(&mut self.metrics, self.run_dir.as_deref(), &line)
    }

    /// Writes the epoch line of the epoch just finished.
    fn end_epoch(&mut self) -> Result<(), StageError> {
        let Some(epoch) = self.epoch else { return Ok(()) };
        let s = std::mem::take(&mut self.sums);
        if s.steps == 0 {
            return Ok(());
        }
        let k = s.steps as f64;
        let line = serde_json::json!({
            "type": "epoch",
            "epoch": epoch,
            "step": self.step.saturating_sub(1),
            "steps": s.steps,
            "loss": s.loss / k,
            "contrast_acc": s.acc / k,
            "contrast_entropy": s.entropy / k,
            "lr": s.lr,
            "images_per_s": if s.step_s > 0.0 { s.images as f64 / s.step_s } else { 0.0 },
            "data_wait_s": s.data_wait_s,
            "step_s": s.step_s / k,
            "epoch_s": s.started.map_or(0.0, |t| t.elapsed().as_secs_f64()),
        });
        self.write_line(line)?;
        self.run_monitor(epoch)
    }

    /// kNN accuracy of the current encoder, every `monitor.every` epochs and after the last.
    fn run_monitor(&mut self, epoch: u32) -> Result<(), StageError> {
        // Every rank runs it (their encoders are the same), so none waits in the next step's
        // exchange while rank 0 evaluates; only rank 0 writes the line.
        let Some(m) = &self.monitor else { return Ok(()) };
        let done = epoch + 1;
        if !(done.is_multiple_of(m.cfg.every) || done >= self.cfg.epochs) {
            return Ok(());
        }
        let t = EvalTransform::default();
        let engine = &self.engine;
        let encode = |x: &[f32], shape: [usize; 4]| engine.encode(x, shape);
        let train = extract("monitor", &encode, &m.train, &t, m.seed, 256)?;
        let test = extract("monitor", &encode, &m.test, &t, m.seed, 256)?;
        let classes = train.y.iter().chain(&test.y).max().map_or(0, |c| *c as usize + 1);
        let (top1, top5) = knn_accuracy(&train, &test, classes, m.cfg.k, m.cfg.temperature);
        tracing::info!("epoch {epoch}: kNN top-1 {top1:.2}%");
        let line = serde_json::json!({
            "type": "monitor", "epoch": epoch, "step": self.step.saturating_sub(1),
            "knn_top1": top1, "knn_top5": top5,
        });
        self.write_line(line)
    }
}

impl Sink for TrainSink {
    fn epochs(&self) -> u32 {
        self.cfg.epochs
    }

    fn consume(&mut self, sample: Sample) -> Result<(), StageError> {
        // A rank of a data-parallel run was interrupted: every rank stopped after the same
        // step and trains nothing more (the runtime then saves the checkpoint).
        if self.world > 1 {
            if crate::dist::stop_agreed() {
                return Ok(());
            }
            crate::dist::set_training(true);
        }
        let mut start = Instant::now();
        let data_wait_s = self.last_end.map_or(0.0, |t| start.duration_since(t).as_secs_f64());
        let Payload::Batch(batch) = &sample.payload else {
            return Err(StageError::fatal("`simclr_train` needs batches; put a `batch` stage before it"));
        };
        if batch.views.len() != 2 {
            return Err(StageError::fatal(format!(
                "`simclr_train` needs 2 views per image, got {}; use `views` with `count: 2`",
                batch.views.len()
            )));
        }
        let (v1, v2) = (&batch.views[0], &batch.views[1]);
        let shape: [usize; 4] = match v1.shape[..] {
            [n, 3, h, w] if v2.shape == v1.shape && n > 0 => [n, 3, h, w],
            _ => {
                return Err(StageError::fatal(format!(
                    "views must be two N x 3 x H x W tensors of one shape, got {:?} and {:?}",
                    v1.shape, v2.shape
                )))
            }
        };
        // The global batch (this process trains on its 1/world share of it).
        let n = shape[0] * self.world;

        // Epoch bookkeeping: the first epoch's batches give steps_per_epoch.
        if self.epoch != Some(sample.epoch) {
            if self.epoch.is_some() {
                self.end_epoch()?;
                if self.steps_per_epoch.is_none() {
                    self.steps_per_epoch = Some(self.step.max(1));
                }
                self.epoch_completed(false)?;
                // The checkpoint's time is neither data wait nor step time.
                start = Instant::now();
            }
            self.epoch = Some(sample.epoch);
            self.sums.started = Some(start);
        }
        let base = *self.base_lr.get_or_insert_with(|| base_lr(&self.cfg.optimizer, n));
        let lr = self.lr(base);

        let stats = match self.engine.step(&v1.data, &v2.data, shape, lr) {
            Ok(s) => s,
            Err(StepError::NonFinite(loss)) => {
                return Err(StageError::Diverged {
                    step: self.step,
                    message: format!(
                        "loss is {loss} at step {} (epoch {}, lr {lr:.4}): training diverged; lower `optimizer.lr` \
                         (now {} before scaling) or lengthen `warmup_epochs`",
                        self.step, sample.epoch, self.cfg.optimizer.lr
                    ),
                })
            }
            Err(StepError::Other(msg)) => return Err(StageError::fatal(msg)),
        };
        let step_s = start.elapsed().as_secs_f64();
        let images = 2 * n as u64;
        let s = &mut self.sums;
        s.steps += 1;
        s.images += images;
        s.loss += stats.loss;
        s.acc += stats.contrast_acc;
        s.entropy += stats.contrast_entropy;
        s.step_s += step_s;
        s.data_wait_s += data_wait_s;
        s.lr = lr;
        if self.step.is_multiple_of(self.cfg.log_every) {
            let line = serde_json::json!({
                "type": "step",
                "step": self.step,
                "epoch": sample.epoch,
                "loss": stats.loss,
                "contrast_acc": stats.contrast_acc,
                "contrast_entropy": stats.contrast_entropy,
                "lr": lr,
                "images_per_s": images as f64 / step_s,
                "data_wait_s": data_wait_s,
                "step_s": step_s,
                "gflop": crate::model::step_flops(&self.cfg, 2 * n, shape[2], shape[3]) / 1e9,
            });
            self.write_line(line)?;
        }
        self.step += 1;
        self.step_completed()?;
        self.last_end = Some(Instant::now());
        Ok(())
    }

    fn finish(&mut self) -> Result<(), StageError> {
        crate::dist::set_training(false);
        self.end_epoch()?;
        self.epoch_completed(true)?;
        self.epoch = None;
        if let Some(dir) = self.run_dir.as_ref().filter(|_| self.writes()) {
            let path = dir.join(simclr_core::run_dir::ENCODER_FILE);
            let meta = checkpoint_metadata(&self.cfg, self.engine.steps(), self.ckpt.epochs_done);
            write_safetensors(&path, &self.engine.encoder_tensors(), &meta)
                .map_err(|e| StageError::fatal(format!("cannot write {}: {e}", path.display())))?;
        }
        // Training is over: the ranks leave their group (a later data-parallel stage in this
        // process forms a new one); evaluation encodes on one device.
        self.engine.leave_group();
        if let Some((id, artifacts)) = self.publish.take() {
            let engine = std::mem::replace(&mut self.engine, Box::new(Spent));
            artifacts.put(
                &id,
                EncoderArtifact {
                    stage: id.clone(),
                    method: "simclr".into(),
                    // Evaluation encodes on the first training device, on one rank.
                    arch: SimclrTrain {
                        device: self.cfg.local_devices().swap_remove(0),
                        devices: None,
                        ..self.cfg.clone()
                    },
                    encoder: Mutex::new(Box::new(EngineEncoder(engine))),
                },
            );
        }
        Ok(())
    }

    fn resume(&mut self) -> Result<(), StageError> {
        self.resume_from_dir()
    }

    fn start_epoch(&self) -> u32 {
        self.ckpt.start_epoch
    }

    fn start_offset(&self) -> u64 {
        self.ckpt.start_offset
    }

    fn position(&mut self, epoch: u32, consumed: u64) {
        // After an agreed stop the batches that still arrive are not trained (see `consume`).
        if self.world > 1 && crate::dist::stop_agreed() {
            return;
        }
        self.ckpt.position = Some((epoch, consumed));
    }

    fn interrupted(&mut self) -> Result<(), StageError> {
        crate::dist::set_training(false);
        self.save_on_interrupt()
    }

    fn share(&self) -> Option<(usize, usize)> {
        (self.world > 1).then_some((self.rank, self.world))
    }
}

/// What is left in a sink whose engine was handed over: every call says so.
struct Spent;

impl Engine for Spent {
    fn step(&mut self, _: &[f32], _: &[f32], _: [usize; 4], _: f64) -> Result<crate::StepStats, StepError> {
        Err(StepError::Other("training already finished".into()))
    }
    fn encoder_tensors(&self) -> Vec<crate::export::NamedTensor> {
        Vec::new()
    }
    fn encode(&self, _: &[f32], _: [usize; 4]) -> Result<Vec<f32>, String> {
        Err("training already finished".into())
    }
    fn steps(&self) -> u64 {
        0
    }
    fn device_name(&self) -> String {
        "none".into()
    }
    fn state_tensors(&self) -> Result<Vec<crate::export::NamedTensor>, String> {
        Err("training already finished".into())
    }
    fn load_state(&mut self, _: &[crate::export::NamedTensor]) -> Result<(), String> {
        Err("training already finished".into())
    }
}
