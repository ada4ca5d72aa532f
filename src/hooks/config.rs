//! Which hooks run, and the engine's limits: resolution from
//! `HERMES_BUS_HOOKS`, `$HERMES_HOME/hermes-bus/hooks.yaml`, and the
//! default `$HERMES_HOME/hermes-notify/bus_callback.py`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::error::HookError;
use super::filter::HookFilter;

/// Default number of hook runs (processes or in-process calls) at once.
pub const DEFAULT_MAX_CONCURRENT: usize = 16;
/// Default number of events waiting between `offer` and the runner.
pub const DEFAULT_QUEUE_CAPACITY: usize = 1024;
/// Default time limit of one hook run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The environment variable that lists hooks (or disables them with `none`).
pub const HOOKS_ENV: &str = "HERMES_BUS_HOOKS";

/// One configured command hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookSpec {
    /// The file to run (`~` already expanded).
    pub path: PathBuf,
    /// Which events it runs for; plain path entries get
    /// [`HookFilter::messages`], what the reference matched.
    pub filter: HookFilter,
    /// Its own time limit (`timeout_ms` in hooks.yaml); `None` uses
    /// [`HookConfig::timeout`].
    pub timeout: Option<Duration>,
}

impl HookSpec {
    /// A hook for `path` with the reference filter and the default limit.
    pub fn new(path: impl Into<PathBuf>) -> HookSpec {
        HookSpec {
            path: path.into(),
            filter: HookFilter::messages(),
            timeout: None,
        }
    }
}

/// The hook engine's configuration: limits and the command hooks to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookConfig {
    /// Hook runs at once, across all hooks; past it, events wait in the
    /// queue. A value of 0 is treated as 1.
    pub max_concurrent: usize,
    /// Events that may wait for a free run slot; past it, `offer` drops and
    /// counts. A value of 0 is treated as 1.
    pub queue_capacity: usize,
    /// Time limit of one run unless the hook has its own; then it is killed.
    pub timeout: Duration,
    /// The command hooks, in configuration order.
    pub hooks: Vec<HookSpec>,
}

impl Default for HookConfig {
    fn default() -> Self {
        HookConfig {
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            timeout: DEFAULT_TIMEOUT,
            hooks: Vec::new(),
        }
    }
}

/// Where the resolved hook list came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookSource {
    /// `HERMES_BUS_HOOKS` listed the hooks.
    Env,
    /// `HERMES_BUS_HOOKS=none` disabled hooks.
    Disabled,
    /// The hooks file at this path.
    File(PathBuf),
    /// The default `hermes-notify/bus_callback.py`.
    Default,
    /// Nothing configured.
    Nothing,
}

impl HookConfig {
    /// Resolves the hooks from the process environment (`HERMES_BUS_HOOKS`,
    /// `HOME` for `~`) and `hermes_home` (the value of `HERMES_HOME`,
    /// default `~/.hermes`). See [`HookConfig::resolve_with`].
    pub fn resolve(hermes_home: &Path) -> Result<HookConfig, HookError> {
        let env = match std::env::var_os(HOOKS_ENV) {
            None => None,
            Some(v) => Some(v.into_string().map_err(|_| HookError::InvalidEnv {
                detail: "the value is not valid UTF-8".into(),
            })?),
        };
        let home = std::env::var_os("HOME").map(PathBuf::from);
        HookConfig::resolve_with(env.as_deref(), hermes_home, home.as_deref())
    }

