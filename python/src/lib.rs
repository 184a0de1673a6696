//! `simclr_pipeline._native`: the simclr pipeline for Python. The Python package
//! (`pysrc/simclr_pipeline`) re-exports these names and adds the PyTorch adapter.
//!
//! Pipelines load, validate and run exactly as in the `simclr` CLI (same registry, plugins,
//! `--set` overrides and error texts); this crate only converts at the boundary.

use std::path::{Path, PathBuf};

use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use simclr_core::{Diagnostics, Plan, RunError};

mod pipeline;
mod run;

pyo3::create_exception!(
    simclr_pipeline,
    PipelineError,
    PyException,
    "An invalid pipeline file (the message is the CLI's FILE:LINE:COL text) or a failing stage."
);

/// A validation failure as the CLI prints it: every problem, then the count.
pub(crate) fn invalid(d: &Diagnostics) -> PyErr {
    let n = d.len();
    PipelineError::new_err(format!("{d}\n{n} error{} found", if n == 1 { "" } else { "s" }))
}

/// A run's failure: the stage, the sample where there is one, and what went wrong.
pub(crate) fn failed(e: &RunError) -> PyErr {
    match e {
        RunError::Interrupted => pyo3::exceptions::PyKeyboardInterrupt::new_err("interrupted"),
        e => PipelineError::new_err(format!("error: {e}")),
    }
}

/// Every built-in stage kind (data, augmentation, training, evaluation), as in the CLI.
pub(crate) fn registry() -> simclr_core::Registry {
    let mut r = simclr_stages::registry();
    simclr_train::register(&mut r);
    r
}

/// `overrides` (`{"crop.size": 96}`) as the CLI's `--set` strings. Values are written as JSON,
/// which is YAML, so strings, numbers, lists and mappings all keep their type; a string is
/// passed as it is (`{"color": "off"}` is `--set color=off`).
pub(crate) fn override_strings(overrides: Option<&Bound<'_, PyDict>>) -> PyResult<Vec<String>> {
    let Some(d) = overrides else { return Ok(Vec::new()) };
    let json = d.py().import("json")?;
    let mut out = Vec::with_capacity(d.len());
    for (k, v) in d.iter() {
        let key: String = k.extract().map_err(|_| {
            PipelineError::new_err(format!(
                "overrides: key {} is not a string (write {{\"STAGE.FIELD\": VALUE}})",
                k.repr().map(|r| r.to_string()).unwrap_or_default()
            ))
        })?;
        let value: String = match v.extract::<String>() {
            Ok(s) => s,
            Err(_) => json.call_method1("dumps", (&v,))?.extract().map_err(|_| {
                PipelineError::new_err(format!("overrides: the value of `{key}` cannot be written as YAML"))
            })?,
        };
        out.push(format!("{key}={value}"));
    }
    Ok(out)
}

/// Loads and validates a pipeline file with the built-in kinds and the file's plugins.
pub(crate) fn load(path: &Path, set: &[String]) -> PyResult<Plan> {
    let spec = simclr_core::spec::load(path, set).map_err(|d| invalid(&d))?;
    let mut registry = registry();
    let search = std::env::var_os(simclr_core::plugin::SEARCH_PATH_VAR);
    simclr_core::plugin::load_spec_plugins(&spec, &mut registry, search.as_deref())
        .map_err(|d| invalid(&d))?;
    simclr_core::validate(spec, &registry).map_err(|d| invalid(&d))
}

/// Checks a pipeline file as `simclr validate` does; raises `PipelineError` listing every
/// problem with FILE:LINE:COL.
#[pyfunction]
#[pyo3(signature = (path, overrides = None))]
fn validate(path: PathBuf, overrides: Option<&Bound<'_, PyDict>>) -> PyResult<()> {
    let set = override_strings(overrides)?;
    load(&path, &set).map(|_| ())
}

/// The stage kinds a pipeline file can use (built-in ones), as `(kind, role, about)` tuples.
#[pyfunction]
fn kinds(py: Python<'_>) -> PyResult<Bound<'_, PyList>> {
    let r = registry();
    let items: Vec<(String, String, String)> = r
        .kinds()
        .map(|f| (f.kind().to_string(), format!("{:?}", f.role()).to_lowercase(), f.about().to_string()))
        .collect();
    PyList::new(py, items)
}

#[pymodule(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<pipeline::Pipeline>()?;
    m.add_class::<pipeline::Batches>()?;
    m.add_class::<pipeline::RustBuffer>()?;
    m.add_function(wrap_pyfunction!(validate, m)?)?;
    m.add_function(wrap_pyfunction!(kinds, m)?)?;
    m.add_function(wrap_pyfunction!(run::run, m)?)?;
    m.add("PipelineError", m.py().get_type::<PipelineError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
