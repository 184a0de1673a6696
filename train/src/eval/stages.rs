//! The evaluation stage kinds: `random_init`, `linear_eval`, `knn_eval`, `extract_features`.
//! They are tasks: each runs once, after the stages its fields name.

use std::sync::Mutex;
use std::time::Instant;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use simclr_core::{Context, PortType, Problem, Role, Stage, StageConfig, StageError, StageRef, Task};

use super::features::{
    cached_features, encoder_of, source_of, EncoderArtifact, EngineEncoder, EvalTransform,
};
use super::knn::knn_accuracy;
use super::linear::{fit_lbfgs, fit_sgd, Features, Standardizer};
use super::subset;
use crate::export::{write_safetensors, Data, NamedTensor};
use crate::trainer::make_engine;

fn encoder_ref(field: &str, stage: &str) -> StageRef {
    StageRef { field: field.into(), stage: stage.into(), expects: PortType::Encoder }
}
fn data_ref(field: &str, stage: &str) -> StageRef {
    StageRef { field: field.into(), stage: stage.into(), expects: PortType::Any }
}

/// `random_init`: an untrained encoder with the architecture of another encoder stage (the
/// random-init baseline), initialized from the pipeline seed.
#[derive(Clone, Debug, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RandomInit {
    /// The encoder stage whose architecture to copy (e.g. `train`).
    pub like: String,
}

impl StageConfig for RandomInit {
    const KIND: &'static str = "random_init";
    const ABOUT: &'static str = "task: an untrained encoder shaped like another (random-init baseline)";
    const ROLE: Role = Role::Task;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Nothing, PortType::Encoder)
    }
    fn refs(&self) -> Vec<StageRef> {
        vec![encoder_ref("like", &self.like)]
    }
    fn build(&self, cx: &Context) -> Result<Stage, StageError> {
        let like = encoder_of(cx, "like", &self.like)?;
        let engine = make_engine(&like.arch, cx.seed).map_err(StageError::fatal)?;
        cx.artifacts.put(
            &cx.stage_id,
            EncoderArtifact {
                stage: cx.stage_id.clone(),
                method: "random_init".into(),
                arch: like.arch.clone(),
                encoder: Mutex::new(Box::new(EngineEncoder(engine))),
            },
        );
        Ok(Stage::Task(Box::new(Done)))
    }
}

/// A task whose work happened at build time.
struct Done;

impl Task for Done {
    fn run(&mut self) -> Result<(), StageError> {
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// L2-regularized multinomial logistic regression by L-BFGS (the transfer protocol).
    #[default]
    Lbfgs,
    /// Minibatch SGD, Nesterov momentum 0.9, cosine decay (the linear-evaluation optimizer).
    Sgd,
}

/// `linear_eval`: a linear classifier on frozen features of each encoder; top-1/top-5 on the
/// test split (and kNN accuracy with `knn: true`).
#[derive(Clone, Debug, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LinearEval {
    /// The encoder stages to evaluate (`simclr_train`, `supervised_train`, `random_init`).
    pub encoders: Vec<String>,
    /// Labeled source to fit on.
    pub train_data: String,
    /// Labeled source to report on (held out).
    pub test_data: String,
    /// `lbfgs` (default) or `sgd`.
    #[serde(default)]
    pub protocol: Protocol,
    /// L2 penalty on the weights (default 1e-4; features are standardized first).
    #[serde(default = "l2")]
    pub l2: f64,
    /// L-BFGS iterations at most (default 500).
    #[serde(default = "max_iter")]
    pub max_iter: usize,
    /// Standardize features with the training split's mean and std (default true).
    #[serde(default = "yes")]
    pub standardize: bool,
    /// `sgd`: epochs (default 90), learning rate at batch 256 (default 0.1), batch size (default 256).
    #[serde(default = "ninety")]
    pub epochs: usize,
    #[serde(default = "lr")]
    pub lr: f64,
    #[serde(default = "batch")]
    #[schemars(range(min = 1))]
    pub batch_size: usize,
    /// `sgd`: train on random resized crops + flips of the training images, encoded afresh
    /// every epoch (the paper's linear evaluation; default true). `false`: on the cached
    /// features of the un-augmented images (much faster).
    #[serde(default = "yes")]
    pub augment: bool,
    /// Also report kNN accuracy on the same features (default true).
    #[serde(default = "yes")]
    pub knn: bool,
    /// Fit on a class-balanced share of the training labels (default 1: all). Below 1 the
    /// keys are `linear_<pct>pct_top1` etc.; the subset is the one `fine_tune` uses for the
    /// same share of the same data and seed (the paper's semi-supervised comparison, Table 7).
    #[serde(default = "one")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub label_fraction: f64,
    /// kNN neighbours (default 200) and temperature (default 0.1).
    #[serde(default = "k")]
    pub k: usize,
    #[serde(default = "temperature")]
    pub temperature: f64,
    #[serde(default)]
    pub transform: EvalTransform,
}

