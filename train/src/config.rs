//! The `simclr_train` config: every field, its default, and the semantic checks.

use serde::{Deserialize, Serialize};
use simclr_core::Problem;

/// ResNet depth.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Backbone {
    /// BasicBlock [2, 2, 2, 2]; h is 512 x width.
    #[default]
    Resnet18,
    /// BasicBlock [3, 4, 6, 3]; h is 512 x width.
    Resnet34,
    /// Bottleneck [3, 4, 6, 3]; h is 2048 x width.
    Resnet50,
}

impl Backbone {
    pub fn name(self) -> &'static str {
        match self {
            Backbone::Resnet18 => "resnet18",
            Backbone::Resnet34 => "resnet34",
            Backbone::Resnet50 => "resnet50",
        }
    }
}

/// The first layers of the encoder.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Stem {
    /// 3x3 conv, stride 1, no max-pool (32x32 inputs).
    #[default]
    Cifar,
    /// 7x7 conv, stride 2, then 3x3 max-pool stride 2.
    Imagenet,
}

/// Projection head g.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    /// z = h.
    None,
    /// One dense layer to `out_dim`.
    Linear,
    /// `layers` dense layers, ReLU between them (the paper's head).
    #[default]
    Nonlinear,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeadConfig {
    /// `none | linear | nonlinear` (default nonlinear).
    #[serde(default)]
    pub kind: HeadKind,
    /// Dense layers of a nonlinear head (default 2; SimCLRv2 uses 3).
    #[serde(default = "two")]
    pub layers: usize,
    /// Width of the hidden layers (default: the representation's size).
    #[serde(default)]
    pub hidden_dim: Option<usize>,
    /// Size of z (default 128).
    #[serde(default = "out_dim")]
    pub out_dim: usize,
    /// BatchNorm after each dense layer, dense layers without bias (default true, as the official code).
    #[serde(default = "yes")]
    pub bn: bool,
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self { kind: HeadKind::default(), layers: 2, hidden_dim: None, out_dim: 128, bn: true }
    }
}

/// Contrastive objective (the paper's Table 4).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    #[default]
    NtXent,
    NtLogistic,
    MarginTriplet,
}

/// How NT-Xent is reduced over the 2N anchors.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Reduction {
    /// Mean over the 2N anchors (the paper; near ln(2N-1) at initialization).
    Paper,
    /// Sum of the two directions' mean cross-entropies, i.e. 2x `paper` (the official code).
    #[default]
    Code,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    /// `nt_xent | nt_logistic | margin_triplet` (default nt_xent).
    #[serde(default)]
    pub kind: LossKind,
    /// Temperature t (default 0.5, the CIFAR value; ImageNet uses 0.1).
    #[serde(default = "half")]
    pub temperature: f64,
    /// L2-normalize z before the similarities (default true).
    #[serde(default = "yes")]
    pub l2_normalize: bool,
    /// NT-Xent only: `paper | code` (default code).
    #[serde(default)]
    pub reduction: Reduction,
    /// margin_triplet only: the margin m (default 0.5).
    #[serde(default = "half")]
    pub margin: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            kind: LossKind::default(),
            temperature: 0.5,
            l2_normalize: true,
            reduction: Reduction::default(),
            margin: 0.5,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    #[default]
    Lars,
    Sgd,
    Adamw,
}

/// How the base learning rate follows the batch size B (pairs per batch).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LrScaling {
    /// lr x B / 256.
    #[default]
    Linear,
    /// lr x sqrt(B).
    Sqrt,
    /// lr as given.
    None,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// `lars | sgd | adamw` (default lars).
    #[serde(default)]
    pub kind: OptimizerKind,
    /// Base learning rate before `lr_scaling` (default 0.3).
    #[serde(default = "lr")]
    pub lr: f64,
    /// `linear | sqrt | none` (default linear: lr x B/256).
    #[serde(default)]
    pub lr_scaling: LrScaling,
    /// Momentum of lars and sgd (default 0.9).
    #[serde(default = "momentum")]
    pub momentum: f64,
    /// Weight decay (default 1e-6; lars and sgd add it to the gradient, adamw decouples it).
    #[serde(default = "weight_decay")]
    pub weight_decay: f64,
    /// LARS trust coefficient (default 0.001).
    #[serde(default = "eta")]
    pub eta: f64,
    /// Nesterov momentum for lars and sgd (default false).
    #[serde(default)]
    pub nesterov: bool,
    /// Keep biases and BatchNorm parameters out of weight decay and the LARS trust ratio
    /// (default true, as the official code).
    #[serde(default = "yes")]
    pub exclude_bias_and_bn: bool,
    /// adamw's (beta1, beta2) (default [0.9, 0.999]).
    #[serde(default = "betas")]
    pub betas: [f64; 2],
    /// adamw's epsilon (default 1e-8).
    #[serde(default = "adam_eps")]
    pub eps: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults deserialize")
    }
}

