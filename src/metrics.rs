//! Metrics in the Prometheus text format (0.0.4), made from the same data
//! as `stats`, and the minimal HTTP/1.1 responder that serves them
//! (`server --metrics ADDR`, `proxy --metrics ADDR`).
//!
//! The responder answers `GET /metrics` only (404 for another path, 405
//! for another method), one request per connection, and is bounded: a
//! request head of at most [`MAX_REQUEST`] bytes arriving within
//! [`REQUEST_TIMEOUT`], at most [`MAX_CONNECTIONS`] connections at once
//! (more are closed at once). It is plain tokio, no HTTP library.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Largest request head read, in bytes.
pub const MAX_REQUEST: usize = 8192;
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send its request and read the answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What the responder serves: the metrics text, made on each request.
pub type Source = Arc<dyn Fn() -> String + Send + Sync>;

/// Samples of one metric: its type and its (labels, value) pairs.
type Family = (&'static str, Vec<(String, f64)>);

/// Metrics being collected, grouped by name (each family once, as the
/// format requires).
#[derive(Default)]
struct Metrics(BTreeMap<String, Family>);

impl Metrics {
    fn add(&mut self, name: &str, kind: &'static str, labels: &[(&str, &str)], v: f64) {
        let mut l = String::new();
        if !labels.is_empty() {
            l.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    l.push(',');
                }
                let _ = write!(l, "{k}=\"{}\"", escape_label(val));
            }
            l.push('}');
        }
        self.0
            .entry(sanitize(name))
            .or_insert_with(|| (kind, Vec::new()))
            .1
            .push((l, v));
    }

    /// Every number of an object as `prefix_key` (`_total` and counter
    /// unless the key is in `gauges`); nested objects add their key.
    fn object(&mut self, prefix: &str, v: &Value, gauges: &[&str], labels: &[(&str, &str)]) {
        let Some(map) = v.as_object() else { return };
        for (k, x) in map {
            let name = format!("{prefix}_{k}");
            if x.is_object() {
                self.object(&name, x, gauges, labels);
            } else if let Some(n) = number(x) {
                if gauges.contains(&k.as_str()) {
                    self.add(&name, "gauge", labels, n);
                } else {
                    self.add(&format!("{name}_total"), "counter", labels, n);
                }
            }
        }
    }

    fn text(&self) -> String {
        let mut out = String::new();
        for (name, (kind, samples)) in &self.0 {
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        }
        out
    }
}

/// A JSON number or boolean as a sample value.
fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        _ => None,
    }
}

/// A metric name: `[a-zA-Z0-9_:]`, other characters as `_`.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A label value with `\`, `"` and newlines escaped.
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Gauges (levels, not counts) among the fields of the snapshots.
const GAUGES: &[&str] = &[
    "open",
    "subscriptions",
    "upstream_prefixes",
    "upstream_pending_bytes",
    "bus_prefixes",
    "bus_prefix_bytes",
    "bus_everything",
    "cached_topics",
    "cached_bytes",
    "enabled",
    "in_flight",
    "queue_len",
    "queue_capacity",
    "max_concurrent",
    "blocked_now",
    "budget_used",
    "budget_limit",
    "outbox_bytes",
    "outbox_capacity",
    "slow_consumer_timeout_ms",
    "monitors",
];

