//! The memory-pressure monitor: usage per place (device and tier) as a run goes, a pressure
//! level per place — normal, warning, critical — at two thresholds, an event at each level
//! change, time spent in each level, a bounded history and the recent trend.
//!
//! Drivers feed it ([`Monitor::observe`]) after every engine step or allocation operation; it
//! observes and decides nothing, so a run with it is the run without it. Later policies (the
//! automatic offloader) read it ([`Monitor::level`], [`Monitor::usage`],
//! [`Monitor::time_in`], [`Monitor::trend`], [`Monitor::history`]).
//!
//! Integers decide: thresholds are parts per million, and `used ≥ ⌈threshold × capacity⌉` is
//! the level test (exactly `used / capacity ≥ threshold`). Memory stays flat however long the
//! run: the history keeps at most [`HISTORY_POINTS`] windows a place (the window doubling when
//! full, as the serving time series does), the trend the last [`TREND_SAMPLES`] observations,
//! and the events the first [`EVENTS_KEPT`] (all are counted).

use std::fmt;

use gpumem_core::place::{Place, Tier};
use gpumem_traces::serving::import::parse_decimal;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

/// Events kept in full (every event is counted).
pub const EVENTS_KEPT: usize = 20;
/// Windows of history kept per place.
pub const HISTORY_POINTS: usize = 2048;
/// Observations the trend looks back over.
pub const TREND_SAMPLES: usize = 16;

const PPM: u64 = 1_000_000;

/// The warning and critical thresholds, fractions of capacity in parts per million,
/// `0 < warning < critical ≤ 1`. Written as the flag takes them: `0.75,0.9`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    warning_ppm: u64,
    critical_ppm: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            warning_ppm: 750_000,
            critical_ppm: 900_000,
        }
    }
}

impl Thresholds {
    /// Thresholds in parts per million, checked: `0 < warning < critical ≤ 1,000,000`.
    pub fn new(warning_ppm: u64, critical_ppm: u64) -> Result<Thresholds, String> {
        if warning_ppm == 0 || warning_ppm >= critical_ppm || critical_ppm > PPM {
            return Err(format!(
                "pressure thresholds {}: need 0 < warning < critical <= 1",
                Thresholds {
                    warning_ppm,
                    critical_ppm
                }
            ));
        }
        Ok(Thresholds {
            warning_ppm,
            critical_ppm,
        })
    }

    /// `WARNING,CRITICAL` as decimals (`0.75,0.9`; six digits after the point at most).
    pub fn parse(text: &str) -> Result<Thresholds, String> {
        let bad = || {
            format!("pressure thresholds '{text}': expected WARNING,CRITICAL as fractions with 0 < WARNING < CRITICAL <= 1, such as 0.75,0.9")
        };
        let (warning, critical) = text.split_once(',').ok_or_else(bad)?;
        let fraction = |s: &str| parse_decimal(s.trim(), 6).ok_or_else(bad);
        Thresholds::new(fraction(warning)?, fraction(critical)?).map_err(|_| bad())
    }

    pub fn warning_ppm(self) -> u64 {
        self.warning_ppm
    }

    pub fn critical_ppm(self) -> u64 {
        self.critical_ppm
    }
}

/// A fraction in ppm as its shortest decimal: 750000 → `0.75`.
fn decimal(ppm: u64) -> String {
    let text = format!("{}.{:06}", ppm / PPM, ppm % PPM);
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

impl fmt::Display for Thresholds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{},{}",
            decimal(self.warning_ppm),
            decimal(self.critical_ppm)
        )
    }
}

impl Serialize for Thresholds {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Thresholds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Thresholds::parse(&text).map_err(de::Error::custom)
    }
}

/// How full a place is, against the thresholds.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Below the warning threshold.
    #[default]
    Normal,
    /// At or above the warning threshold, below the critical one.
    Warning,
    /// At or above the critical threshold.
    Critical,
}

impl Level {
    pub const ALL: [Level; 3] = [Level::Normal, Level::Warning, Level::Critical];

    pub fn name(self) -> &'static str {
        match self {
            Level::Normal => "normal",
            Level::Warning => "warning",
            Level::Critical => "critical",
        }
    }
}

/// A place's usage at its last observation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub used: u64,
    pub capacity: u64,
}