/// `simclr_train`: trains encoder + head on batches of view pairs (a sink; its encoder is an artifact).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SimclrTrain {
    /// `resnet18 | resnet34 | resnet50` (default resnet18).
    #[serde(default)]
    pub backbone: Backbone,
    /// `cifar | imagenet` (default cifar).
    #[serde(default)]
    pub stem: Stem,
    /// Channel multiplier: 64 x width channels in the first stage, at least 1 (default 1.0).
    #[serde(default = "one_f")]
    pub width: f64,
    #[serde(default)]
    pub head: HeadConfig,
    #[serde(default)]
    pub loss: LossConfig,
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    /// Passes over the data (default 100).
    #[serde(default = "epochs")]
    pub epochs: u32,
    /// Linear warmup length in epochs, clamped to `epochs` (default 10). While the first
    /// epoch's length is still being counted the ramp assumes the epoch ends at the current
    /// step, so with 1 epoch or less the rate is near its peak after a few steps: give
    /// `steps_per_epoch` for an exact ramp.
    #[serde(default = "warmup")]
    pub warmup_epochs: f64,
    /// Batches per epoch, normally counted during the first epoch. Giving it makes the
    /// first epoch's warmup exact (default: counted; e.g. 2,000 images in 64-pair batches: 31).
    #[serde(default)]
    pub steps_per_epoch: Option<u64>,
    /// `cpu | cuda | cuda:N | wgpu | wgpu:N | wgpu:cpu` (default cpu). `cuda` and `wgpu` need
    /// a build with that feature; `wgpu` is the best adapter (a discrete GPU first), `wgpu:cpu`
    /// the CPU's (lavapipe, for tests). `simclr selftest --device D` checks one against the CPU.
    #[serde(default = "cpu")]
    pub device: String,
    /// Data-parallel training on several devices of this machine, one peer (rank) each, e.g.
    /// `[cuda:0, cuda:1]` (repeated `cpu` entries are allowed, for tests). `batch_size` stays the
    /// global batch: each device trains on its share, NT-Xent sees the negatives of the whole
    /// batch and the gradients are summed, so the run matches one device with the whole batch.
    /// Replaces `device`. Several processes or machines: `simclr run --world-size` (README).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<String>>,
    /// `global | local` with several peers: BatchNorm statistics over the global batch (the
    /// paper's "global BN", default) or over each device's share. One peer: no effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_norm: Option<BatchNormMode>,
    /// Write one metrics line every this many steps (epoch lines always; default 1).
    #[serde(default = "one_u")]
    pub log_every: u64,
    /// Write `checkpoint.safetensors` every this many epochs (default 1; 0 = only at the end
    /// and on Ctrl-C). The end of training always writes one.
    #[serde(default = "one_epoch")]
    pub checkpoint_every: u32,
    /// Also write it every this many steps, mid-epoch included (default 0 = off): a resumed
    /// run continues from that step, seeking the data to the position (nothing consumed is read
    /// again) and training exactly as the uninterrupted run.
    #[serde(default)]
    pub checkpoint_every_steps: u64,
    /// kNN monitor: accuracy of a cosine kNN on frozen features every few epochs, logged to
    /// `metrics.jsonl` as `"type": "monitor"` lines (default off).
    #[serde(default)]
    pub monitor: Option<MonitorConfig>,
}

/// `batch_norm:` of `simclr_train`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BatchNormMode {
    /// Statistics over all peers' samples (sums all-reduced forward and backward).
    Global,
    /// Statistics over each peer's own samples.
    Local,
}

/// `monitor:` of `simclr_train`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MonitorConfig {
    /// Labeled source stage the kNN looks up (e.g. the training split, unaugmented).
    pub train_data: String,
    /// Labeled source stage it is measured on (held out).
    pub test_data: String,
    /// Every this many epochs, and after the last (default 1).
    #[serde(default = "one_u32")]
    pub every: u32,
    /// Neighbours (default 200).
    #[serde(default = "two_hundred")]
    pub k: usize,
    /// Vote temperature (default 0.1).
    #[serde(default = "tenth")]
    pub temperature: f64,
}

