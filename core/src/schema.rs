//! The JSON Schema (draft 2020-12) of a pipeline file, for editors: `simclr schema`.
//!
//! Each stage kind's config schema is generated from its config type (schemars, honouring the
//! serde attributes: `deny_unknown_fields`, renames, defaults; doc comments become
//! descriptions), so it cannot drift from what the parser accepts; plugin kinds contribute the
//! schema their library ships. A stage is a `oneOf` over the kinds, each keyed on a `kind`
//! constant and extended with the keys every stage takes (`id`, `input`, `workers`, ...).

use serde_json::{json, Map, Value};

use crate::stage::Registry;

/// `$id` of the schema (the file shipped in the repository).
pub const SCHEMA_ID: &str = "https://example.invalid/simclr/schema/pipeline.schema.json";

/// The keys every stage takes besides its kind's own (see `spec::COMMON_STAGE_KEYS`).
fn common_keys() -> Map<String, Value> {
    let id = json!({
        "type": "string",
        "pattern": "^[A-Za-z][A-Za-z0-9_-]*$",
        "description": "The stage's name, unique in the file: other stages refer to it (`input:`, `encoder:`), `--set ID.FIELD=VALUE` overrides its fields."
    });
    let mut m = Map::new();
    m.insert("id".into(), id);
    m.insert("name".into(), json!({"type": "string", "description": "What reports call this source's data (default: a folder's name, else the stage id)."}));
    m.insert("input".into(), json!({"type": "string", "description": "The stage feeding this one (default: the previous stage in the list)."}));
    m.insert("inputs".into(), json!({"type": "array", "items": {"type": "string"}, "description": "Several input stages, for stages that take more than one."}));
    m.insert("workers".into(), json!({"type": "integer", "minimum": 1, "description": "Worker threads of this stage alone (it then runs in its own segment; default: a share of --threads)."}));
    m.insert("capacity".into(), json!({"type": "integer", "minimum": 1, "description": "Chunks its output channel holds (default: twice its workers)."}));
    m
}

