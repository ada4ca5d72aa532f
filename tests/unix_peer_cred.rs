//! Peer credentials: a process of another user is refused (with a
//! `permission_denied` error) even when the socket file's mode would let
//! it in, unless the bus allows other users. Needs root to run a client as
//! another uid; elsewhere it says so and passes.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use common::TestBus;
use hermes_bus::hooks::HookEngine;
use hermes_bus::RouterConfig;

const CLIENT: &str = r#"
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
s.connect(sys.argv[1])
p = json.dumps({"type": "ping"}).encode()
try:
    s.sendall(struct.pack(">I", len(p)) + p)
except BrokenPipeError:
    pass  # refused: the bus may have closed before reading; its reply is still there
h = s.recv(4)
n = struct.unpack(">I", h)[0]
b = b""
while len(b) < n:
    b += s.recv(n - len(b))
print(b.decode())
"#;

fn as_nobody(socket: &Path) -> serde_json::Value {
    let out = std::process::Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(CLIENT)
        .arg(socket)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json reply")
}

async fn serve(allow: bool) -> TestBus {
    let bus = TestBus::start_unix(RouterConfig::default(), HookEngine::disabled(), |u| {
        u.allow_other_users = allow
    })
    .await;
    std::fs::set_permissions(bus.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod dir");
    let socket = &bus.socket;
    assert_eq!(
        std::fs::metadata(socket)
            .expect("socket")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // Open the file mode wide, so only the credential check stands.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    bus
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_users_are_refused_unless_allowed() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/usr/bin/python3").exists() {
        let msg = "needs root and /usr/bin/python3 to run a client as another user";
        assert!(!common::in_ci(), "{msg}");
        eprintln!("SKIPPED: {msg}");
        return;
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        let bus = serve(false).await;
        let s = bus.socket.clone();
        let v = tokio::task::spawn_blocking(move || as_nobody(&s))
            .await
            .expect("join");
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["code"], "permission_denied", "{v}");
        bus.stop().await;

        let bus = serve(true).await;
        let s = bus.socket.clone();
        let v = tokio::task::spawn_blocking(move || as_nobody(&s))
            .await
            .expect("join");
        assert_eq!(v["type"], "pong", "{v}");
        bus.stop().await;
    })
    .await
    .expect("test timed out");
}
