//! What a run measures while it runs, in memory that does not grow with its steps: per
//! finished request the three latencies its percentiles need (exact, nearest-rank over all
//! requests), the state over time as a bounded series that keeps the last state of each
//! time window, the window doubling whenever the series is full, the memory-pressure monitor
//! fed with the KV pool's usage after every step, and each step's CUDA-graph padding.

use crate::monitor::{periods, Monitor, Period, WatchId};

use super::cudagraph::GraphPadding;
use super::report::{Percentiles, RunInfo, TimelinePoint};
use super::step::StepRecord;
use super::vllm::{EngineConfig, RequestOutcome, KV_SEGMENT};

/// What a run measures besides the driver's totals, step by logged step.
#[derive(Clone, Debug)]
pub struct Measured {
    pub latencies: Latencies,
    pub series: Series,
    pub running_peak: u64,
    pub waiting_peak: u64,
    /// Requests skipped before the run (prompt too long for the model).
    pub rejected: u64,
    pub prefix_hits_refused: u64,
    /// Prefix-cache hit and looked-up tokens of all admissions so far.
    pub hit_tokens: u64,
    pub query_tokens: u64,
    pub scheduled_tokens: u64,
    /// Fed with the KV blocks in use of the usable ones (vLLM's `kv_cache_usage`).
    pub pressure: Monitor,
    kv_watch: WatchId,
    pub cudagraph: GraphPadding,
    usable_blocks: u64,
}

impl Measured {
    /// Measurements of a run of an engine with `cfg`, configured by `info` (the pressure
    /// thresholds, the CUDA-graph sizes).
    pub fn new(cfg: &EngineConfig, info: &RunInfo) -> Self {
        let usable_blocks = cfg.num_gpu_blocks as u64 - 1;
        let mut pressure = Monitor::new(info.pressure_thresholds);
        let kv_watch = pressure.watch(KV_SEGMENT.place, usable_blocks);
        // The pool is empty when the clock starts.
        pressure.observe(kv_watch, 0, 0);
        Measured {
            latencies: Latencies::default(),
            series: Series::default(),
            running_peak: 0,
            waiting_peak: 0,
            rejected: 0,
            prefix_hits_refused: 0,
            hit_tokens: 0,
            query_tokens: 0,
            scheduled_tokens: 0,
            pressure,
            kv_watch,
            cudagraph: GraphPadding::new(
                &info.cudagraph_sizes,
                cfg,
                info.cudagraph_bytes_per_graph,
            ),
            usable_blocks,
        }
    }

    /// Takes in a logged step (a step that is not logged changes no usage and runs no batch).
    pub fn observe(&mut self, rec: &StepRecord) {
        rec.outcomes.iter().for_each(|o| self.latencies.record(o));
        let scheduled = rec.scheduled_tokens();
        let kv_blocks_used = self.usable_blocks - rec.free_blocks as u64;
        self.hit_tokens += rec.admitted_hit_tokens();
        self.query_tokens += rec.admitted_tokens;
        self.scheduled_tokens += scheduled;
        self.running_peak = self.running_peak.max(rec.running);
        self.waiting_peak = self.waiting_peak.max(rec.waiting);
        self.pressure
            .observe(self.kv_watch, rec.end_ns, kv_blocks_used);
        self.cudagraph.observe(scheduled);
        self.series.push(TimelinePoint {
            t_us: rec.end_ns / 1000,
            kv_blocks_used,
            running: rec.running,
            waiting: rec.waiting,
            prefix_hit_tokens: self.hit_tokens,
            prefix_query_tokens: self.query_tokens,
        });
    }
}

impl Measured {
    /// The KV pool's warning and critical periods up to the last step.
    pub fn pressure_periods(&self) -> Vec<Period> {
        let m = &self.pressure;
        periods(m.history(KV_SEGMENT.place), m.last_ns())
    }
}

/// Latencies of the finished requests, µs: three integers per request at most.
#[derive(Clone, Debug, Default)]
pub struct Latencies {
    ttft_us: Vec<u64>,
    tpot_us: Vec<u64>,
    e2e_us: Vec<u64>,
}

impl Latencies {
    /// TTFT (arrival to first token), end to end (arrival to finish) and, with two outputs or
    /// more, TPOT ((finish − first token) / (outputs − 1)).
    pub fn record(&mut self, o: &RequestOutcome) {
        self.ttft_us.push((o.first_token_ns - o.arrival_ns) / 1000);
        self.e2e_us.push((o.finish_ns - o.arrival_ns) / 1000);
        if o.output_tokens >= 2 {
            self.tpot_us
                .push((o.finish_ns - o.first_token_ns) / (o.output_tokens - 1) / 1000);
        }
    }

    /// Adds every latency of `other`.
    pub fn absorb(&mut self, other: &Latencies) {
        self.ttft_us.extend_from_slice(&other.ttft_us);
        self.tpot_us.extend_from_slice(&other.tpot_us);
        self.e2e_us.extend_from_slice(&other.e2e_us);
    }

