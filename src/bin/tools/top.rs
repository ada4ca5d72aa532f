//! `hermes-bus top`: live rates from two `stats` snapshots, refreshed
//! each interval (as `redis-cli --stat`, `nats top`).

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use hermes_bus::daemon;
use hermes_bus::transports::unix::client;
use serde_json::{json, Map, Value};

use super::line;

/// The flags of `top`.
#[derive(clap::Args)]
pub struct TopArgs {
    /// Print one view (after one interval) and exit.
    #[arg(long)]
    pub once: bool,
    /// One JSON object per view.
    #[arg(long)]
    pub json: bool,
    /// Seconds between views.
    #[arg(long, default_value_t = 1.0, value_parser = super::parse_secs)]
    pub interval: f64,
    /// Rows per table on screen.
    #[arg(long, default_value_t = 15)]
    pub rows: usize,
}

fn n(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn rate(a: &Value, b: &Value, dt: f64) -> f64 {
    ((n(b) - n(a)).max(0.0)) / dt
}

fn round(x: f64) -> Value {
    json!((x * 10.0).round() / 10.0)
}

/// The view between snapshots `a` and `b`, `dt` seconds apart.
pub fn view(a: &Value, b: &Value, dt: f64) -> Value {
    let ta = &a["router"]["totals"];
    let tb = &b["router"]["totals"];
    let mut totals = Map::new();
    for k in [
        "routed",
        "delivered",
        "dropped_slow",
        "dropped_held",
        "errors",
        "blocked",
    ] {
        totals.insert(format!("{k}_per_s"), round(rate(&ta[k], &tb[k], dt)));
    }
    let ep_a: std::collections::HashMap<&str, &Value> = a["router"]["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["session_id"].as_str()?, e)))
        .collect();
    let mut endpoints: Vec<Value> = b["router"]["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let before = e["session_id"].as_str().and_then(|s| ep_a.get(s));
            let c = |k: &str| {
                let was = before.map_or(&Value::Null, |x| &x["counters"][k]);
                round(rate(was, &e["counters"][k], dt))
            };
            json!({
                "name": e["name"], "transport": e["transport"],
                "in_per_s": c("received"), "out_per_s": c("delivered"),
                "dropped_per_s": c("dropped"),
                "queued": e["queued"], "queued_bytes": e["queued_bytes"],
                "dropped": e["counters"]["dropped"], "stuck": e["stuck"],
            })
        })
        .collect();
    endpoints.sort_by(|x, y| {
        let s = |v: &Value| n(&v["in_per_s"]) + n(&v["out_per_s"]);
        s(y).total_cmp(&s(x))
    });
    let per = |section: &str, keys: &[&str], label: &str| -> Vec<Value> {
        let mut rows: Vec<Value> = b["traffic"][section]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, t)| {
                let was = &a["traffic"][section][name];
                let mut row = Map::new();
                row.insert(label.to_owned(), json!(name));
                for k in keys {
                    row.insert(format!("{k}_per_s"), round(rate(&was[*k], &t[*k], dt)));
                }
                Value::Object(row)
            })
            .collect();
        rows.sort_by(|x, y| {
            let s = |v: &Value| {
                keys.iter()
                    .map(|k| n(&v[format!("{k}_per_s")]))
                    .sum::<f64>()
            };
            s(y).total_cmp(&s(x))
        });
        rows
    };
    let mut transports = per(
        "transports",
        &["messages", "publishes", "bytes", "delivered"],
        "transport",
    );
    if let Some(z) = b["transports"]["zmq"].as_object() {
        let za = &a["transports"]["zmq"];
        transports.push(json!({
            "transport": "zmq proxy",
            "in_per_s": round(rate(&za["publishers"]["messages"], &z["publishers"]["messages"], dt)),
            "out_per_s": round(rate(&za["subscribers"]["messages"], &z["subscribers"]["messages"], dt)),
            "bytes_in_per_s": round(rate(&za["publishers"]["bytes"], &z["publishers"]["bytes"], dt)),
            "drops_per_s": round(rate(&za["subscribers"]["drops"], &z["subscribers"]["drops"], dt)),
            "publishers": z["publishers"]["open"], "subscribers": z["subscribers"]["open"],
        }));
    }
    let topics = per("topics", &["publishes", "bytes", "delivered"], "topic");
    let (ha, hb) = (&a["hooks"], &b["hooks"]);
    let hooks = json!({
        "runs_per_s": round(rate(&ha["runs_started"], &hb["runs_started"], dt)),
        "failed_per_s": round(rate(&ha["runs_failed"], &hb["runs_failed"], dt)),
        "dropped_per_s": round(rate(&ha["dropped_queue_full"], &hb["dropped_queue_full"], dt)),
        "in_flight": hb["in_flight"], "queue_len": hb["queue_len"],
    });
    json!({
        "interval_s": dt,
        "uptime_s": b["uptime_s"],
        "sessions": b["router"]["sessions"],
        "totals": totals,
        "flow": b["router"]["flow"],
        "endpoints": endpoints,
        "topics": topics,
        "transports": transports,
        "hooks": hooks,
        "monitors": b["monitors"],
    })
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Number(x) => match x.as_f64() {
            Some(f) if f.fract() != 0.0 => format!("{f:.1}"),
            _ => x.to_string(),
        },
        other => other.to_string(),
    }
}