impl Usage {
    /// `used / capacity` in parts per million, rounded down (0 for no capacity).
    pub fn ppm(self) -> u64 {
        if self.capacity == 0 {
            return 0;
        }
        (self.used as u128 * PPM as u128 / self.capacity as u128).min(u64::MAX as u128) as u64
    }
}

/// A level change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PressureEvent {
    pub t_ns: u64,
    pub place: Place,
    /// The level entered.
    pub level: Level,
    pub usage: Usage,
}

/// One window of a place's history: the observations from `t_ns` until the next window's
/// first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistoryPoint {
    /// The window's first observation.
    pub t_ns: u64,
    pub used_last: u64,
    pub used_max: u64,
    /// The highest level observed in the window.
    pub level_max: Level,
}

/// How usage moved over the recent observations: from the oldest kept to the newest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Trend {
    pub from_t_ns: u64,
    pub from_used: u64,
    pub to_t_ns: u64,
    pub to_used: u64,
}

impl Trend {
    /// Change in usage (negative: falling).
    pub fn delta_used(&self) -> i128 {
        self.to_used as i128 - self.from_used as i128
    }

    /// Change per second of run time, rounded toward zero; `None` over no time.
    pub fn per_s(&self) -> Option<i128> {
        let dt = self
            .to_t_ns
            .checked_sub(self.from_t_ns)
            .filter(|&d| d > 0)?;
        Some(self.delta_used() * 1_000_000_000 / dt as i128)
    }
}

/// Index of a watched place, from [`Monitor::watch`]: the cheap way to feed it every step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchId(usize);

/// One watched place.
#[derive(Clone, Debug)]
struct Watch {
    place: Place,
    capacity: u64,
    /// The least usage at warning and at critical level.
    warning_from: u64,
    critical_from: u64,
    used: u64,
    used_peak: u64,
    level: Level,
    observed: bool,
    last_ns: u64,
    time_ns: [u64; 3],
    entered: [u64; 3],
    history: History,
    recent: Recent,
}

impl Watch {
    fn new(place: Place, capacity: u64, t: Thresholds) -> Watch {
        // used ≥ ⌈ppm × capacity / 10⁶⌉ ⇔ used × 10⁶ ≥ ppm × capacity. No capacity: never.
        let least = |ppm: u64| match capacity {
            0 => u64::MAX,
            c => (ppm as u128 * c as u128).div_ceil(PPM as u128) as u64,
        };
        Watch {
            place,
            capacity,
            warning_from: least(t.warning_ppm),
            critical_from: least(t.critical_ppm),
            used: 0,
            used_peak: 0,
            level: Level::Normal,
            observed: false,
            last_ns: 0,
            time_ns: [0; 3],
            entered: [0; 3],
            history: History::default(),
            recent: Recent::default(),
        }
    }

    #[inline]
    fn level_of(&self, used: u64) -> Level {
        if used >= self.critical_from {
            Level::Critical
        } else if used >= self.warning_from {
            Level::Warning
        } else {
            Level::Normal
        }
    }

    fn usage(&self) -> Usage {
        Usage {
            used: self.used,
            capacity: self.capacity,
        }
    }
}

/// The monitor: see the module documentation.
#[derive(Clone, Debug)]
pub struct Monitor {
    thresholds: Thresholds,
    watches: Vec<Watch>,
    events: Vec<PressureEvent>,
    events_total: u64,
}

impl Monitor {
    pub fn new(thresholds: Thresholds) -> Monitor {
        Monitor {
            thresholds,
            watches: Vec::new(),
            events: Vec::new(),
            events_total: 0,
        }
    }

    pub fn thresholds(&self) -> Thresholds {
        self.thresholds
    }

    /// Starts watching `place`, `capacity` units large (bytes, blocks: whatever its feed
    /// counts); a place already watched keeps its state and takes the new capacity.
    pub fn watch(&mut self, place: Place, capacity: u64) -> WatchId {
        if let Some(i) = self.watches.iter().position(|w| w.place == place) {
            let w = &mut self.watches[i];
            let fresh = Watch::new(place, capacity, self.thresholds);
            (w.capacity, w.warning_from, w.critical_from) =
                (capacity, fresh.warning_from, fresh.critical_from);
            return WatchId(i);
        }
        self.watches
            .push(Watch::new(place, capacity, self.thresholds));
        WatchId(self.watches.len() - 1)
    }

