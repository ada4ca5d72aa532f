//! Paths and environment: where the socket, pid file, log and hook
//! configuration live (README.md, "Configuration").

use std::path::{Path, PathBuf};

/// The user's home directory (`$HOME`), or `/` when unset.
pub fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// Expands a leading `~` or `~/` to the home directory.
pub fn expand_tilde(p: &str) -> PathBuf {
    if p == "~" {
        home_dir()
    } else if let Some(rest) = p.strip_prefix("~/") {
        home_dir().join(rest)
    } else {
        PathBuf::from(p)
    }
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| expand_tilde(&v))
}

/// The paths one bus uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// The bus root (`HERMES_BUS_ROOT`, default `~/.hermes`): socket and run/.
    pub root: PathBuf,
    /// The listening socket (`<root>/hermes-bus.sock` unless overridden).
    pub socket: PathBuf,
    /// The pid file of the daemon (`<root>/run/busd.pid`).
    pub pid_file: PathBuf,
    /// The daemon log (`<root>/run/busd.log`).
    pub log_file: PathBuf,
    /// `HERMES_HOME` (default `~/.hermes`): where hook configuration lives.
    pub hermes_home: PathBuf,
}

impl Paths {
    /// Paths from the environment, with optional `--root` and `--socket`
    /// overrides (flags win over the environment).
    pub fn resolve(root: Option<&Path>, socket: Option<&Path>) -> Paths {
        let root = root
            .map(Path::to_path_buf)
            .or_else(|| env_path("HERMES_BUS_ROOT"))
            .unwrap_or_else(|| home_dir().join(".hermes"));
        let hermes_home = env_path("HERMES_HOME").unwrap_or_else(|| home_dir().join(".hermes"));
        Paths::under(root, socket.map(Path::to_path_buf), hermes_home)
    }

    /// Paths under an explicit root (tests, embedding).
    pub fn under(root: PathBuf, socket: Option<PathBuf>, hermes_home: PathBuf) -> Paths {
        let run = root.join("run");
        Paths {
            socket: socket.unwrap_or_else(|| root.join("hermes-bus.sock")),
            pid_file: run.join("busd.pid"),
            log_file: run.join("busd.log"),
            hermes_home,
            root,
        }
    }

    /// `<root>/run`.
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_under_root() {
        let p = Paths::under("/r".into(), None, "/h".into());
        assert_eq!(p.socket, PathBuf::from("/r/hermes-bus.sock"));
        assert_eq!(p.pid_file, PathBuf::from("/r/run/busd.pid"));
        assert_eq!(p.log_file, PathBuf::from("/r/run/busd.log"));
        let p = Paths::under("/r".into(), Some("/s.sock".into()), "/h".into());
        assert_eq!(p.socket, PathBuf::from("/s.sock"));
    }
}
