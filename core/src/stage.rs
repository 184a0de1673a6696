//! The stage traits and the registry that maps `kind:` names to them.
//!
//! A stage kind is a config struct (serde, `deny_unknown_fields`) implementing [`StageConfig`];
//! registering it is one line: `registry.register::<MyConfig>()`. Plugins register
//! [`Factory`] objects directly.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::error::StageError;
use crate::rng::{StageRng, StreamKey};
use crate::sample::{Payload, Sample, Tensor};
use crate::yaml::PathSeg;

/// The type of data on an edge; the validator checks that connected ports agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PortType {
    /// No data (a source's input; a sink that yields nothing).
    Nothing,
    /// Encoded files (JPEG/PNG/WebP bytes).
    Encoded,
    /// Decoded RGB8 images: one per sample, or its views.
    Views,
    /// Views as f32 tensors (after `to_tensor`).
    Tensors,
    /// Batches of f32 tensors.
    Batch,
    /// A trained encoder (an artifact, not a stream).
    Encoder,
    /// Accepts anything (input side only).
    Any,
    /// Passes its input type through (output side only).
    SameAsInput,
}

impl fmt::Display for PortType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PortType::Nothing => "nothing",
            PortType::Encoded => "encoded bytes",
            PortType::Views => "image views",
            PortType::Tensors => "view tensors",
            PortType::Batch => "batches",
            PortType::Encoder => "an encoder artifact",
            PortType::Any => "anything",
            PortType::SameAsInput => "its input",
        })
    }
}

impl PortType {
    /// Whether data of type `self` may flow into an input port of type `input`.
    pub fn fits(self, input: PortType) -> bool {
        input == PortType::Any || self == input
    }
}

/// How a stage takes part in the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Produces samples by index; called from many threads.
    Source,
    /// Transforms one sample at a time; called from many threads.
    Map,
    /// Groups the ordered stream into batches, on the collector thread.
    Batch,
    /// Consumes the ordered stream on one thread (training, evaluation, writers).
    Sink,
    /// Runs once, after the stages it references (`encoder: train`), on no stream of its own:
    /// evaluations, baselines.
    Task,
}

/// What a source does with bad samples.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Stop the run, naming the sample.
    #[default]
    Fail,
    /// Drop the sample, count it and name it in the log.
    Skip,
}

/// Which part of the dataset this process reads (`index` of `count`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

/// The options every source takes, owned by the core: validation splits these keys off a
/// source stage's fields before its kind parses the rest, and the runtime applies them (order,
/// limit, shard, what a bad sample does). A source gets them in [`Context::source`].
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(default, deny_unknown_fields)]
pub struct SourceOptions {
    /// Reshuffle the items every epoch (from the pipeline seed); default false (file order).
    pub shuffle: bool,
    /// Use only the first this many items (before sharding and shuffling); default all.
    #[schemars(range(min = 1))]
    pub limit: Option<u64>,
    /// Read only part of the data: every `count`-th item from `index` on (one process of
    /// `count`); default all.
    pub shard: Option<Shard>,
    /// `fail` (default): a bad item stops the run, naming it; `skip`: it is dropped, counted
    /// and named in the log.
    pub on_error: OnError,
}

