//! Reading a pipeline file into a validated plan: the built-in kinds, the file's plugins,
//! `--set` overrides and `--seed`.

use std::path::Path;

use simclr_core::plugin;
use simclr_core::{Diagnostics, PipelineSpec, Plan, Registry};

use crate::failure::Failure;

/// Every built-in stage kind: data and augmentation stages, then training.
pub fn registry() -> simclr_core::Registry {
    let mut r = simclr_stages::registry();
    simclr_train::register(&mut r);
    r
}

pub fn load(file: &Path, set: &[String], seed: Option<u64>) -> Result<Plan, Failure> {
    let mut set = set.to_vec();
    if let Some(s) = seed {
        set.push(format!("seed={s}"));
    }
    let spec = simclr_core::spec::load(file, &set)?;
    Ok(check(spec)?)
}

/// Validates a parsed pipeline against the built-in kinds and its plugins.
pub fn check(spec: simclr_core::PipelineSpec) -> Result<Plan, Diagnostics> {
    let mut registry = registry();
    load_plugins(&spec, &mut registry)?;
    simclr_core::validate(spec, &registry)
}

pub fn load_str(name: &Path, src: &str, set: &[String], seed: Option<u64>) -> Result<Plan, Failure> {
    let mut set = set.to_vec();
    if let Some(s) = seed {
        set.push(format!("seed={s}"));
    }
    let spec = simclr_core::spec::parse(name, src, &set)?;
    let mut registry = registry();
    load_plugins(&spec, &mut registry)?;
    Ok(simclr_core::validate(spec, &registry)?)
}

/// Loads the spec's `plugins:` (bare names from `SIMCLR_PLUGIN_PATH`) into `registry`; a
/// library that fails to load is a diagnostic at its entry.
pub fn load_plugins(spec: &PipelineSpec, registry: &mut Registry) -> Result<(), Diagnostics> {
    let search = std::env::var_os(plugin::SEARCH_PATH_VAR);
    plugin::load_spec_plugins(spec, registry, search.as_deref()).map(|_| ())
}
