//! Our binaries as processes: where they are, a temp bus root to run the
//! CLI in, a real server process, and reading a child's output lines.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader, Lines};

use super::wait::eventually;

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// True when running under CI, where a missing interop peer is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// Directory holding the built binaries of this package (target/debug).
pub fn bin_dir() -> PathBuf {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_hermes-bus"));
    exe.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// One of our binaries (`hermes-bus`, `hermes-busd`, `hermes-bus-server`).
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// PATH with our binaries first, so a Python client that auto-starts
/// `hermes-busd` starts ours.
pub fn path_with_bins() -> String {
    let old = std::env::var("PATH").unwrap_or_default();
    format!("{}:{}", bin_dir().display(), old)
}

/// Whether process `pid` is alive (exists and is not a zombie).
pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let exists = unsafe { libc::kill(pid, 0) == 0 };
    exists
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
}

/// True once something accepts connections on the Unix socket `socket`
/// (within `limit`).
pub async fn listening(socket: &Path, limit: Duration) -> bool {
    eventually(limit, || {
        std::os::unix::net::UnixStream::connect(socket).is_ok()
    })
    .await
}

/// A child's output (stdout or stderr) as lines.
pub fn lines_of<R: tokio::io::AsyncRead + Unpin>(r: R) -> Lines<BufReader<R>> {
    BufReader::new(r).lines()
}

/// The next line within `limit`; panics on timeout or end of output.
pub async fn next_line<R: AsyncBufRead + Unpin>(lines: &mut Lines<R>, limit: Duration) -> String {
    tokio::time::timeout(limit, lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("no line within {limit:?}"))
        .expect("read")
        .expect("a line before the end of output")
}

/// A temp bus root (`HERMES_BUS_ROOT`) to run our binaries in, as a user
/// would; the daemon started in it is killed on drop.
pub struct TempRoot {
    dir: tempfile::TempDir,
}

impl TempRoot {
    /// A fresh root.
    pub fn new() -> TempRoot {
        TempRoot {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }
    /// Its directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    /// The bus socket of this root.
    pub fn socket(&self) -> PathBuf {
        self.path().join("hermes-bus.sock")
    }
    /// The daemon's pid file.
    pub fn pid_file(&self) -> PathBuf {
        self.path().join("run/busd.pid")
    }
    /// The pid in the pid file.
    pub fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }
    /// `bin` with this root, a `HERMES_HOME` inside it, no hooks or
    /// autostart setting from the caller's environment, our binaries
    /// first on PATH; killed on drop.
    pub fn cmd(&self, bin: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(self::bin(bin));
        c.env("HERMES_BUS_ROOT", self.path())
            .env("HERMES_HOME", self.path().join("home"))
            .env_remove("HERMES_BUS_HOOKS")
            .env_remove("HERMES_BUS_AUTOSTART")
            .env("PATH", path_with_bins())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }
    /// Runs `bin ARGS` (within 30 s); (exit code, stdout, stderr).
    pub async fn run(&self, bin: &str, args: &[&str]) -> (i32, String, String) {
        output_of(self.cmd(bin).args(args), Duration::from_secs(30)).await
    }
    /// Like [`TempRoot::run`], stdout and stderr as one text.
    pub async fn run_text(&self, bin: &str, args: &[&str]) -> (i32, String) {
        let (code, out, err) = self.run(bin, args).await;
        (code, format!("{out}{err}"))
    }
    /// `hermes-bus ARGS`: (exit code, stdout, stderr).
    pub async fn bus(&self, args: &[&str]) -> (i32, String, String) {
        self.run("hermes-bus", args).await
    }
    /// `hermes-busd ARGS`: (exit code, stdout and stderr).
    pub async fn busd(&self, args: &[&str]) -> (i32, String) {
        self.run_text("hermes-busd", args).await
    }
    /// `hermes-busd start`, which must succeed.
    pub async fn start(&self) {
        let (code, out) = self.busd(&["start"]).await;
        assert_eq!(code, 0, "{out}");
    }
    /// `hermes-busd status --json`.
    pub async fn status_json(&self) -> serde_json::Value {
        let out = self
            .cmd("hermes-busd")
            .args(["status", "--json"])
            .output()
            .await
            .expect("status runs");
        serde_json::from_slice(&out.stdout).expect("status --json is JSON")
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        // Never leave a daemon behind, whatever the test did.
        if let Some(pid) = self.pid() {
            // SAFETY: plain kill(2) of the daemon this test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// A real server process on a socket in a temp dir (killed on drop), for
/// tests of the binaries and of the process itself (its memory).
pub struct ServerProcess {
    /// Holds the temp dir alive.
    pub dir: tempfile::TempDir,
    /// The socket path.
    pub socket: PathBuf,
    /// The process.
    pub child: tokio::process::Child,
}

impl ServerProcess {
    /// Starts `hermes-bus --socket S server ARGS` and waits until it listens.
    pub async fn start(args: &[&str]) -> ServerProcess {
        let mut all = vec!["server"];
        all.extend_from_slice(args);
        ServerProcess::start_bin("hermes-bus", &all, |_| {}).await
    }

    /// Starts `BIN --socket S ARGS` (output discarded, `HERMES_HOME` in
    /// the temp dir, no `HERMES_BUS_HOOKS`), with `tune` applied to the
    /// command, and waits until it listens.
    pub async fn start_bin(
        bin: &str,
        args: &[&str],
        tune: impl FnOnce(&mut tokio::process::Command),
    ) -> ServerProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("bus.sock");
        let mut cmd = tokio::process::Command::new(self::bin(bin));
        cmd.arg("--socket")
            .arg(&socket)
            .args(args)
            .env("HERMES_HOME", dir.path().join("home"))
            .env_remove("HERMES_BUS_HOOKS")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        tune(&mut cmd);
        let child = cmd.spawn().expect("server starts");
        assert!(
            listening(&socket, Duration::from_secs(20)).await,
            "server listening"
        );
        ServerProcess { dir, socket, child }
    }

    /// Peak resident memory so far, in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> u64 {
        self.proc_kib("VmHWM:")
    }

    /// Resident memory now, in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        self.proc_kib("VmRSS:")
    }

    fn proc_kib(&self, field: &str) -> u64 {
        let pid = self.child.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("proc field")
    }
}

/// Runs a command to its end within `limit`; (exit code, stdout, stderr).
pub async fn output_of(
    cmd: &mut tokio::process::Command,
    limit: Duration,
) -> (i32, String, String) {
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .expect("command finished in time")
        .expect("command runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
