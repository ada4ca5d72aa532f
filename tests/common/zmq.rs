//! ZeroMQ in this process: our proxy on free ports (alone or as the bus's
//! transport), our receiver as tests configure it, and raw ZMTP peers.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hermes_bus::transports::zmq::endpoint::{self, ReadHalf, WriteHalf};
use hermes_bus::transports::zmq::proxy::{ProxyConfig, ProxyEndpoints, ProxyStats, ZmqProxy};
use hermes_bus::transports::zmq::zmtp::{self, FrameReader, SocketType};
use hermes_bus::transports::zmq::{Receiver, ReceiverConfig, SlowPolicy, ZmqTransport};
use hermes_bus::{Bus, Transport};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

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
    run_proxy(cfg).await
}

/// A proxy bound as `cfg` says, running in this process.
pub async fn run_proxy(cfg: ProxyConfig) -> TestProxy {
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

/// The proxy as the transport of `bus` (as `hermes-bus server --zmq`
/// runs it), on free loopback ports.
pub async fn serve_zmq(bus: &Bus) -> TestProxy {
    let t = ZmqTransport::bind(ProxyConfig {
        frontend: "tcp://127.0.0.1:0".into(),
        backend: "tcp://127.0.0.1:0".into(),
        ..ProxyConfig::default()
    })
    .await
    .expect("bind");
    let ep = t.endpoints().expect("endpoints");
    let stats = t.stats();
    let stop = CancellationToken::new();
    let serve = Box::new(t).serve(bus.clone(), stop.clone());
    let task = tokio::spawn(async move {
        if let Err(e) = serve.await {
            eprintln!("zmq transport failed: {e}");
        }
    });
    TestProxy {
        ep,
        stats,
        stop,
        task,
    }
}

/// A started receiver of `addr` named `r` that never stops on lag
/// (loaded CI machines), with `tune` applied to its config.
pub fn receiver(addr: &str, tune: impl FnOnce(&mut ReceiverConfig)) -> Receiver {
    let mut cfg = ReceiverConfig::new(addr, "r");
    cfg.slow_policy = SlowPolicy::Warn;
    tune(&mut cfg);
    let mut r = Receiver::with_config(cfg).expect("receiver");
    r.start().expect("start");
    r
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
    try_raw_peer(addr, ty)
        .await
        .unwrap_or_else(|e| panic!("raw peer of {addr}: {e}"))
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
