//! Training checkpoints: `checkpoint.safetensors` in the run directory.
//!
//! One file, written atomically (a temporary file, then a rename), so a crash or a second
//! Ctrl-C leaves the previous checkpoint whole. It holds:
//! - `model.<path>`: every float tensor of encoder + head (parameters and BatchNorm running
//!   statistics), under its module path (`model.encoder.layer1.0.bn1.running_mean`);
//! - `optim.<path>.<k>`: the optimizer state of that parameter, flattened (LARS/SGD: `0` the
//!   momentum buffer; AdamW: `0` and `1` the moments);
//! - `trainer.steps`, `optim.steps` (I64 scalars): updates done;
//! - metadata `simclr_checkpoint`: JSON [`CheckpointMeta`] (config, seed, epochs done, global
//!   step, steps per epoch).
//!
//! Everything is f32/i64 bit patterns, so loading gives the exact state that was saved. The
//! model has no random state of its own (no dropout; weights are initialized from the seed),
//! and the data pipeline's randomness is keyed by (seed, epoch, sample, view, stage), so a run
//! resumed at epoch k sees the same batches as one that never stopped.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::config::SimclrTrain;
use crate::export::{named_tensors, read_safetensors_with_metadata, write_safetensors, Data, NamedTensor};
use crate::model::SimclrModel;
use crate::optim::Optimizer;

/// The checkpoint's file name in the run directory.
pub const FILE: &str = simclr_core::run_dir::CHECKPOINT_FILE;
/// The metadata key holding [`CheckpointMeta`] as JSON.
const META_KEY: &str = "simclr_checkpoint";
/// Bumped when the layout changes.
pub const VERSION: u32 = 1;

/// Why a checkpoint could not be read, written or used. Each message names the file and the fix.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// No checkpoint file.
    #[error("{0}")]
    Missing(String),
    /// Unreadable, corrupt, or not a simclr checkpoint.
    #[error("{0}")]
    Corrupt(String),
    /// Made by a model of another shape, or another training config.
    #[error("{0}")]
    Mismatch(String),
    #[error("{0}")]
    Io(String),
}

/// The training position and what made the checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub version: u32,
    /// The id of the `simclr_train` stage that wrote it.
    pub stage: String,
    /// The pipeline seed.
    pub seed: u64,
    /// The stage config (as written by serde).
    pub config: serde_json::Value,
    /// Epochs completed; a resumed run starts with this epoch (0-based).
    pub epochs_done: u32,
    /// Global step (0-based) of the next step.
    pub step: u64,
    /// Batches per epoch (counted in the first epoch unless configured).
    pub steps_per_epoch: Option<u64>,
    /// Every configured epoch done.
    pub finished: bool,
    /// A checkpoint taken mid-epoch: positions of epoch `epochs_done`'s order consumed (a
    /// resumed run skips them) and that epoch's running sums so far. Absent at epoch ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<PartialEpoch>,
    /// The base learning rate after `lr_scaling` (from the first batch's size), so that a run
    /// resumed on a smaller, last batch keeps the schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_lr: Option<f64>,
}

/// How far into an epoch a mid-epoch checkpoint was taken.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PartialEpoch {
    /// Positions of the epoch's sample order consumed (skipped samples included).
    pub consumed: u64,
    /// The epoch's sums for its metrics line, so far (floats round-trip exactly through JSON).
    pub steps: u64,
    pub images: u64,
    pub loss: f64,
    pub contrast_acc: f64,
    pub contrast_entropy: f64,
    pub step_s: f64,
    pub data_wait_s: f64,
    pub lr: f64,
}

/// A whole checkpoint in memory.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub tensors: Vec<NamedTensor>,
}

impl Checkpoint {
    /// Writes `dir/checkpoint.safetensors` atomically.
    pub fn write(&self, dir: &Path) -> Result<(), CheckpointError> {
        let path = dir.join(FILE);
        let json = serde_json::to_string(&self.meta)
            .map_err(|e| CheckpointError::Io(format!("cannot encode the checkpoint metadata: {e}")))?;
        let meta = BTreeMap::from([
            ("format".to_string(), "simclr-checkpoint".to_string()),
            (META_KEY.to_string(), json),
            ("producer".to_string(), format!("simclr-train {}", env!("CARGO_PKG_VERSION"))),
        ]);
        write_safetensors(&path, &self.tensors, &meta).map_err(|e| {
            let why = if e.kind() == std::io::ErrorKind::StorageFull {
                "the disk is full: free space there, then resume the run with --resume"
            } else {
                "check the disk space and permissions of the run directory"
            };
            CheckpointError::Io(format!(
                "cannot write {}: {e} ({why}; the previous checkpoint, if any, is intact)",
                path.display()
            ))
        })
    }

