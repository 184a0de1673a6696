//! The plugin host: loads stage plugins (shared libraries speaking the `simclr-plugin` C ABI),
//! checks them, and registers each of their kinds as a [`Factory`].
//!
//! - Where: `plugins:` entries of the pipeline file (paths relative to its folder), and bare
//!   names (no `/`) looked up in the `SIMCLR_PLUGIN_PATH` folders, then the file's folder.
//! - Checks at load: the entry symbol of this ABI major (`simclr_stage_plugin_v1`; another
//!   major's symbol is named in the error), the table's size and minor version, its function
//!   pointers, kind names (no clash with built-ins) and each kind's config JSON Schema (only
//!   the subset this host validates is accepted).
//! - Validation: configs are checked against the schema without running anything; structural
//!   errors (unknown or missing fields, wrong types) come back as [`ConfigError`]s and range
//!   errors as [`Problem`]s, both located at FILE:LINE:COL like built-in kinds. Then the plugin
//!   may reject the config itself (`create` returning `SIMCLR_ERR_CONFIG`).
//! - Running: a plugin kind is a [`Role::Map`] stage between image views that honours `views:`.
//!   Each call gets a seed drawn from the view's random stream; every output is checked (the
//!   declared size, every byte written: out-of-place outputs are pre-filled with a canary);
//!   a failing call stops the run naming the library, the kind and the sample.
//! - Libraries are never unloaded: their code may still be referenced (thread-locals, atexit
//!   handlers, the tables we keep), and unloading buys nothing in a batch process.
//!
//! Plugins are trusted native code running in-process; see `plugins/README.md`.

use std::collections::HashSet;
use std::ffi::{c_char, c_void, CStr, OsStr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rand::RngCore;
use serde_json::{Map, Value};
pub use simclr_plugin::abi;
use simclr_plugin::abi::{CreateFn, DestroyFn, ErrorBuf, OutputSizeFn, ProcessFn, View};

use crate::error::{Diagnostic, Diagnostics, StageError};
use crate::sample::{Image, Payload, Sample};
use crate::spec::PipelineSpec;
use crate::stage::{
    ConfigError, Configured, Context, Factory, MapStage, PortType, Problem, Registry, Role, SampleCtx, Stage,
    StageRef,
};
use crate::yaml::PathSeg;

/// The environment variable listing folders searched for bare plugin names.
pub const SEARCH_PATH_VAR: &str = "SIMCLR_PLUGIN_PATH";
/// Largest output a plugin may declare, in pixels (and per side).
const MAX_OUTPUT_PIXELS: u64 = 1 << 26;
const MAX_SIDE: u32 = 1 << 16;
/// Bytes of the host's error-message buffer.
const ERROR_CAPACITY: usize = 1024;

/// Why a library could not be used: what is wrong, and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadError {
    pub problem: String,
    pub fix: String,
}

impl LoadError {
    fn new(problem: impl Into<String>, fix: impl Into<String>) -> Self {
        LoadError { problem: problem.into(), fix: fix.into() }
    }
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.problem, self.fix)
    }
}

/// One stage kind a plugin provides.
#[derive(Debug)]
pub struct PluginKind {
    pub name: String,
    pub about: String,
    /// The config schema as the plugin wrote it (parsed JSON).
    pub schema: Value,
    pub in_place: bool,
    parsed: Schema,
}

/// A loaded, checked plugin library.
pub struct LoadedPlugin {
    /// The library file (canonical path).
    pub path: PathBuf,
    /// Its file name, for messages.
    pub file_name: String,
    pub name: String,
    pub version: String,
    pub abi_minor: u32,
    /// The `struct_size` the plugin reported.
    pub table_size: u32,
    pub kinds: Vec<PluginKind>,
    create: CreateFn,
    output_size: Option<OutputSizeFn>,
    process: ProcessFn,
    destroy: DestroyFn,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("kinds", &self.kinds.iter().map(|k| &k.name).collect::<Vec<_>>())
            .finish()
    }
}