    /// `used` units of the watched place at `t_ns`. The level held since the last
    /// observation is charged the time between; a time before the last one counts as the
    /// last (no time passes backwards).
    #[inline]
    pub fn observe(&mut self, id: WatchId, t_ns: u64, used: u64) {
        let w = &mut self.watches[id.0];
        if w.observed && used == w.used && w.level_of(used) == w.level {
            // Most observations repeat the last usage: the level (unless a new capacity moved
            // the thresholds), the peak and the window's highs stand, so only the clock, the
            // time at the level and the trend move.
            let t_ns = t_ns.max(w.last_ns);
            w.time_ns[w.level as usize] += t_ns - w.last_ns;
            w.last_ns = t_ns;
            w.history.push_same(t_ns, used, w.level);
            w.recent.push(t_ns, used);
            return;
        }
        self.observe_in_full(id, t_ns, used);
    }

    /// [`observe`](Self::observe) without its shortcut for a repeated usage.
    fn observe_in_full(&mut self, id: WatchId, t_ns: u64, used: u64) {
        let w = &mut self.watches[id.0];
        let t_ns = if w.observed {
            t_ns.max(w.last_ns)
        } else {
            t_ns
        };
        if w.observed {
            w.time_ns[w.level as usize] += t_ns - w.last_ns;
        }
        w.observed = true;
        w.last_ns = t_ns;
        w.used = used;
        w.used_peak = w.used_peak.max(used);
        let level = w.level_of(used);
        w.history.push(t_ns, used, level);
        w.recent.push(t_ns, used);
        if level != w.level {
            w.level = level;
            w.entered[level as usize] += 1;
            let event = PressureEvent {
                t_ns,
                place: w.place,
                level,
                usage: w.usage(),
            };
            self.events_total += 1;
            if self.events.capacity() == 0 {
                self.events.reserve_exact(EVENTS_KEPT);
            }
            if self.events.len() < EVENTS_KEPT {
                self.events.push(event);
            }
        }
    }

    /// [`observe`](Self::observe) by place, watching it first if it is new.
    pub fn observe_place(&mut self, place: Place, capacity: u64, t_ns: u64, used: u64) {
        let id = match self.watches.iter().position(|w| w.place == place) {
            Some(i) if self.watches[i].capacity == capacity => WatchId(i),
            _ => self.watch(place, capacity),
        };
        self.observe(id, t_ns, used);
    }

    fn find(&self, place: Place) -> Option<&Watch> {
        self.watches.iter().find(|w| w.place == place)
    }

    /// The watched places, in the order they were first watched.
    pub fn places(&self) -> impl Iterator<Item = Place> + '_ {
        self.watches.iter().map(|w| w.place)
    }

    /// The level of `place` now (normal for a place never observed).
    pub fn level(&self, place: Place) -> Level {
        self.find(place).map_or(Level::Normal, |w| w.level)
    }

    /// Usage of `place` at its last observation.
    pub fn usage(&self, place: Place) -> Option<Usage> {
        self.find(place).map(Watch::usage)
    }

    /// Time `place` spent at `level` up to its last observation, ns.
    pub fn time_in(&self, place: Place, level: Level) -> u64 {
        self.find(place).map_or(0, |w| w.time_ns[level as usize])
    }

    /// Times `place` entered `level`.
    pub fn entered(&self, place: Place, level: Level) -> u64 {
        self.find(place).map_or(0, |w| w.entered[level as usize])
    }

    /// How usage of `place` moved over its last [`TREND_SAMPLES`] observations.
    pub fn trend(&self, place: Place) -> Option<Trend> {
        self.find(place).and_then(|w| w.recent.trend())
    }

    /// The bounded history of `place`, oldest window first.
    pub fn history(&self, place: Place) -> &[HistoryPoint] {
        self.find(place).map_or(&[], |w| w.history.points())
    }

    /// The first [`EVENTS_KEPT`] level changes, in order.
    pub fn events(&self) -> &[PressureEvent] {
        &self.events
    }

    /// Every level change, counted.
    pub fn events_total(&self) -> u64 {
        self.events_total
    }

    /// Time of the last observation of any place, ns.
    pub fn last_ns(&self) -> u64 {
        self.watches.iter().map(|w| w.last_ns).max().unwrap_or(0)
    }

    /// The report; `measure` says what usage was fed (`kv-blocks`, `reserved-bytes`).
    pub fn report(&self, measure: &'static str) -> PressureReport {
        let places: Vec<PlaceReport> = self.watches.iter().map(PlaceReport::of).collect();
        let sum = |f: fn(&PlaceReport) -> u64| places.iter().map(f).sum::<u64>();
        PressureReport {
            thresholds: self.thresholds,
            measure,
            warning_events: sum(|p| p.warning_events),
            critical_events: sum(|p| p.critical_events),
            time_warning_us: sum(|p| p.time_warning_us),
            time_critical_us: sum(|p| p.time_critical_us),
            events_total: self.events_total,
            events: self.events.iter().map(EventReport::of).collect(),
            places,
        }
    }
}

