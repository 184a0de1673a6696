//! Plugins on the command line: `simclr kinds --plugin LIB` and `simclr plugins inspect LIB`.

use std::path::{Path, PathBuf};

use simclr_core::plugin::{self, abi, LoadedPlugin};
use simclr_core::Registry;

/// `simclr plugins ...`
#[derive(clap::Subcommand)]
pub enum PluginsCommand {
    /// Load a plugin library and print its name, version, ABI, kinds and their config schema.
    Inspect {
        /// The library: a path, or a bare name looked up in SIMCLR_PLUGIN_PATH.
        lib: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `plugins` subcommand; an `Err` is an invalid input (exit 2).
pub fn run(command: PluginsCommand) -> Result<(), String> {
    match command {
        PluginsCommand::Inspect { lib, json } => inspect(&lib, json),
    }
}

/// Loads each library of `libs` into `registry`; returns which library each added kind came
/// from (kind -> library file name). An `Err` is an invalid input (exit 2).
pub fn register_libraries(
    libs: &[String],
    registry: &mut Registry,
) -> Result<std::collections::HashMap<String, String>, String> {
    let search = std::env::var_os(plugin::SEARCH_PATH_VAR);
    let mut from = std::collections::HashMap::new();
    for lib in libs {
        let fail = |e: plugin::LoadError| format!("plugin '{lib}': {e}");
        let path: PathBuf = plugin::resolve(lib, Path::new("."), search.as_deref()).map_err(fail)?;
        let p = plugin::load(&path).map_err(fail)?;
        plugin::register(registry, &p).map_err(fail)?;
        let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| lib.clone());
        for k in &p.kinds {
            from.insert(k.name.clone(), file.clone());
        }
    }
    Ok(from)
}

fn inspect(lib: &str, json: bool) -> Result<(), String> {
    let search = std::env::var_os(plugin::SEARCH_PATH_VAR);
    let fail = |e: plugin::LoadError| format!("plugin '{lib}': {e}");
    let path: PathBuf = plugin::resolve(lib, Path::new("."), search.as_deref()).map_err(fail)?;
    let p = plugin::load(&path).map_err(fail)?;
    // Would it fit next to the built-in kinds?
    let clash = plugin::register(&mut crate::load::registry(), &p).err();
    if json {
        println!("{}", to_json(&p));
    } else {
        print!("{}", to_text(&p));
    }
    match clash {
        Some(e) => Err(fail(e)),
        None => Ok(()),
    }
}

fn to_json(p: &LoadedPlugin) -> serde_json::Value {
    serde_json::json!({
        "library": p.path,
        "name": p.name,
        "version": p.version,
        "abi": {
            "major": abi::ABI_MAJOR,
            "minor": p.abi_minor,
            "table_size": p.table_size,
        },
        "kinds": p.kinds.iter().map(|k| serde_json::json!({
            "name": k.name,
            "about": k.about,
            "in_place": k.in_place,
            "config_schema": k.schema,
        })).collect::<Vec<_>>(),
    })
}

fn to_text(p: &LoadedPlugin) -> String {
    let mut s = String::new();
    s += &format!("plugin:  {} {}\n", p.name, p.version);
    s += &format!("library: {}\n", p.path.display());
    s += &format!(
        "abi:     {}.{} (entry {}, table {} bytes)\n",
        abi::ABI_MAJOR,
        p.abi_minor,
        abi::ENTRY_SYMBOL,
        p.table_size
    );
    s += &format!("kinds:   {}\n", p.kinds.len());
    for k in &p.kinds {
        s += &format!(
            "\n{}  (map stage, image views -> image views, {}; also takes `views: [..]`)\n  {}\n  config schema:\n",
            k.name,
            if k.in_place { "in place" } else { "out of place" },
            k.about
        );
        let schema = serde_json::to_string_pretty(&k.schema).unwrap_or_default();
        for line in schema.lines() {
            s += &format!("    {line}\n");
        }
    }
    s
}