/// Finds the library a `plugins:` entry names.
///
/// An entry with a `/` is a path, relative to `base_dir` (the pipeline file's folder) unless
/// absolute. A bare name is looked up in each folder of `search_path` (`SIMCLR_PLUGIN_PATH`,
/// colon-separated), then in `base_dir`, as written and as `lib<name>.so` (the platform's
/// library prefix and suffix).
pub fn resolve(entry: &str, base_dir: &Path, search_path: Option<&OsStr>) -> Result<PathBuf, LoadError> {
    let p = Path::new(entry);
    if entry.is_empty() {
        return Err(LoadError::new("empty plugin path", "write the library's path or name"));
    }
    let bare = !entry.contains('/') && !entry.contains(std::path::MAIN_SEPARATOR);
    if !bare {
        let full = if p.is_absolute() { p.to_path_buf() } else { base_dir.join(p) };
        return if full.is_file() {
            Ok(full)
        } else {
            Err(LoadError::new(
                format!("no such file: {}", full.display()),
                "build the plugin first, or fix the path (relative paths start from the pipeline file's folder)",
            ))
        };
    }
    let (prefix, suffix) = (std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    let mut names = vec![entry.to_string()];
    if !entry.ends_with(suffix) {
        if entry.starts_with(prefix) {
            names.push(format!("{entry}{suffix}"));
        }
        names.push(format!("{prefix}{entry}{suffix}"));
    }
    let mut dirs: Vec<PathBuf> = search_path.map(|s| std::env::split_paths(s).collect()).unwrap_or_default();
    dirs.retain(|d| !d.as_os_str().is_empty());
    dirs.push(base_dir.to_path_buf());
    for d in &dirs {
        for n in &names {
            let c = d.join(n);
            if c.is_file() {
                return Ok(c);
            }
        }
    }
    let searched = search_path.map(|s| s.to_string_lossy().into_owned()).filter(|s| !s.is_empty());
    Err(LoadError::new(
        format!(
            "not found: looked for {} in {}the pipeline file's folder",
            names.join(", "),
            match &searched {
                Some(s) => format!("{SEARCH_PATH_VAR} ({s}) and "),
                None => format!("{SEARCH_PATH_VAR} (not set) and "),
            }
        ),
        format!(
            "set {SEARCH_PATH_VAR} to the folder holding it, or write a path such as ./{}",
            names.last().map_or(entry, String::as_str)
        ),
    ))
}

/// Libraries loaded so far, by canonical path: loading is idempotent.
static LOADED: Mutex<Vec<Arc<LoadedPlugin>>> = Mutex::new(Vec::new());

/// Loads and checks a plugin library (once per process; it is never unloaded).
pub fn load(path: &Path) -> Result<Arc<LoadedPlugin>, LoadError> {
    let canonical = path.canonicalize().map_err(|e| {
        LoadError::new(format!("cannot open {}: {e}", path.display()), "check the path and its permissions")
    })?;
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = loaded.iter().find(|p| p.path == canonical) {
        return Ok(p.clone());
    }
    let plugin = Arc::new(load_uncached(&canonical)?);
    loaded.push(plugin.clone());
    Ok(plugin)
}

fn open_library(path: &Path) -> Result<libloading::Library, libloading::Error> {
    // RTLD_NOW: a library with unresolved symbols fails here, not in the middle of a run.
    #[cfg(unix)]
    {
        use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
        unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }.map(Into::into)
    }
    #[cfg(not(unix))]
    {
        unsafe { libloading::Library::new(path) }
    }
}

const REBUILD: &str = "rebuild it against this simclr's plugins/sdk (Rust) or include/simclr_plugin.h (C)";

fn load_uncached(path: &Path) -> Result<LoadedPlugin, LoadError> {
    let lib = open_library(path).map_err(|e| {
        let detail = std::error::Error::source(&e).map(|s| format!(": {s}")).unwrap_or_default();
        LoadError::new(
            format!("not a loadable shared library ({e}{detail})"),
            "give the .so/.dylib/.dll a plugin build produces (cargo build -p NAME, or cc -shared -fPIC), built for this platform",
        )
    })?;
    // From here on the library stays loaded whatever happens: its code may have run.
    let lib: &'static libloading::Library = Box::leak(Box::new(lib));
    let entry = match unsafe { lib.get::<abi::EntryFn>(abi::ENTRY_SYMBOL) } {
        Ok(sym) => *sym,
        Err(_) => {
            let other = (0..=16u32)
                .filter(|&m| m != abi::ABI_MAJOR)
                .find(|&m| unsafe { lib.get::<abi::EntryFn>(abi::entry_symbol(m).as_str()) }.is_ok());
            return Err(match other {
                Some(m) => LoadError::new(
                    format!(
                        "built for plugin ABI {m} (it exports `{}`), but this simclr speaks ABI {} (`{}`)",
                        abi::entry_symbol(m),
                        abi::ABI_MAJOR,
                        abi::ENTRY_SYMBOL
                    ),
                    REBUILD,
                ),
                None => LoadError::new(
                    format!("not a simclr plugin: it exports no `{}` symbol", abi::ENTRY_SYMBOL),
                    "define the entry point (SIMCLR_PLUGIN_ENTRY in C, export_plugin! in Rust) and export it",
                ),
            });
        }
    };
    let table = unsafe { entry() };
    let Some(t) = (unsafe { table.as_ref() }) else {
        return Err(LoadError::new(
            format!("`{}` returned NULL", abi::ENTRY_SYMBOL),
            "return a pointer to a static simclr_plugin table",
        ));
    };
    if (t.struct_size as usize) < abi::PLUGIN_SIZE_V1_0 {
        return Err(LoadError::new(
            format!(
                "its table is {} bytes, smaller than the {} bytes of ABI {}.0",
                t.struct_size,
                abi::PLUGIN_SIZE_V1_0,
                abi::ABI_MAJOR
            ),
            "set struct_size = sizeof(simclr_plugin) and fill every field",
        ));
    }
    if t.abi_minor > abi::ABI_MINOR {
        return Err(LoadError::new(
            format!(
                "built for plugin ABI {major}.{}, newer than this simclr's {major}.{}",
                t.abi_minor,
                abi::ABI_MINOR,
                major = abi::ABI_MAJOR
            ),
            "update simclr, or build the plugin against this simclr's SDK",
        ));
    }
    let text = |p: *const c_char, what: &str| -> Result<String, LoadError> {
        if p.is_null() {
            return Err(LoadError::new(format!("its {what} is NULL"), "fill every field of the table"));
        }
        unsafe { CStr::from_ptr(p) }
            .to_str()
            .map(str::to_string)
            .map_err(|_| LoadError::new(format!("its {what} is not UTF-8"), "use UTF-8 text"))
    };
    let name = text(t.name, "name")?;
    let version = text(t.version, "version")?;
    if name.is_empty() {
        return Err(LoadError::new("its name is empty", "give the plugin a name"));
    }
    let (Some(create), Some(process), Some(destroy)) = (t.create, t.process, t.destroy) else {
        return Err(LoadError::new(
            "its create, process or destroy function is NULL",
            "fill every function pointer of the table",
        ));
    };
    if t.kind_count == 0 || t.kind_count > 256 || t.kinds.is_null() {
        return Err(LoadError::new(
            format!("it declares {} kinds", t.kind_count),
            "declare 1 to 256 kinds in `kinds` / `kind_count`",
        ));
    }
    let raw = unsafe { std::slice::from_raw_parts(t.kinds, t.kind_count as usize) };
    let mut kinds: Vec<PluginKind> = Vec::new();
    for (i, k) in raw.iter().enumerate() {
        let kname = text(k.name, &format!("kind #{i}'s name"))?;
        if !valid_kind_name(&kname) {
            return Err(LoadError::new(
                format!("kind #{i} has an invalid name `{kname}`"),
                "use lowercase ASCII letters, digits and `_`, starting with a letter, at most 64 bytes",
            ));
        }
        if kinds.iter().any(|x| x.name == kname) {
            return Err(LoadError::new(
                format!("kind `{kname}` is declared twice"),
                "give every kind its own name",
            ));
        }
        let about = text(k.about, &format!("kind `{kname}`'s about"))?;
        let schema_text = text(k.config_schema, &format!("kind `{kname}`'s config schema"))?;
        let schema: Value = serde_json::from_str(&schema_text).map_err(|e| {
            LoadError::new(
                format!("kind `{kname}`: its config schema is not valid JSON: {e}"),
                "write the schema as JSON text",
            )
        })?;
        let parsed = Schema::parse_top(&schema)
            .map_err(|e| LoadError::new(format!("kind `{kname}`: config schema: {e}"), SCHEMA_FIX))?;
        if k.flags & !abi::KNOWN_KIND_FLAGS != 0 {
            return Err(LoadError::new(
                format!("kind `{kname}` has unknown flags {:#x}", k.flags & !abi::KNOWN_KIND_FLAGS),
                format!("use only SIMCLR_KIND_* flags of ABI {}.{}", abi::ABI_MAJOR, abi::ABI_MINOR),
            ));
        }
        let in_place = k.flags & abi::KIND_IN_PLACE != 0;
        if !in_place && t.output_size.is_none() {
            return Err(LoadError::new(
                format!("kind `{kname}` is out of place but output_size is NULL"),
                "implement output_size, or flag the kind SIMCLR_KIND_IN_PLACE",
            ));
        }
        kinds.push(PluginKind { name: kname, about, schema, in_place, parsed });
    }
    Ok(LoadedPlugin {
        path: path.to_path_buf(),
        file_name: path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
        name,
        version,
        abi_minor: t.abi_minor,
        table_size: t.struct_size,
        kinds,
        create,
        output_size: t.output_size,
        process,
        destroy,
    })
}

