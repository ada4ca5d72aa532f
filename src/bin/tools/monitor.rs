//! `hermes-bus monitor`: every routed message, one line each.
//!
//! Opens an unregistered connection, asks the bus to monitor
//! (`{"type":"monitor",..}`) and prints each `monitor` event. The bus
//! keeps this monitor's events in a queue bounded by `--max-bytes`: when
//! we read too slowly, it drops events (never slowing the bus or any
//! sender) and the next event says how many (`dropped`), which is shown.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use hermes_bus::transports::unix::frame;
use hermes_bus::transports::unix::ClientError;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::{bail, line};
use hermes_bus::daemon::EXIT_FAILURE;

/// The flags of `monitor`.
#[derive(clap::Args)]
pub struct MonitorArgs {
    /// Only messages from or to this endpoint (repeatable; a topic's
    /// origin counts as its sender).
    #[arg(long = "name", value_name = "NAME")]
    pub names: Vec<String>,
    /// Only topic publishes whose topic starts with this prefix
    /// (repeatable; "" for every topic). With --name too, either selects.
    #[arg(long = "topic", value_name = "PREFIX")]
    pub topics: Vec<String>,
    /// Only traffic that entered through this transport: unix or zmq
    /// (repeatable).
    #[arg(long = "transport", value_name = "NAME")]
    pub transports: Vec<String>,
    /// Show each message's body (a topic's data).
    #[arg(long)]
    pub body: bool,
    /// Bytes of events the bus queues for this monitor (K, M suffixes);
    /// past it, events are dropped (counted, and shown) instead of
    /// slowing anyone. At most the bus's --outbox-bytes.
    #[arg(long, default_value = "4M", value_parser = hermes_bus::cli::parse_size)]
    pub max_bytes: usize,
    /// Exit after this many events.
    #[arg(long)]
    pub count: Option<u64>,
    /// One JSON event per line (always when piped).
    #[arg(long)]
    pub json: bool,
}

fn frame_of(v: &Value) -> Vec<u8> {
    let body = v.to_string();
    let mut out = BytesMut::with_capacity(4 + body.len());
    out.put_u32(body.len() as u32);
    out.put_slice(body.as_bytes());
    out.to_vec()
}

/// Reads the next frame as JSON; None when the bus closed.
async fn next(rd: &mut UnixStream, buf: &mut BytesMut) -> anyhow::Result<Option<Value>> {
    loop {
        if let Some(payload) = frame::decode(buf, frame::MAX_FRAME)? {
            return Ok(Some(serde_json::from_slice(&payload)?));
        }
        if rd.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// Runs `monitor` against the bus at `socket` (never starts one).
pub async fn run(socket: &Path, a: MonitorArgs) -> anyhow::Result<()> {
    let mut s = UnixStream::connect(socket).await.map_err(ClientError::Io)?;
    let req = json!({
        "type": "monitor", "names": a.names, "topics": a.topics,
        "transports": a.transports, "body": a.body, "max_bytes": a.max_bytes,
    });
    s.write_all(&frame_of(&req)).await?;
    let mut buf = BytesMut::with_capacity(64 << 10);
    let first = tokio::time::timeout(Duration::from_secs(5), next(&mut s, &mut buf))
        .await
        .map_err(|_| ClientError::Timeout)??;
    match first {
        Some(v) if v["type"] == "monitoring" => eprintln!(
            "hermes-bus: monitoring the bus on {} (queue bound {} bytes: a slow reader loses events, counted and shown, and never slows the bus)",
            socket.display(),
            v["max_bytes"]
        ),
        Some(v) if v["type"] == "error" => {
            return Err(bail(
                EXIT_FAILURE,
                format!(
                    "the bus on {} refused to monitor: {} {}",
                    socket.display(),
                    v["code"].as_str().unwrap_or(""),
                    v["detail"].as_str().unwrap_or("")
                ),
            ))
        }
        _ => {
            return Err(bail(
                EXIT_FAILURE,
                format!(
                    "the bus on {} does not support monitoring (too old?)",
                    socket.display()
                ),
            ))
        }
    }
    let human = !a.json && std::io::stdout().is_terminal();
    let mut shutdown = Box::pin(hermes_bus::signals::shutdown_signal());
    // A silent connection is evicted after the bus's heartbeat timeout.
    let mut ping = tokio::time::interval(Duration::from_secs(20));
    ping.tick().await;
    let mut seen = 0u64;
    let mut lost = 0u64;
    loop {
        let ev = tokio::select! {
            _ = &mut shutdown => break,
            _ = ping.tick() => {
                s.write_all(&frame_of(&json!({"type": "ping"}))).await?;
                continue;
            }
            ev = next(&mut s, &mut buf) => ev?,
        };
        let Some(ev) = ev else {
            return Err(bail(
                EXIT_FAILURE,
                format!("the bus on {} closed the connection", socket.display()),
            ));
        };
        if ev["type"] != "monitor" {
            continue;
        }
        if let Some(d) = ev["dropped"].as_u64() {
            lost += d;
            if human {
                line(&format!(
                    "… {d} events dropped (this monitor read too slowly)"
                ));
            }
        }
        if human {
            line(&human_event(&ev));
        } else {
            line(&ev.to_string());
        }
        seen += 1;
        if a.count.is_some_and(|n| seen >= n) {
            break;
        }
    }
    if lost > 0 {
        eprintln!("hermes-bus: {lost} events were dropped for this monitor (it read too slowly)");
    }
    Ok(())
}

/// `12:34:56.789 unix  a → b  message  120 B  {body}`.
fn human_event(ev: &Value) -> String {
    let ts = ev["ts"].as_f64().unwrap_or(0.0);
    let secs = ts.rem_euclid(86_400.0);
    let clock = format!(
        "{:02}:{:02}:{:06.3}",
        (secs / 3600.0) as u64,
        ((secs % 3600.0) / 60.0) as u64,
        secs % 60.0
    );
    let from = ev["from"].as_str().unwrap_or("");
    let from = if from.is_empty() { "?" } else { from };
    let to = match ev["kind"].as_str() {
        Some("broadcast") => "*".to_owned(),
        Some("publish") => format!("[{}]", ev["topic"].as_str().unwrap_or("")),
        _ => ev["to"].as_str().unwrap_or("").to_owned(),
    };
    let mut s = format!(
        "{clock} {:<4} {from} → {to}  {}  {} B  ×{}",
        ev["transport"].as_str().unwrap_or(""),
        ev["kind"].as_str().unwrap_or(""),
        ev["size"],
        ev["delivered"],
    );
    if let Some(body) = ev.get("body") {
        s.push_str("  ");
        s.push_str(&body.to_string());
    }
    s
}
