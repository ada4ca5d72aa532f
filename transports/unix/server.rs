//! The Unix-socket server: binds the socket (refusing to take over a live
//! bus's path), restricts it to its owner, bounds the connections, and
//! shuts down in order: stop accepting, let sessions drain for a bounded
//! time, remove the socket file.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{ErrorCode, ProtocolError};
use crate::router::error_frame;
use crate::transport::{Bus, Transport};

use super::frame::MAX_FRAME;
use super::session::{self, SessionLimits};

/// Settings of the Unix-socket server.
#[derive(Debug, Clone)]
pub struct UnixConfig {
    /// Where to listen.
    pub socket: PathBuf,
    /// Most connections open at once; more are answered
    /// `too_many_connections` and closed.
    pub max_connections: usize,
    /// Largest frame accepted (the reference: 10 MiB).
    pub max_frame: usize,
    /// Accept peers running as another user (by default only the bus's
    /// own uid may connect, checked by peer credentials).
    pub allow_other_users: bool,
    /// How long sessions may take to drain their outboxes at shutdown.
    pub drain_timeout: Duration,
    /// A registered session sent nothing for this long gets a keepalive
    /// `pong` (zero: never): `{"type":"pong","keepalive":true}`.
    pub keepalive: Duration,
    /// A frame must be complete this long after its first byte arrived.
    pub frame_timeout: Duration,
    /// Bytes buffered for incomplete large frames, all connections
    /// together; a connection that would pass it is refused and closed.
    pub max_partial_bytes: usize,
    /// Deepest nesting of a message accepted; deeper ones are answered
    /// `too_deep` and never forwarded.
    pub max_depth: usize,
}

impl UnixConfig {
    /// Defaults for a socket path.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        UnixConfig {
            socket: socket.into(),
            max_connections: 16384,
            max_frame: MAX_FRAME,
            allow_other_users: false,
            drain_timeout: Duration::from_secs(2),
            keepalive: Duration::from_millis(500),
            frame_timeout: Duration::from_secs(30),
            max_partial_bytes: 256 << 20,
            max_depth: crate::message::MAX_DEPTH,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another bus answers on this socket path; we refuse to steal it.
    #[error("a bus is already listening on {0}")]
    LiveBus(PathBuf),
    /// Something that is not a socket sits at the path; we do not delete it.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// The OS refused (directory, bind, permissions).
    #[error("cannot listen on {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The Unix-socket transport.
pub struct UnixServer {
    /// Its settings.
    config: UnixConfig,
    /// The bound listener, when bound ahead of `serve` (so a caller knows
    /// binding worked before it reports readiness).
    listener: Option<UnixListener>,
}

impl UnixServer {
    /// A server that binds when served.
    pub fn new(config: UnixConfig) -> Self {
        UnixServer {
            config,
            listener: None,
        }
    }

    /// Binds now: refuses a live bus's path, removes a stale socket file,
    /// creates the directory, binds, and makes the socket mode 0600.
    pub fn bind(config: UnixConfig) -> Result<Self, BindError> {
        let listener = bind_socket(&config.socket)?;
        Ok(UnixServer {
            config,
            listener: Some(listener),
        })
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.config.socket
    }
}

/// True when something accepts connections at `path`.
pub fn socket_is_live(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

fn bind_socket(path: &Path) -> Result<UnixListener, BindError> {
    let io = |source| BindError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                return Err(BindError::NotASocket(path.to_path_buf()));
            }
            if socket_is_live(path) {
                return Err(BindError::LiveBus(path.to_path_buf()));
            }
            tracing::info!(path = %path.display(), "removing stale socket file");
            std::fs::remove_file(path).map_err(io)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Raises the open-files soft limit to the hard limit (a bus with many
/// sessions needs one descriptor each).
pub fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit write only into the struct we pass.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[async_trait]
impl Transport for UnixServer {
    fn name(&self) -> &'static str {
        session::TRANSPORT
    }

    async fn serve(self: Box<Self>, bus: Bus, shutdown: CancellationToken) -> anyhow::Result<()> {
        let UnixServer { config, listener } = *self;
        let listener = match listener {
            Some(l) => l,
            None => bind_socket(&config.socket)?,
        };
        raise_fd_limit();
        tracing::info!(socket = %config.socket.display(), "unix transport listening");
        let limits = Arc::new(SessionLimits {
            max_frame: config.max_frame,
            drain_timeout: config.drain_timeout,
            keepalive: config.keepalive,
            frame_timeout: config.frame_timeout,
            max_depth: config.max_depth,
            partial: session::PartialBudget::new(config.max_partial_bytes),
        });
        bus.add_status(session::TRANSPORT, limits.partial.clone());
        let slots = Arc::new(Semaphore::new(config.max_connections));
        let tasks = TaskTracker::new();
        // SAFETY: geteuid has no preconditions.
        let my_uid = unsafe { libc::geteuid() };
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // EMFILE and the like: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            if !config.allow_other_users {
                match stream.peer_cred() {
                    Ok(cred) if cred.uid() == my_uid => {}
                    other => {
                        let who = other
                            .map(|c| c.uid().to_string())
                            .unwrap_or_else(|e| e.to_string());
                        tracing::warn!(peer_uid = %who, "refused a connection from another user");
                        tasks.spawn(refuse(stream, ErrorCode::PermissionDenied, "this bus accepts only its own user's processes (see --allow-other-users)".into()));
                        continue;
                    }
                }
            }
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::warn!(limit = config.max_connections, "connection limit reached");
                tasks.spawn(refuse(
                    stream,
                    ErrorCode::TooManyConnections,
                    format!(
                        "the bus is at its limit of {} connections",
                        config.max_connections
                    ),
                ));
                continue;
            };
            let bus = bus.clone();
            let limits = limits.clone();
            tasks.spawn(async move {
                session::run(bus, stream, limits).await;
                drop(permit);
            });
        }
        drop(listener);
        if let Err(e) = std::fs::remove_file(&config.socket) {
            tracing::warn!("could not remove {}: {e}", config.socket.display());
        }
        tracing::info!("unix transport stopping: draining sessions");
        bus.close_all(None);
        tasks.close();
        if tokio::time::timeout(config.drain_timeout + Duration::from_secs(1), tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some sessions did not drain in time");
        }
        Ok(())
    }
}

/// Tells a refused peer why, then closes.
async fn refuse(mut stream: UnixStream, code: ErrorCode, detail: String) {
    let d = error_frame(&ProtocolError::new(code, detail), None);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(d.unix_frame())).await;
    let _ = stream.shutdown().await;
}
