//! `gpumem plan`: the smallest replica count whose run meets every latency SLO.
//!
//! - An SLO bounds a latency percentile of the fleet (`ttft-p99=2s`, `tpot-p99=100ms`,
//!   `e2e-p50=…`), on integers (µs): a run meets it when the percentile is at most the bound.
//! - [`smallest`] searches the count exponentially (1, 2, 4, …, capped at the maximum) until a
//!   run meets the SLO, then by bisection between the last count that missed and the first
//!   that met. It relies on more replicas never hurting latency, and it makes the reliance
//!   visible: the answer's run and the run one replica fewer are both kept, the first meeting
//!   and the second missing the SLO (where the answer is more than one replica).

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::serve::{KvReport, Percentiles};

/// Which latency an SLO bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Latency {
    Ttft,
    Tpot,
    E2e,
}

/// Which percentile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Quantile {
    P50,
    P90,
    P99,
}

/// One bound: `latency` at `quantile` at most `max_us`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Slo {
    pub latency: Latency,
    pub quantile: Quantile,
    pub max_us: u64,
}

impl fmt::Display for Slo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}<={}us", self.name(), self.max_us)
    }
}

impl Slo {
    /// `ttft-p99`, as `--slo` spells it.
    pub fn name(&self) -> String {
        let l = match self.latency {
            Latency::Ttft => "ttft",
            Latency::Tpot => "tpot",
            Latency::E2e => "e2e",
        };
        let q = match self.quantile {
            Quantile::P50 => "p50",
            Quantile::P90 => "p90",
            Quantile::P99 => "p99",
        };
        format!("{l}-{q}")
    }

    /// The run's value of what this SLO bounds, µs.
    pub fn measured_us(&self, r: &KvReport) -> u64 {
        let p: &Percentiles = match self.latency {
            Latency::Ttft => &r.ttft_us,
            Latency::Tpot => &r.tpot_us,
            Latency::E2e => &r.e2e_us,
        };
        match self.quantile {
            Quantile::P50 => p.p50,
            Quantile::P90 => p.p90,
            Quantile::P99 => p.p99,
        }
    }

    pub fn met_by(&self, r: &KvReport) -> bool {
        self.measured_us(r) <= self.max_us
    }
}

/// `ttft-p99=2s,tpot-p99=100ms` (durations in us, ms or s, integers or decimals down to the
/// µs); a latency bounded twice is refused.
pub fn parse_slos(text: &str) -> Result<Vec<Slo>, String> {
    let mut slos: Vec<Slo> = Vec::new();
    for part in text.split(',') {
        let bad = |why: &str| {
            format!(
                "--slo {part}: {why} (expected LATENCY-PCT=DURATION, e.g. ttft-p99=2s: \
                 LATENCY ttft, tpot or e2e; PCT p50, p90 or p99; DURATION in us, ms or s)"
            )
        };
        let (name, duration) = part.trim().split_once('=').ok_or_else(|| bad("no '='"))?;
        let (latency, quantile) = name.split_once('-').ok_or_else(|| bad("no percentile"))?;
        let latency = match latency {
            "ttft" => Latency::Ttft,
            "tpot" => Latency::Tpot,
            "e2e" => Latency::E2e,
            _ => return Err(bad("unknown latency")),
        };
        let quantile = match quantile {
            "p50" => Quantile::P50,
            "p90" => Quantile::P90,
            "p99" => Quantile::P99,
            _ => return Err(bad("unknown percentile")),
        };
        let max_us = parse_duration_us(duration).ok_or_else(|| bad("bad duration"))?;
        let slo = Slo {
            latency,
            quantile,
            max_us,
        };
        if slos.iter().any(|s| s.name() == slo.name()) {
            return Err(bad("given twice"));
        }
        slos.push(slo);
    }
    Ok(slos)
}

/// `2s`, `100ms`, `1.5s`, `250us` in whole µs.
fn parse_duration_us(text: &str) -> Option<u64> {
    let text = text.trim();
    let (number, scale_places) = if let Some(n) = text.strip_suffix("us") {
        (n, 0)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 6)
    } else {
        return None;
    };
    gpumem_traces::serving::import::parse_decimal(number.trim(), scale_places)
}

/// A run the search made: its replica count, whether it met every SLO, and what it measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Trial<R> {
    pub replicas: u64,
    pub met: bool,
    pub run: R,
}

