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
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
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

use bytes::BytesMut;
use hermes_bus::hooks::HookEngine;
use hermes_bus::transports::unix::{frame, UnixConfig, UnixServer};
use hermes_bus::{Bus, RouterConfig, Transport};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

/// A bus served in-process on a socket in a temp dir.
pub struct TestBus {
    /// Holds the temp dir alive.
    pub dir: tempfile::TempDir,
    /// The socket path.
    pub socket: PathBuf,
    /// The bus handle (router, counters).
    pub bus: Bus,
    /// Stops the server.
    pub shutdown: CancellationToken,
    /// The server task.
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestBus {
    /// Starts a bus with the given router config and hooks.
    pub async fn start_with(cfg: RouterConfig, hooks: HookEngine) -> TestBus {
        TestBus::start_unix(cfg, hooks, |_| {}).await
    }

    /// Starts a bus whose Unix transport settings `tune` adjusts.
    pub async fn start_unix(
        cfg: RouterConfig,
        hooks: HookEngine,
        tune: impl FnOnce(&mut UnixConfig),
    ) -> TestBus {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("hermes-bus.sock");
        let mut unix = UnixConfig::new(&socket);
        tune(&mut unix);
        let server = UnixServer::bind(unix).expect("bind");
        let bus = Bus::new(cfg, hooks);
        let shutdown = CancellationToken::new();
        bus.spawn_sweeper(Duration::from_millis(100), shutdown.clone());
        let task = tokio::spawn(Box::new(server).serve(bus.clone(), shutdown.clone()));
        TestBus {
            dir,
            socket,
            bus,
            shutdown,
            task,
        }
    }

    /// Starts a bus with defaults and no hooks.
    pub async fn start() -> TestBus {
        TestBus::start_with(RouterConfig::default(), HookEngine::disabled()).await
    }

    /// The router's totals.
    pub fn totals(&self) -> hermes_bus::stats::Totals {
        self.bus.router().totals()
    }

    /// Stops the server and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// A raw protocol connection for tests: frames in, JSON out.
pub struct Raw {
    /// The socket.
    pub s: UnixStream,
    /// Bytes read but not yet framed.
    buf: BytesMut,
}

impl Raw {
    /// Connects.
    pub async fn connect(path: &Path) -> Raw {
        Raw {
            s: UnixStream::connect(path).await.expect("connect"),
            buf: BytesMut::new(),
        }
    }

    /// Connects and registers `name`; returns after `registered`.
    pub async fn register(path: &Path, name: &str) -> Raw {
        let mut r = Raw::connect(path).await;
        r.send(&serde_json::json!({"type": "register", "endpoint": name}))
            .await;
        let v = r.recv().await.expect("registered reply");
        assert_eq!(v["type"], "registered", "{v}");
        r
    }

    /// Sends raw bytes.
    pub async fn send_bytes(&mut self, b: &[u8]) {
        self.s.write_all(b).await.expect("write");
    }

    /// Sends one frame around `payload`.
    pub async fn send_payload(&mut self, payload: &[u8]) {
        self.send_bytes(&frame::encode(payload)).await;
    }

    /// Sends one JSON frame.
    pub async fn send(&mut self, v: &Value) {
        self.send_payload(&serde_json::to_vec(v).expect("json"))
            .await;
    }

    /// Next frame as JSON within 5 s; None on EOF or timeout.
    pub async fn recv(&mut self) -> Option<Value> {
        self.recv_within(Duration::from_secs(5)).await
    }

    /// Next frame as JSON within `limit`; None on EOF or timeout. The
    /// bus's keepalive pongs (`"keepalive": true`, sent to quiet
    /// registered sessions) are skipped, as the reference clients skip
    /// every pong.
    pub async fn recv_within(&mut self, limit: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(Some(p)) = frame::decode(&mut self.buf, frame::MAX_FRAME) {
                let v: Value = serde_json::from_slice(&p).expect("bus sent invalid JSON");
                if v["keepalive"] == true {
                    continue;
                }
                return Some(v);
            }
            let r = tokio::time::timeout_at(deadline, self.s.read_buf(&mut self.buf)).await;
            match r {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Next frame's raw payload within 5 s (any codec); None on EOF or
    /// timeout.
    pub async fn recv_payload(&mut self) -> Option<bytes::Bytes> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(p)) = frame::decode(&mut self.buf, frame::MAX_FRAME) {
                let keepalive = hermes_bus::codec::decode::<Value>(&p)
                    .is_ok_and(|v| v["type"] == "pong" && v["keepalive"] == true);
                if keepalive {
                    continue;
                }
                return Some(p);
            }
            match tokio::time::timeout_at(deadline, self.s.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// True when the bus closed the connection within `limit`.
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        let mut scratch = [0u8; 4096];
        loop {
            match tokio::time::timeout_at(deadline, self.s.read(&mut scratch)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    }
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

/// A real `hermes-bus server` process on a socket in a temp dir (killed
/// on drop), for tests that watch the process itself (its memory).
pub struct ServerProcess {
    /// Holds the temp dir alive.
    pub dir: tempfile::TempDir,
    /// The socket path.
    pub socket: PathBuf,
    /// The process.
    pub child: tokio::process::Child,
}

impl ServerProcess {
    /// Starts `hermes-bus server ARGS` and waits until it listens.
    pub async fn start(args: &[&str]) -> ServerProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("bus.sock");
        let child = tokio::process::Command::new(bin_dir().join("hermes-bus"))
            .arg("--socket")
            .arg(&socket)
            .arg("server")
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("server starts");
        let up = wait_for(Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(&socket).ok()
        })
        .await;
        assert!(up.is_some(), "server listening");
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
