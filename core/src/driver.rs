//! Runs a validated plan: builds its stages and runs each chain.

use std::path::Path;

use crate::error::{RunError, StageError};
use crate::graph::{Chain, Plan};
use crate::runtime::{run_chain, ChainStages, RunOptions, RunReport, StageInfo};
use crate::sample::Sample;
use crate::stage::{Role, Sink, Stage};

/// What to run of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Everything, sinks included.
    Full,
    /// The data pipeline only: sinks (training, evaluation) are replaced by a discarding sink.
    DataOnly,
}

/// A sink that drops samples.
pub struct Discard;

impl Sink for Discard {
    fn consume(&mut self, _sample: Sample) -> Result<(), StageError> {
        Ok(())
    }
}

fn info(plan: &Plan, i: usize) -> StageInfo {
    let s = &plan.stages[i];
    StageInfo { id: s.id.clone(), kind: s.kind.clone(), workers: s.workers, capacity: s.capacity }
}

fn build(plan: &Plan, i: usize, run_dir: Option<&Path>) -> Result<Stage, RunError> {
    let s = &plan.stages[i];
    s.config.build(&s.context(plan, run_dir)).map_err(|e| RunError::Stage {
        stage: s.id.clone(),
        kind: s.kind.clone(),
        message: e.to_string(),
    })
}

fn wrong_role(plan: &Plan, i: usize, want: &str) -> RunError {
    let s = &plan.stages[i];
    RunError::Internal(format!("stage '{}' ({}) did not build as a {want}", s.id, s.kind))
}

/// Builds the stages of one chain.
pub fn build_chain(
    plan: &Plan,
    chain: &Chain,
    mode: Mode,
    run_dir: Option<&Path>,
) -> Result<ChainStages, RunError> {
    let Stage::Source(source) = build(plan, chain.source, run_dir)? else {
        return Err(wrong_role(plan, chain.source, "source"));
    };
    let mut maps = Vec::new();
    for &m in &chain.maps {
        let Stage::Map(stage) = build(plan, m, run_dir)? else { return Err(wrong_role(plan, m, "map")) };
        maps.push((info(plan, m), stage));
    }
    let batch = match chain.batch {
        Some(b) => {
            let Stage::Batch(batcher) = build(plan, b, run_dir)? else {
                return Err(wrong_role(plan, b, "batcher"));
            };
            Some((info(plan, b), batcher))
        }
        None => None,
    };
    let sink: (StageInfo, Box<dyn Sink>) = match (chain.sink, mode) {
        (Some(k), Mode::Full) => {
            let Stage::Sink(sink) = build(plan, k, run_dir)? else { return Err(wrong_role(plan, k, "sink")) };
            (info(plan, k), sink)
        }
        _ => (
            StageInfo { id: "(discard)".into(), kind: "null".into(), workers: None, capacity: None },
            Box::new(Discard),
        ),
    };
    Ok(ChainStages { source: (info(plan, chain.source), source), maps, batch, sink })
}

/// Runs every chain of the plan in file order; returns one report per chain.
pub fn run_plan(plan: &Plan, opts: &RunOptions, mode: Mode) -> Result<Vec<(Chain, RunReport)>, RunError> {
    let mut out = Vec::new();
    for chain in plan.chains() {
        let mut stages = build_chain(plan, &chain, mode, opts.run_dir.as_deref())?;
        if opts.resume {
            let (info, sink) = &mut stages.sink;
            sink.resume().map_err(|e| RunError::Stage {
                stage: info.id.clone(),
                kind: info.kind.clone(),
                message: e.to_string(),
            })?;
        }
        let report = run_chain(stages, opts)?;
        out.push((chain, report));
    }
    Ok(out)
}

/// Whether the plan has stages `Mode::DataOnly` leaves out.
pub fn has_sinks(plan: &Plan) -> bool {
    plan.stages.iter().any(|s| s.role == Role::Sink)
}
