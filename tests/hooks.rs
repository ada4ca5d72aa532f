//! Hook engine: resolution sources, real hook processes, limits, filters
//! and in-process hooks.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hermes_bus::hooks::{
    EventProps, Hook, HookConfig, HookEngine, HookError, HookEvent, HookEventKind, HookFilter,
    HookSpec, HookStats,
};
use tempfile::TempDir;

use common::files::{stdin_copy_script, write_file};
use common::{alive, eventually, TEST_LIMIT};

/// Runs `fut` bounded by [`TEST_LIMIT`].
async fn bounded<F: std::future::Future>(fut: F) -> F::Output {
    match tokio::time::timeout(TEST_LIMIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("test did not finish within {TEST_LIMIT:?}"),
    }
}

/// Waits until `cond` holds (within [`TEST_LIMIT`]; fails otherwise).
async fn wait_until(cond: impl FnMut() -> bool) {
    assert!(eventually(TEST_LIMIT, cond).await, "condition never held");
}

fn message_event(json: &str) -> HookEvent {
    HookEvent::message("unix", Some("bob".into()), Bytes::from(json.to_owned()))
}

fn config(hooks: Vec<HookSpec>) -> HookConfig {
    HookConfig {
        hooks,
        ..HookConfig::default()
    }
}

fn paths(cfg: &HookConfig) -> Vec<PathBuf> {
    cfg.hooks.iter().map(|h| h.path.clone()).collect()
}

/// A fresh `HERMES_HOME` and a fake `$HOME`.
struct Homes {
    _tmp: TempDir,
    hermes: PathBuf,
    home: PathBuf,
}

fn homes() -> Homes {
    let tmp = tempfile::tempdir().expect("tempdir");
    let hermes = tmp.path().join("hermes");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(hermes.join("hermes-bus")).expect("mkdir");
    std::fs::create_dir_all(&home).expect("mkdir");
    Homes {
        _tmp: tmp,
        hermes,
        home,
    }
}

fn write_hooks_yaml(h: &Homes, text: &str) {
    std::fs::write(HookConfig::hooks_file(&h.hermes), text).expect("write hooks.yaml");
}

fn write_default_callback(h: &Homes) -> PathBuf {
    let path = HookConfig::default_hook(&h.hermes);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(&path, "import sys\n").expect("write callback");
    path
}

// ---------------------------------------------------------------- resolution

