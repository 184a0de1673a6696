//! Runs a validated plan: builds its stages and runs each chain.

use std::path::Path;
use std::sync::Arc;

use crate::artifact::Artifacts;

use crate::error::{RunError, StageError};
use crate::graph::{Chain, Plan};
use crate::runtime::{run_chain, ChainStages, RunOptions, RunReport, StageInfo};
use crate::sample::Sample;
use crate::stage::{Role, Sink, Source, Stage};

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

fn build(plan: &Plan, i: usize, run_dir: Option<&Path>, artifacts: &Artifacts) -> Result<Stage, RunError> {
    let s = &plan.stages[i];
    s.config.build(&s.context(plan, run_dir, artifacts)).map_err(|e| RunError::stage(&s.id, &s.kind, e))
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
    artifacts: &Artifacts,
) -> Result<ChainStages, RunError> {
    let Stage::Source(source) = build(plan, chain.source, run_dir, artifacts)? else {
        return Err(wrong_role(plan, chain.source, "source"));
    };
    let mut maps = Vec::new();
    for &m in &chain.maps {
        let Stage::Map(stage) = build(plan, m, run_dir, artifacts)? else {
            return Err(wrong_role(plan, m, "map"));
        };
        maps.push((info(plan, m), stage));
    }
    let batch = match chain.batch {
        Some(b) => {
            let Stage::Batch(batcher) = build(plan, b, run_dir, artifacts)? else {
                return Err(wrong_role(plan, b, "batcher"));
            };
            Some((info(plan, b), batcher))
        }
        None => None,
    };
    let sink: (StageInfo, Box<dyn Sink>) = match (chain.sink, mode) {
        (Some(k), Mode::Full) => {
            let Stage::Sink(sink) = build(plan, k, run_dir, artifacts)? else {
                return Err(wrong_role(plan, k, "sink"));
            };
            (info(plan, k), sink)
        }
        _ => (
            StageInfo { id: "(discard)".into(), kind: "null".into(), workers: None, capacity: None },
            Box::new(Discard),
        ),
    };
    Ok(ChainStages { source: (info(plan, chain.source), source), maps, batch, sink })
}

/// What runs as one piece: a chain of streaming stages, or a task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unit {
    Chain(Chain),
    Task(usize),
}

impl Unit {
    fn members(&self) -> Vec<usize> {
        match self {
            Unit::Chain(c) => {
                std::iter::once(c.source).chain(c.maps.iter().copied()).chain(c.batch).chain(c.sink).collect()
            }
            Unit::Task(i) => vec![*i],
        }
    }
}

/// The chains and tasks of a plan in the order they run: file order, except that a unit waits
/// for the units producing the artifacts it references (`encoder: train`). Sources that only
/// tasks read are not run as chains; they are built and handed over as artifacts.
pub fn schedule(plan: &Plan) -> Vec<Unit> {
    let mut units: Vec<(usize, Unit)> =
        plan.chains().into_iter().map(|c| (c.source, Unit::Chain(c))).collect();
    for (i, s) in plan.stages.iter().enumerate() {
        if s.role == Role::Task {
            units.push((i, Unit::Task(i)));
        }
    }
    units.sort_by_key(|(first, _)| *first);
    let owner =
        |stage: usize, units: &[(usize, Unit)]| units.iter().position(|(_, u)| u.members().contains(&stage));
    let mut done = vec![false; units.len()];
    let mut order = Vec::new();
    while order.len() < units.len() {
        // The first unit in file order whose references are all produced (validation rejected
        // cycles; if one slipped through, fall back to file order rather than loop forever).
        let ready = (0..units.len()).find(|&u| {
            !done[u]
                && units[u].1.members().iter().all(|&m| {
                    plan.stages[m]
                        .refs
                        .iter()
                        .all(|(_, j)| owner(*j, &units).is_none_or(|o| o == u || done[o]))
                })
        });
        let Some(u) = ready.or_else(|| (0..units.len()).find(|&u| !done[u])) else { break };
        done[u] = true;
        order.push(units[u].1.clone());
    }
    order
}