/// The history of one place: the observations of each `2^shift`-ns window merged into one
/// point, the window doubling whenever more than `max_points` would be kept. Deterministic: it
/// depends on the observations alone.
#[derive(Clone, Debug)]
struct History {
    points: Vec<HistoryPoint>,
    shift: u32,
    max_points: usize,
}

impl Default for History {
    fn default() -> Self {
        History::with_max_points(HISTORY_POINTS)
    }
}

impl History {
    fn with_max_points(max_points: usize) -> Self {
        History {
            points: Vec::new(),
            shift: 0,
            max_points: max_points.max(2),
        }
    }

    #[inline]
    fn push(&mut self, t_ns: u64, used: u64, level: Level) {
        if let Some(last) = self.points.last_mut() {
            if last.t_ns >> self.shift == t_ns >> self.shift {
                last.used_last = used;
                last.used_max = last.used_max.max(used);
                last.level_max = last.level_max.max(level);
                return;
            }
        }
        if self.points.len() == self.max_points {
            self.widen();
        }
        if self.points.capacity() == 0 {
            // Reserved whole once (untouched pages cost nothing): growing would copy it.
            self.points.reserve_exact(self.max_points);
        }
        self.points.push(HistoryPoint {
            t_ns,
            used_last: used,
            used_max: used,
            level_max: level,
        });
    }

    /// [`push`](Self::push) of the usage and level the last point ended with: nothing changes
    /// unless a new window starts.
    #[inline]
    fn push_same(&mut self, t_ns: u64, used: u64, level: Level) {
        match self.points.last() {
            Some(last) if last.t_ns >> self.shift == t_ns >> self.shift => {
                debug_assert!(last.used_last == used && last.level_max >= level);
            }
            _ => self.push(t_ns, used, level),
        }
    }

    /// Doubles the window until the points fit in half the room, merging each window's points.
    fn widen(&mut self) {
        while self.points.len() > self.max_points / 2 && self.shift < 63 {
            self.shift += 1;
            let s = self.shift;
            let mut kept = 0;
            for i in 0..self.points.len() {
                let p = self.points[i];
                if kept > 0 && self.points[kept - 1].t_ns >> s == p.t_ns >> s {
                    let k = &mut self.points[kept - 1];
                    k.used_last = p.used_last;
                    k.used_max = k.used_max.max(p.used_max);
                    k.level_max = k.level_max.max(p.level_max);
                } else {
                    self.points[kept] = p;
                    kept += 1;
                }
            }
            self.points.truncate(kept);
        }
    }

    fn points(&self) -> &[HistoryPoint] {
        &self.points
    }
}

/// The last [`TREND_SAMPLES`] observations, in a ring.
#[derive(Clone, Debug, Default)]
struct Recent {
    samples: [(u64, u64); TREND_SAMPLES],
    /// Observations so far (the next slot is `count % TREND_SAMPLES`).
    count: u64,
}

impl Recent {
    #[inline]
    fn push(&mut self, t_ns: u64, used: u64) {
        self.samples[(self.count % TREND_SAMPLES as u64) as usize] = (t_ns, used);
        self.count += 1;
    }

    fn trend(&self) -> Option<Trend> {
        let n = TREND_SAMPLES as u64;
        let newest = self.count.checked_sub(1)?;
        let oldest = self.count.saturating_sub(n);
        let (from_t_ns, from_used) = self.samples[(oldest % n) as usize];
        let (to_t_ns, to_used) = self.samples[(newest % n) as usize];
        Some(Trend {
            from_t_ns,
            from_used,
            to_t_ns,
            to_used,
        })
    }
}

