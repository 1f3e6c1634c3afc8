//! The report on stdout: a closed pipe (`gpumem kv | head -1`) ends the run quietly, any other
//! failure to write (a full disk: `> /dev/full`) is a clear error, never a panic.

use std::fs::File;
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};

/// The error a command returns when its reader closed stdout: `main` exits quietly with 0.
pub const STDOUT_CLOSED: &str = "stdout was closed";

/// Writes `text` to stdout and flushes it.
pub fn print(text: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Err(STDOUT_CLOSED.into()),
        Err(e) => Err(format!("cannot write the report to stdout: {e}")),
    }
}

/// [`print`] with a newline.
pub fn println(text: &str) -> Result<(), String> {
    print(&format!("{text}\n"))
}

/// An output file written beside its final path and renamed onto it only when complete: a run
/// that fails half way leaves an existing file as it was, and creating it first proves the
/// folder writable before a long run.
pub struct AtomicFile {
    path: PathBuf,
    temporary: PathBuf,
    file: Option<BufWriter<File>>,
}

impl AtomicFile {
    pub fn create(path: &Path) -> Result<AtomicFile, String> {
        let name = path
            .file_name()
            .ok_or_else(|| format!("{}: not a file name", path.display()))?;
        let mut temporary_name = std::ffi::OsString::from(".");
        temporary_name.push(name);
        temporary_name.push(format!(".gpumem-{}.tmp", std::process::id()));
        let temporary = path.with_file_name(temporary_name);
        let file = File::create(&temporary)
            .map_err(|e| format!("{}: cannot write here: {e}", path.display()))?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            temporary,
            // A step log runs to tens of megabytes: 1 MiB writes, not 8 KiB ones.
            file: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    /// Flushes the file and renames it onto its path.
    pub fn commit(mut self) -> Result<(), String> {
        let file = self.file.take().expect("committed once");
        let fail = |e: std::io::Error| format!("{}: cannot write: {e}", self.path.display());
        let file = file.into_inner().map_err(|e| fail(e.into_error()))?;
        file.sync_all().map_err(fail)?;
        std::fs::rename(&self.temporary, &self.path).map_err(fail)
    }
}

impl Write for AtomicFile {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.file.as_mut().expect("not committed").write(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().expect("not committed").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.temporary);
        }
    }
}

impl AtomicFile {
    /// Writes all of `bytes`, then commits.
    pub fn write_all_and_commit(mut self, bytes: &[u8]) -> Result<(), String> {
        self.write_all(bytes)
            .map_err(|e| format!("{}: cannot write: {e}", self.path.display()))?;
        self.commit()
    }
}
