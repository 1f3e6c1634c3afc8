//! When to offload and restore whole models: GPU usage against two thresholds, with
//! hysteresis, and optionally a forecast of each model's next request.
//!
//! The offloader decides nothing about bytes itself: it reads usage (the pressure monitor's
//! view: used and capacity bytes of the GPU) and the models' state, and answers which models
//! to offload now and which to restore. Above `offload_ppm` of the capacity it starts
//! offloading, least recently used first, and keeps going until usage would fall to
//! `restore_ppm`; it restores only while usage stays below `restore_ppm`. The gap between the
//! two is the hysteresis that keeps it from thrashing around one threshold.
//!
//! Predictive mode keeps (and prefetches) models whose next request is expected within the
//! horizon: a per-model mean gap between arrivals, an integer moving average (weight 1/4 for
//! the newest gap), so the forecast is exact arithmetic and the same on every machine.

use serde::{Deserialize, Serialize};

use crate::weights::ModelId;

/// The offloader's knobs (thresholds in parts per million of the GPU's capacity).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffloaderConfig {
    pub offload_ppm: u32,
    pub restore_ppm: u32,
    /// Keep and prefetch models expected within `horizon_us` (0: not predictive).
    pub horizon_us: u64,
}

impl Default for OffloaderConfig {
    fn default() -> Self {
        OffloaderConfig {
            offload_ppm: 800_000,
            restore_ppm: 600_000,
            horizon_us: 0,
        }
    }
}

impl OffloaderConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.restore_ppm >= self.offload_ppm || self.offload_ppm > 1_000_000 {
            return Err(format!(
                "restore threshold {} must be below the offload threshold {}, both within 0..1",
                self.restore_ppm as f64 / 1e6,
                self.offload_ppm as f64 / 1e6
            ));
        }
        Ok(())
    }
}

/// A model as the offloader sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelView {
    pub id: ModelId,
    /// Bytes it holds on the GPU now (0: offloaded).
    pub resident_bytes: u64,
    /// Bytes it needs to run.
    pub bytes: u64,
    /// Serving or with requests waiting: never offloaded.
    pub busy: bool,
    /// When it was last used (µs); models never used count as oldest.
    pub last_used_us: Option<u64>,
}

/// What to do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Offload(ModelId),
    Restore(ModelId),
}

#[derive(Clone, Copy, Debug, Default)]
struct Rate {
    last_arrival_us: Option<u64>,
    mean_gap_us: Option<u64>,
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct AutomaticOffloader {
    config: OffloaderConfig,
    /// Offloading until usage falls to the restore threshold.
    draining: bool,
    rates: Vec<Rate>,
}

impl AutomaticOffloader {
    pub fn new(config: OffloaderConfig, models: usize) -> AutomaticOffloader {
        AutomaticOffloader {
            config,
            draining: false,
            rates: vec![Rate::default(); models],
        }
    }

    /// A request for `model` arrived at `now_us` (arrivals come in time order).
    pub fn observe_arrival(&mut self, model: ModelId, now_us: u64) {
        let r = &mut self.rates[model.0 as usize];
        if let Some(last) = r.last_arrival_us {
            let gap = now_us.saturating_sub(last);
            r.mean_gap_us = Some(match r.mean_gap_us {
                None => gap,
                Some(mean) => mean - mean / 4 + gap / 4,
            });
        }
        r.last_arrival_us = Some(now_us);
    }

    /// When `model`'s next request is expected (`None`: fewer than two arrivals seen).
    pub fn expected_next_us(&self, model: ModelId) -> Option<u64> {
        let r = self.rates[model.0 as usize];
        Some(r.last_arrival_us?.saturating_add(r.mean_gap_us?))
    }

    fn expected_soon(&self, model: ModelId, now_us: u64) -> bool {
        self.config.horizon_us > 0
            && self
                .expected_next_us(model)
                .is_some_and(|t| t <= now_us.saturating_add(self.config.horizon_us))
    }

