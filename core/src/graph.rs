//! Validation: a parsed spec checked against the registry, as a graph of configured stages.
//!
//! `validate` never stops at the first problem: it reports unknown kinds, bad fields, duplicate
//! ids, dangling inputs, cycles and port mismatches of the whole file together.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::artifact::Artifacts;
use crate::error::{Diagnostic, Diagnostics};
use crate::spec::{PipelineSpec, StageSpec};
use crate::stage::{Configured, Context, PortType, Registry, Role, SourceOptions, StageRef};
use crate::yaml::{Node, PathSeg, Pos, Spanned};

/// A stage that passed validation.
pub struct PlannedStage {
    pub id: String,
    pub kind: String,
    pub role: Role,
    pub config: Box<dyn Configured>,
    /// Indices (into `Plan::stages`) of the stages feeding this one.
    pub inputs: Vec<usize>,
    pub refs: Vec<(StageRef, usize)>,
    pub input_port: PortType,
    pub output_port: PortType,
    pub workers: Option<usize>,
    pub capacity: Option<usize>,
    /// The `name:` the file gives the stage's data, if any.
    pub name: Option<String>,
    pub pos: Pos,
    /// The user-written fields, for graph labels.
    pub fields: Spanned<Node>,
    /// A source's common options (default for other stages).
    pub source: SourceOptions,
}

impl PlannedStage {
    pub fn context(&self, plan: &Plan, run_dir: Option<&Path>, artifacts: &Artifacts) -> Context {
        Context {
            base_dir: plan.base_dir(),
            seed: plan.spec.seed,
            stage_id: self.id.clone(),
            run_dir: run_dir.map(Path::to_path_buf),
            artifacts: artifacts.clone(),
            source: self.source,
        }
    }
}

/// A valid pipeline.
pub struct Plan {
    pub spec: PipelineSpec,
    pub stages: Vec<PlannedStage>,
}

/// One linear run of the data: a source, per-sample stages, and an optional sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub source: usize,
    pub maps: Vec<usize>,
    pub batch: Option<usize>,
    pub sink: Option<usize>,
}

impl Plan {
    pub fn base_dir(&self) -> std::path::PathBuf {
        self.spec.file.parent().map(Path::to_path_buf).unwrap_or_default()
    }

    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.stages.iter().position(|s| s.id == id)
    }

    /// The linear chains from each source, in file order.
    pub fn chains(&self) -> Vec<Chain> {
        let mut consumers: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, s) in self.stages.iter().enumerate() {
            for &inp in &s.inputs {
                consumers.entry(inp).or_default().push(i);
            }
        }
        let referenced: HashSet<usize> =
            self.stages.iter().flat_map(|s| s.refs.iter().map(|(_, j)| *j)).collect();
        let mut chains = Vec::new();
        for (i, s) in self.stages.iter().enumerate() {
            if s.role != Role::Source {
                continue;
            }
            if referenced.contains(&i) && !consumers.contains_key(&i) {
                // A data source that tasks read (evaluation data), not a stream of its own.
                continue;
            }
            let mut chain = Chain { source: i, maps: Vec::new(), batch: None, sink: None };
            let mut cur = i;
            while let Some(next) = consumers.get(&cur).and_then(|c| c.first()).copied() {
                match self.stages[next].role {
                    Role::Map if chain.batch.is_none() => chain.maps.push(next),
                    Role::Batch if chain.batch.is_none() => chain.batch = Some(next),
                    Role::Map | Role::Batch => break,
                    Role::Sink => {
                        chain.sink = Some(next);
                        break;
                    }
                    Role::Source | Role::Task => break,
                }
                cur = next;
            }
            chains.push(chain);
        }
        chains
    }
}

