//! `fine_tune`: the semi-supervised protocol (the paper's section B.5 / Table 7). It trains
//! with [`super::supervised`]'s sink, plus what is its own: the labeled subset, the linear-probe
//! initialization of the classifier, and the report under `finetune_`/`scratch_` keys.

use std::sync::Arc;

use serde::Deserialize;
use simclr_core::driver::DataSource;
use simclr_core::{Context, PortType, Problem, Role, Stage, StageConfig, StageError, StageRef};

use super::features::{encoder_of, source_of, EvalTransform};
use super::linear::{fit_lbfgs, Features, Standardizer};
use super::subset::Subset;
use super::supervised::{make_supervised, sgd, ten, SupervisedSink, SupervisedTrain};
use crate::config::OptimizerConfig;

/// Fine-tuning's extras: the label subset and the test it reports on.
pub(super) struct FineTuneRun {
    pub(super) fraction: f64,
    pub(super) seed: u64,
    pub(super) test: Arc<DataSource>,
    pub(super) transform: EvalTransform,
    /// The method the starting encoder is filed under (`simclr`).
    pub(super) method: String,
    /// The labeled subset, chosen after a first pass that only reads the labels (below a
    /// fraction of 1: a class-balanced subset needs every label first).
    pub(super) subset: Option<Subset>,
    /// (dataset index, label) seen in that first pass.
    pub(super) seen: Vec<(u64, u32)>,
    /// `head_init: linear_probe` (below a fraction of 1): the subset's (augmented) images
    /// encoded by the starting encoder in a second pass; the classifier starts from a logistic
    /// regression fitted on them (linear probing, then fine-tuning). `None` once fitted.
    pub(super) probe: Option<Features>,
    /// The probe's L2 penalty.
    pub(super) probe_l2: f64,
    /// Whether the run has the probe's pass (fixed at build: `probe` is emptied after it).
    probe_pass: bool,
}

impl FineTuneRun {
    /// Whether the stream's epoch 0 is the labels-only pass.
    pub(super) fn labels_pass(&self) -> bool {
        self.fraction < 1.0
    }

    /// Passes over the data before training: the labels pass, then the probe's.
    pub(super) fn extra_epochs(&self) -> u32 {
        u32::from(self.labels_pass()) + u32::from(self.probe_pass)
    }
}

/// The rows of `batch` whose dataset index passes `keep`.
pub(super) fn keep_rows(batch: &simclr_core::Batch, keep: impl Fn(u64) -> bool) -> simclr_core::Batch {
    let rows: Vec<usize> = (0..batch.indices.len()).filter(|&r| keep(batch.indices[r])).collect();
    let views = batch
        .views
        .iter()
        .map(|v| {
            let per = v.shape.iter().skip(1).product::<usize>();
            let mut shape = v.shape.clone();
            if let Some(n) = shape.first_mut() {
                *n = rows.len();
            }
            let data = rows.iter().flat_map(|&r| v.data[r * per..(r + 1) * per].iter().copied()).collect();
            simclr_core::Tensor { shape, data }
        })
        .collect();
    simclr_core::Batch {
        views,
        indices: rows.iter().map(|&r| batch.indices[r]).collect(),
        labels: rows.iter().map(|&r| batch.labels[r]).collect(),
        pool: None,
    }
}

/// `fine_tune`: the semi-supervised protocol: a pre-trained encoder plus a linear classifier,
/// trained end to end with the labels of `label_fraction` of the data; reports top-1/top-5 on
/// `test_data` as `<method>.finetune_<pct>pct_top1`.
#[derive(Clone, Debug, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FineTune {
    /// The encoder stage to start from (e.g. `train`).
    pub encoder: String,
    /// Number of classes.
    pub classes: usize,
    /// Share of the training samples whose labels are used (default 0.1; the paper: 0.01, 0.1).
    #[serde(default = "tenth")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub label_fraction: f64,
    /// Labeled source stage to report on.
    pub test_data: String,
    /// Optimizer (default: sgd, lr 0.1 x B/256, nesterov, weight decay 5e-4... as `supervised_train`).
    #[serde(default = "sgd")]
    pub optimizer: OptimizerConfig,
    /// Passes over the data (default 30).
    #[serde(default = "thirty")]
    pub epochs: u32,
    #[serde(default)]
    pub warmup_epochs: f64,
    #[serde(default = "ten")]
    pub log_every: u64,
    #[serde(default)]
    pub transform: EvalTransform,
    /// How the classifier starts: `linear_probe` (default: a logistic regression fitted on the
    /// labeled subset's features from the starting encoder, then everything is fine-tuned; with
    /// few labels a random classifier's early gradients wreck the pre-trained features) or
    /// `random`.
    #[serde(default)]
    pub head_init: HeadInit,
    /// L2 penalty of that probe on standardized features (default 0.1, much stronger than
    /// `linear_eval`'s: the classifier starts with moderate logits; at demo scale 0.01 and 1.0
    /// both fine-tuned 5+ points worse).
    #[serde(default = "probe_l2")]
    pub probe_l2: f64,
}

fn probe_l2() -> f64 {
    0.1
}

/// `fine_tune`'s classifier initialization.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HeadInit {
    #[default]
    LinearProbe,
    Random,
}

