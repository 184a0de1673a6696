//! `supervised_train`: the supervised baseline from the same backbone: the encoder plus a linear
//! classifier trained with cross-entropy on labeled batches (crop + flip upstream).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Mutex;

use std::collections::HashMap;

use burn::module::{AutodiffModule, Module};
use burn::optim::GradientsParams;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::Deserialize;
use simclr_core::{
    Artifacts, Context, Payload, PortType, Problem, Role, Sample, Sink, Stage, StageConfig, StageError,
};

use super::features::{extract, Encode, EncoderArtifact};
use super::fine_tune_run::{concat, keep_rows, probe_head, FineTuneRun};
use super::linear::topk_accuracy;
use super::subset::{self, Subset};
use crate::config::{Backbone, OptimizerConfig, SimclrTrain, Stem};
use crate::device::{with_backend, DeviceInfo, DeviceSpec, OnBackend};
use crate::export::{Data, NamedTensor};
use crate::model::SimclrModel;
use crate::optim::{base_lr, first_epoch_lr, Optimizer, Schedule};
use crate::trainer::StepError;

/// `supervised_train`: encoder + linear classifier, cross-entropy with labels (a sink; its
/// encoder is an artifact, filed as `supervised`).
#[derive(Clone, Debug, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SupervisedTrain {
    /// `resnet18 | resnet34 | resnet50` (default resnet18).
    #[serde(default)]
    pub backbone: Backbone,
    /// `cifar | imagenet` (default cifar).
    #[serde(default)]
    pub stem: Stem,
    /// Channel multiplier (default 1.0).
    #[serde(default = "one")]
    pub width: f64,
    /// Number of classes (labels must be below it).
    pub classes: usize,
    /// Optimizer (default: `sgd`, lr 0.1 x B/256, momentum 0.9, nesterov, weight decay 5e-4).
    #[serde(default = "sgd")]
    pub optimizer: OptimizerConfig,
    /// Passes over the data (default 90).
    #[serde(default = "ninety")]
    pub epochs: u32,
    /// Linear warmup in epochs (default 0).
    #[serde(default)]
    pub warmup_epochs: f64,
    /// `cpu | cuda | cuda:N` (default cpu).
    #[serde(default = "cpu")]
    pub device: String,
    /// Write a step line every this many steps (default 10).
    #[serde(default = "ten")]
    pub log_every: u64,
}

fn one() -> f64 {
    1.0
}
fn ninety() -> u32 {
    90
}
pub(super) fn ten() -> u64 {
    10
}
fn cpu() -> String {
    "cpu".into()
}
pub(super) fn sgd() -> OptimizerConfig {
    serde_json::from_value(serde_json::json!({
        "kind": "sgd", "lr": 0.1, "nesterov": true, "weight_decay": 5e-4
    }))
    .unwrap_or_default()
}

impl SupervisedTrain {
    /// The model as a `simclr_train` config: the same encoder, a linear head to `classes`.
    pub fn arch(&self) -> Result<SimclrTrain, String> {
        let head = serde_json::from_value(
            serde_json::json!({"kind": "linear", "out_dim": self.classes, "bn": false}),
        )
        .map_err(|e| e.to_string())?;
        let arch = SimclrTrain {
            backbone: self.backbone,
            stem: self.stem,
            width: self.width,
            head,
            optimizer: self.optimizer.clone(),
            epochs: self.epochs,
            warmup_epochs: self.warmup_epochs,
            device: self.device.clone(),
            log_every: self.log_every,
            ..SimclrTrain::default()
        };
        Ok(arch)
    }

    pub(super) fn problems(&self) -> Vec<Problem> {
        let mut out = match self.arch() {
            Ok(a) => a.problems(),
            Err(e) => vec![Problem::new("", e, "check the fields")],
        };
        if self.classes < 2 {
            out.push(Problem::new(
                "classes",
                "`classes` must be at least 2",
                "e.g. `classes: 10` for CIFAR-10",
            ));
        }
        out
    }
}

