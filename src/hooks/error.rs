//! Errors of hook resolution and hook runs.

use std::path::PathBuf;
use std::time::Duration;

/// What can go wrong while resolving or running hooks.
#[derive(thiserror::Error, Debug)]
pub enum HookError {
    /// `HERMES_BUS_HOOKS` starts with `[` but is not a JSON array of paths.
    #[error("HERMES_BUS_HOOKS is not a valid JSON array of hook paths: {detail}")]
    InvalidEnv {
        /// What the parser objected to.
        detail: String,
    },
    /// The hook file is neither executable nor a `.py` script run with python3.
    #[error("hook {path} is not executable and not a .py script")]
    NotRunnable {
        /// The offending hook path.
        path: PathBuf,
    },
    /// The hook file does not exist (the reference skips such hooks quietly).
    #[error("hook {path} does not exist")]
    Missing {
        /// The missing hook path.
        path: PathBuf,
    },
    /// The hook file exists but could not be inspected.
    #[error("cannot inspect hook {path}: {source}")]
    Inspect {
        /// The hook path.
        path: PathBuf,
        /// The error of `stat`.
        source: std::io::Error,
    },
    /// The hook process could not be started.
    #[error("cannot start hook {path}: {source}")]
    Spawn {
        /// The hook path.
        path: PathBuf,
        /// The error of the spawn.
        source: std::io::Error,
    },
    /// Waiting for the hook process failed.
    #[error("cannot wait for hook {path}: {source}")]
    Wait {
        /// The hook path.
        path: PathBuf,
        /// The error of `wait`.
        source: std::io::Error,
    },
    /// The hook process ended unsuccessfully (non-zero exit or a signal).
    #[error("hook {path} failed: {status}")]
    Exit {
        /// The hook path.
        path: PathBuf,
        /// The exit status as the OS describes it.
        status: std::process::ExitStatus,
    },
    /// The hook ran longer than its time limit and was stopped.
    #[error("hook timed out after {after:?}")]
    Timeout {
        /// The limit that was exceeded.
        after: Duration,
    },
    /// An in-process hook reported a failure.
    #[error("hook failed: {0}")]
    Callback(Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl HookError {
    /// Wraps any error or message of an in-process hook.
    pub fn callback(err: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        HookError::Callback(err.into())
    }
}