/// What the search found for one GPU kind.
#[derive(Clone, Debug, PartialEq)]
pub struct Search<R> {
    /// The smallest count that met the SLO, if any up to the maximum did.
    pub answer: Option<Trial<R>>,
    /// The count one fewer, which missed (absent when the answer is 1 replica).
    pub one_fewer: Option<Trial<R>>,
    /// Every count tried, in the order tried.
    pub tried: Vec<u64>,
}

/// The smallest count in `1..=max` for which `run` meets (see the module documentation);
/// `run(n)` answers whether `n` replicas met the SLO, and what they measured.
pub fn smallest<R: Clone, E>(
    max: u64,
    mut run: impl FnMut(u64) -> Result<(bool, R), E>,
) -> Result<Search<R>, E> {
    let mut trials: BTreeMap<u64, Trial<R>> = BTreeMap::new();
    let mut tried = Vec::new();
    let mut trial = |n: u64, trials: &mut BTreeMap<u64, Trial<R>>| -> Result<bool, E> {
        if let Some(t) = trials.get(&n) {
            return Ok(t.met);
        }
        let (met, r) = run(n)?;
        tried.push(n);
        trials.insert(
            n,
            Trial {
                replicas: n,
                met,
                run: r,
            },
        );
        Ok(met)
    };
    // Exponential: the last count that missed (0: none yet) and the first that met.
    let (mut missed, mut met) = (0u64, None);
    let mut n = 1u64;
    while n <= max {
        if trial(n, &mut trials)? {
            met = Some(n);
            break;
        }
        missed = n;
        if n == max {
            break;
        }
        n = n.saturating_mul(2).min(max);
    }
    let Some(mut hi) = met else {
        return Ok(Search {
            answer: None,
            one_fewer: None,
            tried,
        });
    };
    // Bisection over (missed, hi]: every count at or below `missed` misses.
    while hi - missed > 1 {
        let mid = missed + (hi - missed) / 2;
        if trial(mid, &mut trials)? {
            hi = mid;
        } else {
            missed = mid;
        }
    }
    let one_fewer = trials.get(&(hi - 1)).cloned();
    Ok(Search {
        answer: trials.get(&hi).cloned(),
        one_fewer,
        tried,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slos_parse_and_refuse() {
        let s = parse_slos("ttft-p99=2s,tpot-p99=100ms,e2e-p50=1.5s,ttft-p50=250us").unwrap();
        let bounds: Vec<_> = s.iter().map(|s| (s.name(), s.max_us)).collect();
        assert_eq!(
            bounds,
            [
                ("ttft-p99".into(), 2_000_000),
                ("tpot-p99".into(), 100_000),
                ("e2e-p50".into(), 1_500_000),
                ("ttft-p50".into(), 250),
            ]
        );
        for bad in [
            "ttft=2s",
            "ttft-p95=2s",
            "itl-p99=2s",
            "ttft-p99=2",
            "ttft-p99=-2s",
            "ttft-p99=2s,ttft-p99=1s",
            "",
        ] {
            let err = parse_slos(bad).unwrap_err();
            assert!(err.starts_with("--slo"), "{bad}: {err}");
        }
    }

    /// The search over a threshold: `n` meets from `need` on.
    fn search(need: u64, max: u64) -> Search<u64> {
        smallest(max, |n| Ok::<_, ()>((n >= need, n * 10))).unwrap()
    }

    #[test]
    fn the_search_finds_the_threshold_and_keeps_the_one_below() {
        for max in [1, 2, 3, 7, 8, 64, 100] {
            for need in 1..=max {
                let s = search(need, max);
                let answer = s.answer.expect("met");
                assert_eq!(
                    (answer.replicas, answer.met, answer.run),
                    (need, true, need * 10)
                );
                match s.one_fewer {
                    Some(below) => {
                        assert_eq!(below.replicas, need - 1);
                        assert!(!below.met);
                    }
                    None => assert_eq!(need, 1),
                }
                // Exponential then bisection: about 2 log2(max) runs, none twice.
                let mut sorted = s.tried.clone();
                sorted.sort();
                sorted.dedup();
                assert_eq!(sorted.len(), s.tried.len());
                assert!(s.tried.len() as u32 <= 2 * (64 - max.leading_zeros()) + 1);
            }
            let never = search(max + 1, max);
            assert!(never.answer.is_none());
            assert_eq!(never.tried.last(), Some(&max));
        }
    }
}