/// A supervised model + optimizer on some device.
pub trait LabeledEngine: Encode {
    /// Class scores (N x classes) of `images` in evaluation mode.
    fn predict(&self, images: &[f32], shape: [usize; 4]) -> Result<Vec<f32>, String>;
    /// Replaces the encoder's weights and running statistics by `tensors` (torchvision names,
    /// as [`Encode::tensors`] gives them); returns how many were loaded.
    fn load_encoder(&mut self, tensors: &[NamedTensor]) -> Result<usize, String>;
    /// Sets the linear classifier: `weight` is classes x dim (row-major), `bias` classes.
    fn load_head(
        &mut self,
        weight: Vec<f32>,
        bias: Vec<f32>,
        classes: usize,
        dim: usize,
    ) -> Result<(), String>;
    /// One cross-entropy step; returns (loss, accuracy on the batch).
    fn step(
        &mut self,
        images: &[f32],
        labels: &[u32],
        shape: [usize; 4],
        lr: f64,
    ) -> Result<(f64, f64), StepError>;
}

struct SupTrainer<B: AutodiffBackend> {
    device: B::Device,
    model: Option<SimclrModel<B>>,
    opt: Optimizer<B::InnerBackend>,
}

impl<B: AutodiffBackend> SupTrainer<B> {
    fn model(&self) -> Result<&SimclrModel<B>, String> {
        self.model.as_ref().ok_or_else(|| "the model was lost in a failed step".to_string())
    }

    /// Replaces the tensors under `model.<part>.` by those of `map` (the checkpoint loader,
    /// restricted to one part); the loaded ones leave `map`. Returns the mismatches.
    fn load_part(
        &mut self,
        map: &mut HashMap<String, NamedTensor>,
        part: &'static str,
    ) -> Result<Vec<String>, String> {
        let model = self.model.take().ok_or_else(|| "the model was lost in a failed step".to_string())?;
        let mut load = crate::checkpoint::Load::<B> {
            tensors: map,
            device: self.device.clone(),
            path: Vec::new(),
            errors: Vec::new(),
            only: Some(part),
        };
        self.model = Some(model.map(&mut load));
        Ok(load.errors)
    }
}

fn to_vec<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>, String> {
    t.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| format!("{e:?}"))
}

impl<B: AutodiffBackend> Encode for SupTrainer<B> {
    fn encode(&self, images: &[f32], shape: [usize; 4]) -> Result<Vec<f32>, String> {
        if images.len() != shape.iter().product::<usize>() {
            return Err(format!("{} values for a {shape:?} batch", images.len()));
        }
        let encoder = self.model()?.encoder.valid();
        catch_unwind(AssertUnwindSafe(|| {
            let x = Tensor::<B::InnerBackend, 4>::from_data(
                TensorData::new(images.to_vec(), shape),
                &self.device,
            );
            to_vec(encoder.forward(x))
        }))
        .map_err(|_| "the backend failed while encoding".to_string())?
    }
    fn tensors(&self) -> Vec<crate::export::NamedTensor> {
        match self.model() {
            Ok(m) => crate::export::named_tensors(&m.encoder.valid(), 0),
            Err(_) => Vec::new(),
        }
    }
}

impl<B: AutodiffBackend> LabeledEngine for SupTrainer<B> {
    fn predict(&self, images: &[f32], shape: [usize; 4]) -> Result<Vec<f32>, String> {
        let model = self.model()?.valid();
        catch_unwind(AssertUnwindSafe(|| {
            let x = Tensor::<B::InnerBackend, 4>::from_data(
                TensorData::new(images.to_vec(), shape),
                &self.device,
            );
            to_vec(model.forward(x).1)
        }))
        .map_err(|_| "the backend failed while predicting".to_string())?
    }

    fn load_encoder(&mut self, tensors: &[NamedTensor]) -> Result<usize, String> {
        // The checkpoint loader, restricted to the encoder (the linear head stays as built).
        let mut map: HashMap<String, NamedTensor> = tensors
            .iter()
            .filter(|t| matches!(t.data, Data::F32(_)))
            .map(|t| (format!("model.encoder.{}", t.name), t.clone()))
            .collect();
        let given = map.len();
        let mut errors = self.load_part(&mut map, "encoder")?;
        if !errors.is_empty() {
            errors.truncate(5);
            return Err(format!("the encoder does not fit: {}", errors.join("; ")));
        }
        Ok(given - map.len())
    }