fn locate(fields: &Spanned<Node>, path: &[PathSeg]) -> Pos {
    // Point at the key of the field when there is one: that is what the user looks for.
    if let Some((PathSeg::Key(last), parent)) = path.split_last() {
        if let Some(p) = Node::find(fields, parent).and_then(|n| n.value.key_pos(last)) {
            return p;
        }
    }
    let mut p = path;
    loop {
        if let Some(n) = Node::find(fields, p) {
            return n.pos;
        }
        match p.split_last() {
            Some((_, parent)) => p = parent,
            None => return fields.pos,
        }
    }
}

/// A stage whose config parsed: its role, config and (for a source) common options.
type Parsed = (Role, Box<dyn Configured>, SourceOptions);

/// Turns serde's message into what to write instead.
fn config_fix(message: &str, kind: &str, extra: &[&str]) -> (String, String) {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let field = rest.split('`').next().unwrap_or_default();
        let mut expected: Vec<&str> = rest
            .split("expected ")
            .nth(1)
            .map(|e| {
                e.split(['`', ','])
                    .map(str::trim)
                    .filter(|s| !s.is_empty() && *s != "one of" && *s != "or")
                    .collect()
            })
            .unwrap_or_default();
        expected.extend_from_slice(extra);
        let fix = match crate::suggest(field, expected.iter().copied()) {
            Some(s) => format!("did you mean `{s}`? `{kind}` takes: {}", expected.join(", ")),
            None if expected.is_empty() => {
                format!("`{kind}` takes no fields besides id, kind, input, workers, capacity")
            }
            None => format!("`{kind}` takes: {}", expected.join(", ")),
        };
        return (format!("unknown field `{field}`"), fix);
    }
    if message.starts_with("missing field") {
        return (message.to_string(), format!("add it to the `{kind}` stage"));
    }
    (
        message.to_string(),
        format!("see the `{kind}` entry of the stage reference in README.md for its fields and types"),
    )
}

/// Checks a parsed spec against the registry and returns the runnable plan, or every problem.
///
/// Phases, each reporting into one list so every problem comes out in one pass: stage ids,
/// kinds and configs, edges (inputs and references), cycles, ports; then the plan is built.
pub fn validate(spec: PipelineSpec, registry: &Registry) -> Result<Plan, Diagnostics> {
    let mut diags = Diagnostics::default();
    let (configured, edges, out_ports) = {
        let cx = Cx::new(&spec);
        check_ids(&cx, &mut diags);
        let configured = parse_configs(&cx, registry, &mut diags);
        let edges = resolve_edges(&cx, &configured, &mut diags);
        check_cycles(&cx, &edges, &mut diags);
        let out_ports = check_ports(&cx, &configured, &edges, &mut diags);
        (configured, edges, out_ports)
    };
    if !diags.is_empty() {
        return Err(diags.into_result(()).err().unwrap_or_default());
    }
    Ok(assemble(spec, configured, edges, out_ports))
}

/// What every phase looks things up in.
struct Cx<'a> {
    spec: &'a PipelineSpec,
    base_dir: std::path::PathBuf,
    /// Stage index by id (the first stage with that id).
    index: HashMap<&'a str, usize>,
    /// The ids, in file order, once each.
    ids: Vec<&'a str>,
}

impl<'a> Cx<'a> {
    fn new(spec: &'a PipelineSpec) -> Self {
        let index = spec.stages.iter().enumerate().rev().map(|(i, s)| (s.id.value.as_str(), i)).collect();
        let mut ids: Vec<&str> = Vec::new();
        for s in &spec.stages {
            if !ids.contains(&s.id.value.as_str()) {
                ids.push(&s.id.value);
            }
        }
        let base_dir = spec.file.parent().map(Path::to_path_buf).unwrap_or_default();
        Self { spec, base_dir, index, ids }
    }

    fn diag(&self, s: &StageSpec, pos: Pos, msg: String) -> Diagnostic {
        Diagnostic::new(&self.spec.file, pos, msg).stage(s.id.value.clone())
    }

    fn unknown_stage_fix(&self, name: &str) -> String {
        match crate::suggest(name, self.ids.iter().copied()) {
            Some(s) => format!("did you mean `{s}`? stages: {}", self.ids.join(", ")),
            None => format!("name one of: {}", self.ids.join(", ")),
        }
    }
}