    /// Nearest-rank percentiles of (TTFT, TPOT, end to end).
    pub fn percentiles(&mut self) -> [Percentiles; 3] {
        [
            Percentiles::of(&mut self.ttft_us),
            Percentiles::of(&mut self.tpot_us),
            Percentiles::of(&mut self.e2e_us),
        ]
    }
}

/// Most points a [`Series`] keeps (12 MiB): whole-trace runs of the real traces stay below
/// it, so their timeline is the state after every step at one-µs resolution.
pub const MAX_SERIES_POINTS: usize = 1 << 18;

/// The state over time, bounded: the last point of each `window_us`-wide time window, the
/// window starting at 1 µs and doubling (neighbouring windows merged, the later point kept)
/// whenever more than `max_points` would be kept. Deterministic: it depends on the points
/// alone.
#[derive(Clone, Debug)]
pub struct Series {
    points: Vec<TimelinePoint>,
    /// log2 of the window's width in µs.
    window_shift: u32,
    max_points: usize,
}

impl Default for Series {
    fn default() -> Self {
        Series::with_max_points(MAX_SERIES_POINTS)
    }
}

impl Series {
    pub fn with_max_points(max_points: usize) -> Self {
        assert!(max_points >= 2, "a series keeps at least two points");
        Series {
            // Reserved whole (untouched pages cost nothing): growing would copy it.
            points: Vec::with_capacity(max_points),
            window_shift: 0,
            max_points,
        }
    }

    /// Adds the state at `p.t_us` (not before the last point's time).
    pub fn push(&mut self, p: TimelinePoint) {
        if let Some(last) = self.points.last_mut() {
            debug_assert!(last.t_us <= p.t_us, "points in time order");
            if last.t_us >> self.window_shift == p.t_us >> self.window_shift {
                *last = p;
                return;
            }
        }
        if self.points.len() == self.max_points {
            self.widen();
        }
        self.points.push(p);
    }

    /// Doubles the window until the points fit in half the room, keeping each window's last.
    fn widen(&mut self) {
        while self.points.len() > self.max_points / 2 && self.window_shift < 63 {
            self.window_shift += 1;
            let w = self.window_shift;
            let mut kept = 0;
            for i in 0..self.points.len() {
                let p = self.points[i];
                if kept > 0 && self.points[kept - 1].t_us >> w == p.t_us >> w {
                    self.points[kept - 1] = p;
                } else {
                    self.points[kept] = p;
                    kept += 1;
                }
            }
            self.points.truncate(kept);
        }
    }

    pub fn points(&self) -> &[TimelinePoint] {
        &self.points
    }

    /// Width of the windows, µs (1 while nothing was merged).
    pub fn window_us(&self) -> u64 {
        1 << self.window_shift
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::report::downsample;

    fn point(t_us: u64, running: u64) -> TimelinePoint {
        TimelinePoint {
            t_us,
            running,
            ..TimelinePoint::default()
        }
    }

    #[test]
    fn a_series_that_fits_downsamples_like_every_point() {
        let all: Vec<TimelinePoint> = (0..500u64).map(|i| point(i / 3 * 7, i)).collect();
        let mut s = Series::with_max_points(1000);
        all.iter().for_each(|&p| s.push(p));
        assert_eq!(s.window_us(), 1);
        assert!(s.points().len() < all.len(), "points at the same µs merge");
        for n in [4, 48, 1200] {
            assert_eq!(downsample(s.points(), n), downsample(&all, n), "{n} points");
        }
    }

    #[test]
    fn a_full_series_keeps_the_last_point_of_each_wider_window() {
        let mut s = Series::with_max_points(16);
        for i in 0..1000u64 {
            s.push(point(i, i));
            assert!(s.points().len() <= 16);
        }
        let w = s.window_us();
        assert!(w > 1 && w.is_power_of_two());
        let pts = s.points();
        assert_eq!(
            pts.last().unwrap().t_us,
            999,
            "the newest point is always kept"
        );
        for p in &pts[..pts.len() - 1] {
            assert_eq!((p.t_us + 1) % w, 0, "{p:?} ends its {w}-µs window");
        }
        assert!(pts.windows(2).all(|q| q[0].t_us / w < q[1].t_us / w));
    }

    #[test]
    fn latencies_count_tpot_only_with_two_outputs() {
        let mut l = Latencies::default();
        let o = RequestOutcome {
            arrival_ns: 1_000,
            first_token_ns: 5_000,
            finish_ns: 25_000,
            output_tokens: 3,
            ..RequestOutcome::default()
        };
        l.record(&o);
        l.record(&RequestOutcome {
            output_tokens: 1,
            finish_ns: 5_000,
            ..o
        });
        let [ttft, tpot, e2e] = l.percentiles();
        assert_eq!(
            (ttft.p99, tpot.p50, tpot.p99, e2e.p50, e2e.p99),
            (4, 10, 10, 4, 24)
        );
    }
}