fn one_u32() -> u32 {
    1
}
fn two_hundred() -> usize {
    200
}
fn tenth() -> f64 {
    0.1
}

impl Default for SimclrTrain {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults deserialize")
    }
}

fn yes() -> bool {
    true
}
fn two() -> usize {
    2
}
fn out_dim() -> usize {
    128
}
fn half() -> f64 {
    0.5
}
fn lr() -> f64 {
    0.3
}
fn momentum() -> f64 {
    0.9
}
fn weight_decay() -> f64 {
    1e-6
}
fn eta() -> f64 {
    0.001
}
fn betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn adam_eps() -> f64 {
    1e-8
}
fn one_f() -> f64 {
    1.0
}
fn one_u() -> u64 {
    1
}
fn one_epoch() -> u32 {
    1
}
fn epochs() -> u32 {
    100
}
fn warmup() -> f64 {
    10.0
}
fn cpu() -> String {
    "cpu".to_string()
}

pub use crate::device::DeviceSpec;

impl SimclrTrain {
    /// Channels of the first stage: 64 x width, at least 1.
    pub fn scaled(&self, channels: usize) -> usize {
        ((channels as f64 * self.width).round() as usize).max(1)
    }

    /// Warmup epochs as used: clamped to [0, epochs].
    pub fn warmup_epochs_clamped(&self) -> f64 {
        self.warmup_epochs.clamp(0.0, f64::from(self.epochs))
    }

    /// Every semantic problem of the config.
    /// The devices of this process: `devices`, or `device` alone.
    pub fn local_devices(&self) -> Vec<String> {
        self.devices.clone().filter(|d| !d.is_empty()).unwrap_or_else(|| vec![self.device.clone()])
    }

