//! The pipeline file: top-level fields, the stage list, and command-line overrides.

use std::path::{Path, PathBuf};

use crate::error::{Diagnostic, Diagnostics};
use crate::yaml::{self, Node, Pos, Spanned};

/// Keys every stage may carry besides its kind's own fields.
pub const COMMON_STAGE_KEYS: &[&str] = &["id", "kind", "name", "input", "inputs", "workers", "capacity"];
const TOP_KEYS: &[&str] =
    &["name", "seed", "plugins", "stages", "sweep", "fuse", "chunk", "profiles", "profile"];

/// One entry of `stages:` with its common keys split off.
#[derive(Clone, Debug)]
pub struct StageSpec {
    pub id: Spanned<String>,
    pub kind: Spanned<String>,
    /// Explicit `input`/`inputs`; `None` means "the previous stage".
    pub inputs: Option<Vec<Spanned<String>>>,
    pub workers: Option<usize>,
    pub capacity: Option<usize>,
    /// What reports call the stage's data (`name:`; a source's dataset name), if given.
    pub name: Option<String>,
    /// The kind's own fields, as a mapping.
    pub config: Spanned<Node>,
    pub pos: Pos,
}

/// One entry of `plugins:`: a library path (or bare name), loaded in-process unless isolated.
#[derive(Clone, Debug, PartialEq)]
pub struct PluginEntry {
    pub path: String,
    /// `isolate: process`: the plugin's stages run in helper processes, so that a crash or a
    /// hang fails (or skips) one sample instead of killing the run.
    pub isolate: bool,
    /// Longest a call of an isolated plugin may take (seconds).
    pub timeout_s: f64,
}

/// The default `timeout_s` of an isolated plugin.
pub const PLUGIN_TIMEOUT_S: f64 = 10.0;

/// A pipeline file, parsed but not yet checked against the registry.
#[derive(Clone, Debug)]
pub struct PipelineSpec {
    pub file: PathBuf,
    pub name: String,
    pub seed: u64,
    pub plugins: Vec<Spanned<PluginEntry>>,
    pub stages: Vec<StageSpec>,
    pub sweep: Option<Spanned<Node>>,
    /// Run consecutive per-sample stages in one worker loop (same output, less overhead).
    pub fuse: bool,
    /// Samples per channel message; `None` picks automatically.
    pub chunk: Option<usize>,
    /// The document the spec came from (after overrides), for `graph` and the run directory.
    pub doc: Spanned<Node>,
}

/// Reads and parses a pipeline file.
pub fn load(file: &Path, overrides: &[String]) -> Result<PipelineSpec, Diagnostics> {
    let src = std::fs::read_to_string(file).map_err(|e| {
        Diagnostics(vec![Diagnostic::new(
            file,
            Pos { line: 1, col: 1 },
            format!("cannot read the pipeline file: {e}"),
        )
        .fix("check the path and that the file is readable UTF-8 text")])
    })?;
    parse(file, &src, overrides)
}

/// Parses pipeline YAML text, as if read from `file`, applying `--set` overrides first.
pub fn parse(file: &Path, src: &str, overrides: &[String]) -> Result<PipelineSpec, Diagnostics> {
    let mut doc = yaml::parse(src).map_err(|e| {
        Diagnostics(vec![Diagnostic::new(file, e.pos, format!("invalid YAML: {}", e.message))
            .fix("fix the YAML syntax at this position")])
    })?;
    let mut diags = Diagnostics::default();
    // `profile=NAME` first, then the profile's changes, then the other overrides: a `--set`
    // can adjust what a profile set.
    let is_profile = |o: &str| o.split_once('=').is_some_and(|(k, _)| k.trim() == "profile");
    for pass in [true, false] {
        for (i, o) in overrides.iter().enumerate().filter(|(_, o)| is_profile(o) == pass) {
            if let Err(msg) = apply_override(&mut doc, o) {
                diags.push(
                    Diagnostic::new("--set", Pos { line: 1, col: i as u32 + 1 }, format!("`{o}`: {}", msg.0))
                        .fix(msg.1),
                );
            }
        }
        if pass {
            apply_profile(file, &mut doc, &mut diags, overrides.iter().any(|o| is_profile(o)));
        }
    }
    let spec = from_doc(file, doc, &mut diags);
    diags.into_result(spec)
}

