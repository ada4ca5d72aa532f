//! The one harness of the integration tests; every test file starts with
//! `mod common;`. One concept a file:
//!
//! - `wait.rs`: `eventually(limit, cond)`, the only polling wait;
//!   `TEST_LIMIT`.
//! - `net.rs`: `free_port`, `free_tcp_addr`.
//! - `process.rs`: our binaries (`bin`, `path_with_bins`), `TempRoot`
//!   (a bus root to run the CLI in), `ServerProcess` (a real server),
//!   `next_line` of a child's output, `alive(pid)`, `in_ci`.
//! - `python.rs`: `python("py07" | "py03")` (the venv's interpreter; a
//!   missing one fails under `CI=true`, elsewhere the test says SKIPPED
//!   and passes), `PyPeer` (a `tests/py/` script driven by its stdout
//!   lines), `run_python` (a `-c` script).
//! - `bus.rs`: `TestBus` (a bus in this process on a temp socket),
//!   `serve_unix`, `Raw` (frames in, JSON out), `client_recv`.
//! - `zmq.rs` (feature `zmq`): `start_proxy` / `run_proxy` /
//!   `serve_zmq` (our proxy alone or as the bus's transport), `receiver`,
//!   raw ZMTP peers (`raw_peer`, `FakeXpub`).
//! - `files.rs`: `write_file`, `stdin_copy_script` (hook scripts).
//!
//! The tests are grouped by file-name prefix: `unix_*` the Unix-socket
//! transport and its client, `zmq_*` the ZeroMQ transport and its
//! clients, `daemon_*` / `cli_*` the binaries as users run them, `hooks*`
//! the hook engine. One line each:
//!
//! - `unix_bad_input`: every kind of bad input gets its error code; others go on.
//! - `unix_client`: the Rust client: autostart, events, reconnect, blocking wrapper.
//! - `unix_fanout`: 1,000 sessions hear every broadcast.
//! - `unix_flow_control`: lossless flow control, receipts, the byte budget.
//! - `unix_hooks`: hooks seen through the bus (env, hooks.yaml, a hanging hook).
//! - `unix_hostile`: what a hostile peer makes the bus keep is bounded.
//! - `unix_interop`: the reference Python clients 0.7.0 / 0.3.0 against our bus.
//! - `unix_limits`: the connection limit, heartbeat eviction, draining shutdown.
//! - `unix_msgpack`: MessagePack sessions next to JSON ones.
//! - `unix_peer_cred`: another user is refused unless allowed.
//! - `unix_reconnect`: nothing lost across the 0.7.0 client's reconnects; holds expire.
//! - `unix_slow_consumer`: a stalled receiver slows no one; its drops are shown.
//! - `unix_topics_scale`: 1,000,000 subscriptions; topic limits.
//! - `zmq_badinput`: malformed, oversized and MessagePack input through the proxy.
//! - `zmq_bus`: ZeroMQ traffic in the router and its hooks, and back out.
//! - `zmq_cli`: `hermes-bus server --zmq`: Unix sessions and ZeroMQ peers on one router.
//! - `zmq_demand`: inside the bus, publishers are sent only what sessions and hooks want.
//! - `zmq_faults`: stalled and broken peers, a proxy restart, exact counts.
//! - `zmq_heartbeat`: ZMTP PING/PONG with libzmq and raw peers; silent peers dropped.
//! - `zmq_hostile`: one publisher's bytes never corrupt another's stream.
//! - `zmq_interop`: hermes-zmq 1.3.0 and libzmq (pyzmq) peers with ours.
//! - `zmq_lossless`: the proxy's lossless mode against a slow pyzmq SUB.
//! - `zmq_netns`: publisher and subscriber in separate network namespaces; a cut link.
//! - `zmq_last_value`: late joiners get the last values first (pyzmq, Receiver, Unix snapshot); bounds.
//! - `zmq_subscriptions`: bare subscriptions (`RAW/`), strict mode, and a libzmq SUB's own filter.
//! - `zmq_storm`: subscription storms, limits and idle peers lock out no one.
//! - `daemon_cli`: `hermes-busd start/status/stop/restart` on a temp root.
//! - `cli_output`: `--json` outputs, closed pipes, `request`, `pub` / `sub`, completions.
//! - `cli_monitor`: `monitor`, `top`, the metrics endpoint (bus and proxy), `bench`.
//! - `hooks`: the hook engine: resolution, real hook processes, limits, filters.
#![allow(dead_code, unused_imports)]

pub mod bus;
pub mod files;
pub mod net;
pub mod process;
pub mod python;
pub mod wait;
#[cfg(feature = "zmq")]
pub mod zmq;

pub use bus::{client_recv, serve_unix, Raw, Served, TestBus};
pub use net::{free_port, free_tcp_addr};
pub use process::{
    alive, bin, bin_dir, in_ci, lines_of, listening, next_line, path_with_bins, repo_root,
    ServerProcess, TempRoot,
};
pub use python::{python, run_python, PyPeer};
pub use wait::{eventually, TEST_LIMIT};