fn table(title: &str, rows: &[Value], cols: &[(&str, &str)], max: usize) {
    if rows.is_empty() {
        return;
    }
    line(title);
    let mut t = vec![cols
        .iter()
        .map(|(h, _)| (*h).to_owned())
        .collect::<Vec<_>>()];
    for r in rows.iter().take(max) {
        t.push(cols.iter().map(|(_, k)| cell(&r[*k])).collect());
    }
    daemon::print_table("  ", &t);
    if rows.len() > max {
        line(&format!("  … {} more", rows.len() - max));
    }
}

fn print_human(v: &Value, socket: &Path, rows: usize) {
    let t = &v["totals"];
    line(&format!(
        "bus on {}  up {:.0}s  sessions {}  routed {}/s  delivered {}/s  dropped {}/s  blocked now {}  budget {} B",
        socket.display(),
        n(&v["uptime_s"]),
        cell(&v["sessions"]),
        cell(&t["routed_per_s"]),
        cell(&t["delivered_per_s"]),
        n(&t["dropped_slow_per_s"]) + n(&t["dropped_held_per_s"]),
        cell(&v["flow"]["blocked_now"]),
        cell(&v["flow"]["budget_used"]),
    ));
    let h = &v["hooks"];
    line(&format!(
        "hooks: {} runs/s, {} failed/s, {} dropped/s, {} running, {} queued   monitors: {}",
        cell(&h["runs_per_s"]),
        cell(&h["failed_per_s"]),
        cell(&h["dropped_per_s"]),
        cell(&h["in_flight"]),
        cell(&h["queue_len"]),
        cell(&v["monitors"]["monitors"]),
    ));
    let empty = Vec::new();
    table(
        "endpoints",
        v["endpoints"].as_array().unwrap_or(&empty),
        &[
            ("NAME", "name"),
            ("TRANSPORT", "transport"),
            ("IN/S", "in_per_s"),
            ("OUT/S", "out_per_s"),
            ("QUEUED", "queued"),
            ("BYTES", "queued_bytes"),
            ("DROPPED", "dropped"),
            ("STUCK", "stuck"),
        ],
        rows,
    );
    table(
        "transports",
        v["transports"].as_array().unwrap_or(&empty),
        &[
            ("TRANSPORT", "transport"),
            ("MSG/S", "messages_per_s"),
            ("PUB/S", "publishes_per_s"),
            ("BYTES/S", "bytes_per_s"),
            ("OUT/S", "delivered_per_s"),
            ("IN/S", "in_per_s"),
            ("SENT/S", "out_per_s"),
        ],
        rows,
    );
    table(
        "topics",
        v["topics"].as_array().unwrap_or(&empty),
        &[
            ("TOPIC", "topic"),
            ("PUB/S", "publishes_per_s"),
            ("BYTES/S", "bytes_per_s"),
            ("OUT/S", "delivered_per_s"),
        ],
        rows,
    );
}

/// Runs `top` against the bus at `socket`.
pub async fn run(socket: &Path, a: TopArgs) -> anyhow::Result<()> {
    let every = Duration::try_from_secs_f64(a.interval.max(0.05)).unwrap_or(Duration::from_secs(1));
    let tty = !a.json && std::io::stdout().is_terminal();
    let mut before = client::stats(socket).await?;
    let mut at = Instant::now();
    let mut shutdown = Box::pin(hermes_bus::signals::shutdown_signal());
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
        let now = client::stats(socket).await?;
        let dt = at.elapsed().as_secs_f64().max(1e-3);
        at = Instant::now();
        let v = view(&before, &now, dt);
        if a.json {
            line(&v.to_string());
        } else {
            if tty && !a.once {
                // Home and clear, as top does.
                use std::io::Write;
                let _ = std::io::stdout().write_all(b"\x1b[H\x1b[2J");
            }
            print_human(&v, socket, a.rows);
        }
        if a.once {
            return Ok(());
        }
        before = now;
    }
}