fn l2() -> f64 {
    1e-4
}
fn one() -> f64 {
    1.0
}
fn max_iter() -> usize {
    500
}
fn yes() -> bool {
    true
}
fn ninety() -> usize {
    90
}
fn lr() -> f64 {
    0.1
}
fn batch() -> usize {
    256
}
fn k() -> usize {
    200
}
fn temperature() -> f64 {
    0.1
}

/// What an evaluation task reads: its encoders and its two data sources.
fn eval_refs(encoders: &[String], train_data: &str, test_data: &str) -> Vec<StageRef> {
    let mut r: Vec<StageRef> = encoders.iter().map(|e| encoder_ref("encoders", e)).collect();
    r.push(data_ref("train_data", train_data));
    r.push(data_ref("test_data", test_data));
    r
}

fn check_knn(k: usize, t: f64, out: &mut Vec<Problem>) {
    if k == 0 {
        out.push(Problem::new("k", "`k` must be at least 1", "e.g. `k: 200`"));
    }
    if !(t.is_finite() && t > 0.0) {
        out.push(Problem::new("temperature", "`temperature` must be positive", "e.g. `temperature: 0.1`"));
    }
}

impl StageConfig for LinearEval {
    const KIND: &'static str = "linear_eval";
    const ABOUT: &'static str = "task: linear classifier on frozen features (L-BFGS or SGD), top-1/top-5";
    const ROLE: Role = Role::Task;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Nothing, PortType::Nothing)
    }
    fn refs(&self) -> Vec<StageRef> {
        eval_refs(&self.encoders, &self.train_data, &self.test_data)
    }
    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        if self.encoders.is_empty() {
            out.push(Problem::new("encoders", "no encoders to evaluate", "e.g. `encoders: [train, random]`"));
        }
        if !(self.l2.is_finite() && self.l2 >= 0.0) {
            out.push(Problem::new("l2", "`l2` must be zero or positive", "e.g. `l2: 1e-4`"));
        }
        if self.max_iter == 0 || self.epochs == 0 || self.batch_size == 0 {
            out.push(Problem::new(
                "",
                "`max_iter`, `epochs` and `batch_size` must be at least 1",
                "raise them",
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            out.push(Problem::new("lr", "`lr` must be positive", "e.g. `lr: 0.1`"));
        }
        if !(self.label_fraction > 0.0 && self.label_fraction <= 1.0) {
            out.push(Problem::new(
                "label_fraction",
                "`label_fraction` must be in (0, 1]",
                "e.g. `label_fraction: 0.1` (10% of the labels)",
            ));
        }
        if self.label_fraction < 1.0 && self.protocol == Protocol::Sgd && self.augment {
            out.push(Problem::new(
                "label_fraction",
                "`label_fraction` below 1 works on cached features; the augmented `sgd` protocol re-reads every image",
                "use `protocol: lbfgs` (the default) or `augment: false`",
            ));
        }
        check_knn(self.k, self.temperature, out);
        out.extend(self.transform.problems("transform"));
    }
    fn build(&self, cx: &Context) -> Result<Stage, StageError> {
        Ok(Stage::Task(Box::new(EvalTask { cfg: Eval::Linear(self.clone()), cx: cx.clone() })))
    }
}