/// One kind's stage schema: its config schema with `kind` fixed and the common keys added.
fn stage_schema(kind: &str, about: &str, config: Value) -> Value {
    let mut s = match config {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    // A kind without fields may come out as `true`/`{}` or with `type: "null"` (a unit struct).
    s.insert("type".into(), json!("object"));
    let props = s.entry("properties").or_insert_with(|| json!({}));
    if let Value::Object(p) = props {
        // `kind: null` reads as YAML's null; the parser takes it for the `null` kind.
        let mut k = if kind == "null" { json!({"enum": ["null", null]}) } else { json!({"const": kind}) };
        k["description"] = json!(about);
        p.insert("kind".into(), k);
        for (k, v) in common_keys() {
            p.entry(k).or_insert(v);
        }
    }
    let mut required: Vec<Value> = vec![json!("id"), json!("kind")];
    if let Some(Value::Array(r)) = s.get("required") {
        required.extend(r.iter().filter(|v| *v != "id" && *v != "kind").cloned());
    }
    s.insert("required".into(), Value::Array(required));
    s.insert("additionalProperties".into(), json!(false));
    s.insert("title".into(), json!(kind));
    s.entry("description").or_insert_with(|| json!(about));
    Value::Object(s)
}

/// The schema of a pipeline file whose stages may be any kind of `registry`.
pub fn pipeline_schema(registry: &Registry) -> Value {
    let mut generator = schemars::generate::SchemaSettings::draft2020_12().into_generator();
    let mut kinds: Vec<_> = registry.kinds().collect();
    kinds.sort_by(|a, b| a.kind().cmp(b.kind()));
    let source_options =
        <crate::stage::SourceOptions as schemars::JsonSchema>::json_schema(&mut generator).to_value();
    let stages: Vec<Value> = kinds
        .iter()
        .map(|f| {
            let mut config = f.schema(&mut generator);
            // A source's `shuffle`, `limit`, `shard`, `on_error` are the core's (SourceOptions).
            if f.role() == crate::stage::Role::Source {
                if let (Some(Value::Object(props)), Some(Value::Object(opts))) =
                    (config.get_mut("properties"), source_options.get("properties"))
                {
                    for (k, v) in opts {
                        props.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                }
            }
            stage_schema(f.kind(), f.about(), config)
        })
        .collect();
    let mut kind_names: Vec<Value> = kinds.iter().map(|f| json!(f.kind())).collect();
    if kinds.iter().any(|f| f.kind() == "null") {
        kind_names.push(Value::Null);
    }
    let mut defs: Map<String, Value> = generator.take_definitions(true);
    defs.insert(
        "stage".into(),
        json!({
            "description": "One stage: `id`, `kind` and the kind's own fields.",
            "type": "object",
            "required": ["id", "kind"],
            "properties": {"kind": {"enum": kind_names, "description": "The stage kind (`simclr kinds` lists them)."}},
            "oneOf": stages,
        }),
    );
    let mut schema = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "simclr pipeline",
        "description": "A simclr pipeline file: stages that read, augment, batch, train and evaluate (README.md).",
        "type": "object",
        "additionalProperties": false,
        "required": ["stages"],
        "properties": {
            "name": {"type": "string", "description": "Names the run directory (runs/<name>/...; default: the file name)."},
            "seed": {"type": "integer", "minimum": 0, "default": 0, "description": "The pipeline seed: every random draw derives from it (same seed, same bits)."},
            "plugins": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "object", "required": ["path"], "additionalProperties": false, "properties": {"path": {"type": "string", "description": "The library: a path relative to this file, or a bare name looked up in SIMCLR_PLUGIN_PATH."}, "isolate": {"enum": ["process", "none"], "description": "process: run the plugin's kinds in helper processes, so that a crash or a hang fails (or, with the source's on_error: skip, skips) one sample instead of the run."}, "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 86400, "default": 10, "description": "Longest one call of an isolated plugin may take, in seconds."}}}]}, "description": "Plugin libraries adding stage kinds: paths relative to this file, or bare names looked up in SIMCLR_PLUGIN_PATH; `{ path, isolate: process, timeout_s }` runs one in helper processes."},
            "fuse": {"type": "boolean", "default": true, "description": "Run consecutive per-sample stages in one worker loop (same output, less overhead)."},
            "chunk": {"type": ["integer", "null"], "minimum": 1, "description": "Samples per channel message (default: automatic)."},
            "stages": {"type": "array", "items": {"$ref": "#/$defs/stage"}, "description": "The stages, in order: each reads the previous one's output unless it names its `input`."},
            "sweep": {
                "type": "object",
                "description": "Variants of this pipeline for `simclr sweep`: `variants` (name -> changes) or `grid` (axes), `metrics` for the report, `seeds` to run each variant once per seed and report the mean and standard deviation; changes are `STAGE.FIELD: VALUE`, `STAGE: off` or a swap `STAGE: {kind: ..}`."
            },
            "profiles": {"type": "object", "additionalProperties": {"type": "object"}, "description": "Named sets of changes (as a sweep variant's) applied with `--set profile=NAME`."},
            "profile": {"type": ["string", "null"], "description": "The profile to apply (usually set with `--set profile=NAME`)."},
        },
        "$defs": defs,
    });
    tidy_defaults(&mut schema);
    schema
}

/// Writes f32 defaults as written in the source (`0.08`, not `0.07999999821186066`): a default
/// that is exactly an f32 is replaced by the shortest decimal of that f32.
fn tidy_defaults(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k == "default" {
                    shorten_f32(x);
                } else {
                    tidy_defaults(x);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(tidy_defaults),
        _ => {}
    }
}

/// Numbers that are exactly an f32 as that f32's shortest decimal (`0.08`), in place.
pub(crate) fn shorten_f32(x: &mut Value) {
    match x {
        Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64() {
                let g = f as f32;
                if f64::from(g) == f {
                    if let Some(m) = format!("{g}").parse::<f64>().ok().and_then(serde_json::Number::from_f64)
                    {
                        *n = m;
                    }
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(shorten_f32),
        _ => {}
    }
}
