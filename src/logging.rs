//! Logging: `tracing` to stderr or to a log file that trims itself (the
//! daemon's log), with the level from `RUST_LOG` or `HERMES_BUS_LOG`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The log is trimmed to its last half once it passes this many bytes.
pub const MAX_LOG_BYTES: u64 = 500_000;

/// A log file writer that keeps the file under [`MAX_LOG_BYTES`] by
/// keeping its last half (cut at a line start) when it grows past it.
#[derive(Clone)]
pub struct TrimmingLog {
    /// The open file (append mode) and its size as we know it.
    inner: Arc<Mutex<(File, u64)>>,
    /// Its path, to re-read it when trimming.
    path: PathBuf,
}

impl TrimmingLog {
    /// Opens (creating) the log file for appending.
    pub fn open(path: &Path) -> std::io::Result<TrimmingLog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        let len = f.metadata()?.len();
        let log = TrimmingLog {
            inner: Arc::new(Mutex::new((f, len))),
            path: path.to_path_buf(),
        };
        log.trim_if_needed();
        Ok(log)
    }

    fn trim_if_needed(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.1 <= MAX_LOG_BYTES {
            return;
        }
        if let Ok(kept) = trim_file(&self.path) {
            g.1 = kept;
        }
    }
}

/// Rewrites a file in place keeping its last half (from a line start).
/// Writers with O_APPEND carry on at the new end. Returns the new size.
pub fn trim_file(path: &Path) -> std::io::Result<u64> {
    let mut f = OpenOptions::new().read(true).write(true).open(path)?;
    let mut data = Vec::new();
    f.read_to_end(&mut data)?;
    let keep_from = data.len().saturating_sub((MAX_LOG_BYTES / 2) as usize);
    let start = data[keep_from..]
        .iter()
        .position(|b| *b == b'\n')
        .map(|p| keep_from + p + 1)
        .unwrap_or(keep_from);
    let tail = data[start..].to_vec();
    f.set_len(0)?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&tail)?;
    Ok(tail.len() as u64)
}

impl Write for TrimmingLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let over = {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            let n = g.0.write(buf)?;
            g.1 += n as u64;
            g.1 > MAX_LOG_BYTES
        };
        if over {
            self.trim_if_needed();
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for TrimmingLog {
    type Writer = TrimmingLog;
    fn make_writer(&'a self) -> TrimmingLog {
        self.clone()
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line (for log shippers).
    Json,
}

/// The `--log-format` flag (also `HERMES_BUS_LOG_FORMAT`).
#[cfg(feature = "cli")]
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct LogArgs {
    /// Log lines as text or as one JSON object each.
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "HERMES_BUS_LOG_FORMAT"
    )]
    pub format: LogFormat,
}

/// True when colour may be used on stderr: it is a terminal and
/// `NO_COLOR` is unset or empty (<https://no-color.org>).
pub fn stderr_wants_color() -> bool {
    use std::io::IsTerminal;
    std::env::var_os("NO_COLOR").map_or(true, |v| v.is_empty()) && std::io::stderr().is_terminal()
}

/// Sets up `tracing`: to the log file when given, else to stderr.
/// `RUST_LOG` (or `HERMES_BUS_LOG`) chooses the level; default info.
pub fn init_logging(log_file: Option<&Path>) {
    init(log_file, LogFormat::Text)
}

/// [`init_logging`] with a line format. Colour only on a terminal and
/// without `NO_COLOR`; never in a file.
pub fn init(log_file: Option<&Path>, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = || {
        std::env::var("HERMES_BUS_LOG")
            .ok()
            .and_then(|v| EnvFilter::try_new(v).ok())
            .or_else(|| EnvFilter::try_from_default_env().ok())
            .unwrap_or_else(|| EnvFilter::new("info"))
    };
    let (file, open_err) = match log_file.map(TrimmingLog::open) {
        Some(Ok(w)) => (Some(w), None),
        Some(Err(e)) => (None, Some(e)),
        None => (None, None),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter());
    match (file, format) {
        (Some(w), LogFormat::Text) => {
            let _ = builder.with_ansi(false).with_writer(w).try_init();
        }
        (Some(w), LogFormat::Json) => {
            let _ = builder.json().with_ansi(false).with_writer(w).try_init();
        }
        (None, LogFormat::Text) => {
            let _ = builder
                .with_ansi(stderr_wants_color())
                .with_writer(std::io::stderr)
                .try_init();
        }
        (None, LogFormat::Json) => {
            let _ = builder
                .json()
                .with_ansi(false)
                .with_writer(std::io::stderr)
                .try_init();
        }
    }
    if let Some(e) = open_err {
        tracing::warn!("cannot open log file: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_is_trimmed_to_its_last_half_at_a_line_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("run/busd.log");
        let mut log = TrimmingLog::open(&path).expect("open");
        let line = format!("{}\n", "x".repeat(99));
        for i in 0..6000 {
            log.write_all(format!("{i:05} {line}").as_bytes())
                .expect("write");
        }
        let size = std::fs::metadata(&path).expect("meta").len();
        assert!(size <= MAX_LOG_BYTES, "{size}");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            text.starts_with(|c: char| c.is_ascii_digit()),
            "cut at a line start"
        );
        assert!(
            text.ends_with(&format!("05999 {line}")),
            "newest lines kept"
        );
        assert!(!text.contains("00000 "), "oldest lines gone");
    }
}