/// A logistic regression on standardized `rows` (L-BFGS, as `linear_eval`), folded back into
/// weights and biases on the raw features: (classes x dim weights, biases, train accuracy %).
pub(super) fn probe_head(rows: &Features, classes: usize, l2: f64) -> (Vec<f32>, Vec<f32>, f64) {
    let std = Standardizer::fit(rows);
    let (model, _) = fit_lbfgs(&std.apply(rows), classes, l2, 500, 1e-6);
    let d = rows.dim;
    let mut weight = vec![0f32; classes * d];
    let mut bias = vec![0f32; classes];
    for c in 0..classes {
        let mut b = model.b[c];
        for j in 0..d {
            let w = model.w[c * d + j] * std.inv_std[j];
            weight[c * d + j] = w as f32;
            b -= w * std.mean[j];
        }
        bias[c] = b as f32;
    }
    let (train_acc, _) = model.accuracy(&std.apply(rows));
    (weight, bias, train_acc)
}

fn tenth() -> f64 {
    0.1
}
fn thirty() -> u32 {
    30
}

impl StageConfig for FineTune {
    const KIND: &'static str = "fine_tune";
    const ABOUT: &'static str =
        "sink: fine-tunes a pre-trained encoder + linear head on a fraction of the labels";
    const ROLE: Role = Role::Sink;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Batch, PortType::Encoder)
    }
    fn refs(&self) -> Vec<StageRef> {
        vec![
            StageRef { field: "encoder".into(), stage: self.encoder.clone(), expects: PortType::Encoder },
            StageRef { field: "test_data".into(), stage: self.test_data.clone(), expects: PortType::Any },
        ]
    }
    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        if !(self.label_fraction > 0.0 && self.label_fraction <= 1.0) {
            out.push(Problem::new(
                "label_fraction",
                "`label_fraction` must be in (0, 1]",
                "e.g. `label_fraction: 0.1`",
            ));
        }
        if self.classes < 2 {
            out.push(Problem::new("classes", "`classes` must be at least 2", "e.g. `classes: 10`"));
        }
        if self.epochs == 0 || self.log_every == 0 {
            out.push(Problem::new(
                "epochs",
                "`epochs` and `log_every` must be at least 1",
                "e.g. `epochs: 30`",
            ));
        }
        out.extend(self.transform.problems("transform"));
    }
    fn build(&self, cx: &Context) -> Result<Stage, StageError> {
        let start = encoder_of(cx, "encoder", &self.encoder)?;
        let test = source_of(cx, "test_data", &self.test_data)?;
        let cfg = SupervisedTrain {
            backbone: start.arch.backbone,
            stem: start.arch.stem,
            width: start.arch.width,
            classes: self.classes,
            optimizer: self.optimizer.clone(),
            epochs: self.epochs,
            warmup_epochs: self.warmup_epochs,
            device: start.arch.device.clone(),
            log_every: self.log_every,
        };
        if let Some(p) = cfg.problems().into_iter().next() {
            return Err(StageError::fatal(format!("{} ({})", p.message, p.fix)));
        }
        let arch = cfg.arch().map_err(StageError::fatal)?;
        let mut engine = make_supervised(&arch, cx.seed).map_err(StageError::fatal)?;
        let loaded = engine.load_encoder(&start.tensors()).map_err(StageError::fatal)?;
        if loaded == 0 {
            return Err(StageError::fatal(format!(
                "`encoder: {}` gave no weights to start from; name a trained encoder stage",
                self.encoder
            )));
        }
        tracing::info!("'{}': starting from '{}' ({loaded} tensors)", cx.stage_id, self.encoder);
        let probe_pass = self.head_init == HeadInit::LinearProbe && self.label_fraction < 1.0;
        let run = FineTuneRun {
            fraction: self.label_fraction,
            seed: cx.seed,
            test,
            transform: self.transform.clone(),
            method: start.method.clone(),
            subset: None,
            seen: Vec::new(),
            probe: probe_pass.then(Features::default),
            probe_pass,
            probe_l2: self.probe_l2,
        };
        Ok(Stage::Sink(Box::new(SupervisedSink::new(cfg, arch, engine, cx, Some(run)))))
    }
}

/// `a`'s rows followed by `b`'s.
pub(super) fn concat(mut a: simclr_core::Batch, b: simclr_core::Batch) -> simclr_core::Batch {
    for (va, vb) in a.views.iter_mut().zip(&b.views) {
        va.data.extend_from_slice(&vb.data);
        if let (Some(na), Some(nb)) = (va.shape.first_mut(), vb.shape.first()) {
            *na += nb;
        }
    }
    a.indices.extend_from_slice(&b.indices);
    a.labels.extend_from_slice(&b.labels);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The folded classifier on raw features predicts what the probe predicts on standardized ones.
    #[test]
    fn the_probe_head_folds_the_standardization_into_the_weights() {
        // Three classes along different features, with large offsets and scales.
        let mut f = Features { dim: 3, ..Features::default() };
        for i in 0..60u32 {
            let c = i % 3;
            let jitter = (i as f32 * 0.37).sin();
            let mut row = [100.0 + jitter, -50.0 + 0.5 * jitter, 3.0 * jitter];
            row[c as usize] += 4.0 * (1.0 + 0.1 * jitter);
            f.x.extend(row);
            f.y.push(c);
            f.index.push(u64::from(i));
        }
        let (w, b, train_acc) = probe_head(&f, 3, 1e-4);
        assert!(train_acc > 90.0, "{train_acc}");
        let correct = (0..f.len())
            .filter(|&r| {
                let x = f.row(r);
                let scores: Vec<f32> =
                    (0..3).map(|c| b[c] + (0..3).map(|j| w[c * 3 + j] * x[j]).sum::<f32>()).collect();
                let best = (0..3).max_by(|&a, &c| scores[a].total_cmp(&scores[c])).unwrap_or(0);
                best as u32 == f.y[r]
            })
            .count();
        assert_eq!(correct as f64 / f.len() as f64 * 100.0, train_acc);
    }
}