    /// Whether BatchNorm statistics are shared across peers (the default with several).
    pub fn global_bn(&self) -> bool {
        self.batch_norm != Some(BatchNormMode::Local)
    }

    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        if !(self.width.is_finite() && self.width > 0.0 && self.width <= 16.0) {
            out.push(Problem::new(
                "width",
                "`width` must be in (0, 16]",
                "e.g. `width: 1.0` (0.25 for a tiny demo net)",
            ));
        }
        if self.epochs == 0 {
            out.push(Problem::new("epochs", "`epochs` must be at least 1", "e.g. `epochs: 100`"));
        }
        if !(self.warmup_epochs.is_finite() && self.warmup_epochs >= 0.0) {
            out.push(Problem::new(
                "warmup_epochs",
                "`warmup_epochs` must be zero or positive",
                "e.g. `warmup_epochs: 10`",
            ));
        }
        if let Some(d) = &self.devices {
            if d.is_empty() {
                out.push(Problem::new(
                    "devices",
                    "`devices` is empty",
                    "list at least one, e.g. `devices: [cuda:0, cuda:1]`",
                ));
            }
            if self.device != "cpu" {
                out.push(Problem::new(
                    "devices",
                    "`device` and `devices` are both set",
                    "keep `devices` (one entry per device) and remove `device`",
                ));
            }
            for e in d {
                if let Err(msg) = crate::device::DeviceSpec::parse(e) {
                    out.push(Problem::new(
                        "devices",
                        format!("{msg} in `devices`"),
                        crate::device::DEVICE_HINT,
                    ));
                }
            }
        }
        if self.steps_per_epoch == Some(0) {
            out.push(Problem::new(
                "steps_per_epoch",
                "`steps_per_epoch` must be positive",
                "leave it out to count batches during the first epoch",
            ));
        }
        if let Some(m) = &self.monitor {
            if m.every == 0 || m.k == 0 || !(m.temperature.is_finite() && m.temperature > 0.0) {
                out.push(Problem::new(
                    "monitor",
                    "`monitor` needs `every` >= 1, `k` >= 1 and a positive `temperature`",
                    "e.g. `monitor: { train_data: eval_train, test_data: eval_test, every: 1 }`",
                ));
            }
        }
        if self.log_every == 0 {
            out.push(Problem::new("log_every", "`log_every` must be at least 1", "e.g. `log_every: 10`"));
        }
        match DeviceSpec::parse(&self.device) {
            Err(e) => out.push(Problem::new("device", e, crate::device::DEVICE_HINT)),
            Ok(d) => {
                if let Err(e) = d.check_built() {
                    out.push(Problem::new("device", e, "or set `device: cpu`"))
                }
            }
        }
        let h = &self.head;
        if h.kind == HeadKind::Nonlinear && h.layers < 2 {
            out.push(Problem::new(
                "head.layers",
                "a nonlinear head has at least 2 dense layers",
                "use `layers: 2` (or `kind: linear` for one layer)",
            ));
        }
        if h.out_dim == 0 {
            out.push(Problem::new("head.out_dim", "`out_dim` must be positive", "e.g. `out_dim: 128`"));
        }
        if h.hidden_dim == Some(0) {
            out.push(Problem::new(
                "head.hidden_dim",
                "`hidden_dim` must be positive",
                "leave it out to use the representation's size",
            ));
        }
        let l = &self.loss;
        if !(l.temperature.is_finite() && l.temperature > 0.0) {
            out.push(Problem::new(
                "loss.temperature",
                "`temperature` must be positive",
                "e.g. `temperature: 0.5`",
            ));
        }
        if !(l.margin.is_finite() && l.margin >= 0.0) {
            out.push(Problem::new("loss.margin", "`margin` must be zero or positive", "e.g. `margin: 0.5`"));
        }
        let o = &self.optimizer;
        let fix = "e.g. `optimizer: {kind: lars, lr: 0.3}`";
        if !(o.lr.is_finite() && o.lr > 0.0) {
            out.push(Problem::new("optimizer.lr", "`lr` must be positive", fix));
        }
        if !(o.momentum.is_finite() && (0.0..1.0).contains(&o.momentum)) {
            out.push(Problem::new(
                "optimizer.momentum",
                "`momentum` must be in [0, 1)",
                "e.g. `momentum: 0.9`",
            ));
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            out.push(Problem::new(
                "optimizer.weight_decay",
                "`weight_decay` must be zero or positive",
                "e.g. `weight_decay: 1e-6`",
            ));
        }
        if !(o.eta.is_finite() && o.eta > 0.0) {
            out.push(Problem::new("optimizer.eta", "`eta` must be positive", "e.g. `eta: 0.001`"));
        }
        if o.betas.iter().any(|b| !(b.is_finite() && (0.0..1.0).contains(b))) {
            out.push(Problem::new(
                "optimizer.betas",
                "`betas` must be in [0, 1)",
                "e.g. `betas: [0.9, 0.999]`",
            ));
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            out.push(Problem::new("optimizer.eps", "`eps` must be positive", "e.g. `eps: 1e-8`"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_fields() {
        let c = SimclrTrain::default();
        assert_eq!(c.backbone, Backbone::Resnet18);
        assert_eq!(c.optimizer.kind, OptimizerKind::Lars);
        assert_eq!(c.optimizer.lr, 0.3);
        assert_eq!(c.loss.temperature, 0.5);
        assert_eq!(c.head.out_dim, 128);
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        let bad = serde_json::from_value::<SimclrTrain>(serde_json::json!({"optimiser": {}}));
        assert!(bad.is_err());
        let bad = serde_json::from_value::<SimclrTrain>(serde_json::json!({"head": {"widht": 3}}));
        assert!(bad.is_err());
    }

    #[test]
    fn a_device_without_its_backend_is_a_config_problem() {
        for (device, built) in [("cuda:1", cfg!(feature = "cuda")), ("wgpu", cfg!(feature = "wgpu"))] {
            let c: SimclrTrain = serde_json::from_value(serde_json::json!({ "device": device })).unwrap();
            let flagged = c.problems().iter().any(|p| p.message.contains("backend: rebuild"));
            assert_eq!(flagged, !built, "{device}");
        }
        let c: SimclrTrain = serde_json::from_value(serde_json::json!({"device": "tpu"})).unwrap();
        assert!(c.problems().iter().any(|p| p.message.contains("unknown device `tpu`")));
    }

    #[test]
    fn bad_values_are_reported() {
        let c: SimclrTrain = serde_json::from_value(serde_json::json!({
            "width": 0.0, "epochs": 0, "loss": {"temperature": 0.0},
            "optimizer": {"lr": -1.0}, "head": {"layers": 1}
        }))
        .unwrap();
        let fields: Vec<String> = c
            .problems()
            .iter()
            .map(|p| {
                p.field
                    .iter()
                    .map(|s| match s {
                        simclr_core::yaml::PathSeg::Key(k) => k.clone(),
                        simclr_core::yaml::PathSeg::Index(i) => i.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(".")
            })
            .collect();
        for f in ["width", "epochs", "loss.temperature", "optimizer.lr", "head.layers"] {
            assert!(fields.iter().any(|x| x == f), "{f} not reported in {fields:?}");
        }
    }
}
