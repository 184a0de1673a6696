//! Errors a user can cause, each pointing at where and saying how to fix it.

use std::fmt;
use std::path::PathBuf;

use crate::yaml::Pos;

/// One problem in a pipeline file: `FILE:LINE:COL: [variant 'V': ][stage 'ID': ]WHAT (HOW TO FIX)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub pos: Pos,
    /// Where in a multi-pipeline file the problem is, e.g. `variant 'crop+color'`.
    pub context: Option<String>,
    pub stage: Option<String>,
    pub message: String,
    pub fix: Option<String>,
}

impl Diagnostic {
    pub fn new(file: impl Into<PathBuf>, pos: Pos, message: impl Into<String>) -> Self {
        Self { file: file.into(), pos, context: None, stage: None, message: message.into(), fix: None }
    }

    pub fn stage(mut self, id: impl Into<String>) -> Self {
        self.stage = Some(id.into());
        self
    }

    pub fn context(mut self, context: impl Into<String>) -> Self {
        self.context = Some(context.into());
        self
    }

    pub fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.pos.line, self.pos.col)?;
        if let Some(context) = &self.context {
            write!(f, "{context}: ")?;
        }
        if let Some(stage) = &self.stage {
            write!(f, "stage '{stage}': ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(fix) = &self.fix {
            write!(f, " ({fix})")?;
        }
        Ok(())
    }
}

/// Every problem found in one pass over a pipeline file.
#[derive(Clone, Debug, Default, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        self.0.push(d);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter()
    }

    /// `Ok(value)` when nothing was reported.
    pub fn into_result<T>(mut self, value: T) -> Result<T, Diagnostics> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            self.0.sort_by_key(|d| d.pos);
            Err(self)
        }
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// A failure while processing one sample or running one stage.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The sample's data is bad (corrupt file, wrong size...): the source's `on_error`
    /// policy decides whether the run skips it or stops.
    #[error("{0}")]
    Data(String),
    /// Anything else: the run stops.
    #[error("{0}")]
    Fatal(String),
    /// Training met a non-finite loss at `step`: the run stops, and a sweep records the
    /// variant as diverged.
    #[error("{message}")]
    Diverged { step: u64, message: String },
}

impl StageError {
    pub fn data(msg: impl Into<String>) -> Self {
        StageError::Data(msg.into())
    }

    pub fn fatal(msg: impl Into<String>) -> Self {
        StageError::Fatal(msg.into())
    }
}

impl RunError {
    /// A stage's error, naming the stage (a divergence stays one).
    pub fn stage(stage: &str, kind: &str, e: StageError) -> Self {
        let (stage, kind) = (stage.to_string(), kind.to_string());
        match e {
            StageError::Diverged { step, message } => RunError::Diverged { stage, kind, step, message },
            e => RunError::Stage { stage, kind, message: e.to_string() },
        }
    }
}

/// Why a run ended without finishing.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("stage '{stage}' ({kind}) failed on sample {sample}{name}: {message}", name = .name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default())]
    Sample { stage: String, kind: String, sample: u64, name: Option<String>, message: String },
    #[error("stage '{stage}' ({kind}) failed: {message}")]
    Stage { stage: String, kind: String, message: String },
    #[error("stage '{stage}' ({kind}) failed: {message}")]
    Diverged { stage: String, kind: String, step: u64, message: String },
    /// The run cannot do what it is for (an epoch with no batch): refused before it starts.
    #[error("stage '{stage}' ({kind}): {message}")]
    Refused { stage: String, kind: String, message: String },
    #[error("interrupted")]
    Interrupted,
    #[error("internal error: {0}")]
    Internal(String),
}
