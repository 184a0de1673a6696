//! Stages that exercise the core: a counting source, a pass-through, a discarding sink, and a
//! stage that fails on purpose (for testing error handling).

use std::sync::Arc;

use serde::Deserialize;
use simclr_core::{
    Context, MapStage, PortType, Problem, Role, Sample, SampleCtx, Sink, Source, SourceOptions, Stage,
    StageConfig, StageError,
};

/// `counter`: samples numbered 0..count with no payload (tests, overhead benchmarks).
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Counter {
    /// Samples per epoch.
    pub count: u64,
}

impl StageConfig for Counter {
    const KIND: &'static str = "counter";
    const ABOUT: &'static str = "source: `count` empty samples numbered 0..count";
    const ROLE: Role = Role::Source;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Nothing, PortType::Nothing)
    }
    fn build(&self, cx: &Context) -> Result<Stage, StageError> {
        Ok(Stage::Source(Arc::new(CounterSource { count: self.count, opts: cx.source })))
    }
}

struct CounterSource {
    count: u64,
    opts: SourceOptions,
}

impl Source for CounterSource {
    fn len(&self) -> u64 {
        self.count
    }
    fn options(&self) -> SourceOptions {
        self.opts
    }
    fn read(&self, index: u64, _ctx: &SampleCtx) -> Result<Sample, StageError> {
        Ok(Sample { index, ..Sample::default() })
    }
}

/// `identity`: passes samples through unchanged.
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Identity {}

impl StageConfig for Identity {
    const KIND: &'static str = "identity";
    const ABOUT: &'static str = "passes samples through unchanged";
    const ROLE: Role = Role::Map;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Any, PortType::SameAsInput)
    }
    fn build(&self, _cx: &Context) -> Result<Stage, StageError> {
        Ok(Stage::Map(Arc::new(self.clone())))
    }
}

impl MapStage for Identity {
    fn apply(&self, _sample: &mut Sample, _ctx: &SampleCtx) -> Result<(), StageError> {
        Ok(())
    }
}

/// `null`: a sink that drops everything (the data pipeline alone, as in `bench`).
#[derive(Clone, Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Null {
    /// Passes over the data.
    #[serde(default = "one")]
    pub epochs: u32,
}

fn one() -> u32 {
    1
}

impl StageConfig for Null {
    const KIND: &'static str = "null";
    const ABOUT: &'static str = "sink: discards samples";
    const ROLE: Role = Role::Sink;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Any, PortType::Nothing)
    }
    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        if self.epochs == 0 {
            out.push(Problem::new("epochs", "`epochs` must be at least 1", "write e.g. `epochs: 1`"));
        }
    }
    fn build(&self, _cx: &Context) -> Result<Stage, StageError> {
        Ok(Stage::Sink(Box::new(NullSink { epochs: self.epochs })))
    }
}

/// The sink behind `null`.
pub struct NullSink {
    pub epochs: u32,
}

impl Sink for NullSink {
    fn epochs(&self) -> u32 {
        self.epochs
    }
    fn consume(&mut self, _sample: Sample) -> Result<(), StageError> {
        Ok(())
    }
}

/// `fail`: fails on the sample with dataset index `at` (to test error handling).
#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Fail {
    pub at: u64,
    /// `data` failures follow the source's `on_error`; `fatal` ones always stop the run.
    #[serde(default)]
    pub mode: FailMode,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    #[default]
    Fatal,
    Data,
}

impl StageConfig for Fail {
    const KIND: &'static str = "fail";
    const ABOUT: &'static str = "fails on sample `at` (for testing error handling)";
    const ROLE: Role = Role::Map;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Any, PortType::SameAsInput)
    }
    fn build(&self, _cx: &Context) -> Result<Stage, StageError> {
        Ok(Stage::Map(Arc::new(self.clone())))
    }
}

impl MapStage for Fail {
    fn apply(&self, sample: &mut Sample, _ctx: &SampleCtx) -> Result<(), StageError> {
        if sample.index != self.at {
            return Ok(());
        }
        let msg = format!("deliberate failure at sample {}", self.at);
        Err(match self.mode {
            FailMode::Fatal => StageError::fatal(msg),
            FailMode::Data => StageError::data(msg),
        })
    }
}