    /// Resolves the hooks from an explicit `HERMES_BUS_HOOKS` value, in
    /// order:
    ///
    /// 1. `env_value`: a JSON array (starts with `[`) or a comma-separated
    ///    list of paths; `none` disables hooks; empty counts as unset.
    /// 2. `$HERMES_HOME/hermes-bus/hooks.yaml`: a YAML list of paths, or a
    ///    mapping whose `hooks:` list holds paths or
    ///    `{path, filter, timeout_ms}` entries. A file that cannot be read
    ///    or lists no usable hook is logged and skipped.
    /// 3. `$HERMES_HOME/hermes-notify/bus_callback.py` when it exists.
    ///
    /// `~` in paths expands to `home_dir`. Errors only on an env value that
    /// looks like JSON and is not a valid array of hooks.
    pub fn resolve_with(
        env_value: Option<&str>,
        hermes_home: &Path,
        home_dir: Option<&Path>,
    ) -> Result<HookConfig, HookError> {
        let (hooks, source) = resolve_hooks(env_value, hermes_home, home_dir)?;
        tracing::info!(
            source = ?source,
            hooks = ?hooks.iter().map(|h| h.path.display().to_string()).collect::<Vec<_>>(),
            "hooks resolved"
        );
        Ok(HookConfig {
            hooks,
            ..HookConfig::default()
        })
    }

    /// `$HERMES_HOME/hermes-bus/hooks.yaml`.
    pub fn hooks_file(hermes_home: &Path) -> PathBuf {
        hermes_home.join("hermes-bus").join("hooks.yaml")
    }

    /// `$HERMES_HOME/hermes-notify/bus_callback.py`, the default hook.
    pub fn default_hook(hermes_home: &Path) -> PathBuf {
        hermes_home.join("hermes-notify").join("bus_callback.py")
    }
}

/// The hook list and where it came from; see [`HookConfig::resolve_with`].
pub fn resolve_hooks(
    env_value: Option<&str>,
    hermes_home: &Path,
    home_dir: Option<&Path>,
) -> Result<(Vec<HookSpec>, HookSource), HookError> {
    if let Some(value) = env_value {
        if let Some(hooks) = parse_env(value, home_dir)? {
            let source = if hooks.is_empty() {
                HookSource::Disabled
            } else {
                HookSource::Env
            };
            return Ok((hooks, source));
        }
    }

    let file = HookConfig::hooks_file(hermes_home);
    match std::fs::read_to_string(&file) {
        Ok(text) => match parse_hooks_yaml(&text, home_dir) {
            Ok(hooks) if !hooks.is_empty() => return Ok((hooks, HookSource::File(file))),
            Ok(_) => {
                tracing::warn!(file = %file.display(), "hooks file lists no usable hook; ignored")
            }
            Err(detail) => {
                tracing::warn!(file = %file.display(), error = %detail, "invalid hooks file; ignored")
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "cannot read hooks file; ignored")
        }
    }

    let default = HookConfig::default_hook(hermes_home);
    if default.exists() {
        return Ok((vec![HookSpec::new(default)], HookSource::Default));
    }
    Ok((Vec::new(), HookSource::Nothing))
}

/// Parses a `HERMES_BUS_HOOKS` value: `None` when it counts as unset (empty
/// or blank), `Some(empty)` for `none`, else the listed hooks.
pub fn parse_env(value: &str, home_dir: Option<&Path>) -> Result<Option<Vec<HookSpec>>, HookError> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    if value.eq_ignore_ascii_case("none") {
        return Ok(Some(Vec::new()));
    }
    if value.starts_with('[') {
        let items: Vec<serde_json::Value> =
            serde_json::from_str(value).map_err(|e| HookError::InvalidEnv {
                detail: e.to_string(),
            })?;
        let mut hooks = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let entry = match item {
                serde_json::Value::String(s) => Entry::Path(s),
                obj @ serde_json::Value::Object(_) => Entry::Full(
                    serde_json::from_value(obj).map_err(|e| HookError::InvalidEnv {
                        detail: format!("entry {i}: {e}"),
                    })?,
                ),
                other => {
                    return Err(HookError::InvalidEnv {
                        detail: format!("entry {i}: expected a path string, found {other}"),
                    })
                }
            };
            if let Some(spec) =
                entry
                    .into_spec(home_dir)
                    .map_err(|detail| HookError::InvalidEnv {
                        detail: format!("entry {i}: {detail}"),
                    })?
            {
                hooks.push(spec);
            }
        }
        return Ok(Some(hooks));
    }
    Ok(Some(
        value
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| HookSpec::new(expand_tilde(p, home_dir)))
            .collect(),
    ))
}