    /// Reads `dir/checkpoint.safetensors`.
    pub fn read(dir: &Path) -> Result<Self, CheckpointError> {
        let path = dir.join(FILE);
        if !path.is_file() {
            return Err(CheckpointError::Missing(format!(
                "{} holds no {FILE}: either it is not a run directory, or the run stopped before \
                 its first epoch ended (nothing to resume); start the run again without --resume",
                dir.display()
            )));
        }
        let corrupt = |m: String| {
            CheckpointError::Corrupt(format!(
                "{}: {m}; the file is damaged or not a simclr training checkpoint (start the run \
                 again without --resume)",
                path.display()
            ))
        };
        let (tensors, meta) = read_safetensors_with_metadata(&path).map_err(corrupt)?;
        let json = meta.get(META_KEY).ok_or_else(|| corrupt(format!("no `{META_KEY}` metadata")))?;
        let meta: CheckpointMeta =
            serde_json::from_str(json).map_err(|e| corrupt(format!("metadata `{META_KEY}`: {e}")))?;
        if meta.version != VERSION {
            return Err(corrupt(format!(
                "checkpoint version {} (this build reads version {VERSION})",
                meta.version
            )));
        }
        Ok(Self { meta, tensors })
    }
}

/// The config as compared across a resume: a JSON round trip, so floats compare as written.
pub fn config_json(cfg: &SimclrTrain) -> serde_json::Value {
    serde_json::to_string(cfg)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Fields that may change between a run and its resumption.
const FREE_FIELDS: [&str; 4] = ["device", "log_every", "checkpoint_every", "checkpoint_every_steps"];
/// Fields that shape the network.
const ARCH_FIELDS: [&str; 4] = ["backbone", "stem", "width", "head"];

/// Whether a checkpoint made with `saved` (a [`config_json`]) can continue under `now`: the
/// architecture and every training field must match (`device`, `log_every`, `checkpoint_every`
/// and `checkpoint_every_steps` may change).
pub fn check_config(saved: &serde_json::Value, now: &serde_json::Value) -> Result<(), CheckpointError> {
    let (Some(saved), Some(now)) = (saved.as_object(), now.as_object()) else {
        return Err(CheckpointError::Mismatch("the checkpoint's config is not an object".into()));
    };
    let mut keys: Vec<&String> = saved.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    let null = serde_json::Value::Null;
    let differ: Vec<String> = keys
        .into_iter()
        .filter(|k| !FREE_FIELDS.contains(&k.as_str()))
        .filter(|k| saved.get(*k).unwrap_or(&null) != now.get(*k).unwrap_or(&null))
        .map(|k| {
            format!(
                "`{k}`: {} in the checkpoint, {} now",
                saved.get(k).unwrap_or(&null),
                now.get(k).unwrap_or(&null)
            )
        })
        .collect();
    if differ.is_empty() {
        return Ok(());
    }
    let arch = differ.iter().any(|d| ARCH_FIELDS.iter().any(|a| d.starts_with(&format!("`{a}`"))));
    Err(CheckpointError::Mismatch(format!(
        "the checkpoint was made with a different {}: {}; resume with the pipeline file and \
         --set options the run started with (its run directory holds them as pipeline.yaml), or \
         start a new run",
        if arch { "architecture" } else { "training config" },
        differ.join("; ")
    )))
}

/// (module path, parameter id) of every float tensor of a module, in visiting order.
struct Paths {
    path: Vec<String>,
    out: Vec<(String, ParamId)>,
}

impl<B: Backend> ModuleVisitor<B> for Paths {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.out.push((self.path.join("."), param.id));
    }
}

fn paths<B: Backend, M: Module<B>>(module: &M) -> Vec<(String, ParamId)> {
    let mut p = Paths { path: Vec::new(), out: Vec::new() };
    module.visit(&mut p);
    p.out
}

fn f32s<B: Backend, const D: usize>(t: Tensor<B, D>, name: &str) -> Result<Vec<f32>, String> {
    t.into_data().convert::<f32>().to_vec::<f32>().map_err(|e| format!("cannot read {name}: {e:?}"))
}

