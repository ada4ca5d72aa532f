//! Hooks seen through the bus: the daemon resolves them from its
//! environment (`HERMES_BUS_HOOKS`, `hooks.yaml`), a hook gets the routed
//! message on stdin, and a hook that hangs never slows routing.
//! (The engine itself is tested in tests/hooks.rs.)

mod common;

use std::path::Path;
use std::time::Duration;

use common::files::{stdin_copy_script, write_file};
use common::{Raw, ServerProcess, TestBus};
use hermes_bus::hooks::{HookConfig, HookEngine, HookSpec};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(90);

/// Runs the real server binary with `env`, sends one message from a
/// registered sender to a registered receiver, and returns what the hook
/// wrote (its stdin) with the message as the receiver got it.
async fn hook_sees_routed_message(
    env: &[(&str, String)],
    out: &Path,
    home: &Path,
) -> (Value, Value) {
    let mut server = ServerProcess::start_bin("hermes-bus-server", &[], |cmd| {
        cmd.env("HERMES_HOME", home);
        for (k, v) in env {
            cmd.env(k, v);
        }
    })
    .await;
    let socket = server.socket.clone();
    let mut alice = Raw::register(&socket, "alice").await;
    let mut bob = Raw::register(&socket, "bob").await;
    alice
        .send(&json!({"type": "message", "to": "bob", "text": "hi", "body": {"x": "ü", "n": [1, 2]}, "extra": true}))
        .await;
    let delivered = bob.recv().await.expect("delivered");
    let mut seen = None;
    common::eventually(Duration::from_secs(20), || {
        seen = std::fs::read(out).ok();
        seen.is_some()
    })
    .await;
    let _ = server.child.kill().await;
    let stdin: Value =
        serde_json::from_slice(&seen.expect("hook ran")).expect("hook stdin is JSON");
    (stdin, delivered)
}

#[tokio::test]
async fn hook_from_env_gets_the_routed_message_on_stdin() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("stdin.json");
        let hook = stdin_copy_script(dir.path(), "hook.sh", &out);
        let home = dir.path().join("home");
        let env = [("HERMES_BUS_HOOKS", hook.display().to_string())];
        let (stdin, delivered) = hook_sees_routed_message(&env, &out, &home).await;
        // Exactly what was routed: id, ts and from filled in by the bus,
        // body and unknown fields untouched.
        assert_eq!(stdin, delivered);
        assert_eq!(stdin["from"], "alice");
        assert_eq!(stdin["body"], json!({"x": "ü", "n": [1, 2]}));
        assert_eq!(stdin["extra"], true);
        assert!(stdin["id"].is_string() && stdin["ts"].is_number());
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn hook_from_hooks_yaml_runs_a_python_script() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("stdin.json");
        let home = dir.path().join("home");
        std::fs::create_dir_all(home.join("hermes-bus")).expect("dir");
        // A non-executable .py file: run with python3.
        let py = dir.path().join("hook.py");
        std::fs::write(
            &py,
            format!(
                "import sys, os\ndata = sys.stdin.buffer.read()\nopen('{0}.tmp', 'wb').write(data)\nos.rename('{0}.tmp', '{0}')\n",
                out.display()
            ),
        )
        .expect("write");
        std::fs::write(home.join("hermes-bus/hooks.yaml"), format!("- {}\n", py.display())).expect("yaml");
        let (stdin, delivered) = hook_sees_routed_message(&[], &out, &home).await;
        assert_eq!(stdin, delivered);
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_hooks_never_slow_routing() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().expect("tempdir");
        let hang = write_file(dir.path(), "hang.sh", "#!/bin/sh\nexec sleep 30\n", 0o755);
        let cfg = HookConfig {
            max_concurrent: 2,
            queue_capacity: 8,
            timeout: Duration::from_secs(1),
            hooks: vec![HookSpec::new(hang)],
        };
        let hooks = HookEngine::start(cfg, Vec::new());
        let bus = TestBus::start_with(Default::default(), hooks.clone()).await;
        let mut alice = Raw::register(&bus.socket, "alice").await;
        let mut bob = Raw::register(&bus.socket, "bob").await;
        const N: u64 = 5000;
        for i in 0..N {
            alice
                .send(&json!({"type": "message", "to": "bob", "body": {"n": i}}))
                .await;
            if i % 500 == 499 {
                for j in i - 499..=i {
                    assert_eq!(bob.recv().await.expect("routed")["body"]["n"], j);
                }
            }
        }
        let st = hooks.stats();
        assert_eq!(st.offered, N, "{st:?}");
        assert!(st.dropped_queue_full > 0, "{st:?}");
        assert!(st.in_flight <= 2, "{st:?}");
        assert_eq!(bus.totals().routed, N);
        hooks.shutdown(Duration::from_millis(200)).await;
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}
