//! simclr-core: the pipeline file, its validation, the stage registry and the parallel
//! runtime. No image or ML code lives here; stages do that.

pub mod artifact;
pub mod driver;
pub mod error;
pub mod graph;
pub mod plugin;
pub mod rng;
pub mod run_dir;
pub mod runtime;
pub mod sample;
pub mod schema;
pub mod simd;
pub mod spec;
pub mod stage;
pub mod sweep;
pub mod tensorboard;
pub mod yaml;

pub use artifact::Artifacts;
pub use driver::{run_plan, Mode};
pub use error::{Diagnostic, Diagnostics, RunError, StageError};
pub use graph::{validate, Chain, Plan, PlannedStage};
pub use rng::StageRng;
pub use runtime::{run_chain, ChainStages, RunOptions, RunReport, StageInfo, StageMetrics};
pub use sample::{Batch, BufferPool, Image, Payload, Sample, Tensor};
pub use spec::PipelineSpec;
pub use stage::{
    for_each_view, Batcher, Configured, Context, Factory, MapStage, OnError, PortType, Problem, Registry,
    Role, SampleCtx, Shard, Sink, Source, SourceOptions, Stage, StageConfig, StageRef, Task, TensorWriter,
};

/// The candidate closest to `word`, if close enough to be a likely typo.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 3).max(2) && *d < c.len().max(word.len()))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}