    fn load_head(
        &mut self,
        weight: Vec<f32>,
        bias: Vec<f32>,
        classes: usize,
        dim: usize,
    ) -> Result<(), String> {
        let layer = "model.head.layers.0.linear";
        let mut map: HashMap<String, NamedTensor> = [
            NamedTensor {
                name: format!("{layer}.weight"),
                shape: vec![classes, dim],
                data: Data::F32(weight),
            },
            NamedTensor { name: format!("{layer}.bias"), shape: vec![classes], data: Data::F32(bias) },
        ]
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
        let errors = self.load_part(&mut map, "head")?;
        if !errors.is_empty() || !map.is_empty() {
            let unused: Vec<&String> = map.keys().collect();
            return Err(format!("the classifier does not fit: {} (unused: {unused:?})", errors.join("; ")));
        }
        Ok(())
    }

    fn step(
        &mut self,
        images: &[f32],
        labels: &[u32],
        shape: [usize; 4],
        lr: f64,
    ) -> Result<(f64, f64), StepError> {
        let n = shape[0];
        if images.len() != shape.iter().product::<usize>() || labels.len() != n {
            return Err(StepError::Other(format!(
                "{} values and {} labels for a {shape:?} batch",
                images.len(),
                labels.len()
            )));
        }
        let model = self
            .model
            .take()
            .ok_or_else(|| StepError::Other("the model was lost in a failed step".into()))?;
        let run = AssertUnwindSafe(|| {
            let x = Tensor::<B, 4>::from_data(TensorData::new(images.to_vec(), shape), &self.device);
            let y = Tensor::<B, 1, Int>::from_data(
                TensorData::new(labels.iter().map(|&l| i64::from(l)).collect::<Vec<_>>(), [n]),
                &self.device,
            );
            let (_, logits) = model.forward(x);
            let pred = to_vec(logits.clone().detach().argmax(1).float());
            let loss = log_softmax(logits, 1).gather(1, y.reshape([n, 1])).mean().neg();
            let value =
                to_vec(loss.clone().detach()).ok().and_then(|v| v.first().copied()).unwrap_or(f32::NAN);
            (loss, f64::from(value), pred)
        });
        let (loss, value, pred) = match catch_unwind(run) {
            Ok(x) => x,
            Err(_) => return Err(StepError::Other("the backend failed during a supervised step".into())),
        };
        if !value.is_finite() {
            self.model = Some(model);
            return Err(StepError::NonFinite(value));
        }
        let acc = pred
            .map(|p| p.iter().zip(labels).filter(|(p, &l)| **p as u32 == l).count() as f64 / n as f64 * 100.0)
            .unwrap_or(0.0);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        self.model = Some(self.opt.step(model, grads, lr));
        Ok((value, acc))
    }
}

pub(super) fn make_supervised(arch: &SimclrTrain, seed: u64) -> Result<Box<dyn LabeledEngine>, String> {
    struct Make<'a>(&'a SimclrTrain, u64);
    impl OnBackend for Make<'_> {
        type Output = Box<dyn LabeledEngine>;
        fn run<B: AutodiffBackend>(self, device: B::Device, _: &DeviceInfo) -> Box<dyn LabeledEngine> {
            let Make(arch, seed) = self;
            B::seed(&device, seed);
            Box::new(SupTrainer::<B> {
                model: Some(SimclrModel::new(arch, seed, &device)),
                device,
                opt: Optimizer::new(&arch.optimizer),
            })
        }
    }
    with_backend(DeviceSpec::parse(&arch.device)?, Make(arch, seed))
}

impl StageConfig for SupervisedTrain {
    const KIND: &'static str = "supervised_train";
    const ABOUT: &'static str = "sink: supervised baseline (same encoder + linear classifier, cross-entropy)";
    const ROLE: Role = Role::Sink;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Batch, PortType::Encoder)
    }
    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        out.extend(self.problems());
    }
    fn build(&self, cx: &Context) -> Result<Stage, StageError> {
        if let Some(p) = self.problems().into_iter().next() {
            return Err(StageError::fatal(format!("{} ({})", p.message, p.fix)));
        }
        let arch = self.arch().map_err(StageError::fatal)?;
        let engine = make_supervised(&arch, cx.seed).map_err(StageError::fatal)?;
        Ok(Stage::Sink(Box::new(SupervisedSink::new(self.clone(), arch, engine, cx, None))))
    }
}