    /// The actions for GPU usage `used_bytes` of `capacity_bytes` at `now_us`. Offloads come
    /// least recently used first (models expected soon last); restores only in predictive mode,
    /// soonest expected first, while usage stays within the restore threshold.
    pub fn plan(
        &mut self,
        now_us: u64,
        used_bytes: u64,
        capacity_bytes: u64,
        models: &[ModelView],
    ) -> Vec<Action> {
        let at = |ppm: u32| (capacity_bytes as u128 * ppm as u128 / 1_000_000) as u64;
        let (high, low) = (at(self.config.offload_ppm), at(self.config.restore_ppm));
        if used_bytes > high {
            self.draining = true;
        }
        let mut actions = Vec::new();
        if self.draining {
            let mut victims: Vec<&ModelView> = models
                .iter()
                .filter(|m| m.resident_bytes > 0 && !m.busy)
                .collect();
            victims.sort_by_key(|m| (self.expected_soon(m.id, now_us), m.last_used_us, m.id));
            let mut used = used_bytes;
            for m in victims {
                if used <= low {
                    break;
                }
                used -= m.resident_bytes.min(used);
                actions.push(Action::Offload(m.id));
            }
            if used <= low {
                self.draining = false;
            }
            return actions;
        }
        if self.config.horizon_us == 0 || used_bytes >= low {
            return actions;
        }
        let mut wanted: Vec<(u64, ModelId, u64)> = models
            .iter()
            .filter(|m| m.resident_bytes < m.bytes && self.expected_soon(m.id, now_us))
            .map(|m| {
                let t = self.expected_next_us(m.id).expect("expected soon");
                (t, m.id, m.bytes - m.resident_bytes)
            })
            .collect();
        wanted.sort();
        let mut used = used_bytes;
        for (_, id, missing) in wanted {
            if used.saturating_add(missing) > low {
                continue;
            }
            used += missing;
            actions.push(Action::Restore(id));
        }
        actions
    }

    /// Still offloading toward the restore threshold.
    pub fn is_draining(&self) -> bool {
        self.draining
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(id: u32, resident: u64, busy: bool, last: Option<u64>) -> ModelView {
        ModelView {
            id: ModelId(id),
            resident_bytes: resident,
            bytes: 30,
            busy,
            last_used_us: last,
        }
    }

    #[test]
    fn above_the_offload_threshold_it_drains_lru_first_down_to_the_restore_threshold() {
        let mut o = AutomaticOffloader::new(OffloaderConfig::default(), 4);
        let models = [
            view(0, 30, false, Some(50)),
            view(1, 30, true, Some(1)),
            view(2, 30, false, Some(10)),
            view(3, 0, false, None),
        ];
        // 90 of 100 used: above 80; to reach 60, one model goes: the oldest idle one (2).
        assert_eq!(o.plan(100, 90, 100, &models), [Action::Offload(ModelId(2))]);
        assert!(!o.is_draining());
        // 79 is below the offload threshold and nothing was draining: nothing happens.
        assert!(o.plan(100, 79, 100, &models).is_empty());
    }

    #[test]
    fn hysteresis_keeps_draining_between_the_thresholds_until_it_can_reach_the_low_one() {
        let mut o = AutomaticOffloader::new(OffloaderConfig::default(), 3);
        let busy = [view(0, 45, true, Some(1)), view(1, 45, true, Some(2))];
        assert!(o.plan(0, 90, 100, &busy).is_empty(), "everything busy");
        assert!(o.is_draining());
        let idle = [view(0, 45, false, Some(1)), view(1, 25, true, Some(2))];
        // 70 is below 80 but still draining: model 0 goes.
        assert_eq!(o.plan(0, 70, 100, &idle), [Action::Offload(ModelId(0))]);
        assert!(!o.is_draining());
    }

    #[test]
    fn predictive_mode_keeps_models_expected_soon_and_prefetches_them() {
        let config = OffloaderConfig {
            horizon_us: 100,
            ..OffloaderConfig::default()
        };
        let mut o = AutomaticOffloader::new(config, 3);
        for t in [0, 50, 100, 150] {
            o.observe_arrival(ModelId(0), t);
        }
        assert_eq!(o.expected_next_us(ModelId(0)), Some(200));
        assert_eq!(o.expected_next_us(ModelId(1)), None);
        let models = [view(0, 30, false, Some(1)), view(1, 30, false, Some(100))];
        // Model 0 is older but expected soon: model 1 goes first.
        assert_eq!(o.plan(160, 85, 100, &models), [Action::Offload(ModelId(1))]);
        let offloaded = [view(0, 0, false, Some(1)), view(1, 30, false, Some(100))];
        assert_eq!(
            o.plan(160, 30, 100, &offloaded),
            [Action::Restore(ModelId(0))]
        );
        // Not when it would cross the restore threshold.
        assert!(o.plan(160, 31, 100, &offloaded).is_empty());
    }

    #[test]
    fn thresholds_must_be_ordered() {
        let bad = OffloaderConfig {
            offload_ppm: 500_000,
            restore_ppm: 600_000,
            horizon_us: 0,
        };
        assert!(bad.validate().is_err());
        assert!(OffloaderConfig::default().validate().is_ok());
    }
}