/// The metrics text of a status (the `stats` reply of the bus, or a
/// standalone proxy's `{"uptime_s", "transports": {"zmq": ..}}`).
pub fn render(status: &Value) -> String {
    let mut m = Metrics::default();
    const P: &str = "hermes_bus";
    if let Some(up) = number(&status["uptime_s"]) {
        m.add(&format!("{P}_uptime_seconds"), "gauge", &[], up);
    }
    let router = &status["router"];
    if router.is_object() {
        for k in ["sessions", "subscriptions", "subscription_bytes"] {
            if let Some(n) = number(&router[k]) {
                m.add(&format!("{P}_{k}"), "gauge", &[], n);
            }
        }
        m.object(P, &router["totals"], GAUGES, &[]);
        m.object(
            &format!("{P}_last_value"),
            &router["last_value"],
            GAUGES,
            &[],
        );
        if let Some(flow) = router["flow"].as_object() {
            for (k, v) in flow {
                if let Some(n) = number(v) {
                    m.add(&format!("{P}_flow_{k}"), "gauge", &[], n);
                }
            }
        }
        // The bus's topic numbering: topics, bytes, limit (gauges) and
        // counters forgotten for the bound.
        if let Some(seq) = router["seq"].as_object() {
            for (k, v) in seq {
                if let Some(n) = number(v) {
                    if k == "forgotten" {
                        m.add(&format!("{P}_seq_{k}_total"), "counter", &[], n);
                    } else {
                        m.add(&format!("{P}_seq_{k}"), "gauge", &[], n);
                    }
                }
            }
        }
        for e in router["endpoints"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().unwrap_or("");
            let transport = e["transport"].as_str().unwrap_or("");
            let labels = [("endpoint", name), ("transport", transport)];
            for k in ["queued", "queued_bytes", "stuck"] {
                if let Some(n) = number(&e[k]) {
                    m.add(&format!("{P}_endpoint_{k}"), "gauge", &labels, n);
                }
            }
            m.object(&format!("{P}_endpoint"), &e["counters"], GAUGES, &labels);
        }
        for h in router["held"].as_array().into_iter().flatten() {
            let labels = [("endpoint", h["name"].as_str().unwrap_or(""))];
            for k in ["queued", "bytes"] {
                if let Some(n) = number(&h[k]) {
                    m.add(&format!("{P}_held_{k}"), "gauge", &labels, n);
                }
            }
        }
    }
    for (name, t) in status["traffic"]["transports"]
        .as_object()
        .into_iter()
        .flatten()
    {
        m.object(&format!("{P}_transport"), t, GAUGES, &[("transport", name)]);
    }
    for (name, t) in status["traffic"]["topics"]
        .as_object()
        .into_iter()
        .flatten()
    {
        m.object(&format!("{P}_topic"), t, GAUGES, &[("topic", name)]);
    }
    m.object(&format!("{P}_monitor"), &status["monitors"], GAUGES, &[]);
    m.object(&format!("{P}_hooks"), &status["hooks"], GAUGES, &[]);
    for (name, t) in status["transports"].as_object().into_iter().flatten() {
        m.object(&format!("{P}_{name}"), t, GAUGES, &[]);
    }
    m.text()
}

/// Binds the metrics address (e.g. `127.0.0.1:9100`); fails with the
/// address named.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, source: Source, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("metrics: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Past the limit a connection is closed at once.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let source = source.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &source)).await;
            drop(slot);
        });
    }
}

/// Reads one request head and answers it.
async fn answer(mut stream: TcpStream, source: &Source) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break;
        }
        if buf.len() >= MAX_REQUEST {
            return respond(&mut stream, "431 Request Header Fields Too Large", "").await;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => respond(&mut stream, "200 OK", &source()).await,
        ("GET", _) => respond(&mut stream, "404 Not Found", "only /metrics here\n").await,
        _ => respond(&mut stream, "405 Method Not Allowed", "GET /metrics\n").await,
    }
}

async fn respond(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Binds `addr` and serves `source` there until `shutdown` (a task);
/// returns the bound address.
pub async fn spawn(
    addr: SocketAddr,
    source: Source,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(serve(listener, source, shutdown));
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_families_once_with_labels_escaped() {
        let status = serde_json::json!({
            "uptime_s": 1.5,
            "router": {
                "sessions": 2,
                "totals": {"routed": 7, "delivered": 6},
                "flow": {"blocked_now": 0},
                "endpoints": [
                    {"name": "a\"b", "transport": "unix", "queued": 1, "queued_bytes": 9, "stuck": false,
                     "counters": {"received": 3, "delivered": 4, "dropped": 0, "errors": 0}},
                    {"name": "c", "transport": "unix", "queued": 0, "queued_bytes": 0, "stuck": true,
                     "counters": {"received": 1, "delivered": 1, "dropped": 0, "errors": 0}}
                ],
                "held": []
            },
            "traffic": {"transports": {"unix": {"messages": 7}}, "topics": {"md/x": {"publishes": 2}}},
            "hooks": {"runs_ok": 1, "in_flight": 0, "hooks": ["/x"]},
            "transports": {"zmq": {"publishers": {"messages": 5, "open": 1}, "to_bus": 5}}
        });
        let text = render(&status);
        assert!(text.contains("hermes_bus_routed_total 7\n"), "{text}");
        assert!(text
            .contains(r#"hermes_bus_endpoint_received_total{endpoint="a\"b",transport="unix"} 3"#));
        assert!(text.contains(r#"hermes_bus_endpoint_stuck{endpoint="c",transport="unix"} 1"#));
        assert!(text.contains(r#"hermes_bus_topic_publishes_total{topic="md/x"} 2"#));
        assert!(text.contains("hermes_bus_zmq_publishers_open 1\n"));
        assert!(text.contains("hermes_bus_hooks_in_flight 0\n"));
        assert_eq!(
            text.matches("# TYPE hermes_bus_endpoint_received_total ")
                .count(),
            1
        );
    }
}