pub(super) struct SupervisedSink {
    cfg: SupervisedTrain,
    /// `supervised` or `fine_tuned`: how the encoder artifact is filed.
    method: String,
    fine_tune: Option<FineTuneRun>,
    /// Fine-tuning: kept rows waiting for a full batch.
    pending: Option<simclr_core::Batch>,
    /// Fine-tuning: the incoming batch size, the size of the batches it trains on.
    target_rows: usize,
    arch: SimclrTrain,
    engine: Option<Box<dyn LabeledEngine>>,
    id: String,
    run_dir: Option<PathBuf>,
    artifacts: Artifacts,
    metrics: Option<crate::metrics_log::MetricsLog>,
    step: u64,
    epoch: Option<u32>,
    steps_per_epoch: Option<u64>,
    base_lr: Option<f64>,
    /// Steps, summed loss, summed accuracy of the current epoch.
    sums: (u64, f64, f64),
    /// The last finished epoch's training accuracy (percent).
    last_train_acc: Option<f64>,
}

impl SupervisedSink {
    pub(super) fn new(
        cfg: SupervisedTrain,
        arch: SimclrTrain,
        engine: Box<dyn LabeledEngine>,
        cx: &Context,
        fine_tune: Option<FineTuneRun>,
    ) -> Self {
        Self {
            cfg,
            method: if fine_tune.is_some() { "fine_tuned" } else { "supervised" }.into(),
            fine_tune,
            pending: None,
            target_rows: 0,
            arch,
            engine: Some(engine),
            id: cx.stage_id.clone(),
            run_dir: cx.run_dir.clone(),
            artifacts: cx.artifacts.clone(),
            metrics: None,
            step: 0,
            epoch: None,
            steps_per_epoch: None,
            base_lr: None,
            sums: (0, 0.0, 0.0),
            last_train_acc: None,
        }
    }

    fn write(&mut self, line: serde_json::Value) -> Result<(), StageError> {
        crate::metrics_log::append_metrics(&mut self.metrics, self.run_dir.as_deref(), &line)
    }

    fn end_epoch(&mut self) -> Result<(), StageError> {
        let (steps, loss, acc) = std::mem::take(&mut self.sums);
        if let (Some(epoch), true) = (self.epoch, steps > 0) {
            let k = steps as f64;
            self.last_train_acc = Some(acc / k);
            self.write(serde_json::json!({
                "type": "supervised_epoch", "stage": self.id, "epoch": epoch,
                "step": self.step.saturating_sub(1), "loss": loss / k, "train_acc": acc / k,
            }))?;
            tracing::info!(
                "'{}' epoch {epoch}: loss {:.4}, train accuracy {:.1}%",
                self.id,
                loss / k,
                acc / k
            );
        }
        Ok(())
    }
}

impl Sink for SupervisedSink {
    fn epochs(&self) -> u32 {
        self.cfg.epochs + self.fine_tune.as_ref().map_or(0, FineTuneRun::extra_epochs)
    }

