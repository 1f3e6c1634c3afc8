//! The report on stdout: a closed pipe (`gpumem kv | head -1`) ends the run quietly, any other
//! failure to write (a full disk: `> /dev/full`) is a clear error, never a panic.

use std::io::{ErrorKind, Write};

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
