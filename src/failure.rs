//! Why a command failed, and the exit code it maps to.

use simclr_core::{Diagnostics, RunError};

/// Why the command failed, mapped to an exit code.
pub enum Failure {
    Invalid(String),
    Runtime(String),
    /// Training met a non-finite loss at `step` (exit 1, as a runtime error).
    Diverged {
        step: u64,
        message: String,
    },
    Interrupted,
}

impl From<Diagnostics> for Failure {
    fn from(d: Diagnostics) -> Self {
        let n = d.len();
        Failure::Invalid(format!("{d}\n{n} error{} found", if n == 1 { "" } else { "s" }))
    }
}

impl From<RunError> for Failure {
    fn from(e: RunError) -> Self {
        match e {
            RunError::Interrupted => Failure::Interrupted,
            RunError::Diverged { step, .. } => Failure::Diverged { step, message: format!("error: {e}") },
            e @ RunError::Refused { .. } => Failure::Invalid(format!("error: {e}")),
            e => Failure::Runtime(format!("error: {e}")),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Runtime(format!("error: {e:#}"))
    }
}
