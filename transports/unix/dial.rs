//! The one way a Unix-socket client gets a connection: dial the bus
//! socket (starting the daemon when nobody answers and autostart is on),
//! then, for a registered client, the `register` exchange. Also the reply
//! reading shared by the short-lived requests.

use std::path::Path;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::client::{ClientConfig, ClientError};
use super::frame::{self, MAX_FRAME};
use crate::error::{ErrorCode, ProtocolError};

/// One frame of any serializable value, encoded in place (no second copy).
pub(crate) fn frame_of<T: serde::Serialize + ?Sized>(v: &T) -> Bytes {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(&[0; 4]);
    if serde_json::to_writer(&mut out, v).is_err() {
        out.truncate(4);
    }
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Bytes::from(out)
}

/// Reads one frame and decodes it (JSON, or MessagePack when the bus was
/// asked for it); None when the bus closed the connection.
pub(crate) async fn read_frame(
    stream: &mut UnixStream,
    buf: &mut BytesMut,
) -> Result<Option<Value>, ClientError> {
    loop {
        match frame::decode(buf, MAX_FRAME) {
            Ok(Some(p)) => {
                return crate::codec::decode::<Value>(&p)
                    .map(Some)
                    .map_err(|e| ClientError::Protocol(format!("undecodable frame from bus: {e}")))
            }
            Ok(None) => {}
            Err(e) => return Err(ClientError::Protocol(e.to_string())),
        }
        if stream.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// The bus's `error` reply as a typed error; None for any other reply.
pub(crate) fn as_error(v: &Value) -> Option<ProtocolError> {
    if v.get("type")?.as_str()? != "error" {
        return None;
    }
    let code = v
        .get("code")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let detail = v
        .get("detail")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let code = match code.as_str() {
        "endpoint_not_found" => ErrorCode::EndpointNotFound,
        "already_registered" => ErrorCode::AlreadyRegistered,
        "replaced" => ErrorCode::Replaced,
        "permission_denied" => ErrorCode::PermissionDenied,
        "too_many_connections" => ErrorCode::TooManyConnections,
        "bad_field" => ErrorCode::BadField,
        "missing_field" => ErrorCode::MissingField,
        "slow_consumer" => ErrorCode::SlowConsumer,
        "not_delivered" => ErrorCode::NotDelivered,
        "shutting_down" => ErrorCode::ShuttingDown,
        "heartbeat_timeout" => ErrorCode::HeartbeatTimeout,
        "frame_too_large" => ErrorCode::FrameTooLarge,
        "bad_json" => ErrorCode::BadJson,
        "bad_utf8" => ErrorCode::BadUtf8,
        "bad_msgpack" => ErrorCode::BadMsgpack,
        "not_object" => ErrorCode::NotObject,
        _ => ErrorCode::UnknownType,
    };
    Some(ProtocolError::new(
        code,
        if detail.is_empty() {
            code_text(v)
        } else {
            detail
        },
    ))
}

fn code_text(v: &Value) -> String {
    v.get("code").map(|c| c.to_string()).unwrap_or_default()
}

/// Connects, starting the daemon once if nobody answers and `autostart`
/// (see [`ClientConfig::autostart`]). Nobody answering ends as
/// [`ClientError::NotRunning`], with the reason autostart did not help.
pub(crate) async fn dial(cfg: &ClientConfig) -> Result<UnixStream, ClientError> {
    match UnixStream::connect(&cfg.socket).await {
        Ok(s) => Ok(s),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            let not_running = |reason: String| ClientError::NotRunning {
                socket: cfg.socket.clone(),
                reason,
            };
            if let Err(reason) = may_autostart(cfg) {
                return Err(not_running(reason));
            }
            if let Some(announce) = cfg.on_autostart {
                announce(&cfg.socket);
            }
            start_daemon_auto(&cfg.busd, &cfg.socket)
                .await
                .map_err(|r| not_running(format!("autostart failed: {r}")))?;
            UnixStream::connect(&cfg.socket).await.map_err(|e| {
                not_running(format!("autostarted, but the socket does not answer: {e}"))
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether the client may start the daemon for its socket; the reason
/// when not: autostart is off, the bus was stopped explicitly a moment
/// ago ([`crate::daemon::stopped_recently`]), or the socket's directory
/// does not exist and the socket is not the default one (a socket the
/// user named never gets directories created for it).
pub fn may_autostart(cfg: &ClientConfig) -> Result<(), String> {
    if !cfg.autostart {
        return Err(
            "autostart is off (--no-autostart or HERMES_BUS_AUTOSTART=0); start it with `hermes-busd start`"
                .into(),
        );
    }
    if let Some(age) = crate::daemon::stopped_recently(&cfg.socket) {
        return Err(format!(
            "it was stopped explicitly {} s ago, so clients do not start it for {} s; start it with `hermes-busd start`",
            age.as_secs(),
            crate::daemon::AUTOSTART_HOLDOFF.as_secs()
        ));
    }
    if let Some(dir) = cfg.socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        let default = crate::config::Paths::resolve(None, None).socket;
        if !dir.is_dir() && cfg.socket != default {
            return Err(format!(
                "its directory {} does not exist (not created for a socket named explicitly; create it, or start the bus with `hermes-busd --socket {} start`)",
                dir.display(),
                cfg.socket.display()
            ));
        }
    }
    Ok(())
}

/// Runs `BUSD --root DIR --socket PATH start` and waits up to 3 s for the
/// socket to answer. The root is the socket's directory, so the daemon's
/// pid file and log sit beside its socket (for the default socket that is
/// the bus root itself) and never touch another bus's.
pub async fn start_daemon(busd: &Path, socket: &Path) {
    if let Err(e) = start_daemon_auto(busd, socket).await {
        tracing::warn!("{e}");
    }
}

/// [`start_daemon`] as a client's autostart (`start --auto`: refrains
/// after an explicit stop); the daemon manager's message when no bus
/// answers afterwards.
pub async fn start_daemon_auto(busd: &Path, socket: &Path) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new(busd);
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        cmd.arg("--root").arg(dir);
    }
    let out = cmd
        .arg("--socket")
        .arg(socket)
        .arg("start")
        .arg("--auto")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(false)
        .output();
    let said = match tokio::time::timeout(Duration::from_secs(30), out).await {
        Ok(Ok(o)) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            let first = text.lines().next().unwrap_or("").trim().to_owned();
            if o.status.success() {
                None
            } else if first.is_empty() {
                Some(format!("{} start exited with {}", busd.display(), o.status))
            } else {
                Some(first)
            }
        }
        Ok(Err(e)) => Some(format!("cannot run {}: {e}", busd.display())),
        Err(_) => Some(format!("{} start did not finish in 30 s", busd.display())),
    };
    if let Some(s) = said {
        return Err(s);
    }
    for _ in 0..30 {
        if UnixStream::connect(socket).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "no bus answers on {} after start",
        socket.display()
    ))
}

/// The one dial-and-handshake of a registered client: connects (starting
/// the daemon if needed), sends `register` (with the codec it wants when
/// not JSON) and reads the `registered` reply. Returns the stream, the
/// session id, and whatever the bus sent after the reply.
pub(crate) async fn register(
    cfg: &ClientConfig,
    endpoint: &str,
) -> Result<(UnixStream, String, BytesMut), ClientError> {
    let mut s = dial(cfg).await?;
    s.write_all(&frame_of(&match cfg.codec {
        crate::codec::Codec::Json => serde_json::json!({"type": "register", "endpoint": endpoint}),
        c => serde_json::json!({"type": "register", "endpoint": endpoint, "codec": c.name()}),
    }))
    .await?;
    let mut buf = BytesMut::with_capacity(8192);
    let reply = tokio::time::timeout(Duration::from_secs(3), read_frame(&mut s, &mut buf))
        .await
        .map_err(|_| ClientError::Timeout)??;
    match reply {
        Some(v) if v.get("type").and_then(Value::as_str) == Some("registered") => {
            let sid = v
                .get("session_id")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            Ok((s, sid, buf))
        }
        Some(v) => match as_error(&v) {
            Some(e) => Err(ClientError::Rejected(e)),
            None => Err(ClientError::Protocol(format!(
                "expected 'registered', got {v}"
            ))),
        },
        None => Err(ClientError::Protocol(
            "bus closed the connection during register".into(),
        )),
    }
}