/// Sources read by tasks (no stream consumer), built once and stored as artifacts in
/// `opts.artifacts` (run before building a chain whose stages read them).
pub fn data_sources(plan: &Plan, opts: &RunOptions) -> Result<(), RunError> {
    let streamed: Vec<usize> = plan.chains().iter().map(|c| c.source).collect();
    for (i, s) in plan.stages.iter().enumerate() {
        let referenced = plan.stages.iter().any(|t| t.refs.iter().any(|(_, j)| *j == i));
        if s.role == Role::Source && referenced && !streamed.contains(&i) {
            let Stage::Source(src) = build(plan, i, opts.run_dir.as_deref(), &opts.artifacts)? else {
                return Err(wrong_role(plan, i, "source"));
            };
            let name = dataset_name(s);
            opts.artifacts
                .put(&s.id, DataSource { id: s.id.clone(), kind: s.kind.clone(), name, source: src });
        }
    }
    Ok(())
}

/// What reports call a source's data: its `name:`, else a folder's own name (`image_folder`),
/// else the stage id.
pub fn dataset_name(s: &crate::graph::PlannedStage) -> String {
    if let Some(n) = &s.name {
        return n.clone();
    }
    if s.kind == "image_folder" {
        let folder = s.fields.value.get("path").and_then(|p| match &p.value {
            crate::yaml::Node::Str(p) => {
                Path::new(p).components().next_back().map(|c| c.as_os_str().to_string_lossy().into_owned())
            }
            _ => None,
        });
        if let Some(f) = folder.filter(|f| !f.is_empty() && f != "." && f != "..") {
            return f;
        }
    }
    s.id.clone()
}

/// A source handed to tasks (evaluation data), with its stage id, kind and dataset name.
pub struct DataSource {
    pub id: String,
    /// What reports call its data (see [`dataset_name`]).
    pub name: String,
    pub kind: String,
    pub source: Arc<dyn Source>,
}

/// Runs every chain and task of the plan (see [`schedule`]); returns one report per chain.
/// In `Mode::DataOnly` tasks do not run.
pub fn run_plan(plan: &Plan, opts: &RunOptions, mode: Mode) -> Result<Vec<(Chain, RunReport)>, RunError> {
    let mut out = Vec::new();
    if mode == Mode::Full {
        data_sources(plan, opts)?;
    }
    for unit in schedule(plan) {
        if opts.interrupt.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(RunError::Interrupted);
        }
        match unit {
            Unit::Chain(chain) => {
                let mut stages = build_chain(plan, &chain, mode, opts.run_dir.as_deref(), &opts.artifacts)?;
                if !opts.primary && stages.sink.1.share().is_none() {
                    continue;
                }
                if opts.resume {
                    let (info, sink) = &mut stages.sink;
                    sink.resume().map_err(|e| RunError::stage(&info.id, &info.kind, e))?;
                }
                let report = run_chain(stages, opts)?;
                out.push((chain, report));
            }
            Unit::Task(i) if mode == Mode::Full && opts.primary => {
                let s = &plan.stages[i];
                let Stage::Task(mut task) = build(plan, i, opts.run_dir.as_deref(), &opts.artifacts)? else {
                    return Err(wrong_role(plan, i, "task"));
                };
                tracing::info!("stage '{}' ({}): running", s.id, s.kind);
                task.run().map_err(|e| RunError::stage(&s.id, &s.kind, e))?;
            }
            Unit::Task(_) => {}
        }
    }
    Ok(out)
}

/// Whether the plan has stages `Mode::DataOnly` leaves out.
pub fn has_sinks(plan: &Plan) -> bool {
    plan.stages.iter().any(|s| matches!(s.role, Role::Sink | Role::Task))
}