impl SourceOptions {
    /// The keys a source stage takes for these options.
    pub const KEYS: [&'static str; 4] = ["shuffle", "limit", "shard", "on_error"];

    /// Range checks (the types are serde's).
    pub fn check(&self, out: &mut Vec<Problem>) {
        if let Some(s) = self.shard {
            if s.count == 0 || s.index >= s.count {
                out.push(Problem::new(
                    "shard",
                    format!("shard index {} of {} is out of range", s.index, s.count),
                    "use `shard: {index: I, count: N}` with 0 <= I < N",
                ));
            }
        }
        if self.limit == Some(0) {
            out.push(Problem::new(
                "limit",
                "`limit: 0` leaves no data",
                "remove `limit` or make it positive",
            ));
        }
    }
}

/// Where a sample is, for its random streams.
#[derive(Clone, Copy, Debug)]
pub struct SampleCtx {
    pub seed: u64,
    pub stage_key: u64,
    pub epoch: u32,
    pub index: u64,
}

impl SampleCtx {
    /// The random stream of this stage for this sample and view.
    pub fn rng(&self, view: u32) -> StageRng {
        StreamKey { seed: self.seed, epoch: self.epoch, index: self.index, view, stage: self.stage_key }.rng()
    }
}

/// Runs `f(view, image, rng)` on each view of a sample that `views` selects (`None`: every
/// view; `Some([0])`: the first branch only, the paper's asymmetric ablation, Figure 5), with
/// that view's own random stream: the same draws whatever the scheduling.
pub fn for_each_view(
    sample: &mut Sample,
    views: Option<&[u32]>,
    ctx: &SampleCtx,
    mut f: impl FnMut(u32, &mut crate::Image, &mut StageRng) -> Result<(), StageError>,
) -> Result<(), StageError> {
    let Payload::Views(images) = &mut sample.payload else {
        return Err(StageError::fatal("this stage needs decoded image views; put it after `decode`/`views`"));
    };
    for (v, img) in images.iter_mut().enumerate() {
        let v = v as u32;
        if views.is_some_and(|sel| !sel.contains(&v)) {
            continue;
        }
        f(v, img, &mut ctx.rng(v))?;
    }
    Ok(())
}

/// Produces the samples of a dataset by index.
pub trait Source: Send + Sync {
    /// Items in the whole dataset (before `limit` and sharding).
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn options(&self) -> SourceOptions;
    /// Reads item `index`; `ctx` keys any randomness (synthetic data).
    fn read(&self, index: u64, ctx: &SampleCtx) -> Result<Sample, StageError>;
}

/// Transforms one sample; a pure function of (sample, `ctx`'s random streams).
pub trait MapStage: Send + Sync {
    fn apply(&self, sample: &mut Sample, ctx: &SampleCtx) -> Result<(), StageError>;
    /// A stage whose `apply` turns the views into f32 tensors (`to_tensor`) can also write them
    /// straight into a batch: right before `batch`, the runtime then hands it to the batcher
    /// instead of calling `apply`, which saves a tensor's worth of writes and reads per view.
    fn as_tensor_writer(&self) -> Option<&dyn TensorWriter> {
        None
    }
}

/// Writes a sample's tensors where the caller wants them (see [`MapStage::as_tensor_writer`]).
/// The values must be the bits `apply` would put in `Payload::Tensors`.
pub trait TensorWriter: Send + Sync {
    /// The shapes of the tensors the sample becomes, one per view.
    fn shapes(&self, sample: &Sample) -> Result<Vec<Vec<usize>>, StageError>;
    /// Appends tensor `view` of the sample (as many values as its shape holds) to `dst`.
    fn append(&self, sample: &Sample, view: usize, dst: &mut Vec<f32>) -> Result<(), StageError>;
}

/// Consumes the stream in dataset order.
pub trait Sink: Send {
    /// Passes over the data this sink wants.
    fn epochs(&self) -> u32 {
        1
    }
    fn consume(&mut self, sample: Sample) -> Result<(), StageError>;
    fn finish(&mut self) -> Result<(), StageError> {
        Ok(())
    }
    /// Asked once before the run when it continues an earlier one (`simclr run --resume`):
    /// restore the saved state from the run directory. Stages without state rerun from scratch.
    fn resume(&mut self) -> Result<(), StageError> {
        Ok(())
    }
    /// The first epoch to feed (0 unless [`Sink::resume`] restored a later position); the
    /// runtime runs epochs `start_epoch()..epochs()`, each keyed by its absolute number.
    fn start_epoch(&self) -> u32 {
        0
    }
    /// Positions of [`Sink::start_epoch`]'s order already consumed before the resumed run (a
    /// checkpoint taken mid-epoch): the runtime skips them without reading them. 0 by default.
    fn start_offset(&self) -> u64 {
        0
    }
    /// Told before each [`Sink::consume`]: once that item is in, the run has consumed the first
    /// `consumed` positions of epoch `epoch`'s order (with a batch stage, the positions of every
    /// sample in the batches so far, skipped samples included). A sink that checkpoints keeps it,
    /// so that a resumed run starts there ([`Sink::start_offset`]).
    fn position(&mut self, epoch: u32, consumed: u64) {
        let _ = (epoch, consumed);
    }
    /// Called instead of [`Sink::finish`] when the run was interrupted (Ctrl-C): save what can
    /// be resumed.
    fn interrupted(&mut self) -> Result<(), StageError> {
        Ok(())
    }
    /// `(rank, world)` of a data-parallel sink, one of `world` processes: the runtime feeds this
    /// process only its share of every global batch ([`crate::runtime::Share`]) and the batch
    /// stage makes batches of `batch_size / world`. `None` (the default): everything.
    fn share(&self) -> Option<(usize, usize)> {
        None
    }
}

/// Groups consecutive samples; sees them in dataset order.
pub trait Batcher: Send {
    /// Takes the next sample; returns a finished batch (as a sample) when there is one.
    fn push(&mut self, sample: Sample) -> Result<Option<Sample>, StageError>;
    /// At the end of the data: the last, partial batch if it is kept.
    fn flush(&mut self) -> Result<Option<Sample>, StageError>;
    /// Batches an epoch of `items` samples gives, when the batcher knows (a run whose epoch
    /// gives none is refused before it starts: it would train on nothing).
    fn batches(&self, _items: u64) -> Option<u64> {
        None
    }
    /// Why an epoch of `items` gives no batch, and how to fix it (see [`Batcher::batches`]).
    fn explain_empty(&self, items: u64) -> String {
        format!("an epoch of {items} samples gives no batch")
    }
    /// Samples per batch, if the batcher can also run in the workers: then the runtime makes
    /// every chunk one batch's worth of samples (batches never span epochs, chunks neither)
    /// and each worker assembles its chunk with its own [`Batcher::fork`], so the copy into the
    /// batch happens in parallel and not on the collector thread. The batches are the same.
    fn worker_batch_size(&self) -> Option<usize> {
        None
    }
    /// A batcher for one worker (sharing buffers with this one).
    fn fork(&self) -> Option<Box<dyn Batcher>> {
        None
    }
    /// Makes this process's batches `1/world` of the configured (global) size, for a
    /// data-parallel sink ([`Sink::share`]); returns the new size, or why it cannot.
    fn split(&mut self, world: usize) -> Result<usize, String> {
        Err(format!("this batch stage cannot be split across {world} processes"))
    }
    /// Takes a sample whose tensors `writer` still has to make (the stage before `batch`,
    /// fused into it): the same batches as `push` after that stage's `apply`. This default
    /// makes the tensors and pushes them; a batcher can write them into the batch instead.
    fn push_via(
        &mut self,
        mut sample: Sample,
        writer: &dyn TensorWriter,
    ) -> Result<Option<Sample>, StageError> {
        let tensors = writer
            .shapes(&sample)?
            .into_iter()
            .enumerate()
            .map(|(view, shape)| {
                let mut data = Vec::new();
                writer.append(&sample, view, &mut data).map(|()| Tensor { shape, data })
            })
            .collect::<Result<Vec<_>, _>>()?;
        sample.payload = Payload::Tensors(tensors);
        self.push(sample)
    }
}

/// Work that runs once on artifacts of earlier stages (see [`Role::Task`]).
pub trait Task: Send {
    fn run(&mut self) -> Result<(), StageError>;
}

/// A built stage, ready to run.
pub enum Stage {
    Source(Arc<dyn Source>),
    Map(Arc<dyn MapStage>),
    Batch(Box<dyn Batcher>),
    Sink(Box<dyn Sink>),
    Task(Box<dyn Task>),
}

/// A semantic problem in one stage's config, located by its field path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub field: Vec<PathSeg>,
    pub message: String,
    pub fix: String,
}