#[test]
fn resolve_env_json_array() {
    let h = homes();
    let cfg = HookConfig::resolve_with(
        Some(r#" ["/opt/a.py", "~/b.sh"] "#),
        &h.hermes,
        Some(&h.home),
    )
    .expect("resolve");
    assert_eq!(
        paths(&cfg),
        vec![PathBuf::from("/opt/a.py"), h.home.join("b.sh")]
    );
    for spec in &cfg.hooks {
        assert_eq!(spec.filter, HookFilter::messages());
        assert_eq!(spec.timeout, None);
    }
}

#[test]
fn resolve_env_json_array_accepts_entries_with_filters() {
    let h = homes();
    let cfg = HookConfig::resolve_with(
        Some(r#"[{"path": "/opt/md", "filter": {"kind": "topic", "topic_prefix": "md."}, "timeout_ms": 250}]"#),
        &h.hermes,
        Some(&h.home),
    )
    .expect("resolve");
    assert_eq!(cfg.hooks.len(), 1);
    assert_eq!(cfg.hooks[0].filter.kind, Some(HookEventKind::Topic));
    assert_eq!(cfg.hooks[0].filter.topic_prefix.as_deref(), Some("md."));
    assert_eq!(cfg.hooks[0].timeout, Some(Duration::from_millis(250)));
}

#[test]
fn resolve_env_invalid_json_is_an_error() {
    let h = homes();
    for bad in [
        r#"["/a.py""#,
        r#"[1, 2]"#,
        r#"[{"path": "/a", "filter": {"kinds": "topic"}}]"#,
    ] {
        let err = HookConfig::resolve_with(Some(bad), &h.hermes, Some(&h.home))
            .expect_err("invalid env must be an error");
        assert!(matches!(err, HookError::InvalidEnv { .. }), "{bad}: {err}");
    }
}

#[test]
fn resolve_env_comma_list_expands_tilde() {
    let h = homes();
    let cfg = HookConfig::resolve_with(
        Some(" ~/hooks/a.py , ,/opt/b.sh,~ ,"),
        &h.hermes,
        Some(&h.home),
    )
    .expect("resolve");
    assert_eq!(
        paths(&cfg),
        vec![
            h.home.join("hooks/a.py"),
            PathBuf::from("/opt/b.sh"),
            h.home.clone()
        ]
    );
    assert!(cfg.hooks.iter().all(|s| s.filter == HookFilter::messages()));
}

#[test]
fn resolve_env_none_disables_even_when_hooks_yaml_exists() {
    let h = homes();
    write_hooks_yaml(&h, "- /opt/a.py\n");
    write_default_callback(&h);
    for value in ["none", "  NONE ", "None"] {
        let cfg = HookConfig::resolve_with(Some(value), &h.hermes, Some(&h.home)).expect("resolve");
        assert!(cfg.hooks.is_empty(), "{value:?} must disable hooks");
    }
}

#[test]
fn resolve_empty_env_falls_through_to_plain_yaml_list() {
    let h = homes();
    write_hooks_yaml(
        &h,
        "# hooks of the reference form\n- /opt/a.py\n- '~/b.py'\n- \"/opt/c d.sh\"\n",
    );
    write_default_callback(&h);
    for env in [None, Some(""), Some("   \t ")] {
        let cfg = HookConfig::resolve_with(env, &h.hermes, Some(&h.home)).expect("resolve");
        assert_eq!(
            paths(&cfg),
            vec![
                PathBuf::from("/opt/a.py"),
                h.home.join("b.py"),
                PathBuf::from("/opt/c d.sh")
            ],
            "env {env:?}"
        );
        assert!(cfg.hooks.iter().all(|s| s.filter == HookFilter::messages()));
    }
}

#[test]
fn resolve_yaml_mapping_form_with_filters() {
    let h = homes();
    write_hooks_yaml(
        &h,
        r#"
hooks:
  - ~/plain.py
  - path: /opt/md-audit
    filter: {kind: topic, topic_prefix: "md.", transport: zmq}
    timeout_ms: 2000
  - path: /opt/to-alice.sh
    filter:
      to: alice
  - path: /opt/typo.sh
    filter: {topic_prefx: "x"}
"#,
    );
    let cfg = HookConfig::resolve_with(Some(""), &h.hermes, Some(&h.home)).expect("resolve");
    // The entry with an unknown filter key is skipped, the others kept.
    assert_eq!(
        paths(&cfg),
        vec![
            h.home.join("plain.py"),
            PathBuf::from("/opt/md-audit"),
            PathBuf::from("/opt/to-alice.sh")
        ]
    );
    assert_eq!(cfg.hooks[0].filter, HookFilter::messages());
    assert_eq!(
        cfg.hooks[1].filter,
        HookFilter {
            kind: Some(HookEventKind::Topic),
            to: None,
            topic_prefix: Some("md.".into()),
            transport: Some("zmq".into()),
        }
    );
    assert_eq!(cfg.hooks[1].timeout, Some(Duration::from_secs(2)));
    assert_eq!(cfg.hooks[2].filter.to.as_deref(), Some("alice"));
    assert_eq!(cfg.hooks[2].filter.kind, None);
}

#[test]
fn resolve_invalid_or_empty_yaml_falls_through_to_default() {
    for text in [
        "[: not yaml",
        "",
        "[]\n",
        "hooks: []\n",
        "hooks: 3\n",
        "42\n",
    ] {
        let h = homes();
        write_hooks_yaml(&h, text);
        let callback = write_default_callback(&h);
        let cfg = HookConfig::resolve_with(None, &h.hermes, Some(&h.home)).expect("resolve");
        assert_eq!(paths(&cfg), vec![callback], "hooks.yaml {text:?}");
    }
}

#[test]
fn resolve_default_bus_callback_when_present() {
    let h = homes();
    let callback = write_default_callback(&h);
    let cfg = HookConfig::resolve_with(None, &h.hermes, Some(&h.home)).expect("resolve");
    assert_eq!(paths(&cfg), vec![callback]);
    assert_eq!(cfg.hooks[0].filter, HookFilter::messages());
}

#[test]
fn resolve_nothing_when_absent() {
    let h = homes();
    let cfg = HookConfig::resolve_with(None, &h.hermes, Some(&h.home)).expect("resolve");
    assert!(cfg.hooks.is_empty());
    assert_eq!(cfg.max_concurrent, 16);
    assert_eq!(cfg.queue_capacity, 1024);
    assert_eq!(cfg.timeout, Duration::from_secs(10));
}

// ------------------------------------------------------------ command hooks

#[tokio::test]
async fn shell_hook_gets_the_message_json_on_stdin() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("stdin.json");
        let hook = stdin_copy_script(dir.path(), "hook.sh", &out);
        let engine = HookEngine::start(config(vec![HookSpec::new(&hook)]), Vec::new());

        let json =
            r#"{"type": "message", "from": "alice", "to": "bob", "body": {"text": "héllo ✓"}}"#;
        engine.offer(message_event(json));
        wait_until(|| engine.stats().runs_ok == 1).await;
        assert_eq!(std::fs::read(&out).expect("read output"), json.as_bytes());

        let s = engine.stats();
        assert_eq!(
            (s.offered, s.queued, s.runs_started, s.runs_failed),
            (1, 1, 1, 0)
        );
        assert_eq!(s.hooks, vec![hook.display().to_string()]);
        engine.shutdown(Duration::from_secs(5)).await;
    })
    .await
}

