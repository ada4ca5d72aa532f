//! Files a test writes: hook scripts and their outputs.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Writes `body` to `dir/name` with `mode`, closing the file before return.
pub fn write_file(dir: &Path, name: &str, body: &str, mode: u32) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .expect("create file");
    f.write_all(body.as_bytes()).expect("write file");
    f.sync_all().expect("sync file");
    path
}

/// A shell-script hook that copies its stdin to `out` (atomically, so a
/// reader never sees half a file).
pub fn stdin_copy_script(dir: &Path, name: &str, out: &Path) -> PathBuf {
    let body = format!(
        "#!/bin/sh\ncat > '{out}.tmp' && mv '{out}.tmp' '{out}'\n",
        out = out.display()
    );
    write_file(dir, name, &body, 0o755)
}