/// A period at one level, `[start_ns, end_ns)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Period {
    pub start_ns: u64,
    pub end_ns: u64,
    pub level: Level,
}

/// The warning and critical periods of a history (each window at its highest level, lasting
/// until the next window's first observation, the last until `end_ns`), neighbours at the same
/// level joined. For plots: as many periods as windows at most.
pub fn periods(history: &[HistoryPoint], end_ns: u64) -> Vec<Period> {
    let mut out: Vec<Period> = Vec::new();
    for (i, p) in history.iter().enumerate() {
        let end = history.get(i + 1).map_or(end_ns.max(p.t_ns), |n| n.t_ns);
        if p.level_max == Level::Normal || end <= p.t_ns {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.level == p.level_max && last.end_ns == p.t_ns => last.end_ns = end,
            _ => out.push(Period {
                start_ns: p.t_ns,
                end_ns: end,
                level: p.level_max,
            }),
        }
    }
    out
}

/// The periods of several places (or runs) together, at each time the highest level of any.
pub fn merge_periods(lists: &[Vec<Period>]) -> Vec<Period> {
    let mut cuts: Vec<u64> = lists
        .iter()
        .flatten()
        .flat_map(|p| [p.start_ns, p.end_ns])
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let level_at = |t: u64| {
        lists
            .iter()
            .filter_map(|list| {
                let i = list.partition_point(|p| p.end_ns <= t);
                list.get(i).filter(|p| p.start_ns <= t).map(|p| p.level)
            })
            .max()
            .unwrap_or(Level::Normal)
    };
    let mut out: Vec<Period> = Vec::new();
    for w in cuts.windows(2) {
        let level = level_at(w[0]);
        if level == Level::Normal {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.level == level && last.end_ns == w[0] => last.end_ns = w[1],
            _ => out.push(Period {
                start_ns: w[0],
                end_ns: w[1],
                level,
            }),
        }
    }
    out
}

/// What the monitor saw, for the JSON report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PressureReport {
    /// `WARNING,CRITICAL` fractions of capacity.
    pub thresholds: Thresholds,
    /// The usage fed: `kv-blocks` (KV blocks used of the pool's usable blocks, vLLM's
    /// `kv_cache_usage`) or `reserved-bytes` (bytes reserved of the capacity, from the books).
    pub measure: &'static str,
    /// Times any place entered warning (from normal or from critical) and critical.
    pub warning_events: u64,
    pub critical_events: u64,
    /// Time spent at warning and at critical level, summed over the places (`places` has each).
    pub time_warning_us: u64,
    pub time_critical_us: u64,
    pub events_total: u64,
    /// The first [`EVENTS_KEPT`] events.
    pub events: Vec<EventReport>,
    pub places: Vec<PlaceReport>,
}

/// A level change, for the report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EventReport {
    pub t_us: u64,
    pub device: u16,
    pub tier: Tier,
    pub level: Level,
    pub used: u64,
    pub capacity: u64,
    /// `used / capacity`, to a millionth.
    pub usage: f64,
}

impl EventReport {
    fn of(e: &PressureEvent) -> EventReport {
        EventReport {
            t_us: e.t_ns / 1000,
            device: e.place.device.0,
            tier: e.place.tier,
            level: e.level,
            used: e.usage.used,
            capacity: e.usage.capacity,
            usage: e.usage.ppm() as f64 / 1e6,
        }
    }
}

/// One place over the whole run, for the report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlaceReport {
    pub device: u16,
    pub tier: Tier,
    pub capacity: u64,
    pub used_peak: u64,
    pub level_end: Level,
    pub warning_events: u64,
    pub critical_events: u64,
    pub time_normal_us: u64,
    pub time_warning_us: u64,
    pub time_critical_us: u64,
}

impl PlaceReport {
    fn of(w: &Watch) -> PlaceReport {
        let us = |l: Level| w.time_ns[l as usize] / 1000;
        PlaceReport {
            device: w.place.device.0,
            tier: w.place.tier,
            capacity: w.capacity,
            used_peak: w.used_peak,
            level_end: w.level,
            warning_events: w.entered[Level::Warning as usize],
            critical_events: w.entered[Level::Critical as usize],
            time_normal_us: us(Level::Normal),
            time_warning_us: us(Level::Warning),
            time_critical_us: us(Level::Critical),
        }
    }
}

