//! The bus in this process: a Unix-socket server on a temp socket, raw
//! protocol connections to it, and the client library's receive.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::BytesMut;
use hermes_bus::hooks::HookEngine;
use hermes_bus::transports::unix::{frame, BusClient, UnixConfig, UnixServer};
use hermes_bus::{Bus, RouterConfig, Transport};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

/// A bus serving a Unix socket in this process.
pub struct Served {
    /// The bus handle (router, counters).
    pub bus: Bus,
    /// Stops the server.
    pub shutdown: CancellationToken,
    /// The server task.
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Serves a bus (with `cfg`, `hooks` and its sweeper) on `socket`, the
/// Unix transport's settings adjusted by `tune`.
pub fn serve_unix(
    socket: &Path,
    cfg: RouterConfig,
    hooks: HookEngine,
    tune: impl FnOnce(&mut UnixConfig),
) -> Served {
    let mut unix = UnixConfig::new(socket);
    tune(&mut unix);
    let server = UnixServer::bind(unix).expect("bind");
    let bus = Bus::new(cfg, hooks);
    let shutdown = CancellationToken::new();
    bus.spawn_sweeper(Duration::from_millis(100), shutdown.clone());
    let task = tokio::spawn(Box::new(server).serve(bus.clone(), shutdown.clone()));
    Served {
        bus,
        shutdown,
        task,
    }
}

/// The next message of a client-library client within `limit`; panics on
/// timeout or a closed client.
pub async fn client_recv(c: &mut BusClient, limit: Duration) -> Value {
    tokio::time::timeout(limit, c.recv())
        .await
        .expect("message in time")
        .expect("message")
}

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
        let Served {
            bus,
            shutdown,
            task,
        } = serve_unix(&socket, cfg, hooks, tune);
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

    /// Connects, asks for `stats` and returns the reply.
    pub async fn stats(path: &Path) -> Value {
        let mut admin = Raw::connect(path).await;
        admin.send(&serde_json::json!({"type": "stats"})).await;
        admin.recv().await.expect("stats")
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
