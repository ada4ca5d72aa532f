//! `monitor`, `top`, the metrics endpoint and `bench`, with the real
//! binaries on a bus in a temp dir: the monitor sees a point-to-point
//! message between two other sessions; a stalled monitor does not slow
//! them (its drops are counted and told); `top --once --json` shows
//! rates; `/metrics` parses as Prometheus text (bus and standalone
//! proxy); `bench` reports no loss. No timing assertions.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::{bin, free_port};
use hermes_bus::transports::unix::BusClient;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};
use tokio::process::{Child, Command};

const LIMIT: Duration = Duration::from_secs(120);

/// A bus in a temp dir, with a metrics address; killed on drop.
struct Bus {
    dir: tempfile::TempDir,
    metrics: u16,
    _child: Child,
}

impl Bus {
    async fn start() -> Bus {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = free_port();
        let socket = dir.path().join("bus.sock");
        let child = Command::new(bin("hermes-bus-server"))
            .arg("--root")
            .arg(dir.path())
            .arg("--socket")
            .arg(&socket)
            .args(["--metrics", &format!("127.0.0.1:{metrics}")])
            .env("HERMES_HOME", dir.path().join("home"))
            .env_remove("HERMES_BUS_HOOKS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("server starts");
        for _ in 0..400 {
            if UnixStream::connect(&socket).await.is_ok()
                && TcpStream::connect(("127.0.0.1", metrics)).await.is_ok()
            {
                return Bus {
                    dir,
                    metrics,
                    _child: child,
                };
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the bus did not come up");
    }
    fn socket(&self) -> PathBuf {
        self.dir.path().join("bus.sock")
    }
    fn cmd(&self) -> Command {
        let mut c = Command::new(bin("hermes-bus"));
        c.arg("--socket")
            .arg(self.socket())
            .arg("--root")
            .arg(self.dir.path())
            .env("HERMES_BUS_AUTOSTART", "0")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }
    async fn run(&self, args: &[&str]) -> (i32, String, String) {
        common::process::output_of(self.cmd().args(args), Duration::from_secs(60)).await
    }
    async fn stats(&self) -> Value {
        let (code, out, err) = self.run(&["stats", "--json"]).await;
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(out.trim()).expect("stats JSON")
    }
}

async fn client(bus: &Bus, name: &str) -> BusClient {
    BusClient::connect(name, bus.socket())
        .await
        .expect("client connects")
}

fn frame(v: &Value) -> Vec<u8> {
    let s = v.to_string();
    let mut out = (s.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

async fn read_frame(s: &mut UnixStream) -> Value {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.expect("frame header");
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await.expect("frame");
    serde_json::from_slice(&buf).expect("JSON frame")
}

#[tokio::test]
async fn monitor_sees_a_point_to_point_message_between_two_other_sessions() {
    tokio::time::timeout(LIMIT, async {
        let bus = Bus::start().await;
        let mut mon = bus
            .cmd()
            .args(["monitor", "--json", "--body", "--name", "b", "--count", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("monitor runs");
        // It says so on stderr once the bus accepted the request.
        let mut err = BufReader::new(mon.stderr.take().unwrap()).lines();
        let first = err.next_line().await.unwrap().unwrap_or_default();
        assert!(first.contains("monitoring"), "{first}");
        let a = client(&bus, "a").await;
        let mut b = client(&bus, "b").await;
        a.send("b", json!({"x": 1})).await.unwrap();
        let got = b.recv().await.expect("b gets it");
        assert_eq!(got["body"], json!({"x": 1}));
        let out = mon.wait_with_output().await.expect("monitor ends");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        let ev: Value = serde_json::from_str(text.trim()).expect("one JSON event");
        assert_eq!(ev["type"], "monitor");
        assert_eq!(ev["kind"], "message");
        assert_eq!(ev["transport"], "unix");
        assert_eq!(
            (ev["from"].as_str(), ev["to"].as_str()),
            (Some("a"), Some("b"))
        );
        assert_eq!(ev["body"], json!({"x": 1}));
        assert_eq!(ev["size"], 7);
        assert_eq!(ev["id"], got["id"]);
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn a_stalled_monitor_does_not_slow_the_traffic_and_its_drops_are_counted() {
    tokio::time::timeout(LIMIT, async {
        let bus = Bus::start().await;
        // A monitor that never reads, with the smallest queue.
        let mut stalled = UnixStream::connect(bus.socket()).await.unwrap();
        stalled
            .write_all(&frame(
                &json!({"type": "monitor", "body": true, "max_bytes": 4096}),
            ))
            .await
            .unwrap();
        let a = client(&bus, "a").await;
        let mut b = client(&bus, "b").await;
        // Wait until the bus has it (the monitor counts in stats).
        while bus.stats().await["monitors"]["monitors"] != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        const N: u64 = 20_000;
        let pad = "p".repeat(200);
        let receiver = tokio::spawn(async move {
            let mut n = 0;
            while n < N {
                let m = b.recv().await.expect("b receives");
                assert_eq!(m["body"]["n"], n, "in order, none lost");
                n += 1;
            }
            b
        });
        for n in 0..N {
            a.send("b", json!({"n": n, "pad": pad})).await.unwrap();
        }
        let mut b = receiver.await.expect("all received");
        let s = bus.stats().await;
        assert!(
            s["monitors"]["dropped"].as_u64().unwrap() > 0,
            "{}",
            s["monitors"]
        );
        assert_eq!(
            s["router"]["totals"]["dropped_slow"], 0,
            "no traffic was dropped"
        );

        // The monitor reads at last: a later event says what it lost.
        let reader = tokio::spawn(async move {
            assert_eq!(read_frame(&mut stalled).await["type"], "monitoring");
            loop {
                let ev = read_frame(&mut stalled).await;
                if let Some(d) = ev["dropped"].as_u64() {
                    return d;
                }
            }
        });
        let told = loop {
            a.send("b", json!({"late": true})).await.unwrap();
            b.recv().await.unwrap();
            if reader.is_finished() {
                break reader.await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(told > 0);
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn top_once_json_shows_rates() {
    tokio::time::timeout(LIMIT, async {
        let bus = Bus::start().await;
        let a = client(&bus, "a").await;
        let mut b = client(&bus, "b").await;
        let stop = tokio_util::sync::CancellationToken::new();
        let s2 = stop.clone();
        let traffic = tokio::spawn(async move {
            while !s2.is_cancelled() {
                a.send("b", json!({"t": 1})).await.unwrap();
                a.send_raw(&json!({"type": "publish", "topic": "md/x", "data": 1}))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        let drain = tokio::spawn(async move { while b.recv().await.is_some() {} });
        let (code, out, err) = bus
            .run(&["top", "--once", "--json", "--interval", "1"])
            .await;
        stop.cancel();
        traffic.await.unwrap();
        drain.abort();
        assert_eq!(code, 0, "{err}");
        let v: Value = serde_json::from_str(out.trim()).expect("one JSON view");
        assert!(v["totals"]["routed_per_s"].as_f64().unwrap() > 0.0, "{v}");
        let ep = |name: &str| {
            v["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == name)
                .cloned()
                .unwrap_or_else(|| panic!("{name} in {v}"))
        };
        assert!(ep("a")["in_per_s"].as_f64().unwrap() > 0.0);
        assert!(ep("b")["out_per_s"].as_f64().unwrap() > 0.0);
        let unix = v["transports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["transport"] == "unix")
            .expect("unix transport");
        assert!(unix["messages_per_s"].as_f64().unwrap() > 0.0);
        let topic = v["topics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["topic"] == "md/x")
            .expect("the topic");
        assert!(topic["publishes_per_s"].as_f64().unwrap() > 0.0);
        // The human form prints too.
        let (code, out, _) = bus.run(&["top", "--once", "--interval", "0.2"]).await;
        assert_eq!(code, 0);
        assert!(out.contains("bus on"), "{out}");
    })
    .await
    .expect("in time");
}

/// GET `path`; (status line, body).
async fn http_get(port: u16, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("a head");
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// Checks the Prometheus text format: every line is a comment or
/// `name{labels} value`; returns the samples.
fn parse_prometheus(text: &str) -> Vec<(String, String, f64)> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let kind = rest.split(' ').nth(1).unwrap_or("");
                assert!(
                    ["counter", "gauge", "untyped", "histogram", "summary"].contains(&kind),
                    "{line}"
                );
            }
            continue;
        }
        let name_end = line
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or_else(|| panic!("no value: {line}"));
        let name = &line[..name_end];
        assert!(
            name.chars().next().is_some_and(|c| !c.is_ascii_digit()),
            "bad name: {line}"
        );
        let mut rest = &line[name_end..];
        let mut labels = String::new();
        if let Some(r) = rest.strip_prefix('{') {
            // label="value" pairs, values with \\ \" \n escapes.
            let mut chars = r.char_indices();
            let mut in_value = false;
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' if in_value => {
                        let (_, e) = chars.next().expect("escape");
                        assert!(matches!(e, '\\' | '"' | 'n'), "bad escape: {line}");
                    }
                    '"' => in_value = !in_value,
                    '}' if !in_value => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let end = end.unwrap_or_else(|| panic!("unclosed labels: {line}"));
            labels = r[..end].to_owned();
            for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("{line}"));
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{line}"
                );
                assert!(v.starts_with('"'), "{line}");
            }
            rest = &r[end + 1..];
        }
        let value = rest.strip_prefix(' ').unwrap_or_else(|| panic!("{line}"));
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            x => x.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        samples.push((name.to_owned(), labels, v));
    }
    samples
}

#[tokio::test]
async fn the_metrics_endpoint_serves_prometheus_text() {
    tokio::time::timeout(LIMIT, async {
        let bus = Bus::start().await;
        let a = client(&bus, "a").await;
        let mut b = client(&bus, "we\"ird\\name").await;
        a.send("we\"ird\\name", json!(1)).await.unwrap();
        b.recv().await.unwrap();
        let (status, body) = http_get(bus.metrics, "/metrics").await;
        assert!(status.contains("200"), "{status}");
        let samples = parse_prometheus(&body);
        let get = |name: &str| samples.iter().find(|s| s.0 == name).map(|s| s.2);
        assert_eq!(get("hermes_bus_routed_total"), Some(1.0), "{body}");
        assert!(samples
            .iter()
            .any(|s| s.0 == "hermes_bus_endpoint_received_total"
                && s.1.contains(r#"endpoint="we\"ird\\name""#)));
        assert!(get("hermes_bus_transport_messages_total").is_some());
        let (status, _) = http_get(bus.metrics, "/other").await;
        assert!(status.contains("404"), "{status}");
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn bench_runs_and_reports_no_loss() {
    tokio::time::timeout(LIMIT, async {
        let bus = Bus::start().await;
        let (code, out, err) = bus
            .run(&[
                "bench", "--msgs", "5000", "--size", "64", "--pings", "50", "--json",
            ])
            .await;
        assert_eq!(code, 0, "{out}{err}");
        let v: Value = serde_json::from_str(out.trim()).expect("JSON result");
        assert_eq!(v["lost"], 0);
        assert_eq!(v["received"], 5000);
        assert_eq!(v["out_of_order"], 0);
        assert!(v["msgs_per_s"].as_f64().unwrap() > 0.0);
        assert!(v["rtt_p99_us"].as_f64().unwrap() > 0.0);
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn the_standalone_proxy_serves_metrics_and_logs_summaries() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let metrics = free_port();
        let (fe, be) = (free_port(), free_port());
        let mut proxy = Command::new(bin("hermes-bus"))
            .args(["--root"])
            .arg(dir.path())
            .args(["proxy", "--zmq-in", &format!("tcp://127.0.0.1:{fe}")])
            .args(["--zmq-out", &format!("tcp://127.0.0.1:{be}")])
            .args(["--metrics", &format!("127.0.0.1:{metrics}")])
            .args(["--summary-secs", "0.2"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("proxy runs");
        let mut out = BufReader::new(proxy.stdout.take().unwrap()).lines();
        let addrs = out.next_line().await.unwrap().expect("the addresses");
        assert!(addrs.contains("frontend"), "{addrs}");
        let (status, body) = http_get(metrics, "/metrics").await;
        assert!(status.contains("200"), "{status}");
        let samples = parse_prometheus(&body);
        assert!(
            samples
                .iter()
                .any(|s| s.0 == "hermes_bus_zmq_publishers_messages_total"),
            "{body}"
        );
        let mut err = BufReader::new(proxy.stderr.take().unwrap()).lines();
        loop {
            let l = err.next_line().await.unwrap().expect("a summary line");
            if l.contains("zmq proxy: in") {
                break;
            }
        }
        let _ = proxy.kill().await;
    })
    .await
    .expect("in time");
}
