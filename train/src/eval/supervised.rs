//! `supervised_train`: the supervised baseline from the same backbone: the encoder plus a linear
//! classifier trained with cross-entropy on labeled batches (crop + flip upstream).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Mutex;

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::Deserialize;
use simclr_core::{
    Artifacts, Context, Payload, PortType, Problem, Role, Sample, Sink, Stage, StageConfig, StageError,
};

use super::features::{Encode, EncoderArtifact};
use crate::config::{Backbone, DeviceSpec, OptimizerConfig, SimclrTrain, Stem};
use crate::model::SimclrModel;
use crate::optim::{base_lr, first_epoch_lr, Optimizer, Schedule};
use crate::trainer::StepError;

/// `supervised_train`: encoder + linear classifier, cross-entropy with labels (a sink; its
/// encoder is an artifact, filed as `supervised`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
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
fn ten() -> u64 {
    10
}
fn cpu() -> String {
    "cpu".into()
}
fn sgd() -> OptimizerConfig {
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

    fn problems(&self) -> Vec<Problem> {
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

fn make_supervised(arch: &SimclrTrain, seed: u64) -> Result<Box<dyn LabeledEngine>, String> {
    match DeviceSpec::parse(&arch.device)? {
        DeviceSpec::Cpu => {
            type B = burn::backend::Autodiff<burn::backend::Flex>;
            let device = Default::default();
            <B as burn::tensor::backend::Backend>::seed(&device, seed);
            Ok(Box::new(SupTrainer::<B> {
                model: Some(SimclrModel::new(arch, seed, &device)),
                device,
                opt: Optimizer::new(&arch.optimizer),
            }))
        }
        DeviceSpec::Cuda(index) => cuda_supervised(arch, seed, index),
    }
}

#[cfg(feature = "cuda")]
fn cuda_supervised(arch: &SimclrTrain, seed: u64, index: usize) -> Result<Box<dyn LabeledEngine>, String> {
    type B = burn::backend::Autodiff<burn::backend::Cuda>;
    catch_unwind(AssertUnwindSafe(|| {
        let device = burn::backend::cuda::CudaDevice::new(index);
        <B as burn::tensor::backend::Backend>::seed(&device, seed);
        Box::new(SupTrainer::<B> {
            model: Some(SimclrModel::new(arch, seed, &device)),
            device,
            opt: Optimizer::new(&arch.optimizer),
        }) as Box<dyn LabeledEngine>
    }))
    .map_err(|_| format!("cannot use CUDA device {index}"))
}

#[cfg(not(feature = "cuda"))]
fn cuda_supervised(_arch: &SimclrTrain, _seed: u64, _index: usize) -> Result<Box<dyn LabeledEngine>, String> {
    Err(crate::config::no_cuda_message())
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
        Ok(Stage::Sink(Box::new(SupervisedSink {
            cfg: self.clone(),
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
        })))
    }
}

struct SupervisedSink {
    cfg: SupervisedTrain,
    arch: SimclrTrain,
    engine: Option<Box<dyn LabeledEngine>>,
    id: String,
    run_dir: Option<PathBuf>,
    artifacts: Artifacts,
    metrics: Option<BufWriter<File>>,
    step: u64,
    epoch: Option<u32>,
    steps_per_epoch: Option<u64>,
    base_lr: Option<f64>,
    /// Steps, summed loss, summed accuracy of the current epoch.
    sums: (u64, f64, f64),
}

impl SupervisedSink {
    fn write(&mut self, line: serde_json::Value) -> Result<(), StageError> {
        let Some(dir) = &self.run_dir else { return Ok(()) };
        if self.metrics.is_none() {
            let path = dir.join("metrics.jsonl");
            let f = File::options()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| StageError::fatal(format!("cannot open {}: {e}", path.display())))?;
            self.metrics = Some(BufWriter::new(f));
        }
        if let Some(w) = self.metrics.as_mut() {
            writeln!(w, "{line}")
                .and_then(|_| w.flush())
                .map_err(|e| StageError::fatal(format!("cannot write metrics.jsonl: {e}")))?;
        }
        Ok(())
    }

    fn end_epoch(&mut self) -> Result<(), StageError> {
        let (steps, loss, acc) = std::mem::take(&mut self.sums);
        if let (Some(epoch), true) = (self.epoch, steps > 0) {
            let k = steps as f64;
            self.write(serde_json::json!({
                "type": "supervised_epoch", "stage": self.id, "epoch": epoch,
                "loss": loss / k, "train_acc": acc / k,
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
        self.cfg.epochs
    }

    fn consume(&mut self, sample: Sample) -> Result<(), StageError> {
        let Payload::Batch(batch) = &sample.payload else {
            return Err(StageError::fatal("`supervised_train` needs batches; put a `batch` stage before it"));
        };
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
        if self.epoch != Some(sample.epoch) {
            if self.epoch.is_some() {
                self.end_epoch()?;
                if self.steps_per_epoch.is_none() {
                    self.steps_per_epoch = Some(self.step.max(1));
                }
            }
            self.epoch = Some(sample.epoch);
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
                    return Err(StageError::fatal(format!(
                        "loss is {l} at step {}: training diverged; lower `optimizer.lr`",
                        self.step
                    )))
                }
                Err(StepError::Other(m)) => return Err(StageError::fatal(m)),
            };
            self.sums.0 += 1;
            self.sums.1 += loss;
            self.sums.2 += acc;
            if self.step.is_multiple_of(self.cfg.log_every) {
                self.write(serde_json::json!({
                    "type": "supervised_step", "stage": self.id, "step": self.step,
                    "epoch": sample.epoch, "loss": loss, "train_acc": acc, "lr": lr,
                }))?;
            }
            self.step += 1;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), StageError> {
        self.end_epoch()?;
        self.epoch = None;
        if let Some(engine) = self.engine.take() {
            let encoder: Box<dyn Encode> = engine;
            self.artifacts.put(
                &self.id,
                EncoderArtifact {
                    stage: self.id.clone(),
                    method: "supervised".into(),
                    arch: self.arch.clone(),
                    encoder: Mutex::new(encoder),
                },
            );
        }
        Ok(())
    }
}
