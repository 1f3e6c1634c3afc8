//! A progress bar on stderr for long runs, drawn by `indicatif`.
//!
//! It appears only on a terminal and only once a run has lasted [`SHOW_AFTER`]: what decides is
//! time, not the size of the input, so a quick run prints nothing and a slow one (a large trace,
//! a run on real memory) always shows one, with elapsed time and the time left. `finish` (or
//! dropping the `Progress`, on an error) clears it, so no half-full bar stays on the screen.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How long a run goes before its bar appears: shorter runs are over before a bar would help.
const SHOW_AFTER: Duration = Duration::from_secs(1);
const TEMPLATE: &str =
    "{elapsed_precise} [{bar:40}] {percent:>3}%  {human_pos}/{human_len} {msg}, {eta} left";

/// Progress over several parallel runs: the sum of their done units against the total. Safe to
/// update from several threads at once.
pub struct Progress {
    bar: ProgressBar,
    /// Where the bar goes once the run has lasted `show_after`; `None` once it is there, or
    /// from the start when there is no terminal.
    pending_target: Mutex<Option<ProgressDrawTarget>>,
    pending: AtomicBool,
    show_after: Duration,
    started: Instant,
    done: Vec<AtomicU64>,
    total: u64,
    last_drawn_permille: AtomicU64,
    /// Whether the bar can ever be drawn (stderr is a terminal): when not, an update only
    /// records its count. Updates come once per simulated step, so they stay cheap.
    drawable: bool,
}

impl Progress {
    pub fn new(label_count: usize, total_ops: u64) -> Self {
        Self::with_unit(label_count, total_ops, "ops")
    }

    /// Counts `unit` (e.g. "tokens") instead of ops.
    pub fn with_unit(label_count: usize, total: u64, unit: &'static str) -> Self {
        let terminal = std::io::stderr()
            .is_terminal()
            .then(ProgressDrawTarget::stderr);
        Self::on(terminal, SHOW_AFTER, label_count, total, unit)
    }

    /// A bar that goes to `target` (none: never drawn) once `show_after` has passed.
    fn on(
        target: Option<ProgressDrawTarget>,
        show_after: Duration,
        label_count: usize,
        total: u64,
        unit: &'static str,
    ) -> Self {
        let style = ProgressStyle::with_template(TEMPLATE)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let bar = ProgressBar::with_draw_target(Some(total.max(1)), ProgressDrawTarget::hidden())
            .with_style(style)
            .with_message(unit);
        Progress {
            bar,
            pending: AtomicBool::new(target.is_some()),
            drawable: target.is_some(),
            pending_target: Mutex::new(target),
            show_after,
            started: Instant::now(),
            done: (0..label_count).map(|_| AtomicU64::new(0)).collect(),
            total: total.max(1),
            last_drawn_permille: AtomicU64::new(u64::MAX),
        }
    }

    /// Run `run` has done `done` units.
    pub fn update(&self, run: usize, done: u64) {
        let Some(slot) = self.done.get(run) else {
            return;
        };
        slot.store(done, Ordering::Relaxed);
        if !self.drawable {
            return;
        }
        self.show_when_due();
        let sum: u64 = self.done.iter().map(|d| d.load(Ordering::Relaxed)).sum();
        // Move the bar only when a tenth of a percent is crossed: updates come from every run's
        // thread, and each move takes the bar's lock. A plain load and store, not a swap: a
        // locked exchange fences every update, and a race costs at most one extra move.
        let permille = sum.min(self.total) * 1000 / self.total;
        if self.last_drawn_permille.load(Ordering::Relaxed) != permille {
            self.last_drawn_permille.store(permille, Ordering::Relaxed);
            self.bar.set_position(sum);
        }
    }

    /// Moves the bar to its terminal once the run has lasted `show_after` (once, by whichever
    /// thread gets there first).
    fn show_when_due(&self) {
        if !self.pending.load(Ordering::Relaxed) || self.started.elapsed() < self.show_after {
            return;
        }
        let target = self
            .pending_target
            .lock()
            .map_or(None, |mut pending| pending.take());
        if let Some(target) = target {
            self.bar.set_draw_target(target);
            self.pending.store(false, Ordering::Relaxed);
            // Draw now rather than at the next tenth of a percent.
            self.last_drawn_permille.store(u64::MAX, Ordering::Relaxed);
        }
    }