/// `knn_eval`: weighted kNN (cosine similarity) on frozen features of each encoder.
#[derive(Clone, Debug, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KnnEval {
    pub encoders: Vec<String>,
    pub train_data: String,
    pub test_data: String,
    /// Neighbours (default 200).
    #[serde(default = "k")]
    pub k: usize,
    /// Vote weight exp(similarity / temperature) (default 0.1).
    #[serde(default = "temperature")]
    pub temperature: f64,
    #[serde(default)]
    pub transform: EvalTransform,
}

impl StageConfig for KnnEval {
    const KIND: &'static str = "knn_eval";
    const ABOUT: &'static str = "task: weighted kNN on frozen features (k 200, temperature 0.1)";
    const ROLE: Role = Role::Task;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Nothing, PortType::Nothing)
    }
    fn refs(&self) -> Vec<StageRef> {
        eval_refs(&self.encoders, &self.train_data, &self.test_data)
    }
    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        if self.encoders.is_empty() {
            out.push(Problem::new("encoders", "no encoders to evaluate", "e.g. `encoders: [train]`"));
        }
        check_knn(self.k, self.temperature, out);
        out.extend(self.transform.problems("transform"));
    }
    fn build(&self, cx: &Context) -> Result<Stage, StageError> {
        Ok(Stage::Task(Box::new(EvalTask { cfg: Eval::Knn(self.clone()), cx: cx.clone() })))
    }
}

enum Eval {
    Linear(LinearEval),
    Knn(KnnEval),
}

struct EvalTask {
    cfg: Eval,
    cx: Context,
}

/// Classes seen in either split.
fn classes(a: &Features, b: &Features) -> usize {
    a.y.iter().chain(&b.y).copied().max().map_or(0, |m| m as usize + 1)
}

