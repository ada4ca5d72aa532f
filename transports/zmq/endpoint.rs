//! ZeroMQ-style endpoints (`tcp://host:port`, `ipc:///path`): parsing,
//! binding, connecting, and a stream type over both.

use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use super::ZmqError;

/// Where a socket binds or connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `tcp://host:port`; host `*` binds every interface.
    Tcp(String),
    /// `ipc:///path/to/socket` (a Unix-domain socket).
    Ipc(PathBuf),
}

impl FromStr for Endpoint {
    type Err = ZmqError;
    fn from_str(s: &str) -> Result<Endpoint, ZmqError> {
        if let Some(rest) = s.strip_prefix("tcp://") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| ZmqError::Endpoint(s.to_owned()))?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(ZmqError::Endpoint(s.to_owned()));
            }
            let host = if host == "*" { "0.0.0.0" } else { host };
            Ok(Endpoint::Tcp(format!("{host}:{port}")))
        } else if let Some(rest) = s.strip_prefix("ipc://") {
            if rest.is_empty() {
                return Err(ZmqError::Endpoint(s.to_owned()));
            }
            Ok(Endpoint::Ipc(PathBuf::from(rest)))
        } else {
            Err(ZmqError::Endpoint(s.to_owned()))
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
            Endpoint::Ipc(p) => write!(f, "ipc://{}", p.display()),
        }
    }
}

/// A connected byte stream of either kind.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix-domain socket.
    Unix(UnixStream),
}

/// Boxed read half of a [`Stream`].
pub type ReadHalf = Box<dyn AsyncRead + Send + Unpin>;
/// Boxed write half of a [`Stream`].
pub type WriteHalf = Box<dyn AsyncWrite + Send + Unpin>;

impl Stream {
    /// Splits into owned halves (no lock between them).
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Stream::Unix(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// TCP keepalive: the first probe after this long without traffic.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Time between unanswered probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the kernel closes the connection.
pub const KEEPALIVE_PROBES: u32 = 6;

/// Turns TCP keepalive on: an idle connection whose peer host died (or
/// whose path was cut) is closed by the kernel after
/// [`KEEPALIVE_IDLE`] + [`KEEPALIVE_PROBES`] × [`KEEPALIVE_INTERVAL`],
/// 2 minutes, instead of never (Linux's default starts probing after
/// 2 hours, when enabled at all). It costs one small packet per idle
/// minute. It backs up ZMTP heartbeats (seconds, but off by default on
/// the proxy and possible only with peers that answer PINGs); while data
/// is unacknowledged, TCP's retransmission timeout applies instead. A
/// failure only loses this safety net, so it is logged, not fatal.
pub fn set_keepalive(s: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    if let Err(e) = socket2::SockRef::from(s).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "zmq: TCP keepalive not set");
    }
}

/// A bound listener of either kind.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix-domain socket (its path, removed on drop).
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `ep`. For ipc, a stale socket file (nobody answers) is
    /// replaced, a live one is an error.
    pub async fn bind(ep: &Endpoint) -> Result<Listener, ZmqError> {
        let fail = |e: std::io::Error| ZmqError::Bind(ep.to_string(), e);
        match ep {
            Endpoint::Tcp(addr) => Ok(Listener::Tcp(
                TcpListener::bind(addr.as_str()).await.map_err(fail)?,
            )),
            Endpoint::Ipc(path) => {
                if path.exists() {
                    if UnixStream::connect(path).await.is_ok() {
                        return Err(fail(std::io::Error::new(
                            std::io::ErrorKind::AddrInUse,
                            "a live socket answers at this path",
                        )));
                    }
                    std::fs::remove_file(path).map_err(fail)?;
                }
                Ok(Listener::Unix(
                    UnixListener::bind(path).map_err(fail)?,
                    path.clone(),
                ))
            }
        }
    }

    /// The endpoint actually bound (a tcp port 0 becomes the real port).
    pub fn local_endpoint(&self) -> Result<Endpoint, ZmqError> {
        match self {
            Listener::Tcp(l) => {
                let a = l.local_addr().map_err(ZmqError::Io)?;
                Ok(Endpoint::Tcp(a.to_string()))
            }
            Listener::Unix(_, p) => Ok(Endpoint::Ipc(p.clone())),
        }
    }

    /// Accepts one connection (TCP_NODELAY and TCP keepalive set).
    pub async fn accept(&self) -> std::io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                let _ = s.set_nodelay(true);
                set_keepalive(&s);
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l, _) => Ok(Stream::Unix(l.accept().await?.0)),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Connects once to `ep` (TCP_NODELAY and TCP keepalive set).
pub async fn connect(ep: &Endpoint) -> std::io::Result<Stream> {
    match ep {
        Endpoint::Tcp(addr) => {
            let s = TcpStream::connect(addr.as_str()).await?;
            let _ = s.set_nodelay(true);
            set_keepalive(&s);
            Ok(Stream::Tcp(s))
        }
        Endpoint::Ipc(path) => Ok(Stream::Unix(UnixStream::connect(path).await?)),
    }
}