/// Applies the changes of the profile named by the top-level `profile:` key (usually set from
/// the command line: `--set profile=cifar10`) from the `profiles:` section, in order, with the
/// same meaning as a sweep variant's changes. The key is then cleared, so the resolved pipeline
/// does not apply them twice.
fn apply_profile(file: &Path, doc: &mut Spanned<Node>, diags: &mut Diagnostics, from_cli: bool) {
    let Node::Map(top) = &doc.value else { return };
    let (name, name_pos) = match top.iter().find(|(k, _)| k.value == "profile") {
        None => return,
        Some((_, v)) => match &v.value {
            Node::Null => return,
            Node::Str(s) => (s.clone(), v.pos),
            other => {
                diags.push(
                    Diagnostic::new(
                        file,
                        v.pos,
                        format!("`profile` must be a name, found {}", other.type_name()),
                    )
                    .fix("write e.g. `--set profile=cifar10`"),
                );
                return;
            }
        },
    };
    let profiles: Vec<(Spanned<String>, Spanned<Node>)> =
        match top.iter().find(|(k, _)| k.value == "profiles") {
            Some((_, Spanned { value: Node::Map(m), .. })) => m.clone(),
            _ => Vec::new(),
        };
    let names: Vec<&str> = profiles.iter().map(|(k, _)| k.value.as_str()).collect();
    let Some((_, changes)) = profiles.iter().find(|(k, _)| k.value == name) else {
        let fix = if names.is_empty() {
            "this file has no `profiles:` section; remove `profile`".to_string()
        } else {
            format!("name one of: {}", names.join(", "))
        };
        // A name from the command line has no position in the file.
        let d = if from_cli {
            Diagnostic::new(
                "--set",
                Pos { line: 1, col: 1 },
                format!("no profile `{name}` in {}", file.display()),
            )
        } else {
            Diagnostic::new(file, name_pos, format!("no profile `{name}`"))
        };
        diags.push(d.fix(fix));
        return;
    };
    let Node::Map(changes) = &changes.value else {
        diags.push(
            Diagnostic::new(file, changes.pos, format!("profile `{name}` must be a mapping of changes"))
                .fix("write e.g. `cifar10: {train.stem: cifar, data: {kind: cifar10, path: DIR}}`"),
        );
        return;
    };
    for (target, value) in changes.clone() {
        if let Err((msg, fix)) = apply_change(doc, &target.value, value, Some(target.pos)) {
            diags.push(
                Diagnostic::new(file, target.pos, format!("profile `{name}`: `{}`: {msg}", target.value))
                    .fix(fix),
            );
        }
    }
    if let Node::Map(top) = &mut doc.value {
        if let Some((_, v)) = top.iter_mut().find(|(k, _)| k.value == "profile") {
            v.value = Node::Null;
        }
    }
}