#[tokio::test]
async fn large_message_is_fed_whole_to_stdin() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("stdin.json");
        let hook = stdin_copy_script(dir.path(), "hook.sh", &out);
        let engine = HookEngine::start(config(vec![HookSpec::new(&hook)]), Vec::new());

        // Far larger than a pipe buffer: the engine must write while the
        // hook reads, not before it waits.
        let json = format!(
            r#"{{"type":"message","to":"bob","body":"{}"}}"#,
            "x".repeat(1 << 20)
        );
        engine.offer(message_event(&json));
        wait_until(|| engine.stats().runs_ok == 1).await;
        assert_eq!(std::fs::read(&out).expect("read output"), json.as_bytes());
        engine.shutdown(Duration::from_secs(5)).await;
    })
    .await
}

#[tokio::test]
async fn non_executable_py_hook_runs_with_python3() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("stdin.json");
        let script = format!(
            "import sys\ndata = sys.stdin.buffer.read()\nopen({out:?} + '.tmp', 'wb').write(data)\n\
             import os\nos.rename({out:?} + '.tmp', {out:?})\n",
            out = out.display().to_string()
        );
        let hook = write_file(dir.path(), "hook.py", &script, 0o644);
        let engine = HookEngine::start(config(vec![HookSpec::new(&hook)]), Vec::new());

        let json = r#"{"type":"message","to":"bob","body":{"n":1}}"#;
        engine.offer(message_event(json));
        wait_until(|| {
            let s = engine.stats();
            s.runs_ok + s.runs_failed == 1
        })
        .await;
        assert_eq!(engine.stats().runs_ok, 1, "python3 hook failed");
        assert_eq!(std::fs::read(&out).expect("read output"), json.as_bytes());
        engine.shutdown(Duration::from_secs(5)).await;
    })
    .await
}

#[tokio::test]
async fn failing_missing_and_unrunnable_hooks_are_counted() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let failing = write_file(
            dir.path(),
            "fail.sh",
            "#!/bin/sh\necho oops >&2\nexit 3\n",
            0o755,
        );
        let unrunnable = write_file(dir.path(), "plain.sh", "#!/bin/sh\n", 0o644);
        let missing = dir.path().join("missing.sh");
        let engine = HookEngine::start(
            config(vec![
                HookSpec::new(&failing),
                HookSpec::new(&unrunnable),
                HookSpec::new(&missing),
            ]),
            Vec::new(),
        );
        let s = engine.stats();
        assert_eq!(s.config_errors, 1);
        assert_eq!(
            s.hooks,
            vec![failing.display().to_string(), missing.display().to_string()]
        );

        engine.offer(message_event(r#"{"type":"message","to":"bob"}"#));
        wait_until(|| {
            let s = engine.stats();
            s.runs_failed == 1 && s.skipped_missing == 1
        })
        .await;
        let s = engine.stats();
        assert_eq!((s.runs_started, s.runs_ok, s.in_flight), (2, 0, 0));
        engine.shutdown(Duration::from_secs(5)).await;
    })
    .await
}

fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid")
}

#[tokio::test]
async fn hanging_hook_is_killed_at_its_timeout() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("pid");
        let child_file = dir.path().join("child");
        let script = format!(
            "#!/bin/sh\necho $$ > '{pid}.tmp' && mv '{pid}.tmp' '{pid}'\n\
             sleep 1000 &\necho $! > '{child}.tmp' && mv '{child}.tmp' '{child}'\nwait\n",
            pid = pid_file.display(),
            child = child_file.display()
        );
        let hook = write_file(dir.path(), "hang.sh", &script, 0o755);
        let mut spec = HookSpec::new(&hook);
        spec.timeout = Some(Duration::from_millis(500));
        let engine = HookEngine::start(config(vec![spec]), Vec::new());

        engine.offer(message_event(r#"{"type":"message","to":"bob"}"#));
        wait_until(|| engine.stats().timeouts == 1).await;
        let s = engine.stats();
        assert_eq!(
            (s.runs_started, s.runs_ok, s.runs_failed, s.in_flight),
            (1, 0, 0, 0)
        );

        // The hook (our direct child) is killed and reaped: kill(pid, 0)
        // fails. Its own child, the sleep, was killed with the group.
        let pid = read_pid(&pid_file);
        wait_until(|| {
            // SAFETY: signal 0 only checks that the process exists.
            let rc = unsafe { libc::kill(pid, 0) };
            rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
        })
        .await;
        if child_file.exists() {
            let child = read_pid(&child_file);
            wait_until(|| !alive(child)).await;
        }
        engine.shutdown(Duration::from_secs(5)).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_bound_is_respected() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let marks = dir.path().join("marks");
        std::fs::create_dir(&marks).expect("mkdir");
        let log = dir.path().join("log");
        // Each run leaves a marker while it runs and logs how many markers
        // it saw next to its own.
        let script = format!(
            "#!/bin/sh\nmkdir '{marks}/run.'$$\nn=$(ls '{marks}' | wc -l)\n\
             sleep 0.2\nrmdir '{marks}/run.'$$\necho $n >> '{log}'\n",
            marks = marks.display(),
            log = log.display()
        );
        let hook = write_file(dir.path(), "slow.sh", &script, 0o755);
        let cfg = HookConfig {
            max_concurrent: 2,
            ..config(vec![HookSpec::new(&hook)])
        };
        let engine = HookEngine::start(cfg, Vec::new());

        for i in 0..6 {
            engine.offer(message_event(&format!(
                r#"{{"type":"message","to":"bob","n":{i}}}"#
            )));
        }
        let mut max_in_flight = 0;
        wait_until(|| {
            let s = engine.stats();
            max_in_flight = max_in_flight.max(s.in_flight);
            s.runs_ok + s.runs_failed == 6
        })
        .await;
        let s = engine.stats();
        assert_eq!(s.runs_ok, 6, "{s:?}");
        assert!(max_in_flight <= 2, "in_flight reached {max_in_flight}");

        let seen: Vec<u32> = std::fs::read_to_string(&log)
            .expect("log")
            .lines()
            .map(|l| l.trim().parse().expect("count"))
            .collect();
        assert_eq!(seen.len(), 6);
        assert!(
            seen.iter().all(|&n| (1..=2).contains(&n)),
            "more than 2 hooks ran at once: {seen:?}"
        );
        engine.shutdown(Duration::from_secs(5)).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offer_never_blocks_and_counts_drops() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let hook = write_file(dir.path(), "sleep.sh", "#!/bin/sh\nexec sleep 30\n", 0o755);
        let cfg = HookConfig {
            max_concurrent: 1,
            queue_capacity: 4,
            timeout: Duration::from_secs(60),
            hooks: vec![HookSpec::new(&hook)],
        };
        let engine = HookEngine::start(cfg, Vec::new());

        for i in 0..10_000 {
            engine.offer(message_event(&format!(
                r#"{{"type":"message","to":"bob","n":{i}}}"#
            )));
        }
        let s = engine.stats();
        assert_eq!(s.offered, 10_000);
        assert_eq!(s.queued + s.dropped_queue_full, 10_000, "{s:?}");
        assert!(s.dropped_queue_full > 0);
        assert_eq!(s.filtered_out + s.dropped_closed, 0);

        // Shutdown kills the sleeping hook and discards what is queued.
        engine.shutdown(Duration::ZERO).await;
        let s = engine.stats();
        assert_eq!(s.in_flight, 0);
        assert_eq!(s.queued, s.runs_started + s.dropped_at_shutdown, "{s:?}");
        assert_eq!(
            s.runs_started,
            s.runs_ok + s.runs_failed + s.timeouts + s.skipped_missing + s.killed_at_shutdown,
            "{s:?}"
        );

        // After shutdown nothing is accepted.
        engine.offer(message_event(r#"{"type":"message","to":"bob"}"#));
        assert_eq!(engine.stats().dropped_closed, 1);
        assert!(!engine.wants(HookEventKind::Message, "unix", Some("bob"), None));
    })
    .await
}

// ----------------------------------------------------- in-process, filters

/// What a [`Recorder`] saw of one event: kind, transport, to, topic, JSON.
type Seen = (
    HookEventKind,
    &'static str,
    Option<String>,
    Option<String>,
    Bytes,
);

/// An in-process hook that records what it was called with.
struct Recorder {
    name: String,
    filter: HookFilter,
    seen: Mutex<Vec<Seen>>,
}

impl Recorder {
    fn new(name: &str, filter: HookFilter) -> Arc<Recorder> {
        Arc::new(Recorder {
            name: name.into(),
            filter,
            seen: Mutex::new(Vec::new()),
        })
    }

    fn topics(&self) -> Vec<Option<String>> {
        let seen = self.seen.lock().expect("lock");
        seen.iter().map(|e| e.3.clone()).collect()
    }
}

#[async_trait::async_trait]
impl Hook for Recorder {
    fn name(&self) -> &str {
        &self.name
    }
    fn filter(&self) -> &HookFilter {
        &self.filter
    }
    async fn call(&self, e: &HookEvent) -> Result<(), HookError> {
        let mut seen = self
            .seen
            .lock()
            .map_err(|e| HookError::callback(e.to_string()))?;
        seen.push((
            e.kind,
            e.transport,
            e.to.clone(),
            e.topic.clone(),
            e.json.clone(),
        ));
        Ok(())
    }
}

#[tokio::test]
async fn in_process_hook_is_called_with_the_event() {
    bounded(async {
        let rec = Recorder::new("recorder", HookFilter::messages());
        let engine = HookEngine::start(HookConfig::default(), vec![rec.clone() as Arc<dyn Hook>]);
        assert!(engine.is_enabled());
        assert_eq!(engine.stats().hooks, vec!["recorder".to_string()]);

        let json = r#"{"type":"message","to":"bob","body":"hi"}"#;
        engine.offer(message_event(json));
        wait_until(|| engine.stats().runs_ok == 1).await;
        let seen = rec.seen.lock().expect("lock").clone();
        assert_eq!(
            seen,
            vec![(
                HookEventKind::Message,
                "unix",
                Some("bob".to_string()),
                None,
                Bytes::from(json)
            )]
        );
        engine.shutdown(Duration::from_secs(5)).await;
    })
    .await
}

#[tokio::test]
async fn topic_prefix_filter_fires_for_matching_topics_only() {
    bounded(async {
        let md = Recorder::new(
            "md",
            HookFilter {
                topic_prefix: Some("md.".into()),
                ..HookFilter::any()
            },
        );
        let default = Recorder::new("default", HookFilter::messages());
        let engine = HookEngine::start(
            HookConfig::default(),
            vec![
                md.clone() as Arc<dyn Hook>,
                default.clone() as Arc<dyn Hook>,
            ],
        );

        assert!(engine.wants(HookEventKind::Topic, "zmq", None, Some("md.btc")));
        assert!(!engine.wants(HookEventKind::Topic, "zmq", None, Some("news.x")));
        assert!(!engine.wants(HookEventKind::Topic, "zmq", None, None));
        assert!(engine.wants(HookEventKind::Message, "unix", None, None));

        for topic in ["md.btc", "news.x", "md.eth", "mdx"] {
            engine.offer(HookEvent::topic(
                "zmq",
                topic.into(),
                Bytes::from_static(b"{}"),
            ));
        }
        engine.offer(message_event(r#"{"type":"message","to":"bob"}"#));
        wait_until(|| engine.stats().runs_ok == 3).await;

        assert_eq!(
            md.topics(),
            vec![Some("md.btc".to_string()), Some("md.eth".to_string())]
        );
        // The default filter ignores topic traffic: only the message.
        assert_eq!(default.topics(), vec![None]);
        let s = engine.stats();
        assert_eq!((s.offered, s.filtered_out, s.queued), (5, 2, 3));
        engine.shutdown(Duration::from_secs(5)).await;
    })
    .await
}

#[tokio::test]
async fn default_filter_ignores_topics_without_queueing() {
    bounded(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("never");
        let hook = stdin_copy_script(dir.path(), "hook.sh", &out);
        let engine = HookEngine::start(config(vec![HookSpec::new(&hook)]), Vec::new());
        assert!(!engine.wants(HookEventKind::Topic, "zmq", None, Some("md.btc")));
        engine.offer(HookEvent::topic(
            "zmq",
            "md.btc".into(),
            Bytes::from_static(b"{}"),
        ));
        let s = engine.stats();
        assert_eq!((s.offered, s.filtered_out, s.queued), (1, 1, 0));
        engine.shutdown(Duration::from_secs(5)).await;
        assert_eq!(engine.stats().runs_started, 0);
        assert!(!out.exists());
    })
    .await
}

#[test]
fn filter_conditions_all_must_hold() {
    let f = HookFilter {
        kind: Some(HookEventKind::Message),
        to: Some("alice".into()),
        topic_prefix: None,
        transport: Some("unix".into()),
    };
    let props = |kind, transport, to, topic| EventProps {
        kind,
        transport,
        to,
        topic,
    };
    assert!(f.matches(&props(HookEventKind::Message, "unix", Some("alice"), None)));
    assert!(!f.matches(&props(HookEventKind::Message, "unix", Some("bob"), None)));
    assert!(!f.matches(&props(HookEventKind::Message, "unix", None, None)));
    assert!(!f.matches(&props(HookEventKind::Message, "zmq", Some("alice"), None)));
    assert!(!f.matches(&props(HookEventKind::Topic, "unix", Some("alice"), None)));
    assert!(HookFilter::any().matches(&props(HookEventKind::Topic, "zmq", None, None)));
}

/// An in-process hook that never finishes, or panics.
struct Misbehaving {
    panic: bool,
    filter: HookFilter,
}

#[async_trait::async_trait]
impl Hook for Misbehaving {
    fn name(&self) -> &str {
        if self.panic {
            "panics"
        } else {
            "hangs"
        }
    }
    fn filter(&self) -> &HookFilter {
        &self.filter
    }
    fn timeout(&self) -> Option<Duration> {
        Some(Duration::from_millis(200))
    }
    async fn call(&self, _: &HookEvent) -> Result<(), HookError> {
        if self.panic {
            panic!("hook bug");
        }
        std::future::pending::<()>().await;
        Ok(())
    }
}

#[tokio::test]
async fn in_process_hooks_share_timeout_and_counters() {
    bounded(async {
        let hooks: Vec<Arc<dyn Hook>> = vec![
            Arc::new(Misbehaving {
                panic: false,
                filter: HookFilter::messages(),
            }),
            Arc::new(Misbehaving {
                panic: true,
                filter: HookFilter::messages(),
            }),
        ];
        let engine = HookEngine::start(HookConfig::default(), hooks);
        engine.offer(message_event(r#"{"type":"message","to":"bob"}"#));
        wait_until(|| {
            let s = engine.stats();
            s.timeouts == 1 && s.runs_failed == 1
        })
        .await;
        let s = engine.stats();
        assert_eq!((s.runs_started, s.in_flight), (2, 0));
        engine.shutdown(Duration::from_secs(5)).await;
    })
    .await
}

#[tokio::test]
async fn disabled_engine_counts_and_runs_nothing() {
    bounded(async {
        let engine = HookEngine::disabled();
        assert!(!engine.is_enabled());
        assert!(!engine.wants(HookEventKind::Message, "unix", Some("bob"), None));
        engine.offer(message_event(r#"{"type":"message"}"#));
        let s = engine.stats();
        assert_eq!((s.offered, s.filtered_out, s.runs_started), (1, 1, 0));
        engine.shutdown(Duration::from_secs(1)).await;

        let text = serde_json::to_string(&s).expect("serialize");
        let back: HookStats = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, s);
    })
    .await
}