/// The tensors of a training state: model, optimizer state, step counters.
pub fn state_tensors<B: AutodiffBackend>(
    model: &SimclrModel<B>,
    opt: &Optimizer<B::InnerBackend>,
    steps: u64,
) -> Result<Vec<NamedTensor>, String> {
    // `valid()` folds pending BatchNorm running-statistic updates in (exactly: one thread's
    // update divided by 1), and shares them with `model`.
    let inner = model.valid();
    let mut out: Vec<NamedTensor> = named_tensors(&inner, 0)
        .into_iter()
        .filter(|t| matches!(t.data, Data::F32(_)))
        .map(|t| NamedTensor { name: format!("model.{}", t.name), ..t })
        .collect();
    for (path, id) in paths::<B, _>(model) {
        for (k, t) in opt.state().get(&id).into_iter().flatten().enumerate() {
            let name = format!("optim.{path}.{k}");
            let shape = t.dims().to_vec();
            out.push(NamedTensor { data: Data::F32(f32s(t.clone(), &name)?), name, shape });
        }
    }
    let scalar = |name: &str, v: u64| NamedTensor {
        name: name.to_string(),
        shape: Vec::new(),
        data: Data::I64(vec![i64::try_from(v).unwrap_or(i64::MAX)]),
    };
    out.push(scalar("trainer.steps", steps));
    out.push(scalar("optim.steps", opt.steps()));
    Ok(out)
}

/// Replaces every float tensor of a module by the checkpoint's `model.<path>` (only those under
/// `model.<only>` when `only` is given: fine-tuning loads just the encoder).
pub(crate) struct Load<'a, B: Backend> {
    pub tensors: &'a mut HashMap<String, NamedTensor>,
    pub device: B::Device,
    pub path: Vec<String>,
    pub errors: Vec<String>,
    pub only: Option<&'static str>,
}

impl<B: Backend> ModuleMapper<B> for Load<'_, B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let name = format!("model.{}", self.path.join("."));
        if self.only.is_some_and(|p| !name.starts_with(&format!("model.{p}."))) {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let dims = tensor.dims();
        let new = match self.tensors.remove(&name) {
            None => {
                self.errors.push(format!("{name} is missing"));
                None
            }
            Some(NamedTensor { shape, data: Data::F32(v), .. }) if shape == dims => {
                let t = Tensor::<B, D>::from_data(TensorData::new(v, dims), &self.device);
                Some(if tensor.is_require_grad() { t.require_grad() } else { t })
            }
            Some(t) => {
                self.errors.push(format!("{name} has shape {:?}, the model {:?}", t.shape, dims));
                None
            }
        };
        Param::from_mapped_value(id, new.unwrap_or(tensor), mapper)
    }
}

/// Loads a state written by [`state_tensors`] into a freshly built model and optimizer.
/// Returns the model, and `trainer.steps`.
pub fn load_state<B: AutodiffBackend>(
    model: SimclrModel<B>,
    opt: &mut Optimizer<B::InnerBackend>,
    tensors: &[NamedTensor],
    device: &B::Device,
) -> Result<(SimclrModel<B>, u64), String> {
    let mut map: HashMap<String, NamedTensor> = tensors.iter().map(|t| (t.name.clone(), t.clone())).collect();
    let mut scalar = |name: &str| match map.remove(name) {
        Some(NamedTensor { data: Data::I64(v), .. }) if v.len() == 1 && v[0] >= 0 => Ok(v[0] as u64),
        _ => Err(format!("{name} is missing or not a count")),
    };
    let steps = scalar("trainer.steps")?;
    let opt_steps = scalar("optim.steps")?;
    let mut load = Load::<B> {
        tensors: &mut map,
        device: device.clone(),
        path: Vec::new(),
        errors: Vec::new(),
        only: None,
    };
    let model = model.map(&mut load);
    let mut errors = load.errors;
    let mut state = HashMap::new();
    for (path, id) in paths::<B, _>(&model) {
        let mut v = Vec::new();
        while let Some(t) = map.remove(&format!("optim.{path}.{}", v.len())) {
            let n = t.shape.iter().product::<usize>();
            match t.data {
                Data::F32(d) if t.shape.len() == 1 && d.len() == n => {
                    v.push(Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(d, [n]), device));
                }
                _ => errors.push(format!("optim.{path}.{} is not a flat f32 tensor", v.len())),
            }
            if errors.len() > 20 {
                break;
            }
        }
        if !v.is_empty() {
            state.insert(id, v);
        }
    }
    if !map.is_empty() {
        let mut extra: Vec<&String> = map.keys().collect();
        extra.sort();
        let shown: Vec<&str> = extra.iter().take(5).map(|s| s.as_str()).collect();
        errors.push(format!("{} tensors the model does not have ({}...)", extra.len(), shown.join(", ")));
    }
    if !errors.is_empty() {
        errors.truncate(6);
        return Err(errors.join("; "));
    }
    opt.restore(state, opt_steps);
    Ok((model, steps))
}