/// Reads a pipeline document (overrides already applied) into a spec, reporting problems of
/// its shape (not yet of its stages' kinds) into `diags`.
pub fn from_doc(file: &Path, doc: Spanned<Node>, diags: &mut Diagnostics) -> PipelineSpec {
    let d = |pos: Pos, msg: String| Diagnostic::new(file, pos, msg);
    let mut spec = PipelineSpec {
        file: file.to_path_buf(),
        name: file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "pipeline".into()),
        seed: 0,
        plugins: Vec::new(),
        stages: Vec::new(),
        sweep: None,
        fuse: true,
        chunk: None,
        doc: doc.clone(),
    };
    let Node::Map(entries) = &doc.value else {
        diags.push(
            d(doc.pos, format!("a pipeline file is a mapping, found {}", doc.value.type_name()))
                .fix("start with `name:`, `seed:` and `stages:`"),
        );
        return spec;
    };
    let mut saw_stages = false;
    for (key, value) in entries {
        match key.value.as_str() {
            "name" => match &value.value {
                Node::Str(s) if !s.is_empty() => spec.name = s.clone(),
                other => diags.push(
                    d(value.pos, format!("`name` must be a non-empty string, found {}", other.type_name()))
                        .fix("write e.g. `name: simclr-cifar10`"),
                ),
            },
            "seed" => match &value.value {
                Node::Int(i) if *i >= 0 => spec.seed = *i as u64,
                other => diags.push(
                    d(
                        value.pos,
                        format!("`seed` must be a non-negative integer, found {}", other.type_name()),
                    )
                    .fix("write e.g. `seed: 42`"),
                ),
            },
            "fuse" => match &value.value {
                Node::Bool(b) => spec.fuse = *b,
                other => diags.push(
                    d(value.pos, format!("`fuse` must be true or false, found {}", other.type_name()))
                        .fix("write `fuse: true` (the default) or `fuse: false`"),
                ),
            },
            "chunk" => match &value.value {
                Node::Int(i) if (1..=4096).contains(i) => spec.chunk = Some(*i as usize),
                _ => diags.push(
                    d(value.pos, "`chunk` must be an integer from 1 to 4096".into())
                        .fix("remove it to choose automatically"),
                ),
            },
            "plugins" => match &value.value {
                Node::Seq(items) => {
                    for item in items {
                        match &item.value {
                            Node::Str(s) => spec.plugins.push(Spanned::new(
                                PluginEntry { path: s.clone(), isolate: false, timeout_s: PLUGIN_TIMEOUT_S },
                                item.pos,
                            )),
                            Node::Map(fields) => {
                                if let Some(e) = plugin_entry(fields, item.pos, &d, diags) {
                                    spec.plugins.push(Spanned::new(e, item.pos));
                                }
                            }
                            other => diags.push(
                                d(
                                    item.pos,
                                    format!("a plugin is a library path, found {}", other.type_name()),
                                )
                                .fix("write e.g. `plugins: [target/release/libmy_plugin.so]`, or `{ path: libmy_plugin.so, isolate: process, timeout_s: 10 }`"),
                            ),
                        }
                    }
                }
                Node::Null => {}
                other => diags.push(
                    d(value.pos, format!("`plugins` must be a list of paths, found {}", other.type_name()))
                        .fix("write e.g. `plugins: [target/release/libmy_plugin.so]`"),
                ),
            },
            "sweep" => spec.sweep = Some(value.clone()),
            // Applied before this point (`apply_profile`).
            "profiles" | "profile" => {}
            "stages" => {
                saw_stages = true;
                match &value.value {
                    Node::Seq(items) if !items.is_empty() => {
                        for item in items {
                            if let Some(stage) = stage_spec(file, item, diags) {
                                spec.stages.push(stage);
                            }
                        }
                    }
                    other => diags.push(
                        d(
                            value.pos,
                            format!("`stages` must be a non-empty list, found {}", other.type_name()),
                        )
                        .fix("list stages as `- {id: data, kind: ...}`"),
                    ),
                }
            }
            other => {
                let hint = match crate::suggest(other, TOP_KEYS.iter().copied()) {
                    Some(s) => format!("did you mean `{s}`? the top-level keys are {}", TOP_KEYS.join(", ")),
                    None => format!("the top-level keys are {}", TOP_KEYS.join(", ")),
                };
                diags.push(d(key.pos, format!("unknown top-level key `{other}`")).fix(hint));
            }
        }
    }
    if !saw_stages {
        diags.push(d(doc.pos, "no `stages:` list".into()).fix("add `stages:` with at least a source stage"));
    }
    spec
}

