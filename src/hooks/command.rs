//! The command hook: one process per event, the message JSON on its
//! standard input (the reference bus's behaviour).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStderr, Command};

use super::config::HookSpec;
use super::error::HookError;
use super::event::HookEvent;
use super::filter::HookFilter;
use super::hook::Hook;

/// How much of a hook's stderr is kept for the log; the rest is read and
/// discarded so the hook never blocks on a full pipe.
pub const STDERR_LOG_LIMIT: usize = 4096;

/// How long to keep reading stderr after the hook exited, in case a
/// background child of the hook still holds the pipe open.
const STDERR_GRACE: Duration = Duration::from_millis(200);

/// How often a spawn that failed with "text file busy" is retried (the file
/// was being written a moment ago, e.g. by an editor or an installer).
const SPAWN_BUSY_RETRIES: u32 = 5;

/// How a hook file is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launch {
    /// The file is executable: run it directly.
    Direct,
    /// A non-executable `.py` file: run it with `python3`.
    Python,
}

/// Decides how `path` is run, from what the file is now.
///
/// Executable regular file: directly. Non-executable file ending in `.py`:
/// with `python3`. Anything else is [`HookError::NotRunnable`]; a path that
/// does not exist is [`HookError::Missing`].
pub fn launch_for(path: &Path) -> Result<Launch, HookError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(HookError::Missing {
                path: path.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(HookError::Inspect {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !meta.is_file() {
        return Err(HookError::NotRunnable {
            path: path.to_path_buf(),
        });
    }
    if meta.permissions().mode() & 0o111 != 0 {
        return Ok(Launch::Direct);
    }
    if path.extension().is_some_and(|e| e == "py") {
        return Ok(Launch::Python);
    }
    Err(HookError::NotRunnable {
        path: path.to_path_buf(),
    })
}

/// A hook that runs a file once per event with the event's JSON on stdin.
///
/// stdout is discarded; stderr is logged (the first [`STDERR_LOG_LIMIT`]
/// bytes). The process runs in its own process group, and when the call is
/// dropped before the process ended (time limit, shutdown) the whole group
/// is killed and the process reaped.
#[derive(Debug, Clone)]
pub struct CommandHook {
    /// The file to run; decided anew on each run whether directly or with
    /// python3, so a hook fixed or installed later is picked up.
    path: PathBuf,
    /// The path as text, for logs and stats.
    name: String,
    /// Which events this hook wants.
    filter: HookFilter,
    /// Its own time limit, if the configuration gave one.
    timeout: Option<Duration>,
}

impl CommandHook {
    /// A command hook for `path` with `filter` and the engine's time limit.
    pub fn new(path: impl Into<PathBuf>, filter: HookFilter) -> CommandHook {
        let path = path.into();
        CommandHook {
            name: path.display().to_string(),
            path,
            filter,
            timeout: None,
        }
    }

    /// The hook a configuration entry describes.
    pub fn from_spec(spec: &HookSpec) -> CommandHook {
        CommandHook::new(spec.path.clone(), spec.filter.clone()).with_timeout(spec.timeout)
    }

    /// Sets this hook's own time limit (`None`: the engine's default).
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> CommandHook {
        self.timeout = timeout;
        self
    }

    /// The file this hook runs.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Builds the command for one run.
    fn command(&self, launch: Launch) -> Command {
        let mut cmd = match launch {
            Launch::Direct => Command::new(&self.path),
            Launch::Python => {
                let mut c = Command::new("python3");
                c.arg(&self.path);
                c
            }
        };
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        cmd
    }

    /// Spawns the process, retrying briefly on "text file busy".
    async fn spawn(&self, launch: Launch) -> Result<Child, HookError> {
        let mut attempt = 0;
        loop {
            match self.command(launch).spawn() {
                Ok(child) => return Ok(child),
                Err(e)
                    if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < SPAWN_BUSY_RETRIES =>
                {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
                }
                Err(source) => {
                    return Err(HookError::Spawn {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Hook for CommandHook {
    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> &HookFilter {
        &self.filter
    }

    fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    async fn call(&self, event: &HookEvent) -> Result<(), HookError> {
        let launch = launch_for(&self.path)?;
        let child = self.spawn(launch).await?;
        let mut guard = ChildGuard {
            child: Some(child),
            reaped: false,
        };
        let Some(child) = guard.child.as_mut() else {
            // Unreachable: the guard was just filled.
            return Ok(());
        };
        let stdin = child.stdin.take();
        let stderr = child.stderr.take();
        let pid = child.id();

        let json = event.json.clone();
        let feed = async move {
            if let Some(mut stdin) = stdin {
                if let Err(e) = stdin.write_all(&json).await {
                    // A hook that does not read its input is not an error.
                    if e.kind() != std::io::ErrorKind::BrokenPipe {
                        tracing::debug!(hook = %self.name, error = %e, "writing hook stdin failed");
                    }
                }
                // Dropping stdin closes it: the hook sees end of input.
            }
        };
        let mut captured = Vec::new();
        let mut truncated = false;
        let status = {
            let drain = read_capped(stderr, &mut captured, &mut truncated);
            tokio::pin!(feed, drain);
            let wait = child.wait();
            tokio::pin!(wait);
            let mut fed = false;
            let mut drained = false;
            let status = loop {
                tokio::select! {
                    () = &mut feed, if !fed => fed = true,
                    () = &mut drain, if !drained => drained = true,
                    status = &mut wait => break status,
                }
            };
            if !drained {
                // The hook exited; a background child of it may still hold
                // stderr open, so read what is left for a short while only.
                let _ = tokio::time::timeout(STDERR_GRACE, &mut drain).await;
            }
            status
        };
        let status = status.map_err(|source| HookError::Wait {
            path: self.path.clone(),
            source,
        })?;
        guard.reaped = true;

        if !captured.is_empty() {
            let text = String::from_utf8_lossy(&captured);
            let text = text.trim_end();
            if status.success() {
                tracing::info!(hook = %self.name, pid, truncated, stderr = %text, "hook stderr");
            } else {
                tracing::warn!(hook = %self.name, pid, truncated, stderr = %text, "hook stderr");
            }
        }
        if status.success() {
            Ok(())
        } else {
            Err(HookError::Exit {
                path: self.path.clone(),
                status,
            })
        }
    }
}

/// Reads `stderr` to its end, keeping the first [`STDERR_LOG_LIMIT`] bytes
/// in `buf` and discarding the rest.
async fn read_capped(stderr: Option<ChildStderr>, buf: &mut Vec<u8>, truncated: &mut bool) {
    let Some(mut stderr) = stderr else { return };
    let mut chunk = [0u8; 1024];
    loop {
        match stderr.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let room = STDERR_LOG_LIMIT.saturating_sub(buf.len());
                if n > room {
                    *truncated = true;
                }
                buf.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
}

/// Owns a hook process until it was reaped. Dropped earlier (time limit,
/// shutdown), it kills the process's whole group and reaps it in the
/// background.
struct ChildGuard {
    /// The process; taken by `drop` to reap it.
    child: Option<Child>,
    /// Set once `wait` returned: the pid may since belong to someone else,
    /// so nothing may be killed any more.
    reaped: bool,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
            // The hook leads its own process group (process_group(0)):
            // kill the group so that children of a shell script die too.
            // SAFETY: kill(2) has no memory-safety preconditions; the group
            // id is our unreaped child's pid, so it cannot have been reused.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        let _ = child.start_kill();
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    let _ = child.wait().await;
                });
            }
            // No runtime: dropping the child leaves reaping to tokio's
            // orphan queue (kill_on_drop is set).
            Err(_) => drop(child),
        }
    }
}
