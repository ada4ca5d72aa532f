//! Helpers shared by the integration tests: temp dirs, the reference
//! Python peers, and bounded waiting.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// True when running under CI, where a missing interop peer is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").map(|v| v == "true" || v == "1").unwrap_or(false)
}

/// Finds the Python interpreter of a reference venv (`py07` or `py03`),
/// overridable with `HERMES_TEST_PY07` / `HERMES_TEST_PY03`.
/// Returns None (and prints why) when it is missing outside CI; panics in CI.
pub fn python(which: &str) -> Option<PathBuf> {
    let var = format!("HERMES_TEST_{}", which.to_uppercase());
    let path = std::env::var_os(&var)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv").join(which).join("bin/python"));
    if path.exists() {
        return Some(path);
    }
    let msg = format!(
        "reference peer {which} missing at {} (run .ci/setup-python)",
        path.display()
    );
    if in_ci() {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

/// Directory holding the built binaries of this package (target/debug).
pub fn bin_dir() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_hermes-bus"));
    exe.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// PATH with our binaries first, so a Python client that auto-starts
/// `hermes-busd` starts ours.
pub fn path_with_bins() -> String {
    let old = std::env::var("PATH").unwrap_or_default();
    format!("{}:{}", bin_dir().display(), old)
}

/// Polls `f` every 20 ms until it returns Some or `limit` passes.
pub async fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if tokio::time::Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