    fn consume(&mut self, sample: Sample) -> Result<(), StageError> {
        let Payload::Batch(full) = &sample.payload else {
            return Err(StageError::fatal("`supervised_train` needs batches; put a `batch` stage before it"));
        };
        if let Some(ft) = self.fine_tune.as_mut().filter(|ft| ft.labels_pass() && ft.subset.is_none()) {
            // Epoch 0 of the stream only reads the labels: the subset needs all of them.
            if sample.epoch == 0 {
                ft.seen.extend(full.indices.iter().zip(&full.labels).filter_map(|(i, l)| l.map(|l| (*i, l))));
                return Ok(());
            }
            let sub = subset::balanced(std::mem::take(&mut ft.seen), ft.fraction, ft.seed);
            tracing::info!(
                "'{}': {} labeled samples ({}% of the labels, class-balanced: {} per class)",
                self.id,
                sub.len(),
                subset::pct(ft.fraction),
                sub.per_class.values().map(|n| n.to_string()).collect::<Vec<_>>().join("/")
            );
            for w in subset::thin(&sub, self.cfg.classes) {
                tracing::warn!("'{}': {w}", self.id);
                self.artifacts.push("warnings", serde_json::json!({"stage": self.id, "message": w}));
            }
            ft.subset = Some(sub);
        }
        if let Some(ft) = self.fine_tune.as_mut().filter(|ft| ft.probe.is_some()) {
            // Epoch 1 (with `head_init: linear_probe`) encodes the subset's images with the
            // starting encoder; the classifier is fitted on them before training starts.
            if sample.epoch == 1 {
                let (Some(probe), Some(engine), Some(sub)) = (ft.probe.as_mut(), &self.engine, &ft.subset)
                else {
                    return Ok(());
                };
                let kept = keep_rows(full, |i| sub.contains(i));
                if let Some(view) = kept.views.first().filter(|v| v.shape.first().is_some_and(|n| *n > 0)) {
                    let shape: [usize; 4] = view.shape.clone().try_into().map_err(|_| {
                        StageError::fatal(format!(
                            "fine-tuning needs N x C x H x W images, got {:?}",
                            view.shape
                        ))
                    })?;
                    let f = engine.encode(&view.data, shape).map_err(StageError::fatal)?;
                    probe.dim = f.len() / shape[0];
                    probe.x.extend(f);
                    probe.y.extend(kept.labels.iter().map(|l| l.unwrap_or(0)));
                    probe.index.extend(&kept.indices);
                }
                return Ok(());
            }
            if let (Some(probe), Some(engine)) = (ft.probe.take(), self.engine.as_mut()) {
                if !probe.is_empty() {
                    let (weight, bias, train_acc) = probe_head(&probe, self.cfg.classes, ft.probe_l2);
                    engine.load_head(weight, bias, self.cfg.classes, probe.dim).map_err(StageError::fatal)?;
                    tracing::info!(
                        "'{}': classifier initialized by a linear probe on the labeled subset (train accuracy {train_acc:.1}%)",
                        self.id
                    );
                }
            }
        }
        if self.epoch != Some(sample.epoch) {
            if self.epoch.is_some() {
                self.flush_pending()?;
                self.end_epoch()?;
                if self.steps_per_epoch.is_none() {
                    self.steps_per_epoch = Some(self.step.max(1));
                }
            }
            self.epoch = Some(sample.epoch);
        }
        let Some(ft) = &self.fine_tune else { return self.train_batch(full, sample.epoch) };
        // Fine-tuning keeps a fixed subset of the samples and trains on full batches of them
        // (BatchNorm needs more than the few kept rows of one incoming batch).
        let kept_rows = match &ft.subset {
            Some(sub) => keep_rows(full, |i| sub.contains(i)),
            None => keep_rows(full, |_| true),
        };
        let target = full.indices.len();
        self.target_rows = self.target_rows.max(target);
        let pending = match self.pending.take() {
            Some(p) => concat(p, kept_rows),
            None => kept_rows,
        };
        if pending.indices.len() >= target {
            self.train_batch(&pending, sample.epoch)
        } else {
            self.pending = Some(pending);
            Ok(())
        }
    }

    fn finish(&mut self) -> Result<(), StageError> {
        self.flush_pending()?;
        self.finish_inner()
    }
}

impl SupervisedSink {
    /// Trains on the kept rows still waiting for a full batch (at an epoch's end) when they
    /// are at least half a batch; fewer are dropped (a shuffled source drops other rows each
    /// epoch), since BatchNorm statistics of a handful of rows make the step noise.
    fn flush_pending(&mut self) -> Result<(), StageError> {
        match (self.pending.take(), self.epoch) {
            (Some(p), Some(epoch)) if p.indices.len() >= 2 && 2 * p.indices.len() >= self.target_rows => {
                self.train_batch(&p, epoch)
            }
            _ => Ok(()),
        }
    }

    /// One step per view of `batch`.
    fn train_batch(&mut self, batch: &simclr_core::Batch, epoch: u32) -> Result<(), StageError> {
        let sample_epoch = epoch;
        let mut labels = Vec::with_capacity(batch.labels.len());
        for (l, idx) in batch.labels.iter().zip(&batch.indices) {
            match l {
                Some(l) if (*l as usize) < self.cfg.classes => labels.push(*l),
                Some(l) => {
                    return Err(StageError::fatal(format!(
                        "sample {idx} has label {l}, but `classes` is {}; raise `classes`",
                        self.cfg.classes
                    )))
                }
                None => {
                    return Err(StageError::fatal(format!(
                        "sample {idx} has no label; `supervised_train` needs a labeled source"
                    )))
                }
            }
        }
        // Every view is a labeled image: one step over all of them.
        for view in &batch.views {
            let shape: [usize; 4] = match view.shape[..] {
                [n, 3, h, w] if n == labels.len() && n > 0 => [n, 3, h, w],
                _ => {
                    return Err(StageError::fatal(format!(
                        "views must be N x 3 x H x W tensors, got {:?}",
                        view.shape
                    )))
                }
            };
            let base = *self.base_lr.get_or_insert_with(|| base_lr(&self.cfg.optimizer, shape[0]));
            let warmup = self.arch.warmup_epochs_clamped();
            let lr = match self.steps_per_epoch {
                Some(spe) => Schedule::new(base, warmup, self.cfg.epochs, spe).lr(self.step),
                None => first_epoch_lr(base, warmup, self.step),
            };
            let engine =
                self.engine.as_mut().ok_or_else(|| StageError::fatal("training already finished"))?;
            let (loss, acc) = match engine.step(&view.data, &labels, shape, lr) {
                Ok(x) => x,
                Err(StepError::NonFinite(l)) => {
                    return Err(StageError::Diverged {
                        step: self.step,
                        message: format!(
                            "loss is {l} at step {}: training diverged; lower `optimizer.lr`",
                            self.step
                        ),
                    })
                }
                Err(StepError::Other(m)) => return Err(StageError::fatal(m)),
            };
            self.sums.0 += 1;
            self.sums.1 += loss;
            self.sums.2 += acc;
            if self.step.is_multiple_of(self.cfg.log_every) {
                self.write(serde_json::json!({
                    "type": "supervised_step", "stage": self.id, "step": self.step,
                    "epoch": sample_epoch, "loss": loss, "train_acc": acc, "lr": lr,
                }))?;
            }
            self.step += 1;
        }
        Ok(())
    }

