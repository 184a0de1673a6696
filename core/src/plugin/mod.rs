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
//! A plain `plugins:` entry is trusted native code running in-process. An entry
//! `{ path, isolate: process, timeout_s }` runs its kinds' `create` and `process` in helper
//! processes ([`isolate`]): a crash or a hang fails or skips one sample, not the run. See
//! `plugins/README.md`.

use std::collections::HashSet;
use std::ffi::{c_char, CStr, OsStr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
pub use simclr_plugin::abi;
use simclr_plugin::abi::{CreateFn, DestroyFn, OutputSizeFn, ProcessFn};

use crate::error::{Diagnostic, Diagnostics};
use crate::spec::PipelineSpec;
use crate::stage::Registry;

pub mod isolate;
mod schema;
mod stage;
#[cfg(test)]
mod tests;

use schema::Schema;
use stage::PluginFactory;

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
        // SAFETY: loading runs the library's initializers. Plugins are trusted native code by
        // design (plugins/README.md); the user named this library in the pipeline file.
        unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL) }.map(Into::into)
    }
    #[cfg(not(unix))]
    {
        // SAFETY: as above: a trusted library the pipeline file names.
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
    // SAFETY: the symbol is looked up under this ABI's versioned name, whose type is
    // `abi::EntryFn` by the ABI's definition; `lib` is leaked, so the pointer never dangles.
    let entry = match unsafe { lib.get::<abi::EntryFn>(abi::ENTRY_SYMBOL) } {
        Ok(sym) => *sym,
        Err(_) => {
            let other = (0..=16u32)
                .filter(|&m| m != abi::ABI_MAJOR)
                // SAFETY: only checks that the symbol exists; it is never called.
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
    // SAFETY: the entry point takes no arguments and returns a pointer to a static table (the
    // ABI's contract); calling it runs plugin code, trusted by design.
    let table = unsafe { entry() };
    // SAFETY: the pointer is NULL (handled) or points to the plugin's static table, which lives
    // as long as the library (never unloaded); its size is checked right below before any
    // field past ABI 1.0 is read.
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
        // SAFETY: non-NULL (checked above) and, by the ABI, a NUL-terminated string in the
        // plugin's static data, alive as long as the library.
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
    // SAFETY: `kinds` is non-NULL and `kind_count` in 1..=256 (checked above); by the ABI it
    // points to that many kind descriptors in the plugin's static data.
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
    register_isolated(registry, plugin, None)
}

/// [`register`], with every kind running in helper processes when `isolation` is given.
pub fn register_isolated(
    registry: &mut Registry,
    plugin: &Arc<LoadedPlugin>,
    isolation: Option<isolate::Isolation>,
) -> Result<(), LoadError> {
    for k in &plugin.kinds {
        if registry.get(&k.name).is_some() {
            return Err(LoadError::new(
                format!("its kind `{}` is already defined (by a built-in kind or an earlier plugin)", k.name),
                "rename the plugin's kind, or load only one plugin defining it",
            ));
        }
    }
    for i in 0..plugin.kinds.len() {
        registry.register_factory(Arc::new(PluginFactory::new(plugin.clone(), i, isolation.clone())));
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
        let e = &entry.value;
        let isolation =
            e.isolate.then(|| isolate::Isolation { timeout: Duration::from_secs_f64(e.timeout_s) });
        let result = resolve(&e.path, &base_dir, search_path).and_then(|p| load(&p)).and_then(|p| {
            if done.insert(p.path.clone()) {
                register_isolated(registry, &p, isolation)?;
                out.push(p);
            }
            Ok(())
        });
        if let Err(e) = result {
            diags.push(
                Diagnostic::new(
                    &spec.file,
                    entry.pos,
                    format!("plugin '{}': {}", entry.value.path, e.problem),
                )
                .fix(e.fix),
            );
        }
    }
    diags.into_result(out)
}
