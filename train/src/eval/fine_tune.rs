//! `fine_tune`: the semi-supervised protocol (the paper's section B.5 / Table 7). It trains
//! with [`super::supervised`]'s sink, plus what is its own: the labeled subset, the linear-probe
//! initialization of the classifier, and the report under `finetune_`/`scratch_` keys.

use serde::Deserialize;
use simclr_core::{Context, PortType, Problem, Role, Stage, StageConfig, StageError, StageRef};

use super::features::{encoder_of, source_of, EvalTransform};
use super::fine_tune_run::FineTuneRun;
use super::linear::Features;
use super::supervised::{make_supervised, sgd, ten, SupervisedSink, SupervisedTrain};
use crate::config::OptimizerConfig;

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
