//! The reference Python peers: finding the venv's interpreter, running
//! a `-c` script, and driving a script of `tests/py/` by its stdout lines.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::process::Child;
use tokio::sync::mpsc;

use super::process::{in_ci, lines_of, path_with_bins, repo_root};

/// Finds the Python interpreter of a reference venv (`py07` or `py03`),
/// overridable with `HERMES_TEST_PY07` / `HERMES_TEST_PY03`.
/// Returns None (and prints why) when it is missing outside CI; panics in
/// CI (`CI=true`): there a missing peer fails, never skips.
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

/// A script under `tests/py/`.
pub fn script(name: &str) -> PathBuf {
    repo_root().join("tests/py").join(name)
}

/// Runs a Python script with the given interpreter and environment,
/// bounded by `limit`; returns stdout (panics with stderr on failure).
pub async fn run_python(
    python: &Path,
    script: &str,
    env: &[(&str, &str)],
    limit: Duration,
) -> String {
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg("-c")
        .arg(script)
        .env("PATH", path_with_bins())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .expect("python script timed out")
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Why no line came.
#[derive(Debug, PartialEq, Eq)]
pub enum NoLine {
    /// Nothing within the limit.
    TimedOut,
    /// The script's stdout ended.
    Ended,
}

/// A script of `tests/py/` run by a reference interpreter (killed on
/// drop); its stdout comes line by line, as the script's protocol says
/// (text lines like `ready` / `session <id>`, or one JSON value a line).
pub struct PyPeer {
    /// The process.
    pub child: Child,
    /// Its stdout lines.
    lines: mpsc::UnboundedReceiver<String>,
}

impl PyPeer {
    /// Starts `python tests/py/SCRIPT ARGS` with `env` (and our binaries
    /// first on PATH, so a client that autostarts a bus starts ours).
    pub fn spawn(python: &Path, script: &str, args: &[&str], env: &[(&str, &str)]) -> PyPeer {
        let mut cmd = tokio::process::Command::new(python);
        cmd.arg(self::script(script))
            .args(args)
            .env("PATH", path_with_bins())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn python peer");
        let mut out = lines_of(child.stdout.take().expect("stdout"));
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(l)) = out.next_line().await {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        PyPeer { child, lines }
    }

    /// Starts a script that speaks JSON lines and waits (20 s) for its
    /// first line, which must be `{"ready": true}`.
    pub async fn spawn_ready(python: &Path, script: &str, args: &[&str]) -> PyPeer {
        let mut peer = PyPeer::spawn(python, script, args, &[]);
        let first = peer
            .next_json(Duration::from_secs(20))
            .await
            .expect("python peer ready in time");
        assert_eq!(
            first["ready"],
            serde_json::json!(true),
            "python peer: {first}"
        );
        peer
    }

    /// The next line within `limit`, or why there is none.
    pub async fn read(&mut self, limit: Duration) -> Result<String, NoLine> {
        match tokio::time::timeout(limit, self.lines.recv()).await {
            Ok(Some(l)) => Ok(l),
            Ok(None) => Err(NoLine::Ended),
            Err(_) => Err(NoLine::TimedOut),
        }
    }

    /// The next line within `limit`; None on timeout or end.
    pub async fn next_line(&mut self, limit: Duration) -> Option<String> {
        self.read(limit).await.ok()
    }

    /// The next line within `limit`; panics on timeout or end.
    pub async fn line(&mut self, limit: Duration) -> String {
        match self.read(limit).await {
            Ok(l) => l,
            Err(e) => panic!("python peer: no line ({e:?} within {limit:?})"),
        }
    }

    /// The next line that parses as JSON (others are skipped), within
    /// `limit` in all; None on timeout or end.
    pub async fn next_json(&mut self, limit: Duration) -> Option<Value> {
        let end = tokio::time::Instant::now() + limit;
        loop {
            let left = end.saturating_duration_since(tokio::time::Instant::now());
            let l = self.read(left).await.ok()?;
            if let Ok(v) = serde_json::from_str(&l) {
                return Some(v);
            }
        }
    }

    /// Every line until the script's stdout ends, then its exit; both
    /// within `limit`.
    pub async fn finish(mut self, limit: Duration) -> Vec<String> {
        tokio::time::timeout(limit, async {
            let mut rest = Vec::new();
            while let Some(l) = self.lines.recv().await {
                rest.push(l);
            }
            let _ = self.child.wait().await;
            rest
        })
        .await
        .expect("python peer finished in time")
    }
}