fn obj(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

impl Task for EvalTask {
    fn run(&mut self) -> Result<(), StageError> {
        let cx = &self.cx;
        let (encoders, train_id, test_id, t) = match &self.cfg {
            Eval::Linear(c) => (&c.encoders, &c.train_data, &c.test_data, &c.transform),
            Eval::Knn(c) => (&c.encoders, &c.train_data, &c.test_data, &c.transform),
        };
        let dataset = source_of(cx, "train_data", train_id)?.name.clone();
        for id in encoders {
            let method = encoder_of(cx, "encoders", id)?.method.clone();
            let mut train = cached_features(cx, id, train_id, "train_data", t)?;
            let test = cached_features(cx, id, test_id, "test_data", t)?;
            let n_classes = classes(&train, &test);
            let mut metrics = Map::new();
            let mut warnings = Vec::new();
            let mut pct = None;
            if let Eval::Linear(c) = &self.cfg {
                if c.label_fraction < 1.0 {
                    let sub = subset::balanced(train.labeled(), c.label_fraction, cx.seed);
                    warnings.extend(subset::thin(&sub, n_classes));
                    train = std::sync::Arc::new(train.rows(|i| sub.contains(i)));
                    pct = Some(subset::pct(c.label_fraction));
                }
            }
            // `linear_top1`, or `linear_10pct_top1` on a share of the labels.
            let key = |k: &str| match &pct {
                Some(p) => {
                    let (head, tail) = k.split_once('_').unwrap_or((k, ""));
                    format!("{head}_{p}pct_{tail}")
                }
                None => k.to_string(),
            };
            match &self.cfg {
                Eval::Linear(c) => {
                    let start = Instant::now();
                    let (tr, te) = if c.standardize {
                        let s = Standardizer::fit(&train);
                        (s.apply(&train), s.apply(&test))
                    } else {
                        ((*train).clone(), (*test).clone())
                    };
                    let (model, rep) = match c.protocol {
                        Protocol::Lbfgs => fit_lbfgs(&tr, n_classes, c.l2, c.max_iter, 1e-6),
                        Protocol::Sgd if c.augment => {
                            let lr = c.lr * c.batch_size as f64 / 256.0;
                            augmented_sgd(cx, c, id, &train, n_classes, lr)?
                        }
                        Protocol::Sgd => {
                            let lr = c.lr * c.batch_size as f64 / 256.0;
                            fit_sgd(&tr, n_classes, c.l2, lr, c.epochs, c.batch_size, cx.seed)
                        }
                    };
                    let (top1, top5) = model.accuracy(&te);
                    let (train_top1, _) = model.accuracy(&tr);
                    tracing::info!(
                        "'{}': {method} ('{id}') linear top-1 {top1:.2}% (train {train_top1:.2}%), {} iterations, {:.1} s",
                        cx.stage_id,
                        rep.iterations,
                        start.elapsed().as_secs_f64()
                    );
                    metrics.insert(key("linear_top1"), json!(top1));
                    metrics.insert(key("linear_top5"), json!(top5));
                    metrics.insert(key("linear_train_top1"), json!(train_top1));
                    warnings.extend(subset::near_chance(train_top1, n_classes));
                    if c.knn {
                        let (k1, k5) = knn_accuracy(&train, &test, n_classes, c.k, c.temperature);
                        metrics.insert(key("knn_top1"), json!(k1));
                        metrics.insert(key("knn_top5"), json!(k5));
                    }
                }
                Eval::Knn(c) => {
                    let (k1, k5) = knn_accuracy(&train, &test, n_classes, c.k, c.temperature);
                    tracing::info!("'{}': {method} ('{id}') kNN top-1 {k1:.2}%", cx.stage_id);
                    metrics.extend(obj(json!({"knn_top1": k1, "knn_top5": k5})));
                }
            }
            if n_classes > 0 && train.len() < 2 * n_classes && pct.is_none() {
                warnings.push(format!(
                    "{} training samples for {n_classes} classes (fewer than 2 per class): the accuracy says little",
                    train.len()
                ));
            }
            let seen: std::collections::BTreeSet<u32> = train.y.iter().copied().collect();
            let unseen: Vec<String> = test
                .y
                .iter()
                .filter(|y| !seen.contains(y))
                .map(|y| y.to_string())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            if !unseen.is_empty() && pct.is_none() {
                warnings.push(format!(
                    "test classes {} never appear in '{train_id}': they cannot be predicted",
                    unseen.join(", ")
                ));
            }
            for w in &warnings {
                tracing::warn!("'{}': {method} ('{id}'): {w}", cx.stage_id);
                cx.artifacts.push("warnings", json!({"stage": cx.stage_id, "encoder": id, "message": w}));
            }
            cx.artifacts.record(&method, metrics.clone());
            // Also by encoder stage: sweeps compare variants whose encoder changes kind
            // (`simclr_train` -> `supervised_train`) under one key.
            cx.artifacts.record_in("encoders", id, metrics.clone());
            cx.artifacts.push(
                "evals",
                json!({
                    "stage": cx.stage_id, "encoder": id, "method": method, "dataset": dataset,
                    "train_data": train_id, "test_data": test_id, "train_size": train.len(),
                    "label_fraction": match &self.cfg { Eval::Linear(c) => c.label_fraction, Eval::Knn(_) => 1.0 },
                    "test_size": test.len(), "classes": n_classes, "feature_dim": train.dim,
                    "metrics": metrics,
                }),
            );
        }
        Ok(())
    }
}

/// The SGD protocol on fresh crop + flip augmentations of the training images every epoch;
/// features are standardized with the un-augmented training features' statistics (as the
/// test features are).
fn augmented_sgd(
    cx: &Context,
    c: &LinearEval,
    encoder_id: &str,
    plain: &Features,
    classes: usize,
    lr: f64,
) -> Result<(super::linear::Linear, super::linear::FitReport), StageError> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    use simclr_core::rng::stage_key;
    use simclr_core::{MapStage, Payload, Sample, SampleCtx};
    let data = source_of(cx, "train_data", &c.train_data)?;
    let encoder = encoder_of(cx, "encoders", encoder_id)?;
    let std = Standardizer::fit(plain);
    // The crop's output side: that of the evaluation images.
    let side = super::features::read_one(&data, 0, cx.seed, &c.transform)?.0.width;
    let crop: simclr_stages::augment::crop::RandomResizedCrop =
        serde_json::from_value(json!({"size": side})).map_err(|e| StageError::fatal(e.to_string()))?;
    let flip: simclr_stages::augment::flip::HorizontalFlip =
        serde_json::from_value(json!({})).map_err(|e| StageError::fatal(e.to_string()))?;
    let keys = (stage_key(&format!("{}/crop", cx.stage_id)), stage_key(&format!("{}/flip", cx.stage_id)));
    let n = super::features::eval_len(&data);
    let batch = c.batch_size.max(1);
    let mut sgd =
        super::linear::Sgd::new(classes, plain.dim, c.l2, lr, c.epochs * (n as usize).div_ceil(batch));
    let mut order: Vec<u64> = (0..n).collect();
    let mut loss = 0.0;
    let start = Instant::now();
    for epoch in 0..c.epochs {
        let mut rng =
            rand_chacha::ChaCha8Rng::seed_from_u64(cx.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9));
        order.shuffle(&mut rng);
        let e = epoch as u32;
        let augment = |img: simclr_core::Image, index: u64| -> Result<simclr_core::Image, StageError> {
            let mut sample =
                Sample { index, epoch: e, payload: Payload::Views(vec![img]), ..Sample::default() };
            let ctx = |stage_key| SampleCtx { seed: cx.seed, stage_key, epoch: e, index };
            crop.apply(&mut sample, &ctx(keys.0))?;
            flip.apply(&mut sample, &ctx(keys.1))?;
            match sample.payload {
                Payload::Views(mut v) if !v.is_empty() => Ok(v.swap_remove(0)),
                _ => Err(StageError::fatal("the augmentation lost the image")),
            }
        };
        for idx in order.chunks(batch) {
            let f = super::features::encode_items(
                &|x, s| encoder.encode(x, s),
                &data,
                idx,
                &c.transform,
                cx.seed,
                &augment,
            )?
            .0;
            if !f.is_empty() {
                loss = sgd.step(&std.apply(&f));
            }
        }
        tracing::info!(
            "'{}': linear SGD epoch {epoch}: loss {loss:.4} ({:.0} s)",
            cx.stage_id,
            start.elapsed().as_secs_f64()
        );
    }
    Ok((sgd.model, super::linear::FitReport { iterations: c.epochs, loss, converged: true }))
}