/// The graph's edges: each stage's inputs and its references to other stages (`encoder: train`).
struct Edges {
    inputs: Vec<Vec<usize>>,
    refs: Vec<Vec<(StageRef, usize)>>,
}

/// Every id is used once: everything else refers to them.
fn check_ids(cx: &Cx<'_>, diags: &mut Diagnostics) {
    let mut seen: HashMap<&str, Pos> = HashMap::new();
    for s in &cx.spec.stages {
        if let Some(first) = seen.get(s.id.value.as_str()) {
            diags.push(
                cx.diag(s, s.id.pos, format!("duplicate stage id (first used at line {})", first.line))
                    .fix("give every stage its own id"),
            );
        } else {
            seen.insert(&s.id.value, s.id.pos);
        }
    }
}

/// Each stage's kind and config: the kind's parser, then its own checks; a source's common
/// options are split off and checked by the core first.
fn parse_configs(cx: &Cx<'_>, registry: &Registry, diags: &mut Diagnostics) -> Vec<Option<Parsed>> {
    let mut configured: Vec<Option<Parsed>> = Vec::new();
    for s in &cx.spec.stages {
        let Some(factory) = registry.get(&s.kind.value) else {
            let fix = match registry.suggest(&s.kind.value) {
                Some(k) => format!("did you mean `{k}`? run `simclr kinds` for the list"),
                None => "run `simclr kinds` for the list of stage kinds".to_string(),
            };
            diags.push(cx.diag(s, s.kind.pos, format!("unknown stage kind `{}`", s.kind.value)).fix(fix));
            configured.push(None);
            continue;
        };
        // A source's common options are the core's: split them off before the kind parses.
        let mut fields = s.config.value.to_json();
        let mut source = SourceOptions::default();
        if factory.role() == Role::Source {
            let mut opts = serde_json::Map::new();
            if let Some(m) = fields.as_object_mut() {
                for k in SourceOptions::KEYS {
                    if let Some(v) = m.remove(k) {
                        opts.insert(k.to_string(), v);
                    }
                }
            }
            match serde_path_to_error::deserialize::<_, SourceOptions>(serde_json::Value::Object(opts)) {
                Ok(o) => {
                    let mut problems = Vec::new();
                    o.check(&mut problems);
                    for p in problems {
                        diags.push(cx.diag(s, locate(&s.config, &p.field), p.message).fix(p.fix));
                    }
                    source = o;
                }
                Err(e) => {
                    let path = crate::stage::serde_path(e.path());
                    let (msg, fix) = config_fix(&e.inner().to_string(), &s.kind.value, &[]);
                    diags.push(cx.diag(s, locate(&s.config, &path), msg).fix(fix));
                }
            }
        }
        let extra: &[&str] = if factory.role() == Role::Source { &SourceOptions::KEYS } else { &[] };
        match factory.parse(fields) {
            Ok(c) => {
                let stage_cx = Context {
                    base_dir: cx.base_dir.clone(),
                    seed: cx.spec.seed,
                    stage_id: s.id.value.clone(),
                    run_dir: None,
                    artifacts: Artifacts::default(),
                    source,
                };
                let mut problems = Vec::new();
                c.check(&stage_cx, &mut problems);
                for p in problems {
                    diags.push(cx.diag(s, locate(&s.config, &p.field), p.message).fix(p.fix));
                }
                configured.push(Some((factory.role(), c, source)));
            }
            Err(e) => {
                let (msg, fix) = config_fix(&e.message, &s.kind.value, extra);
                diags.push(cx.diag(s, locate(&s.config, &e.path), msg).fix(fix));
                configured.push(None);
            }
        }
    }
    configured
}