fn stage_spec(file: &Path, item: &Spanned<Node>, diags: &mut Diagnostics) -> Option<StageSpec> {
    let Node::Map(entries) = &item.value else {
        diags.push(
            Diagnostic::new(
                file,
                item.pos,
                format!("a stage is a mapping, found {}", item.value.type_name()),
            )
            .fix("write `- {id: NAME, kind: KIND, ...}`"),
        );
        return None;
    };
    let id = match item.value.get("id") {
        Some(Spanned { value: Node::Str(s), pos }) if valid_id(s) => Spanned::new(s.clone(), *pos),
        Some(v) => {
            diags.push(
                Diagnostic::new(file, v.pos, "invalid stage id")
                    .fix("use letters, digits, `_` and `-`, starting with a letter, e.g. `id: crop`"),
            );
            return None;
        }
        None => {
            diags.push(Diagnostic::new(file, item.pos, "stage without an `id`").fix("add e.g. `id: crop`"));
            return None;
        }
    };
    let stage_diag = |pos: Pos, msg: String| Diagnostic::new(file, pos, msg).stage(id.value.clone());
    let kind = match item.value.get("kind") {
        Some(Spanned { value: Node::Str(s), pos }) => Spanned::new(s.clone(), *pos),
        // YAML reads a plain `null` as the null value; here it names the `null` sink.
        Some(Spanned { value: Node::Null, pos }) => Spanned::new("null".to_string(), *pos),
        Some(v) => {
            diags.push(
                stage_diag(v.pos, "`kind` must be a stage kind name".into())
                    .fix("run `simclr kinds` to list them"),
            );
            return None;
        }
        None => {
            diags.push(
                stage_diag(item.pos, "stage without a `kind`".into())
                    .fix("add e.g. `kind: random_resized_crop`"),
            );
            return None;
        }
    };
    let mut inputs = None;
    let list = |v: &Spanned<Node>, diags: &mut Diagnostics| -> Vec<Spanned<String>> {
        let items: Vec<&Spanned<Node>> = match &v.value {
            Node::Seq(items) => items.iter().collect(),
            _ => vec![v],
        };
        let mut out = Vec::new();
        for it in items {
            match &it.value {
                Node::Str(s) => out.push(Spanned::new(s.clone(), it.pos)),
                other => diags.push(
                    stage_diag(it.pos, format!("an input is a stage id, found {}", other.type_name()))
                        .fix("write `input: ID` or `inputs: [ID, ...]`"),
                ),
            }
        }
        out
    };
    if let Some(v) = item.value.get("input") {
        inputs = Some(list(v, diags));
    }
    if let Some(v) = item.value.get("inputs") {
        if inputs.is_some() {
            diags.push(stage_diag(v.pos, "both `input` and `inputs` given".into()).fix("keep one"));
        }
        inputs = Some(list(v, diags));
    }
    let count = |key: &str, diags: &mut Diagnostics| -> Option<usize> {
        let v = item.value.get(key)?;
        match &v.value {
            Node::Int(i) if (1..=1024).contains(i) => Some(*i as usize),
            Node::Str(s) if s == "auto" => None,
            _ => {
                diags.push(
                    stage_diag(v.pos, format!("`{key}` must be an integer from 1 to 1024 or `auto`"))
                        .fix(format!("remove `{key}` to size it automatically")),
                );
                None
            }
        }
    };
    let workers = count("workers", diags);
    let capacity = count("capacity", diags);
    let name = item.value.get("name").and_then(|v| match &v.value {
        Node::Str(s) if !s.trim().is_empty() => Some(s.clone()),
        _ => {
            diags
                .push(stage_diag(v.pos, "`name` must be a non-empty string".to_string()).fix(
                    "name the data as reports should show it, e.g. `name: my-photos`, or remove `name`",
                ));
            None
        }
    });
    let config = Node::Map(
        entries.iter().filter(|(k, _)| !COMMON_STAGE_KEYS.contains(&k.value.as_str())).cloned().collect(),
    );
    Some(StageSpec {
        id,
        kind,
        inputs,
        workers,
        capacity,
        name,
        config: Spanned::new(config, item.pos),
        pos: item.pos,
    })
}