/// Parses the text of hooks.yaml: a list of entries, or a mapping with a
/// `hooks:` list. An entry that is not usable is logged and skipped; an
/// error means the file as a whole is not understood.
pub fn parse_hooks_yaml(text: &str, home_dir: Option<&Path>) -> Result<Vec<HookSpec>, String> {
    let doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let items = match doc {
        serde_yaml::Value::Null => Vec::new(),
        serde_yaml::Value::Sequence(items) => items,
        serde_yaml::Value::Mapping(mut map) => {
            for key in map.keys() {
                if key.as_str() != Some("hooks") {
                    tracing::warn!(key = ?key, "unknown key in hooks file; ignored");
                }
            }
            match map.remove("hooks") {
                None | Some(serde_yaml::Value::Null) => Vec::new(),
                Some(serde_yaml::Value::Sequence(items)) => items,
                Some(_) => return Err("`hooks:` must be a list".into()),
            }
        }
        _ => return Err("expected a list of hooks or a mapping with a `hooks:` list".into()),
    };
    let mut hooks = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let entry = match item {
            serde_yaml::Value::String(s) => Ok(Entry::Path(s)),
            map @ serde_yaml::Value::Mapping(_) => serde_yaml::from_value::<FullEntry>(map)
                .map(Entry::Full)
                .map_err(|e| e.to_string()),
            other => Err(format!("expected a path or a mapping, found {other:?}")),
        };
        match entry.and_then(|e| e.into_spec(home_dir)) {
            Ok(Some(spec)) => hooks.push(spec),
            Ok(None) => {}
            Err(detail) => {
                tracing::warn!(entry = i, error = %detail, "invalid entry in hooks file; skipped")
            }
        }
    }
    Ok(hooks)
}

/// Expands a leading `~` (alone or followed by `/`) to `home_dir`; other
/// paths, and every path when the home directory is unknown, are kept.
pub fn expand_tilde(path: &str, home_dir: Option<&Path>) -> PathBuf {
    match (home_dir, path.strip_prefix('~')) {
        (Some(home), Some("")) => home.to_path_buf(),
        (Some(home), Some(rest)) if rest.starts_with('/') => {
            home.join(rest.trim_start_matches('/'))
        }
        _ => PathBuf::from(path),
    }
}

/// One hook entry as written in a hooks list.
enum Entry {
    /// A bare path: the reference filter and the default limit.
    Path(String),
    /// Our extension: a mapping with a filter and a time limit.
    Full(FullEntry),
}

/// The mapping form of a hook entry.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FullEntry {
    /// The file to run.
    path: String,
    /// Which events; absent means the reference filter (routed messages).
    #[serde(default)]
    filter: Option<HookFilter>,
    /// The hook's own time limit in milliseconds.
    #[serde(default)]
    timeout_ms: Option<u64>,
}

impl Entry {
    /// The spec of this entry; `None` for an empty path (skipped, as the
    /// reference skips empty list items).
    fn into_spec(self, home_dir: Option<&Path>) -> Result<Option<HookSpec>, String> {
        let (path, filter, timeout_ms) = match self {
            Entry::Path(p) => (p, None, None),
            Entry::Full(f) => (f.path, f.filter, f.timeout_ms),
        };
        let path = path.trim();
        if path.is_empty() {
            return Ok(None);
        }
        let timeout = match timeout_ms {
            Some(0) => return Err("timeout_ms must be greater than 0".into()),
            Some(ms) => Some(Duration::from_millis(ms)),
            None => None,
        };
        Ok(Some(HookSpec {
            path: expand_tilde(path, home_dir),
            filter: filter.unwrap_or_else(HookFilter::messages),
            timeout,
        }))
    }
}