/// Inputs (`input:`/`inputs:`, else the previous stage) and references, each named stage known.
fn resolve_edges(cx: &Cx<'_>, configured: &[Option<Parsed>], diags: &mut Diagnostics) -> Edges {
    let mut inputs: Vec<Vec<usize>> = vec![Vec::new(); cx.spec.stages.len()];
    let mut refs: Vec<Vec<(StageRef, usize)>> = vec![Vec::new(); cx.spec.stages.len()];
    for (i, s) in cx.spec.stages.iter().enumerate() {
        let role = configured[i].as_ref().map(|(r, _, _)| *r);
        match &s.inputs {
            Some(list) => {
                if matches!(role, Some(Role::Source | Role::Task)) && !list.is_empty() {
                    let what = if role == Some(Role::Source) { "a source stage" } else { "this stage" };
                    diags.push(
                        cx.diag(s, list[0].pos, format!("{what} takes no input"))
                            .fix("remove `input`/`inputs` from this stage"),
                    );
                }
                for name in list {
                    match cx.index.get(name.value.as_str()) {
                        Some(&j) => inputs[i].push(j),
                        None => diags.push(
                            cx.diag(s, name.pos, format!("input `{}` is not a stage", name.value))
                                .fix(cx.unknown_stage_fix(&name.value)),
                        ),
                    }
                }
            }
            None if matches!(role, Some(Role::Source | Role::Task) | None) => {}
            None if i == 0 => diags.push(
                cx.diag(s, s.pos, "the first stage needs an input, but it is not a source".into())
                    .fix("start the pipeline with a source stage (e.g. `kind: synthetic_shapes`)"),
            ),
            None => inputs[i].push(i - 1),
        }
        if let Some((_, c, _)) = &configured[i] {
            for r in c.refs() {
                let field_pos = s.config.value.get(&r.field).map_or(s.pos, |n| n.pos);
                match cx.index.get(r.stage.as_str()) {
                    Some(&j) => refs[i].push((r, j)),
                    None => diags.push(
                        cx.diag(s, field_pos, format!("`{}: {}` names no stage", r.field, r.stage))
                            .fix(cx.unknown_stage_fix(&r.stage)),
                    ),
                }
            }
        }
    }
    Edges { inputs, refs }
}

/// No stage depends on its own output, through inputs or artifact references.
fn check_cycles(cx: &Cx<'_>, edges: &Edges, diags: &mut Diagnostics) {
    let (inputs, refs) = (&edges.inputs, &edges.refs);
    let n = cx.spec.stages.len();
    let mut state = vec![0u8; n]; // 0 new, 1 on stack, 2 done
    let mut reported: HashSet<usize> = HashSet::new();
    for start in 0..n {
        if state[start] != 0 {
            continue;
        }
        // Iterative DFS: the stack holds (node, next edge to visit).
        let mut stack = vec![(start, 0usize)];
        state[start] = 1;
        while let Some(&mut (node, ref mut next)) = stack.last_mut() {
            let edges: Vec<usize> =
                inputs[node].iter().copied().chain(refs[node].iter().map(|(_, j)| *j)).collect();
            if *next < edges.len() {
                let to = edges[*next];
                *next += 1;
                match state[to] {
                    0 => {
                        state[to] = 1;
                        stack.push((to, 0));
                    }
                    1 => {
                        let cycle_start = stack.iter().position(|(v, _)| *v == to).unwrap_or(0);
                        let members: Vec<usize> = stack[cycle_start..].iter().map(|(v, _)| *v).collect();
                        if members.iter().all(|m| reported.insert(*m)) {
                            let names: Vec<&str> =
                                members.iter().map(|&m| cx.spec.stages[m].id.value.as_str()).collect();
                            let s = &cx.spec.stages[node];
                            diags.push(
                                cx.diag(s, s.pos, format!("cycle: {} -> {}", names.join(" -> "), names[0]))
                                    .fix("break the loop: a stage cannot depend on its own output"),
                            );
                        }
                    }
                    _ => {}
                }
            } else {
                state[node] = 2;
                stack.pop();
            }
        }
    }
}

