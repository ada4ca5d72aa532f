//! `hermes-bus bench`: a quick local throughput and latency check against
//! a running bus (as `nats bench`).
//!
//! Opens two sessions. Throughput: one sends `--msgs` messages with a
//! body of `--size` bytes to the other as fast as the bus takes them
//! (the bus pushes back; nothing is dropped); the other checks that each
//! arrived once, in order. Latency: `--pings` round trips, one at a time,
//! through the bus and back. Exit 1 when anything was lost.

use std::path::Path;
use std::time::{Duration, Instant};

use hermes_bus::daemon::EXIT_FAILURE;
use hermes_bus::transports::unix::{BusClient, ClientConfig};
use serde_json::json;

use super::{bail, line};

/// The flags of `bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Messages to send.
    #[arg(long, default_value_t = 100_000)]
    pub msgs: u64,
    /// Bytes of each message's body (a string of that length).
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Round trips for the latency (one at a time).
    #[arg(long, default_value_t = 1000)]
    pub pings: u64,
    /// Give up (and report the loss) after this many seconds.
    #[arg(long, default_value_t = 120.0, value_parser = super::parse_secs)]
    pub timeout: f64,
    /// The result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Runs the bench against the bus at `socket` (never starts one).
pub async fn run(socket: &Path, a: BenchArgs) -> anyhow::Result<()> {
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (tx_name, rx_name) = (format!("bench-tx-{tag}"), format!("bench-rx-{tag}"));
    let mut cfg = ClientConfig::new(socket);
    cfg.autostart = false;
    let mut rx = BusClient::connect_with(&rx_name, cfg.clone()).await?;
    let mut tx = BusClient::connect_with(&tx_name, cfg).await?;
    let limit = Duration::try_from_secs_f64(a.timeout).unwrap_or(Duration::MAX);

    // The receiver: counts and checks the sequence, reports, then
    // echoes pings until told to end.
    let expect = a.msgs;
    let echo_to = tx_name.clone();
    let (count_tx, count_rx) = tokio::sync::oneshot::channel::<(u64, u64, Instant)>();
    let receiver = tokio::spawn(async move {
        let (mut got, mut out_of_order) = (0u64, 0u64);
        let mut count_tx = Some(count_tx);
        if expect == 0 {
            if let Some(c) = count_tx.take() {
                let _ = c.send((0, 0, Instant::now()));
            }
        }
        while let Some(m) = rx.recv().await {
            let body = &m["body"];
            if let Some(seq) = body["seq"].as_u64() {
                if seq != got {
                    out_of_order += 1;
                }
                got += 1;
                if got == expect {
                    if let Some(c) = count_tx.take() {
                        let _ = c.send((got, out_of_order, Instant::now()));
                    }
                }
            } else if let Some(p) = body["ping"].as_u64() {
                if rx.send(&echo_to, json!({"pong": p})).await.is_err() {
                    break;
                }
            } else if body["end"] == true {
                break;
            }
        }
        rx.close().await;
        (got, out_of_order)
    });

    let pad = "x".repeat(a.size);
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + limit;
    let sending = async {
        for seq in 0..a.msgs {
            tx.send(&rx_name, json!({"seq": seq, "pad": pad})).await?;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout_at(deadline, sending)
        .await
        .map_err(|_| lost(a.timeout, "sending"))??;
    let (got, out_of_order, last) = match tokio::time::timeout_at(deadline, count_rx).await {
        Ok(Ok(c)) => c,
        _ => {
            receiver.abort();
            return Err(lost(a.timeout, "receiving"));
        }
    };
    let elapsed = last.duration_since(started).as_secs_f64().max(1e-9);

    // Latency: one round trip at a time.
    let mut rtts = Vec::with_capacity(a.pings as usize);
    for p in 0..a.pings {
        let t0 = Instant::now();
        tx.send(&rx_name, json!({"ping": p})).await?;
        loop {
            let m = tokio::time::timeout_at(deadline, tx.recv())
                .await
                .map_err(|_| lost(a.timeout, "waiting for a round trip"))?;
            let Some(m) = m else {
                return Err(bail(
                    EXIT_FAILURE,
                    "bench: the connection to the bus closed",
                ));
            };
            if m["body"]["pong"].as_u64() == Some(p) {
                break;
            }
        }
        rtts.push(t0.elapsed());
    }
    let _ = tx.send(&rx_name, json!({"end": true})).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), receiver).await;
    tx.close().await;

    rtts.sort();
    let pct = |q: f64| -> f64 {
        if rtts.is_empty() {
            return 0.0;
        }
        let i = ((rtts.len() as f64 * q).ceil() as usize).clamp(1, rtts.len()) - 1;
        rtts[i].as_secs_f64() * 1e6
    };
    let lost_n = a.msgs - got.min(a.msgs);
    let result = json!({
        "msgs": a.msgs,
        "size": a.size,
        "received": got,
        "lost": lost_n,
        "out_of_order": out_of_order,
        "seconds": elapsed,
        "msgs_per_s": a.msgs as f64 / elapsed,
        "mb_per_s": (a.msgs as f64 * a.size as f64) / elapsed / 1e6,
        "pings": a.pings,
        "rtt_p50_us": pct(0.50),
        "rtt_p99_us": pct(0.99),
        "rtt_max_us": rtts.last().map_or(0.0, |d| d.as_secs_f64() * 1e6),
    });
    if a.json {
        line(&result.to_string());
    } else {
        line(&format!(
            "{} msgs of {} B in {:.3} s: {:.0} msgs/s, {:.2} MB/s; received {}, lost {}, out of order {}",
            a.msgs, a.size, elapsed,
            result["msgs_per_s"].as_f64().unwrap_or(0.0),
            result["mb_per_s"].as_f64().unwrap_or(0.0),
            got, lost_n, out_of_order
        ));
        line(&format!(
            "{} round trips: p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
            a.pings,
            pct(0.50),
            pct(0.99),
            result["rtt_max_us"].as_f64().unwrap_or(0.0)
        ));
    }
    if lost_n > 0 || out_of_order > 0 {
        return Err(bail(
            EXIT_FAILURE,
            format!("bench: {lost_n} messages lost, {out_of_order} out of order"),
        ));
    }
    Ok(())
}

fn lost(timeout: f64, during: &str) -> anyhow::Error {
    bail(
        EXIT_FAILURE,
        format!(
            "bench: timed out after {timeout} s while {during}: messages were lost or the bus is stuck (see `hermes-bus stats`)"
        ),
    )
}