impl Problem {
    pub fn new(field: &str, message: impl Into<String>, fix: impl Into<String>) -> Self {
        let field = if field.is_empty() {
            Vec::new()
        } else {
            field.split('.').map(|s| PathSeg::Key(s.to_string())).collect()
        };
        Self { field, message: message.into(), fix: fix.into() }
    }
}

/// What a stage may look at while being checked or built.
#[derive(Clone, Debug, Default)]
pub struct Context {
    /// The folder of the pipeline file: relative paths are resolved from it.
    pub base_dir: PathBuf,
    pub seed: u64,
    pub stage_id: String,
    /// Where the run writes its files (metrics, checkpoints); `None` while validating.
    pub run_dir: Option<PathBuf>,
    /// What earlier stages of the run produced (empty while validating).
    pub artifacts: crate::artifact::Artifacts,
    /// A source stage's common options (`shuffle`, `limit`, `shard`, `on_error`).
    pub source: SourceOptions,
}

impl Context {
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }
}

/// A reference from a config field to another stage (e.g. `encoder: train`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageRef {
    pub field: String,
    pub stage: String,
    pub expects: PortType,
}

/// A stage kind: its config struct is the schema, and builds the stage.
pub trait StageConfig: DeserializeOwned + schemars::JsonSchema + Send + Sync + 'static {
    const KIND: &'static str;
    /// One line for `--help`-style listings.
    const ABOUT: &'static str;
    const ROLE: Role;
    /// Input and output port types.
    fn ports(&self) -> (PortType, PortType);
    /// Semantic checks beyond types (ranges, files that must exist).
    fn check(&self, _cx: &Context, _out: &mut Vec<Problem>) {}
    fn refs(&self) -> Vec<StageRef> {
        Vec::new()
    }
    fn build(&self, cx: &Context) -> Result<Stage, StageError>;
}