/// Stage ids are used in `--set`, file names and graph labels.
pub fn valid_id(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Applies one `--set` override to the document: `STAGE.FIELD[.SUB]=VALUE`, `STAGE=off`,
/// `STAGE={kind: ..., ...}` (a swap), or a top-level `KEY=VALUE`. Errors are (what, how to fix).
pub fn apply_override(doc: &mut Spanned<Node>, o: &str) -> Result<(), (String, String)> {
    let Some((lhs, rhs)) = o.split_once('=') else {
        return Err(("missing `=`".into(), "write `--set STAGE.FIELD=VALUE` or `--set STAGE=off`".into()));
    };
    let value = yaml::parse_value(rhs)
        .map_err(|e| (format!("the value is not valid YAML: {}", e.message), "quote it".into()))?;
    // A command-line value has no place in the file: it takes the position of what it replaces.
    apply_change(doc, lhs, Spanned::new(value, Pos::default()), None)
}

/// Applies one change to a pipeline document, as `--set` and sweep variants do:
/// - `STAGE.FIELD[.SUB]` = value: sets a field of a stage (creating mappings on the way);
/// - `STAGE` = `off` (or `false`): removes the stage (the next stage then takes its input);
/// - `STAGE` = `{kind: ..., ...}`: swaps the whole stage for another, keeping its id, its
///   position in the list and its `input`/`inputs`/`workers`/`capacity` unless given;
/// - `KEY` = value for a top-level key (`seed`, `name`, `fuse`, `chunk`, ...).
///
/// `at` is where the change is written (the position of `target`), for a change written in the
/// file (a sweep variant): the changed key gets that position and the value keeps its own, so
/// errors point at the change. With `None` (a value from the command line) the new value takes
/// the position of the value it replaces. Errors are (what, how to fix).
pub fn apply_change(
    doc: &mut Spanned<Node>,
    target: &str,
    value: Spanned<Node>,
    at: Option<Pos>,
) -> Result<(), (String, String)> {
    let mut path = target.split('.');
    let head = path.next().unwrap_or_default();
    let rest: Vec<&str> = path.collect();
    if rest.iter().any(|s| s.is_empty()) || head.is_empty() {
        return Err((
            format!("`{target}` is not a path"),
            "write `STAGE.FIELD`, `STAGE.FIELD.SUB` or `STAGE`".into(),
        ));
    }
    let Node::Map(top) = &mut doc.value else {
        return Err(("the pipeline file is not a mapping".into(), "fix the file first".into()));
    };
    let ids: Vec<String> = stage_ids(top);
    if ids.iter().any(|id| id == head) {
        let stages = top
            .iter_mut()
            .find(|(k, _)| k.value == "stages")
            .and_then(|(_, v)| match &mut v.value {
                Node::Seq(items) => Some(items),
                _ => None,
            })
            .ok_or_else(|| ("no stages list".to_string(), "add `stages:`".to_string()))?;
        let idx = stages
            .iter()
            .position(|s| s.value.get("id").and_then(|n| n.value.as_str()) == Some(head))
            .ok_or_else(|| ("stage vanished".to_string(), String::new()))?;
        if rest.is_empty() {
            return match value.value {
                Node::Str(s) if s == "off" => {
                    stages.remove(idx);
                    Ok(())
                }
                Node::Bool(false) => {
                    stages.remove(idx);
                    Ok(())
                }
                Node::Map(entries) if entries.iter().any(|(k, _)| k.value == "kind") => {
                    let pos = if at.is_none() { stages[idx].pos } else { value.pos };
                    stages[idx] = swapped(&stages[idx], head, entries, pos)?;
                    Ok(())
                }
                _ => Err((
                    format!(
                        "a whole stage can only be switched `off` or swapped, not set to {}",
                        describe(&value.value)
                    ),
                    format!(
                        "write `{head}: off`, `{head}: {{kind: KIND, ...}}` (a swap) or `{head}.FIELD: VALUE`"
                    ),
                )),
            };
        }
        let stage_pos = stages[idx].pos;
        set_path(&mut stages[idx], &rest, value, stage_pos, at);
        return Ok(());
    }
    if (rest.is_empty() || head == "sweep") && TOP_KEYS.contains(&head) && head != "stages" {
        // `sweep.metrics=[...]` reaches into the sweep section; other top-level keys are scalars.
        let pos = doc.pos;
        let path: Vec<&str> = std::iter::once(head).chain(rest.iter().copied()).collect();
        set_path(doc, &path, value, pos, at);
        return Ok(());
    }
    let fix = match crate::suggest(head, ids.iter().map(String::as_str)) {
        Some(s) => format!("did you mean `{s}`? stages: {}", ids.join(", ")),
        None => format!("stages: {}", ids.join(", ")),
    };
    Err((format!("no stage `{head}`"), fix))
}

/// The stage that replaces `old` in a swap: `entries` with the old id, and the old wiring and
/// threading keys where `entries` does not give them.
fn swapped(
    old: &Spanned<Node>,
    id: &str,
    entries: Vec<(Spanned<String>, Spanned<Node>)>,
    pos: Pos,
) -> Result<Spanned<Node>, (String, String)> {
    if let Some((_, v)) = entries.iter().find(|(k, _)| k.value == "id") {
        if v.value.as_str() != Some(id) {
            return Err((
                format!("a swap keeps the stage id `{id}`"),
                "leave `id` out of the new stage".into(),
            ));
        }
    }
    let mut out: Vec<(Spanned<String>, Spanned<Node>)> = Vec::with_capacity(entries.len() + 2);
    match old.value.key_pos("id").zip(old.value.get("id")) {
        Some((kpos, v)) => out.push((Spanned::new("id".into(), kpos), v.clone())),
        None => out.push((Spanned::new("id".into(), pos), Spanned::new(Node::Str(id.into()), pos))),
    }
    let gives_input = entries.iter().any(|(k, _)| k.value == "input" || k.value == "inputs");
    if let Node::Map(old_entries) = &old.value {
        for (k, v) in old_entries {
            let keep = match k.value.as_str() {
                "input" | "inputs" => !gives_input,
                "workers" | "capacity" | "name" => !entries.iter().any(|(e, _)| e.value == k.value),
                _ => false,
            };
            if keep {
                out.push((k.clone(), v.clone()));
            }
        }
    }
    out.extend(entries.into_iter().filter(|(k, _)| k.value != "id"));
    Ok(Spanned::new(Node::Map(out), pos))
}

/// A value as a short flow-YAML text, for messages and reports.
pub fn describe(node: &Node) -> String {
    match node {
        Node::Null => "null".into(),
        Node::Bool(b) => b.to_string(),
        Node::Int(i) => i.to_string(),
        Node::Float(f) => {
            if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e15 {
                format!("{f:.1}")
            } else {
                f.to_string()
            }
        }
        Node::Str(s) => {
            let plain = !s.is_empty()
                && s.chars().all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
                && matches!(crate::yaml::parse_value(s), Ok(Node::Str(_)));
            if plain {
                s.clone()
            } else {
                format!("{s:?}")
            }
        }
        Node::Seq(items) => {
            format!("[{}]", items.iter().map(|i| describe(&i.value)).collect::<Vec<_>>().join(", "))
        }
        Node::Map(entries) => format!(
            "{{{}}}",
            entries
                .iter()
                .map(|(k, v)| format!("{}: {}", k.value, describe(&v.value)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn stage_ids(top: &[(Spanned<String>, Spanned<Node>)]) -> Vec<String> {
    top.iter()
        .find(|(k, _)| k.value == "stages")
        .and_then(|(_, v)| match &v.value {
            Node::Seq(items) => Some(
                items
                    .iter()
                    .filter_map(|s| s.value.get("id").and_then(|n| n.value.as_str()).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .unwrap_or_default()
}

/// Sets a nested key, creating mappings on the way. With `at` (a change written in the file),
/// the set key takes that position and the value keeps its own; without, the new value keeps
/// the position of the value it replaces (so errors still point into the file) or else of its
/// parent.
fn set_path(node: &mut Spanned<Node>, path: &[&str], value: Spanned<Node>, fallback: Pos, at: Option<Pos>) {
    let Some((first, rest)) = path.split_first() else {
        if at.is_none() {
            node.value = value.value;
        } else {
            *node = value;
        }
        return;
    };
    if !matches!(node.value, Node::Map(_)) {
        node.value = Node::Map(Vec::new());
    }
    let Node::Map(entries) = &mut node.value else { return };
    let idx = match entries.iter().position(|(k, _)| k.value == *first) {
        Some(i) => i,
        None => {
            let pos = at.unwrap_or(fallback);
            entries.push((Spanned::new(first.to_string(), pos), Spanned::new(Node::Null, pos)));
            entries.len() - 1
        }
    };
    if let (Some(at), true) = (at, rest.is_empty()) {
        entries[idx].0.pos = at;
    }
    let child = &mut entries[idx].1;
    let pos = child.pos;
    set_path(child, rest, value, pos, at);
}

/// A `plugins:` entry written as a mapping: `{ path: P, isolate: process | none, timeout_s: S }`.
fn plugin_entry(
    fields: &[(Spanned<String>, Spanned<Node>)],
    pos: Pos,
    d: &dyn Fn(Pos, String) -> Diagnostic,
    diags: &mut Diagnostics,
) -> Option<PluginEntry> {
    let mut entry = PluginEntry { path: String::new(), isolate: false, timeout_s: PLUGIN_TIMEOUT_S };
    let mut ok = true;
    let mut has_path = false;
    for (key, value) in fields {
        match (key.value.as_str(), &value.value) {
            ("path", Node::Str(s)) => {
                entry.path = s.clone();
                has_path = true;
            }
            ("isolate", Node::Str(s)) if s == "process" || s == "none" => entry.isolate = s == "process",
            ("timeout_s", Node::Int(i)) if (1..=86_400).contains(i) => entry.timeout_s = *i as f64,
            ("timeout_s", Node::Float(f)) if *f > 0.0 && *f <= 86_400.0 => entry.timeout_s = *f,
            ("path", _) => {
                ok = false;
                diags.push(
                    d(value.pos, "`path` must be the plugin library's path".into())
                        .fix("write e.g. `path: ./libmy_plugin.so`"),
                );
            }
            ("isolate", _) => {
                ok = false;
                diags.push(
                    d(value.pos, "`isolate` must be `process` or `none`".into())
                        .fix("write `isolate: process` to run the plugin in helper processes"),
                );
            }
            ("timeout_s", _) => {
                ok = false;
                diags.push(
                    d(value.pos, "`timeout_s` must be a positive number of seconds, at most 86400".into())
                        .fix("write e.g. `timeout_s: 10`"),
                );
            }
            (other, _) => {
                ok = false;
                diags.push(
                    d(key.pos, format!("unknown field `{other}` in a plugin entry"))
                        .fix("a plugin entry has `path`, `isolate` and `timeout_s`"),
                );
            }
        }
    }
    if !has_path {
        ok = false;
        diags.push(
            d(pos, "a plugin entry needs a `path`".into())
                .fix("write e.g. `{ path: ./libmy_plugin.so, isolate: process }`"),
        );
    }
    ok.then_some(entry)
}

#[cfg(test)]
mod profile_tests {
    use super::*;

    const SRC: &str = "name: p\nprofiles:\n  big:\n    crop.size: 64\n    blur: off\n    data: {kind: counter, count: 9}\nstages:\n  - { id: data, kind: synthetic_shapes }\n  - { id: crop, kind: random_resized_crop, size: 32 }\n  - { id: blur, kind: gaussian_blur }\n";

    #[test]
    fn a_profile_applies_its_changes_once() {
        let plain = parse(Path::new("p.yaml"), SRC, &[]).unwrap();
        assert_eq!(plain.stages.len(), 3);
        let spec = parse(Path::new("p.yaml"), SRC, &["profile=big".to_string()]).unwrap();
        let kinds: Vec<&str> = spec.stages.iter().map(|s| s.kind.value.as_str()).collect();
        assert_eq!(kinds, ["counter", "random_resized_crop"]);
        assert!(matches!(spec.stages[1].config.value.get("size").map(|n| &n.value), Some(Node::Int(64))));
        // The resolved document no longer names the profile: running it again changes nothing.
        let again = crate::yaml::parse(&serde_json::to_string(&spec.doc.value.to_json()).unwrap()).unwrap();
        assert!(matches!(again.value.get("profile").map(|n| &n.value), Some(Node::Null)));
    }

    #[test]
    fn an_unknown_profile_lists_the_known_ones() {
        let e = parse(Path::new("p.yaml"), SRC, &["profile=huge".to_string()]).unwrap_err().to_string();
        assert!(
            e.contains("no profile `huge`") && e.contains("name one of: big") && e.starts_with("--set"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod plugin_entry_tests {
    use super::*;

    fn spec(plugins: &str) -> Result<PipelineSpec, String> {
        let src =
            format!("name: p\nplugins:\n{plugins}stages:\n  - {{ id: data, kind: synthetic_shapes }}\n");
        parse(Path::new("p.yaml"), &src, &[]).map_err(|e| e.to_string())
    }

    #[test]
    fn entries_are_paths_or_mappings_with_isolation() {
        let s = spec("  - ./liba.so\n  - { path: b, isolate: process, timeout_s: 2.5 }\n  - { path: c, isolate: none }\n")
            .unwrap();
        let got: Vec<(&str, bool, f64)> =
            s.plugins.iter().map(|p| (p.value.path.as_str(), p.value.isolate, p.value.timeout_s)).collect();
        assert_eq!(
            got,
            [("./liba.so", false, PLUGIN_TIMEOUT_S), ("b", true, 2.5), ("c", false, PLUGIN_TIMEOUT_S)]
        );
    }

    #[test]
    fn a_bad_entry_is_located_and_says_the_fix() {
        let e = spec("  - { path: b, isolate: yes, timeout_s: -1, colour: red }\n  - { isolate: process }\n")
            .unwrap_err();
        assert!(e.contains("p.yaml:3:") && e.contains("`isolate` must be `process` or `none`"), "{e}");
        assert!(e.contains("`timeout_s` must be a positive number"), "{e}");
        assert!(
            e.contains("unknown field `colour`") && e.contains("`path`, `isolate` and `timeout_s`"),
            "{e}"
        );
        assert!(e.contains("p.yaml:4:") && e.contains("needs a `path`"), "{e}");
    }
}