const SCHEMA_FIX: &str = "use the JSON Schema subset listed in simclr_plugin.h (type, properties, required, \
     additionalProperties, minimum/maximum, enum, items, minItems/maxItems, default, description)";

fn valid_kind_name(s: &str) -> bool {
    let mut c = s.chars();
    s.len() <= 64
        && c.next().is_some_and(|c| c.is_ascii_lowercase())
        && c.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Registers every kind of `plugin`; a kind already in the registry (a built-in, or another
/// plugin's) is an error.
pub fn register(registry: &mut Registry, plugin: &Arc<LoadedPlugin>) -> Result<(), LoadError> {
    for k in &plugin.kinds {
        if registry.get(&k.name).is_some() {
            return Err(LoadError::new(
                format!("its kind `{}` is already defined (by a built-in kind or an earlier plugin)", k.name),
                "rename the plugin's kind, or load only one plugin defining it",
            ));
        }
    }
    for i in 0..plugin.kinds.len() {
        registry.register_factory(Arc::new(PluginFactory::new(plugin.clone(), i)));
    }
    Ok(())
}

/// Loads the `plugins:` of a pipeline into `registry`, before validation. Every failure is a
/// diagnostic at its entry: `FILE:LINE:COL: plugin 'PATH': problem (fix)`.
pub fn load_spec_plugins(
    spec: &PipelineSpec,
    registry: &mut Registry,
    search_path: Option<&OsStr>,
) -> Result<Vec<Arc<LoadedPlugin>>, Diagnostics> {
    let base_dir = spec.file.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut diags = Diagnostics::default();
    let mut done: HashSet<PathBuf> = HashSet::new();
    let mut out = Vec::new();
    for entry in &spec.plugins {
        let result = resolve(&entry.value, &base_dir, search_path).and_then(|p| load(&p)).and_then(|p| {
            if done.insert(p.path.clone()) {
                register(registry, &p)?;
                out.push(p);
            }
            Ok(())
        });
        if let Err(e) = result {
            diags.push(
                Diagnostic::new(&spec.file, entry.pos, format!("plugin '{}': {}", entry.value, e.problem))
                    .fix(e.fix),
            );
        }
    }
    diags.into_result(out)
}

// ---------------------------------------------------------------------------------------------
// The config schema: the subset of JSON Schema plugins may use.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Type {
    Object,
    Number,
    Integer,
    String,
    Boolean,
    Array,
}

impl Type {
    fn parse(s: &str) -> Option<Type> {
        Some(match s {
            "object" => Type::Object,
            "number" => Type::Number,
            "integer" => Type::Integer,
            "string" => Type::String,
            "boolean" => Type::Boolean,
            "array" => Type::Array,
            _ => return None,
        })
    }

    fn expected(self) -> &'static str {
        match self {
            Type::Object => "a mapping",
            Type::Number => "a number",
            Type::Integer => "an integer",
            Type::String => "a string",
            Type::Boolean => "a boolean",
            Type::Array => "a list",
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Schema {
    ty: Option<Type>,
    properties: Vec<(String, Schema)>,
    required: Vec<String>,
    additional: bool,
    minimum: Option<f64>,
    maximum: Option<f64>,
    exclusive_minimum: Option<f64>,
    exclusive_maximum: Option<f64>,
    enumeration: Option<Vec<Value>>,
    items: Option<Box<Schema>>,
    min_items: Option<usize>,
    max_items: Option<usize>,
    default: Option<Value>,
}

/// One way a config misses its schema.
#[derive(Clone, Debug, PartialEq)]
struct Violation {
    path: Vec<PathSeg>,
    message: String,
    /// `None`: structural (the config does not have the right shape: a [`ConfigError`]);
    /// `Some(fix)`: a value out of range (a [`Problem`] with this fix).
    range_fix: Option<String>,
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) if n.is_f64() => format!("floating point `{n}`"),
        Value::Number(n) => format!("integer `{n}`"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "sequence".into(),
        Value::Object(_) => "map".into(),
    }
}

/// A JSON value as a YAML flow value (`[3, 9]`, not `[3,9]`), for fixes.
fn yaml_like(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("[{}]", a.iter().map(yaml_like).collect::<Vec<_>>().join(", ")),
        Value::Object(m) => {
            format!(
                "{{{}}}",
                m.iter().map(|(k, v)| format!("{k}: {}", yaml_like(v))).collect::<Vec<_>>().join(", ")
            )
        }
        other => other.to_string(),
    }
}

fn field_name(path: &[PathSeg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            PathSeg::Key(k) if s.is_empty() => s.push_str(k),
            PathSeg::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            PathSeg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

fn expected_list(names: &[&str]) -> String {
    match names {
        [] => "there are no fields".into(),
        [a] => format!("expected `{a}`"),
        [a, b] => format!("expected `{a}` or `{b}`"),
        _ => format!(
            "expected one of {}",
            names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn number(v: &Value, key: &str) -> Result<Option<f64>, String> {
    match v.get(key) {
        None => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(_) => Err(format!("`{key}` must be a number")),
    }
}

fn count(v: &Value, key: &str) -> Result<Option<usize>, String> {
    match v.get(key) {
        None => Ok(None),
        Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64().map(|n| n as usize)),
        Some(_) => Err(format!("`{key}` must be a non-negative integer")),
    }
}

impl Schema {
    /// The top level: an object schema.
    fn parse_top(v: &Value) -> Result<Schema, String> {
        let s = Schema::parse(v, "the schema")?;
        if s.ty != Some(Type::Object) {
            return Err("the top level must be {\"type\": \"object\", ...}".into());
        }
        Ok(s)
    }

    fn parse(v: &Value, at: &str) -> Result<Schema, String> {
        const KEYWORDS: &[&str] = &[
            "type",
            "properties",
            "required",
            "additionalProperties",
            "minimum",
            "maximum",
            "exclusiveMinimum",
            "exclusiveMaximum",
            "enum",
            "items",
            "minItems",
            "maxItems",
            "default",
            "description",
            "title",
            "$schema",
        ];
        let Value::Object(m) = v else {
            return Err(format!("{at} must be a JSON object"));
        };
        if let Some(k) = m.keys().find(|k| !KEYWORDS.contains(&k.as_str())) {
            return Err(format!("{at} uses `{k}`, which this host does not support"));
        }
        let ty = match m.get("type") {
            None => None,
            Some(Value::String(t)) => {
                Some(Type::parse(t).ok_or_else(|| format!("{at} has an unsupported type \"{t}\""))?)
            }
            Some(_) => return Err(format!("{at}: `type` must be one type name (a string)")),
        };
        let mut s = Schema { ty, additional: true, ..Schema::default() };
        if let Some(p) = m.get("properties") {
            let Value::Object(props) = p else {
                return Err(format!("{at}: `properties` must be an object"));
            };
            for (name, sub) in props {
                if name == "views" {
                    return Err(format!(
                        "{at} declares `views`, which the host handles (the views a stage acts on)"
                    ));
                }
                s.properties.push((name.clone(), Schema::parse(sub, &format!("property `{name}`"))?));
            }
        }
        if let Some(r) = m.get("required") {
            let names = r.as_array().filter(|a| a.iter().all(Value::is_string));
            let Some(names) = names else {
                return Err(format!("{at}: `required` must be a list of names"));
            };
            s.required = names.iter().filter_map(|n| n.as_str().map(str::to_string)).collect();
            if let Some(n) = s.required.iter().find(|n| !s.properties.iter().any(|(p, _)| p == *n)) {
                return Err(format!("{at}: required field `{n}` is not among its properties"));
            }
        }
        match m.get("additionalProperties") {
            None => {}
            Some(Value::Bool(b)) => s.additional = *b,
            Some(_) => return Err(format!("{at}: `additionalProperties` must be true or false")),
        }
        s.minimum = number(v, "minimum").map_err(|e| format!("{at}: {e}"))?;
        s.maximum = number(v, "maximum").map_err(|e| format!("{at}: {e}"))?;
        s.exclusive_minimum = number(v, "exclusiveMinimum").map_err(|e| format!("{at}: {e}"))?;
        s.exclusive_maximum = number(v, "exclusiveMaximum").map_err(|e| format!("{at}: {e}"))?;
        s.min_items = count(v, "minItems").map_err(|e| format!("{at}: {e}"))?;
        s.max_items = count(v, "maxItems").map_err(|e| format!("{at}: {e}"))?;
        if let Some(e) = m.get("enum") {
            match e {
                Value::Array(a) if !a.is_empty() => s.enumeration = Some(a.clone()),
                _ => return Err(format!("{at}: `enum` must be a non-empty list")),
            }
        }
        if let Some(i) = m.get("items") {
            s.items = Some(Box::new(Schema::parse(i, &format!("{at}'s items"))?));
        }
        if let Some(d) = m.get("default") {
            let mut errs = Vec::new();
            s.validate(d, &mut Vec::new(), &mut errs);
            if let Some(e) = errs.first() {
                return Err(format!("{at}: its default {d} does not fit it: {}", e.message));
            }
            s.default = Some(d.clone());
        }
        Ok(s)
    }

    /// Appends every violation of `v` (at `path`) to `out`.
    fn validate(&self, v: &Value, path: &mut Vec<PathSeg>, out: &mut Vec<Violation>) {
        let structural =
            |path: &[PathSeg], message: String| Violation { path: path.to_vec(), message, range_fix: None };
        if let Some(t) = self.ty {
            let fits = match t {
                Type::Object => v.is_object(),
                Type::Number => v.is_number(),
                Type::Integer => v.is_i64() || v.is_u64(),
                Type::String => v.is_string(),
                Type::Boolean => v.is_boolean(),
                Type::Array => v.is_array(),
            };
            if !fits {
                out.push(structural(
                    path,
                    format!("invalid type: {}, expected {}", describe(v), t.expected()),
                ));
                return;
            }
        }
        if let Some(options) = &self.enumeration {
            if !options.contains(v) {
                let names: Vec<String> = options
                    .iter()
                    .map(|o| o.as_str().map_or_else(|| o.to_string(), str::to_string))
                    .collect();
                let shown = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                out.push(structural(
                    path,
                    format!(
                        "unknown variant `{shown}`, {}",
                        expected_list(&names.iter().map(String::as_str).collect::<Vec<_>>())
                    ),
                ));
                return;
            }
        }
        match v {
            Value::Object(m) => {
                let known: Vec<&str> = self.properties.iter().map(|(k, _)| k.as_str()).collect();
                for (key, value) in m {
                    path.push(PathSeg::Key(key.clone()));
                    match self.properties.iter().find(|(k, _)| k == key) {
                        Some((_, sub)) => sub.validate(value, path, out),
                        None if !self.additional => {
                            // serde's wording, so the validator's "did you mean" works; the host
                            // also takes `views` at the top level.
                            let mut names = known.clone();
                            if path.len() == 1 {
                                names.push("views");
                            }
                            out.push(structural(
                                path,
                                format!("unknown field `{key}`, {}", expected_list(&names)),
                            ));
                        }
                        None => {}
                    }
                    path.pop();
                }
                for r in &self.required {
                    if !m.contains_key(r) {
                        out.push(structural(path, format!("missing field `{r}`")));
                    }
                }
            }
            Value::Array(items) => {
                let n = items.len();
                let example =
                    self.default.as_ref().map(|d| format!(", e.g. `{}: {}`", field_name(path), yaml_like(d)));
                let too_few = self.min_items.is_some_and(|m| n < m);
                let too_many = self.max_items.is_some_and(|m| n > m);
                if too_few || too_many {
                    let want = match (self.min_items, self.max_items) {
                        (Some(a), Some(b)) if a == b => format!("{a}"),
                        (Some(a), Some(b)) => format!("{a} to {b}"),
                        (Some(a), None) => format!("at least {a}"),
                        (None, Some(b)) => format!("at most {b}"),
                        (None, None) => String::new(),
                    };
                    out.push(Violation {
                        path: path.clone(),
                        message: format!("`{}` has {n} items, expected {want}", field_name(path)),
                        range_fix: Some(format!("write {want} items{}", example.unwrap_or_default())),
                    });
                }
                if let Some(sub) = &self.items {
                    for (i, item) in items.iter().enumerate() {
                        path.push(PathSeg::Index(i));
                        sub.validate(item, path, out);
                        path.pop();
                    }
                }
            }
            Value::Number(n) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                let bad = self.minimum.is_some_and(|m| x < m)
                    || self.maximum.is_some_and(|m| x > m)
                    || self.exclusive_minimum.is_some_and(|m| x <= m)
                    || self.exclusive_maximum.is_some_and(|m| x >= m);
                if bad {
                    let lo = self
                        .minimum
                        .map(|m| format!("at least {m}"))
                        .or(self.exclusive_minimum.map(|m| format!("above {m}")));
                    let hi = self
                        .maximum
                        .map(|m| format!("at most {m}"))
                        .or(self.exclusive_maximum.map(|m| format!("below {m}")));
                    let want = match (self.minimum, self.maximum) {
                        (Some(lo), Some(hi)) => format!("from {lo} to {hi}"),
                        _ => [lo, hi].into_iter().flatten().collect::<Vec<_>>().join(" and "),
                    };
                    out.push(Violation {
                        path: path.clone(),
                        message: format!("`{}` = {n} is out of range", field_name(path)),
                        range_fix: Some(format!("use a value {want}")),
                    });
                }
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Kinds as factories, configs and stages.

struct PluginFactory {
    plugin: Arc<LoadedPlugin>,
    kind: usize,
    about: String,
}

impl PluginFactory {
    fn new(plugin: Arc<LoadedPlugin>, kind: usize) -> Self {
        let about = format!("{} [plugin {} {}]", plugin.kinds[kind].about, plugin.name, plugin.version);
        PluginFactory { plugin, kind, about }
    }
}

impl Factory for PluginFactory {
    fn kind(&self) -> &str {
        &self.plugin.kinds[self.kind].name
    }
    fn about(&self) -> &str {
        &self.about
    }
    fn role(&self) -> Role {
        Role::Map
    }
    fn parse(&self, config: Value) -> Result<Box<dyn Configured>, ConfigError> {
        let Value::Object(mut fields) = config else {
            return Err(ConfigError { path: Vec::new(), message: "a stage's fields form a mapping".into() });
        };
        let views = match fields.remove("views") {
            None | Some(Value::Null) => None,
            Some(v) => Some(parse_views(&v).ok_or_else(|| ConfigError {
                path: vec![PathSeg::Key("views".into())],
                message: format!("invalid type: {}, expected a list of view numbers", describe(&v)),
            })?),
        };
        let schema = &self.plugin.kinds[self.kind].parsed;
        let fields = Value::Object(fields);
        let mut violations = Vec::new();
        schema.validate(&fields, &mut Vec::new(), &mut violations);
        if let Some(v) = violations.iter().find(|v| v.range_fix.is_none()) {
            return Err(ConfigError { path: v.path.clone(), message: v.message.clone() });
        }
        let Value::Object(mut fields) = fields else { unreachable!("checked above") };
        for (name, sub) in &schema.properties {
            if let (false, Some(d)) = (fields.contains_key(name), &sub.default) {
                fields.insert(name.clone(), d.clone());
            }
        }
        let problems = violations
            .into_iter()
            .map(|v| Problem { field: v.path, message: v.message, fix: v.range_fix.unwrap_or_default() })
            .collect();
        Ok(Box::new(PluginConfig { plugin: self.plugin.clone(), kind: self.kind, fields, views, problems }))
    }
}

fn parse_views(v: &Value) -> Option<Vec<u32>> {
    v.as_array()?.iter().map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok())).collect()
}

/// A validated config of a plugin kind.
struct PluginConfig {
    plugin: Arc<LoadedPlugin>,
    kind: usize,
    /// With defaults filled in, without `views`.
    fields: Map<String, Value>,
    views: Option<Vec<u32>>,
    /// Range violations of the schema, reported by `check`.
    problems: Vec<Problem>,
}

impl PluginConfig {
    fn kind_name(&self) -> &str {
        &self.plugin.kinds[self.kind].name
    }

    fn instantiate(&self) -> Result<Instance, String> {
        let json = serde_json::to_string(&self.fields).map_err(|e| e.to_string())?;
        let cjson =
            std::ffi::CString::new(json.clone()).map_err(|_| "the config contains a NUL".to_string())?;
        let mut err = ErrorMessage::new();
        let mut ptr: *mut c_void = std::ptr::null_mut();
        let rc = unsafe {
            (self.plugin.create)(self.kind as u32, cjson.as_ptr(), json.len(), &mut ptr, &mut err.buf())
        };
        if rc != abi::OK {
            // A config the plugin refuses: its message is the point.
            return Err(if rc == abi::ERR_CONFIG {
                err.message()
            } else {
                format!("create {}", err.describe(rc))
            });
        }
        Ok(Instance { ptr, destroy: self.plugin.destroy })
    }
}

impl Configured for PluginConfig {
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Views, PortType::Views)
    }

    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        let before = out.len();
        if let Some(v) = &self.views {
            if v.is_empty() || v.iter().any(|&x| x > 15) {
                out.push(Problem::new(
                    "views",
                    "`views` must list view numbers from 0 to 15",
                    "write e.g. `views: [0]` for the first branch only",
                ));
            }
        }
        out.extend(self.problems.iter().cloned());
        if out.len() > before {
            return;
        }
        // Let the plugin reject what its schema cannot express (e.g. min > max); nothing runs.
        if let Err(e) = self.instantiate() {
            out.push(Problem {
                field: Vec::new(),
                message: format!("plugin '{}' rejected the config: {e}", self.plugin.file_name),
                fix: format!(
                    "see `simclr plugins inspect {}` for the config of `{}`",
                    self.plugin.path.display(),
                    self.kind_name()
                ),
            });
        }
    }

    fn refs(&self) -> Vec<StageRef> {
        Vec::new()
    }

    fn build(&self, _cx: &Context) -> Result<Stage, StageError> {
        let instance = self.instantiate().map_err(|e| {
            StageError::fatal(format!(
                "plugin '{}' could not make a `{}`: {e}",
                self.plugin.file_name,
                self.kind_name()
            ))
        })?;
        Ok(Stage::Map(Arc::new(PluginStage {
            plugin: self.plugin.clone(),
            kind: self.kind,
            in_place: self.plugin.kinds[self.kind].in_place,
            instance,
            views: self.views.clone(),
        })))
    }
}

/// A plugin's instance, destroyed with the stage.
struct Instance {
    ptr: *mut c_void,
    destroy: DestroyFn,
}

// The ABI requires instances to be usable from several threads at once (read-only after
// `create`); the host never touches what the pointer points to.
unsafe impl Send for Instance {}
unsafe impl Sync for Instance {}

impl Drop for Instance {
    fn drop(&mut self) {
        unsafe { (self.destroy)(self.ptr) };
    }
}

/// A host buffer for a plugin's error message (on the stack: one per call).
struct ErrorMessage {
    bytes: [u8; ERROR_CAPACITY],
}

impl ErrorMessage {
    fn new() -> Self {
        ErrorMessage { bytes: [0; ERROR_CAPACITY] }
    }

    /// The `simclr_error` to pass: valid while `self` is not moved.
    fn buf(&mut self) -> ErrorBuf {
        ErrorBuf { message: self.bytes.as_mut_ptr() as *mut c_char, capacity: ERROR_CAPACITY }
    }

    /// The plugin's message.
    fn message(&self) -> String {
        let end = self.bytes.iter().position(|&b| b == 0).unwrap_or(ERROR_CAPACITY);
        let msg = String::from_utf8_lossy(&self.bytes[..end]);
        if msg.trim().is_empty() {
            "(no message)".into()
        } else {
            msg.into_owned()
        }
    }

    /// "returned error code N (NAME): message".
    fn describe(&self, rc: i32) -> String {
        format!("returned error code {rc} ({}): {}", abi::code_name(rc), self.message())
    }
}

/// A plugin kind in a running pipeline.
struct PluginStage {
    plugin: Arc<LoadedPlugin>,
    kind: usize,
    in_place: bool,
    instance: Instance,
    views: Option<Vec<u32>>,
}

/// A fresh out-of-place output buffer: the canary pattern, repeated.
fn canary(len: usize) -> Vec<u8> {
    let mut v = abi::CANARY.repeat(len / abi::CANARY.len() + 1);
    v.truncate(len);
    v
}

/// The offset of the first block of `out` still equal to the canary: every whole
/// `CANARY_BLOCK`-byte block, and a final partial block of half that or more.
fn unwritten_block(out: &[u8]) -> Option<usize> {
    let pattern = canary(abi::CANARY_BLOCK);
    let mut blocks = out.chunks_exact(abi::CANARY_BLOCK);
    if let Some(i) = blocks.by_ref().position(|b| b == pattern.as_slice()) {
        return Some(i * abi::CANARY_BLOCK);
    }
    let tail = blocks.remainder();
    (tail.len() >= abi::CANARY_BLOCK / 2 && tail == &pattern[..tail.len()]).then(|| out.len() - tail.len())
}

impl PluginStage {
    fn process(&self, img: &mut Image, seed: u64) -> Result<(), String> {
        let (w, h) = (img.width, img.height);
        let len = img.pixels() * 3;
        if img.data.len() != len {
            return Err(format!("the input view is malformed ({w}x{h} with {} bytes)", img.data.len()));
        }
        if len == 0 {
            return Ok(()); // Plugins are never called with an empty view.
        }
        let mut err = ErrorMessage::new();
        let view = |data: *mut u8, len: usize, w: u32, h: u32| View {
            data,
            len,
            width: w,
            height: h,
            stride: w * 3,
            channels: 3,
            filled: 0,
        };
        if self.in_place {
            let mut out = view(img.data.as_mut_ptr(), len, w, h);
            let rc = unsafe {
                (self.plugin.process)(self.instance.ptr, seed, std::ptr::null(), &mut out, &mut err.buf())
            };
            if rc != abi::OK {
                return Err(format!("process {}", err.describe(rc)));
            }
            if out.filled != len {
                return Err(format!(
                    "process reported writing {} of the {len} bytes of the view",
                    out.filled
                ));
            }
            return Ok(());
        }
        let output_size = self.plugin.output_size.ok_or("output_size is NULL")?;
        let (mut ow, mut oh) = (0u32, 0u32);
        let rc = unsafe { output_size(self.instance.ptr, w, h, &mut ow, &mut oh, &mut err.buf()) };
        if rc != abi::OK {
            return Err(format!("output_size {}", err.describe(rc)));
        }
        if ow == 0
            || oh == 0
            || ow > MAX_SIDE
            || oh > MAX_SIDE
            || u64::from(ow) * u64::from(oh) > MAX_OUTPUT_PIXELS
        {
            return Err(format!(
                "output_size declared an output of {ow}x{oh} for a {w}x{h} input (out of bounds)"
            ));
        }
        let out_len = ow as usize * oh as usize * 3;
        let mut data = canary(out_len);
        let input = view(img.data.as_ptr() as *mut u8, len, w, h);
        let mut out = view(data.as_mut_ptr(), out_len, ow, oh);
        let rc = unsafe { (self.plugin.process)(self.instance.ptr, seed, &input, &mut out, &mut err.buf()) };
        if rc != abi::OK {
            return Err(format!("process {}", err.describe(rc)));
        }
        if out.filled != out_len {
            return Err(format!(
                "process reported writing {} of the {out_len} bytes of its {ow}x{oh} output",
                out.filled
            ));
        }
        if let Some(at) = unwritten_block(&data) {
            return Err(format!(
                "process left bytes {at}.. of its {out_len}-byte {ow}x{oh} output unwritten (still the host's canary pattern)"
            ));
        }
        *img = Image { width: ow, height: oh, data };
        Ok(())
    }
}

impl MapStage for PluginStage {
    fn apply(&self, sample: &mut Sample, ctx: &SampleCtx) -> Result<(), StageError> {
        let Payload::Views(images) = &mut sample.payload else {
            return Err(StageError::fatal(
                "this stage needs decoded image views; put it after `decode`/`views`",
            ));
        };
        for (v, img) in images.iter_mut().enumerate() {
            let v = v as u32;
            if self.views.as_ref().is_some_and(|sel| !sel.contains(&v)) {
                continue;
            }
            // One u64 of the view's own random stream: the same seed whatever the scheduling.
            let seed = ctx.rng(v).next_u64();
            self.process(img, seed).map_err(|e| {
                StageError::fatal(format!(
                    "plugin '{}' (kind '{}') failed on sample {}, view {v}: {e}",
                    self.plugin.file_name, self.plugin.kinds[self.kind].name, ctx.index
                ))
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        Schema::parse_top(&json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["bits"],
            "properties": {
                "bits": {"type": "integer", "minimum": 1, "maximum": 8},
                "p": {"type": "number", "minimum": 0, "maximum": 1, "default": 1.0},
                "mode": {"type": "string", "enum": ["fast", "exact"], "default": "fast"},
                "range": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0},
                          "minItems": 2, "maxItems": 2, "default": [1, 2]},
                "on": {"type": "boolean"},
                "sub": {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": false}
            }
        }))
        .unwrap()
    }

    fn violations(v: Value) -> Vec<(String, String, bool)> {
        let mut out = Vec::new();
        schema().validate(&v, &mut Vec::new(), &mut out);
        out.into_iter().map(|v| (field_name(&v.path), v.message, v.range_fix.is_some())).collect()
    }

    #[test]
    fn valid_configs_pass() {
        assert!(violations(json!({"bits": 3})).is_empty());
        assert!(violations(
            json!({"bits": 8, "p": 0, "mode": "exact", "range": [0.5, 3], "on": true, "sub": {"a": 1}})
        )
        .is_empty());
    }

    #[test]
    fn structural_errors_use_serde_wording() {
        let v = violations(json!({"bits": 3, "btis": 2}));
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].0, "btis");
        assert!(v[0].1.starts_with("unknown field `btis`, expected one of `bits`"), "{}", v[0].1);
        assert!(v[0].1.contains("`views`"));
        assert_eq!(violations(json!({}))[0].1, "missing field `bits`");
        assert_eq!(
            violations(json!({"bits": 2.5}))[0].1,
            "invalid type: floating point `2.5`, expected an integer"
        );
        assert_eq!(violations(json!({"bits": "x"}))[0].1, "invalid type: string \"x\", expected an integer");
        assert_eq!(
            violations(json!({"bits": 1, "mode": "slow"}))[0].1,
            "unknown variant `slow`, expected `fast` or `exact`"
        );
        let nested = violations(json!({"bits": 1, "sub": {"b": 1}}));
        assert_eq!(nested[0].0, "sub.b");
        assert!(!nested[0].1.contains("views"));
        assert!(violations(json!({"bits": 1, "range": [1, "a"]}))[0].0 == "range[1]");
    }

    #[test]
    fn ranges_are_problems_with_fixes() {
        let v = violations(json!({"bits": 9}));
        assert_eq!(v, vec![("bits".into(), "`bits` = 9 is out of range".into(), true)]);
        let v = violations(json!({"bits": 1, "range": [0, 1, 2]}));
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v.iter().all(|x| x.2));
        assert_eq!(v[0].1, "`range` has 3 items, expected 2");
        assert_eq!(v[1].0, "range[0]");
    }

    #[test]
    fn unsupported_schemas_are_refused() {
        for bad in [
            json!({"type": "array"}),
            json!({"type": "object", "oneOf": []}),
            json!({"type": "object", "properties": {"a": {"type": ["number", "null"]}}}),
            json!({"type": "object", "properties": {"a": {"type": "integer", "minimum": 2, "default": 1}}}),
            json!({"type": "object", "required": ["a"]}),
            json!({"type": "object", "properties": {"views": {"type": "array"}}}),
        ] {
            assert!(Schema::parse_top(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn canary_blocks_are_found() {
        let mut out = canary(100);
        assert_eq!(unwritten_block(&out), Some(0));
        out[..64].fill(1);
        assert_eq!(unwritten_block(&out), Some(64));
        out[64..96].fill(2);
        // The last 4 bytes are too few to judge.
        assert_eq!(unwritten_block(&out), None);
        let mut out = canary(3 * 17);
        out[..32].fill(0);
        assert_eq!(unwritten_block(&out), Some(32));
    }

    #[test]
    fn resolve_finds_bare_names_in_the_search_path() {
        let dir = std::env::temp_dir().join(format!("simclr-resolve-{}", std::process::id()));
        let sub = dir.join("lib");
        std::fs::create_dir_all(&sub).unwrap();
        let file = format!("{}thing{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
        std::fs::write(sub.join(&file), b"x").unwrap();
        let search = std::env::join_paths([dir.join("nowhere"), sub.clone()]).unwrap();
        assert_eq!(resolve("thing", &dir, Some(&search)).unwrap(), sub.join(&file));
        assert_eq!(resolve(&file, &dir, Some(&search)).unwrap(), sub.join(&file));
        assert_eq!(resolve(&format!("lib/{file}"), &dir, None).unwrap(), dir.join("lib").join(&file));
        let e = resolve("other", &dir, Some(&search)).unwrap_err();
        assert!(e.problem.contains("not found") && e.fix.contains(SEARCH_PATH_VAR), "{e}");
        assert!(resolve("./missing.so", &dir, None).unwrap_err().problem.contains("no such file"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