/// Port types fit along every edge and reference, one input per stage, no fan-out. Returns each
/// stage's output port.
fn check_ports(
    cx: &Cx<'_>,
    configured: &[Option<Parsed>],
    edges: &Edges,
    diags: &mut Diagnostics,
) -> Vec<Option<PortType>> {
    let (inputs, refs) = (&edges.inputs, &edges.refs);
    let n = cx.spec.stages.len();
    let mut out_ports: Vec<Option<PortType>> = vec![None; n];
    // Resolve `SameAsInput` in file order (inputs usually come first; unresolved ones stay None).
    for _ in 0..2 {
        for i in 0..n {
            let Some((_, c, _)) = &configured[i] else { continue };
            let (_, out) = c.ports();
            out_ports[i] = match out {
                PortType::SameAsInput => inputs[i].first().and_then(|&j| out_ports[j]),
                p => Some(p),
            };
        }
    }
    let mut consumers: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, s) in cx.spec.stages.iter().enumerate() {
        let Some((role, c, _)) = &configured[i] else { continue };
        let (inp, _) = c.ports();
        if *role != Role::Source && inputs[i].len() > 1 {
            diags.push(
                cx.diag(s, s.pos, format!("takes one input, {} given", inputs[i].len()))
                    .fix("give it a single `input:`"),
            );
        }
        for &j in &inputs[i] {
            consumers.entry(j).or_default().push(i);
            if let Some(p) = out_ports[j] {
                if !p.fits(inp) {
                    diags.push(
                        cx.diag(
                            s,
                            s.kind.pos,
                            format!(
                                "port type mismatch: `{}` takes {inp}, but its input '{}' gives {p}",
                                s.kind.value, cx.spec.stages[j].id.value
                            ),
                        )
                        .fix(match (p, inp) {
                            (PortType::Encoded, PortType::Views) => {
                                "insert a `decode` stage before it".to_string()
                            }
                            _ => {
                                "reorder the stages or set `input:` to a stage of the right type".to_string()
                            }
                        }),
                    );
                }
            }
        }
        for (r, j) in &refs[i] {
            if let Some(p) = out_ports[*j] {
                if !p.fits(r.expects) {
                    let pos = s.config.value.get(&r.field).map_or(s.pos, |n| n.pos);
                    diags.push(
                        cx.diag(
                            s,
                            pos,
                            format!(
                                "`{}: {}` must name a stage giving {}, but it gives {p}",
                                r.field, r.stage, r.expects
                            ),
                        )
                        .fix("point it at the right stage"),
                    );
                }
            }
        }
    }
    for (j, cs) in &consumers {
        if cs.len() > 1 {
            let s = &cx.spec.stages[cs[1]];
            let others: Vec<&str> = cs.iter().map(|&c| cx.spec.stages[c].id.value.as_str()).collect();
            diags.push(
                cx.diag(
                    s,
                    s.pos,
                    format!(
                        "stage '{}' feeds several stages ({}); fan-out is not supported yet",
                        cx.spec.stages[*j].id.value,
                        others.join(", ")
                    ),
                )
                .fix("give each branch its own source stage"),
            );
        }
    }
    out_ports
}

/// The plan of a spec that passed every check.
fn assemble(
    spec: PipelineSpec,
    configured: Vec<Option<Parsed>>,
    edges: Edges,
    out_ports: Vec<Option<PortType>>,
) -> Plan {
    let Edges { inputs, refs } = edges;
    let stages = spec
        .stages
        .iter()
        .zip(configured)
        .enumerate()
        .filter_map(|(i, (s, c))| {
            let (role, config, source) = c?;
            let (input_port, _) = config.ports();
            Some(PlannedStage {
                id: s.id.value.clone(),
                kind: s.kind.value.clone(),
                role,
                config,
                inputs: inputs[i].clone(),
                refs: refs[i].clone(),
                input_port,
                output_port: out_ports[i].unwrap_or(PortType::Nothing),
                workers: s.workers,
                name: s.name.clone(),
                capacity: s.capacity,
                pos: s.pos,
                fields: s.config.clone(),
                source,
            })
        })
        .collect();
    Plan { spec, stages }
}