    /// Clears the bar: the run is over.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Drop for Progress {
    /// A run that ends in an error clears its bar too.
    fn drop(&mut self) {
        if !self.bar.is_finished() {
            self.bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use indicatif::TermLike;
    use std::sync::Arc;

    /// A terminal that keeps what it shows: lines of text and a cursor row (columns are not
    /// modelled; indicatif clears a line before it rewrites it).
    #[derive(Debug, Default, Clone)]
    struct Screen(Arc<Mutex<(Vec<String>, usize)>>);

    impl Screen {
        /// What the screen shows now, lines joined by newlines.
        fn shown(&self) -> String {
            self.0.lock().unwrap().0.join("\n").trim_end().to_string()
        }

        fn edit(&self, edit: impl FnOnce(&mut Vec<String>, &mut usize)) -> std::io::Result<()> {
            let mut screen = self.0.lock().unwrap();
            let (lines, row) = &mut *screen;
            if lines.len() <= *row {
                lines.resize(*row + 1, String::new());
            }
            edit(lines, row);
            Ok(())
        }
    }

    impl TermLike for Screen {
        fn width(&self) -> u16 {
            120
        }
        fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
            self.edit(|_, row| *row = row.saturating_sub(n))
        }
        fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
            self.edit(|_, row| *row += n)
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.edit(|lines, row| {
                lines[*row].push_str(s);
                *row += 1;
            })
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.edit(|lines, row| lines[*row].push_str(s))
        }
        fn clear_line(&self) -> std::io::Result<()> {
            self.edit(|lines, row| lines[*row].clear())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn progress_on(screen: &Screen, show_after: Duration, total: u64) -> Progress {
        let target = ProgressDrawTarget::term_like(Box::new(screen.clone()));
        Progress::on(Some(target), show_after, 2, total, "tokens")
    }

    #[test]
    fn the_template_is_valid() {
        assert!(ProgressStyle::with_template(TEMPLATE).is_ok());
    }

    #[test]
    fn a_run_shorter_than_the_delay_draws_nothing() {
        let screen = Screen::default();
        let progress = progress_on(&screen, Duration::from_secs(3600), 1000);
        for done in (0..=500).step_by(50) {
            progress.update(0, done);
            progress.update(1, done);
        }
        progress.finish();
        assert_eq!(screen.shown(), "");
    }

    #[test]
    fn a_run_past_the_delay_shows_counts_and_time_left() {
        let screen = Screen::default();
        let progress = progress_on(&screen, Duration::ZERO, 1000);
        progress.update(0, 200);
        progress.update(1, 300);
        let text = screen.shown();
        assert!(text.contains("50%"), "{text}");
        assert!(text.contains("500/1,000 tokens"), "{text}");
        assert!(text.contains("left") && text.contains("00:00:0"), "{text}");
    }

    #[test]
    fn a_delay_counts_from_the_start_of_the_run() {
        let screen = Screen::default();
        let progress = progress_on(&screen, Duration::from_millis(50), 1000);
        progress.update(0, 10);
        assert_eq!(screen.shown(), "", "drawn before the delay");
        std::thread::sleep(Duration::from_millis(60));
        progress.update(0, 20);
        assert!(screen.shown().contains("20/1,000"), "{}", screen.shown());
    }

    #[test]
    fn finish_clears_a_bar_left_part_way() {
        let screen = Screen::default();
        let progress = progress_on(&screen, Duration::ZERO, 1000);
        progress.update(0, 955);
        assert!(screen.shown().contains("955/1,000"), "{}", screen.shown());
        progress.finish();
        assert_eq!(screen.shown(), "");
    }

    #[test]
    fn dropping_without_finish_clears_too() {
        let screen = Screen::default();
        drop({
            let progress = progress_on(&screen, Duration::ZERO, 10);
            progress.update(0, 3);
            assert!(screen.shown().contains("3/10"), "{}", screen.shown());
            progress
        });
        assert_eq!(screen.shown(), "");
    }

    #[test]
    fn updates_from_many_threads_add_up() {
        let screen = Screen::default();
        let progress = Progress::on(
            Some(ProgressDrawTarget::term_like(Box::new(screen.clone()))),
            Duration::ZERO,
            8,
            8000,
            "ops",
        );
        std::thread::scope(|s| {
            for run in 0..8 {
                let progress = &progress;
                s.spawn(move || (0..=1000).for_each(|done| progress.update(run, done)));
            }
        });
        assert_eq!(progress.bar.position(), 8000);
        // An unknown run is ignored rather than a panic in a worker thread.
        progress.update(99, 5);
    }
}