    fn finish_inner(&mut self) -> Result<(), StageError> {
        self.end_epoch()?;
        self.epoch = None;
        if let (Some(ft), Some(engine)) = (&self.fine_tune, &self.engine) {
            let predict = |x: &[f32], shape: [usize; 4]| engine.predict(x, shape);
            let scores = extract(&self.id, &predict, &ft.test, &ft.transform, ft.seed, 256)?;
            let classes = scores.dim;
            let (top1, top5) = topk_accuracy(&scores.y, classes, |i, out| {
                for (o, v) in out.iter_mut().zip(scores.row(i)) {
                    *o = f64::from(*v);
                }
            });
            let pct = subset::pct(ft.fraction);
            let train_acc = self.last_train_acc.unwrap_or(0.0);
            // Fine-tuning an untrained encoder is training from scratch on the same labels:
            // the supervised baseline of the paper's Table 7.
            let (method, what) = if ft.method == "random_init" {
                ("supervised".to_string(), "scratch")
            } else {
                (ft.method.clone(), "finetune")
            };
            tracing::info!(
                "'{}': {method} {what} on {pct}% of the labels: top-1 {top1:.2}% (train {train_acc:.1}%)",
                self.id,
            );
            if let Some(w) = subset::near_chance(train_acc, classes) {
                tracing::warn!("'{}': {w}", self.id);
                self.artifacts.push("warnings", serde_json::json!({"stage": self.id, "message": w}));
            }
            let metrics = serde_json::json!({
                format!("{what}_{pct}pct_top1"): top1,
                format!("{what}_{pct}pct_top5"): top5,
                format!("{what}_{pct}pct_train_top1"): train_acc,
            });
            let m = metrics.as_object().cloned().unwrap_or_default();
            self.artifacts.record(&method, m.clone());
            self.artifacts.record_in("encoders", &self.id, m.clone());
            self.artifacts.push(
                "finetunes",
                serde_json::json!({"stage": self.id, "method": method, "from": ft.method, "label_fraction": ft.fraction,
                                   "labeled": ft.subset.as_ref().map(Subset::len),
                                   "test_data": ft.test.id, "dataset": ft.test.name, "metrics": m}),
            );
        } else if let Some(acc) = self.last_train_acc {
            // The supervised baseline: its final training accuracy shows whether it converged.
            let m = serde_json::json!({"train_top1": acc});
            let m = m.as_object().cloned().unwrap_or_default();
            self.artifacts.record(&self.method, m.clone());
            self.artifacts.record_in("encoders", &self.id, m);
            if let Some(w) = subset::near_chance(acc, self.cfg.classes) {
                tracing::warn!("'{}': {w}", self.id);
                self.artifacts.push("warnings", serde_json::json!({"stage": self.id, "message": w}));
            }
        }
        if let Some(engine) = self.engine.take() {
            let encoder: Box<dyn Encode> = engine;
            self.artifacts.put(
                &self.id,
                EncoderArtifact {
                    stage: self.id.clone(),
                    method: self.method.clone(),
                    arch: self.arch.clone(),
                    encoder: Mutex::new(encoder),
                },
            );
        }
        Ok(())
    }
}
