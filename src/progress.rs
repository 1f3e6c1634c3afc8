//! A progress line on stderr for long runs, drawn only when stderr is a terminal.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Progress over several parallel runs: the sum of their done operations against the total.
pub struct Progress {
    enabled: bool,
    total_ops: u64,
    done: Vec<AtomicU64>,
    last_drawn_permille: AtomicU64,
    lock: Mutex<()>,
    unit: &'static str,
}

impl Progress {
    pub fn new(label_count: usize, total_ops: u64) -> Self {
        Self::with_unit(label_count, total_ops, "ops")
    }

    /// Counts `unit` (e.g. "tokens") instead of ops.
    pub fn with_unit(label_count: usize, total_ops: u64, unit: &'static str) -> Self {
        Progress {
            enabled: std::io::stderr().is_terminal() && total_ops >= 200_000,
            total_ops: total_ops.max(1),
            done: (0..label_count).map(|_| AtomicU64::new(0)).collect(),
            last_drawn_permille: AtomicU64::new(u64::MAX),
            lock: Mutex::new(()),
            unit,
        }
    }

    pub fn update(&self, run: usize, done_ops: u64) {
        if !self.enabled {
            return;
        }
        self.done[run].store(done_ops, Ordering::Relaxed);
        let sum: u64 = self.done.iter().map(|d| d.load(Ordering::Relaxed)).sum();
        let permille = sum * 1000 / self.total_ops;
        if self.last_drawn_permille.swap(permille, Ordering::Relaxed) == permille {
            return;
        }
        let _guard = self.lock.lock();
        let filled = (permille / 25) as usize;
        let mut err = std::io::stderr();
        let _ = write!(
            err,
            "\r[{}{}] {:>5.1}%  {} of {} {}",
            "=".repeat(filled),
            " ".repeat(40 - filled.min(40)),
            permille as f64 / 10.0,
            sum,
            self.total_ops,
            self.unit
        );
        let _ = err.flush();
    }

    pub fn finish(&self) {
        if self.enabled {
            eprint!("\r{}\r", " ".repeat(72));
        }
    }
}