/// A parsed, type-checked stage config, kind-erased.
pub trait Configured: Send + Sync {
    fn ports(&self) -> (PortType, PortType);
    fn check(&self, cx: &Context, out: &mut Vec<Problem>);
    fn refs(&self) -> Vec<StageRef>;
    fn build(&self, cx: &Context) -> Result<Stage, StageError>;
}

impl<C: StageConfig> Configured for C {
    fn ports(&self) -> (PortType, PortType) {
        StageConfig::ports(self)
    }
    fn check(&self, cx: &Context, out: &mut Vec<Problem>) {
        StageConfig::check(self, cx, out)
    }
    fn refs(&self) -> Vec<StageRef> {
        StageConfig::refs(self)
    }
    fn build(&self, cx: &Context) -> Result<Stage, StageError> {
        StageConfig::build(self, cx)
    }
}

/// Why a config did not deserialize, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub path: Vec<PathSeg>,
    pub message: String,
}

/// Makes configured stages of one kind from their YAML (as JSON) fields.
pub trait Factory: Send + Sync {
    fn kind(&self) -> &str;
    fn about(&self) -> &str;
    fn role(&self) -> Role;
    fn parse(&self, config: serde_json::Value) -> Result<Box<dyn Configured>, ConfigError>;
    /// The JSON Schema of the kind's own config fields (the common stage keys are added by
    /// [`crate::schema`]); nested types go into `generator`'s definitions.
    fn schema(&self, generator: &mut schemars::SchemaGenerator) -> serde_json::Value;
}

struct Typed<C>(PhantomData<fn() -> C>);

impl<C: StageConfig> Factory for Typed<C> {
    fn kind(&self) -> &str {
        C::KIND
    }
    fn schema(&self, generator: &mut schemars::SchemaGenerator) -> serde_json::Value {
        C::json_schema(generator).to_value()
    }
    fn about(&self) -> &str {
        C::ABOUT
    }
    fn role(&self) -> Role {
        C::ROLE
    }
    fn parse(&self, config: serde_json::Value) -> Result<Box<dyn Configured>, ConfigError> {
        match serde_path_to_error::deserialize::<_, C>(config) {
            Ok(c) => Ok(Box::new(c)),
            Err(e) => Err(ConfigError { path: serde_path(e.path()), message: e.into_inner().to_string() }),
        }
    }
}

/// Where in a config serde failed, as a path into the YAML tree.
pub(crate) fn serde_path(path: &serde_path_to_error::Path) -> Vec<PathSeg> {
    path.iter()
        .filter_map(|seg| match seg {
            serde_path_to_error::Segment::Map { key } => Some(PathSeg::Key(key.clone())),
            serde_path_to_error::Segment::Seq { index } => Some(PathSeg::Index(*index)),
            _ => None,
        })
        .collect()
}

/// Every stage kind known to a run, by name.
#[derive(Default)]
pub struct Registry {
    kinds: BTreeMap<String, Arc<dyn Factory>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a built-in kind. A later registration of the same name replaces it.
    pub fn register<C: StageConfig>(&mut self) -> &mut Self {
        self.kinds.insert(C::KIND.to_string(), Arc::new(Typed::<C>(PhantomData)));
        self
    }

    pub fn register_factory(&mut self, factory: Arc<dyn Factory>) -> &mut Self {
        self.kinds.insert(factory.kind().to_string(), factory);
        self
    }

    pub fn get(&self, kind: &str) -> Option<&Arc<dyn Factory>> {
        self.kinds.get(kind)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &Arc<dyn Factory>> {
        self.kinds.values()
    }

    /// The registered kind closest to a misspelt one.
    pub fn suggest(&self, kind: &str) -> Option<&str> {
        crate::suggest(kind, self.kinds.keys().map(String::as_str))
    }
}