/// `extract_features`: runs a frozen encoder over a labeled source with the evaluation transform
/// and writes `features-<id>.safetensors` (features N x dim, labels N) in the run directory.
#[derive(Clone, Debug, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtractFeatures {
    pub encoder: String,
    pub data: String,
    #[serde(default)]
    pub transform: EvalTransform,
}

impl StageConfig for ExtractFeatures {
    const KIND: &'static str = "extract_features";
    const ABOUT: &'static str = "task: frozen-encoder features of a labeled source, cached and saved";
    const ROLE: Role = Role::Task;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Nothing, PortType::Nothing)
    }
    fn refs(&self) -> Vec<StageRef> {
        vec![encoder_ref("encoder", &self.encoder), data_ref("data", &self.data)]
    }
    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        out.extend(self.transform.problems("transform"));
    }
    fn build(&self, cx: &Context) -> Result<Stage, StageError> {
        Ok(Stage::Task(Box::new(ExtractTask { cfg: self.clone(), cx: cx.clone() })))
    }
}

struct ExtractTask {
    cfg: ExtractFeatures,
    cx: Context,
}

impl Task for ExtractTask {
    fn run(&mut self) -> Result<(), StageError> {
        let f = cached_features(&self.cx, &self.cfg.encoder, &self.cfg.data, "data", &self.cfg.transform)?;
        let Some(dir) = &self.cx.run_dir else { return Ok(()) };
        let path = dir.join(format!("features-{}.safetensors", self.cx.stage_id));
        let tensors = [
            NamedTensor {
                name: "features".into(),
                shape: vec![f.len(), f.dim],
                data: Data::F32(f.x.clone()),
            },
            NamedTensor {
                name: "labels".into(),
                shape: vec![f.len()],
                data: Data::I64(f.y.iter().map(|&y| i64::from(y)).collect()),
            },
        ];
        let meta =
            [("encoder".to_string(), self.cfg.encoder.clone()), ("data".to_string(), self.cfg.data.clone())]
                .into_iter()
                .collect();
        write_safetensors(&path, &tensors, &meta)
            .map_err(|e| StageError::fatal(format!("cannot write {}: {e}", path.display())))?;
        tracing::info!("wrote {}", path.display());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use simclr_core::driver::DataSource;

    fn source(cx: &Context, id: &str, split: &str, count: u64) -> DataSource {
        let cfg: simclr_stages::source::synthetic::SyntheticShapes =
            serde_json::from_value(json!({"count": count, "size": 16, "classes": 3, "split": split}))
                .unwrap();
        let Ok(Stage::Source(source)) = cfg.build(cx) else { panic!("not a source") };
        DataSource { id: id.into(), kind: "synthetic_shapes".into(), name: id.into(), source }
    }

    /// A context whose artifacts hold sources `tr` and `te` of the given sizes and an untrained
    /// encoder `enc` filed as `simclr`.
    fn setup(train: u64, test: u64) -> Context {
        let cx = Context { seed: 5, stage_id: "linear".into(), ..Context::default() };
        cx.artifacts.put("tr", source(&cx, "tr", "train", train));
        cx.artifacts.put("te", source(&cx, "te", "test", test));
        let arch: crate::SimclrTrain = serde_json::from_value(json!({"width": 0.0625})).unwrap();
        let engine = make_engine(&arch, 1).unwrap();
        let encoder = Mutex::new(Box::new(EngineEncoder(engine)) as Box<dyn super::super::features::Encode>);
        cx.artifacts
            .put("enc", EncoderArtifact { stage: "enc".into(), method: "simclr".into(), arch, encoder });
        cx
    }

    #[test]
    fn linear_eval_leaves_the_encoder_unchanged_and_records_results() {
        let cx = setup(60, 30);
        let artifacts = cx.artifacts.clone();
        let before = artifacts.get::<EncoderArtifact>("enc").unwrap().tensors();
        assert!(!before.is_empty());
        let cfg: LinearEval = serde_json::from_value(
            json!({"encoders": ["enc"], "train_data": "tr", "test_data": "te", "k": 5}),
        )
        .unwrap();
        let Ok(Stage::Task(mut task)) = cfg.build(&cx) else { panic!("not a task") };
        task.run().unwrap();
        let after = artifacts.get::<EncoderArtifact>("enc").unwrap().tensors();
        assert_eq!(before, after, "linear evaluation must not touch the encoder");
        let r = artifacts.results();
        let top1 = r["simclr"]["linear_top1"].as_f64().unwrap();
        assert!((0.0..=100.0).contains(&top1), "{r:?}");
        assert!(r["simclr"]["knn_top1"].as_f64().is_some());
        assert_eq!(r["evals"][0]["test_size"], 30);
    }

    #[test]
    fn the_sgd_protocol_trains_on_augmented_images_and_repeats_exactly() {
        let run = || {
            let cx = setup(48, 24);
            let artifacts = cx.artifacts.clone();
            let cfg: LinearEval = serde_json::from_value(json!({
                "encoders": ["enc"], "train_data": "tr", "test_data": "te", "protocol": "sgd",
                "epochs": 2, "batch_size": 16, "knn": false
            }))
            .unwrap();
            assert!(cfg.augment, "crop + flip by default");
            let Ok(Stage::Task(mut task)) = cfg.build(&cx) else { panic!("not a task") };
            task.run().unwrap();
            artifacts.results()["simclr"]["linear_top1"].as_f64().unwrap()
        };
        let a = run();
        assert!((0.0..=100.0).contains(&a));
        assert_eq!(a, run(), "same seed, same result");
    }

    #[test]
    fn a_label_share_fits_on_the_balanced_subset_of_the_training_split() {
        let cx = setup(90, 30);
        let artifacts = cx.artifacts.clone();
        let cfg: LinearEval = serde_json::from_value(json!({
            "encoders": ["enc"], "train_data": "tr", "test_data": "te", "k": 3, "label_fraction": 0.1
        }))
        .unwrap();
        let Ok(Stage::Task(mut task)) = cfg.build(&cx) else { panic!("not a task") };
        task.run().unwrap();
        let r = artifacts.results();
        assert!(r["simclr"]["linear_10pct_top1"].as_f64().is_some(), "{r:?}");
        assert!(r["simclr"]["linear_10pct_train_top1"].as_f64().is_some(), "{r:?}");
        assert!(r["simclr"].get("linear_top1").is_none(), "the full-label key is another stage's");
        // 10% of 90 samples over 3 classes: about 9 rows, at least one per class.
        let eval = &r["evals"][0];
        let n = eval["train_size"].as_u64().unwrap();
        assert!((6..=12).contains(&n), "{eval}");
        assert_eq!(eval["label_fraction"], 0.1);
        // The subset is drawn from the training split only: none of its images is a test image.
        let tr = source_of(&cx, "tr", "tr").unwrap();
        let te = source_of(&cx, "te", "te").unwrap();
        let t = EvalTransform::default();
        let labels: Vec<(u64, u32)> =
            (0..90).map(|i| (i, super::super::features::read_one(&tr, i, 5, &t).unwrap().1)).collect();
        let sub = subset::balanced(labels, 0.1, 5);
        assert_eq!(sub.len() as u64, n);
        let test: Vec<Vec<u8>> =
            (0..30).map(|i| super::super::features::read_one(&te, i, 5, &t).unwrap().0.data).collect();
        for i in &sub.indices {
            let img = super::super::features::read_one(&tr, *i, 5, &t).unwrap().0.data;
            assert!(!test.contains(&img), "training item {i} is also a test image");
        }
        // Under 2 samples per class is warned about.
        let cx = setup(12, 6);
        let artifacts = cx.artifacts.clone();
        let Ok(Stage::Task(mut task)) = cfg.build(&cx) else { panic!("not a task") };
        task.run().unwrap();
        let r = artifacts.results();
        let w = r["warnings"].to_string();
        assert!(w.contains("fewer than 2 per class"), "{w}");
    }

    #[test]
    fn a_missing_encoder_is_named() {
        let cx = Context { stage_id: "linear".into(), ..Context::default() };
        cx.artifacts.put("tr", source(&cx, "tr", "train", 6));
        let cfg: LinearEval =
            serde_json::from_value(json!({"encoders": ["nope"], "train_data": "tr", "test_data": "tr"}))
                .unwrap();
        let Ok(Stage::Task(mut task)) = cfg.build(&cx) else { panic!("not a task") };
        let err = task.run().unwrap_err().to_string();
        assert!(err.contains("`encoders: nope`") && err.contains("simclr_train"), "{err}");
    }
}
