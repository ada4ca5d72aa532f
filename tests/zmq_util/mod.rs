//! Helpers shared by the ZeroMQ integration tests: an in-process proxy on
//! free ports, raw ZMTP peers, and Python reference peers.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hermes_bus::transports::zmq::endpoint::{self, ReadHalf, WriteHalf};
use hermes_bus::transports::zmq::proxy::{ProxyConfig, ProxyEndpoints, ProxyStats, ZmqProxy};
use hermes_bus::transports::zmq::zmtp::{self, FrameReader, SocketType};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Upper bound for any single test.
pub const TEST_LIMIT: Duration = Duration::from_secs(60);

/// A proxy running in this process.
pub struct TestProxy {
    /// Its bound addresses.
    pub ep: ProxyEndpoints,
    /// Its live counters.
    pub stats: Arc<ProxyStats>,
    /// Stops it.
    pub stop: CancellationToken,
    /// Its task.
    pub task: tokio::task::JoinHandle<()>,
}

impl TestProxy {
    /// XSUB address as a string.
    pub fn front(&self) -> String {
        self.ep.frontend.to_string()
    }
    /// XPUB address as a string.
    pub fn back(&self) -> String {
        self.ep.backend.to_string()
    }
    /// Stops the proxy and waits for it.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// A proxy on free loopback ports, with `tweak` applied to the config.
pub async fn start_proxy(tweak: impl FnOnce(&mut ProxyConfig)) -> TestProxy {
    let mut cfg = ProxyConfig {
        frontend: "tcp://127.0.0.1:0".into(),
        backend: "tcp://127.0.0.1:0".into(),
        ..ProxyConfig::default()
    };
    tweak(&mut cfg);
    let p = ZmqProxy::bind(cfg).await.expect("bind proxy");
    let ep = p.endpoints().expect("endpoints");
    let stats = p.stats();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = p.run(s).await {
            eprintln!("proxy failed: {e}");
        }
    });
    TestProxy {
        ep,
        stats,
        stop,
        task,
    }
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("probe port");
    l.local_addr().expect("addr").port()
}

/// A raw ZMTP peer after its handshake.
pub struct RawPeer {
    /// Read half.
    pub r: ReadHalf,
    /// Write half.
    pub w: WriteHalf,
    /// Parser with whatever followed the handshake.
    pub reader: FrameReader,
}

/// Connects to `addr` and handshakes as `ty`.
pub async fn raw_peer(addr: &str, ty: SocketType) -> RawPeer {
    let ep = addr.parse().expect("endpoint");
    let s = endpoint::connect(&ep).await.expect("connect");
    let (mut r, mut w) = s.into_split();
    let mut reader = FrameReader::new(64 << 20);
    zmtp::handshake(&mut r, &mut w, &mut reader, ty, &[], Duration::from_secs(5))
        .await
        .expect("handshake");
    RawPeer { r, w, reader }
}

impl RawPeer {
    /// Sends a multipart message.
    pub async fn send(&mut self, frames: &[&[u8]]) {
        let mut b = BytesMut::new();
        zmtp::put_message(&mut b, frames);
        self.w.write_all(&b).await.expect("send");
    }
    /// Sends a subscription.
    pub async fn subscribe(&mut self, prefix: &[u8]) {
        let mut b = BytesMut::new();
        zmtp::put_subscription(&mut b, true, prefix);
        self.w.write_all(&b).await.expect("subscribe");
    }
}

/// A Python reference peer (killed on drop) and its stdout lines.
pub struct PyPeer {
    /// The process.
    pub child: Child,
    /// Its stdout, one JSON value per line.
    pub lines: mpsc::UnboundedReceiver<serde_json::Value>,
}

/// The reference helper script.
pub fn peer_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/py/zmq_peer.py")
}

/// Starts `zmq_peer.py MODE ARGS` with `python` and waits for its
/// `{"ready":true}` line.
pub async fn py_peer(python: &std::path::Path, args: &[&str]) -> PyPeer {
    py_script_peer(python, &peer_script(), args).await
}

/// A script under `tests/py/`.
pub fn py_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(name)
}

/// Starts `script ARGS` with `python` and waits for its `{"ready":true}`
/// line.
pub async fn py_script_peer(
    python: &std::path::Path,
    script: &std::path::Path,
    args: &[&str],
) -> PyPeer {
    let mut child = Command::new(python)
        .arg(script)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn python peer");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) {
                if tx.send(v).is_err() {
                    break;
                }
            }
        }
    });
    let first = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("python peer ready in time")
        .expect("python peer output");
    assert_eq!(
        first["ready"],
        serde_json::json!(true),
        "python peer: {first}"
    );
    PyPeer { child, lines: rx }
}

/// Polls `f` every 10 ms until true or `limit`.
pub async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}

/// A fake proxy XPUB side: a listener that hands out raw peers after the
/// ZMTP handshake, so tests can feed a receiver exact bytes.
pub struct FakeXpub {
    /// The listener.
    pub listener: tokio::net::TcpListener,
    /// Its address as `tcp://...`.
    pub addr: String,
}

impl FakeXpub {
    /// Binds on a free loopback port.
    pub async fn bind() -> FakeXpub {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = format!("tcp://{}", listener.local_addr().expect("addr"));
        FakeXpub { listener, addr }
    }

    /// Accepts one receiver and completes the handshake as XPUB.
    pub async fn accept(&self) -> RawPeer {
        let (s, _) = self.listener.accept().await.expect("accept");
        let (r, w) = s.into_split();
        let (mut r, mut w): (ReadHalf, WriteHalf) = (Box::new(r), Box::new(w));
        let mut reader = FrameReader::new(1 << 20);
        zmtp::handshake(
            &mut r,
            &mut w,
            &mut reader,
            SocketType::XPub,
            &[],
            Duration::from_secs(5),
        )
        .await
        .expect("handshake");
        RawPeer { r, w, reader }
    }
}

/// Like [`raw_peer`], but an error instead of a panic when the connection
/// or the handshake fails (e.g. refused for the connection limit).
pub async fn try_raw_peer(addr: &str, ty: SocketType) -> Result<RawPeer, String> {
    let ep = addr.parse().map_err(|e| format!("{e}"))?;
    let s = endpoint::connect(&ep).await.map_err(|e| format!("{e}"))?;
    let (mut r, mut w) = s.into_split();
    let mut reader = FrameReader::new(64 << 20);
    zmtp::handshake(&mut r, &mut w, &mut reader, ty, &[], Duration::from_secs(5))
        .await
        .map_err(|e| format!("{e}"))?;
    Ok(RawPeer { r, w, reader })
}

impl RawPeer {
    /// The next item read, or None when the peer closed or `limit` passed.
    pub async fn next_item(&mut self, limit: Duration) -> Option<zmtp::Inbound> {
        tokio::time::timeout(limit, async {
            loop {
                match self.reader.next_item() {
                    Ok(Some(item)) => return Some(item),
                    Ok(None) => {}
                    Err(_) => return None,
                }
                match self.reader.fill(&mut self.r).await {
                    Ok(true) => {}
                    _ => return None,
                }
            }
        })
        .await
        .ok()
        .flatten()
    }
}