impl PressureReport {
    /// One line for the text reports: `warning 3 times (1.20 s), critical once (0.50 s)`.
    pub fn summary(&self) -> String {
        let times = |n: u64| match n {
            1 => "once".to_string(),
            n => format!("{n} times"),
        };
        format!(
            "warning {} ({}), critical {} ({})",
            times(self.warning_events),
            crate::serve::report::human_us(self.time_warning_us),
            times(self.critical_events),
            crate::serve::report::human_us(self.time_critical_us),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPU: Place = Place::GPU0;

    #[test]
    fn thresholds_parse_print_and_refuse_what_is_impossible() {
        let t = Thresholds::parse("0.75,0.9").unwrap();
        assert_eq!(t, Thresholds::default());
        assert_eq!(t.to_string(), "0.75,0.9");
        assert_eq!(Thresholds::parse(" 0.5 , 1 ").unwrap().to_string(), "0.5,1");
        for bad in [
            "0.9,0.75",
            "0.8,0.8",
            "0,0.5",
            "0.5,1.01",
            "0.5",
            "",
            "a,b",
            "-0.1,0.5",
            "0.5,0.9,1",
        ] {
            assert!(Thresholds::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Thresholds::new(1, 1_000_000).is_ok());
    }

    #[test]
    fn levels_change_at_the_exact_crossings() {
        // Capacity 1000: warning from 750, critical from 900, both inclusive.
        let mut m = Monitor::new(Thresholds::default());
        let id = m.watch(GPU, 1000);
        let walk = [
            (0, 0),
            (10, 749),
            (20, 750),
            (30, 899),
            (40, 900),
            (50, 899),
            (60, 749),
        ];
        for (t, used) in walk {
            m.observe(id, t, used);
        }
        let levels: Vec<(u64, Level)> = m.events().iter().map(|e| (e.t_ns, e.level)).collect();
        assert_eq!(
            levels,
            [
                (20, Level::Warning),
                (40, Level::Critical),
                (50, Level::Warning),
                (60, Level::Normal)
            ]
        );
        assert_eq!(m.time_in(GPU, Level::Normal), 20);
        assert_eq!(m.time_in(GPU, Level::Warning), 20 + 10);
        assert_eq!(m.time_in(GPU, Level::Critical), 10);
        assert_eq!(m.level(GPU), Level::Normal);
        assert_eq!(m.entered(GPU, Level::Warning), 2);
        let r = m.report("test");
        assert_eq!((r.warning_events, r.critical_events), (2, 1));
        assert_eq!(r.events[1].usage, 0.9);
    }

    #[test]
    fn thresholds_that_fall_between_units_round_up() {
        // 0.75 of 7 blocks is 5.25: warning from 6 blocks, critical (0.9 → 6.3) from 7.
        let mut m = Monitor::new(Thresholds::default());
        let id = m.watch(GPU, 7);
        m.observe(id, 0, 5);
        assert_eq!(m.level(GPU), Level::Normal);
        m.observe(id, 1, 6);
        assert_eq!(m.level(GPU), Level::Warning);
        m.observe(id, 2, 7);
        assert_eq!(m.level(GPU), Level::Critical);
        // A place without capacity is never under pressure.
        let none = Place::new(0, Tier::PinnedHost);
        m.observe_place(none, 0, 3, 0);
        assert_eq!(m.level(none), Level::Normal);
    }

    #[test]
    fn the_trend_looks_back_over_the_recent_observations() {
        let mut m = Monitor::new(Thresholds::default());
        let id = m.watch(GPU, 1000);
        assert_eq!(m.trend(GPU), None);
        for i in 0..100u64 {
            m.observe(id, i * 1_000_000, i);
        }
        let t = m.trend(GPU).unwrap();
        assert_eq!((t.from_used, t.to_used), (100 - TREND_SAMPLES as u64, 99));
        assert_eq!(t.delta_used(), TREND_SAMPLES as i128 - 1);
        assert_eq!(t.per_s(), Some(1000));
    }

    #[test]
    fn memory_stays_flat_over_a_million_steps() {
        let mut m = Monitor::new(Thresholds::default());
        let gpu = m.watch(GPU, 1000);
        let host = m.watch(Place::new(0, Tier::PinnedHost), 5000);
        let feed = |m: &mut Monitor, from: u64, to: u64| {
            for step in from..to {
                // A saw-tooth crossing both thresholds every 1000 steps.
                let used = step % 1000;
                m.observe(gpu, step * 20_000, used);
                m.observe(host, step * 20_000, used * 5);
            }
        };
        feed(&mut m, 0, 10_000);
        let footprint = |m: &Monitor| {
            let w = &m.watches;
            (
                m.events.capacity(),
                w[0].history.points.capacity(),
                w[1].history.points.capacity(),
            )
        };
        let early = footprint(&m);
        feed(&mut m, 10_000, 1_000_000);
        assert_eq!(footprint(&m), early, "no buffer grew");
        assert!(m.history(GPU).len() <= HISTORY_POINTS);
        assert_eq!(m.events().len(), EVENTS_KEPT);
        // Three changes per tooth and place (warning, critical, back to normal), but the last
        // tooth ends critical.
        assert_eq!(m.events_total(), 2 * (1000 * 3 - 1));
        let r = m.report("test");
        assert_eq!(r.warning_events, 1000 * 2);
        // 150 of every 1000 steps at warning, 100 at critical, 20 µs a step, two places.
        assert_eq!(r.time_warning_us, 2 * 150 * 20 * 999 + 2 * 150 * 20);
        assert!(r.time_critical_us > 0);
        // The history still covers the whole run, each window at its worst.
        let p = periods(m.history(GPU), m.last_ns());
        assert!(p.iter().any(|p| p.level == Level::Critical));
        assert!(p.last().unwrap().end_ns >= m.last_ns());
    }

    proptest::proptest! {
        /// The shortcut for a repeated usage leaves the monitor as the full observation does:
        /// usages that repeat, times that stand still or go back, a capacity changed midway.
        #[test]
        fn a_repeated_usage_is_observed_as_in_full(
            feed in proptest::collection::vec((0u64..3, 0u64..40, 0u64..12, proptest::bool::weighted(0.05)), 1..300)
        ) {
            let mut fast = Monitor::new(Thresholds::parse("0.5,0.8").unwrap());
            let mut full = fast.clone();
            let (mut id_fast, mut id_full) = (fast.watch(GPU, 10), full.watch(GPU, 10));
            let mut t = 0u64;
            for (dt, back, used, rewatch) in feed {
                if rewatch {
                    (id_fast, id_full) = (fast.watch(GPU, 8 + used), full.watch(GPU, 8 + used));
                }
                t = (t + dt * 1000).saturating_sub(if back == 0 { 500 } else { 0 });
                fast.observe(id_fast, t, used);
                full.observe_in_full(id_full, t, used);
                proptest::prop_assert_eq!(fast.report("x"), full.report("x"));
                proptest::prop_assert_eq!(fast.history(GPU), full.history(GPU));
                proptest::prop_assert_eq!(fast.trend(GPU), full.trend(GPU));
                proptest::prop_assert_eq!(fast.level(GPU), full.level(GPU));
            }
        }
    }

    #[test]
    fn twice_the_same_observations_give_the_same_state() {
        let run = || {
            let mut m = Monitor::new(Thresholds::parse("0.5,0.8").unwrap());
            let id = m.watch(GPU, 64);
            for i in 0..50_000u64 {
                m.observe(id, i * 7 + (i % 3), (i * 2654435761) % 65);
            }
            (m.report("x"), m.history(GPU).to_vec())
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn periods_join_neighbours_and_merge_takes_the_worst() {
        let h = |t_ns, level_max| HistoryPoint {
            t_ns,
            level_max,
            ..HistoryPoint::default()
        };
        let a = periods(
            &[
                h(0, Level::Normal),
                h(10, Level::Warning),
                h(20, Level::Warning),
                h(30, Level::Critical),
                h(40, Level::Normal),
            ],
            100,
        );
        let period = |start_ns, end_ns, level| Period {
            start_ns,
            end_ns,
            level,
        };
        assert_eq!(
            a,
            [
                period(10, 30, Level::Warning),
                period(30, 40, Level::Critical)
            ]
        );
        let b = vec![period(35, 60, Level::Warning)];
        assert_eq!(
            merge_periods(&[a, b]),
            [
                period(10, 30, Level::Warning),
                period(30, 40, Level::Critical),
                period(40, 60, Level::Warning)
            ]
        );
    }
}
