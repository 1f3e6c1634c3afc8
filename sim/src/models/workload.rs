//! The built-in multi-model workload: the seeded serving workload of `gpumem kv`, each request
//! given to a model by Zipf popularity (model `k` drawn with weight 1/(k+1)), in bursts (a
//! request stays with the previous request's model with probability `burst_pct`), so a
//! model's requests come in runs as they do when one application is busy. Integer draws only:
//! a seed names the same workload on every machine.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use gpumem_traces::serving::generate::{Arrivals, ServingParams, ServingRequests};
use gpumem_traces::serving::WorkloadRequest;

/// Most models one run serves.
pub const MAX_MODELS: usize = 64;

/// Most requests of the built-in workload.
pub const MAX_REQUESTS: u64 = 10_000_000;

/// The built-in workload's knobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelsWorkload {
    pub seed: u64,
    pub requests: u64,
    /// Arrivals per second, in thousandths (Poisson).
    pub rate_milli_per_s: u64,
    /// Percent of requests that stay with the previous request's model.
    pub burst_pct: u32,
}

impl Default for ModelsWorkload {
    fn default() -> Self {
        ModelsWorkload {
            seed: 0,
            requests: 400,
            rate_milli_per_s: 4000,
            burst_pct: 70,
        }
    }
}

impl ModelsWorkload {
    pub fn validate(&self) -> Result<(), String> {
        if self.requests == 0 || self.requests > MAX_REQUESTS {
            return Err(format!(
                "--requests {}: must be 1 to {MAX_REQUESTS}",
                self.requests
            ));
        }
        if self.rate_milli_per_s == 0 {
            return Err("--rate must be above 0 requests per second".into());
        }
        if self.burst_pct > 100 {
            return Err(format!(
                "--burst {}: a percentage, 0 to 100",
                self.burst_pct
            ));
        }
        Ok(())
    }

    /// `(model index, request)` in arrival order over `models` models, prompts at most
    /// `max_prompt_tokens` long.
    pub fn requests(
        &self,
        models: usize,
        max_prompt_tokens: u64,
    ) -> impl Iterator<Item = (usize, WorkloadRequest)> {
        assert!((1..=MAX_MODELS).contains(&models));
        let params = ServingParams {
            seed: self.seed,
            requests: self.requests,
            arrivals: Arrivals::Poisson {
                rate_milli_per_s: self.rate_milli_per_s,
            },
            max_prompt_tokens,
            ..ServingParams::default()
        };
        let weights: Vec<u64> = (0..models as u64).map(|k| 1_000_000 / (k + 1)).collect();
        let total: u64 = weights.iter().sum();
        // Its own stream, so the model draws never change the requests themselves.
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x6d6f_6465_6c73);
        let burst_pct = self.burst_pct as u64;
        let mut last: Option<usize> = None;
        ServingRequests::new(&params).map(move |req| {
            let stay = last.is_some() && rng.gen_range(0..100u64) < burst_pct;
            let model = match last {
                Some(m) if stay => m,
                _ => {
                    let mut x = rng.gen_range(0..total);
                    weights
                        .iter()
                        .position(|&w| {
                            let hit = x < w;
                            x = x.saturating_sub(w);
                            hit
                        })
                        .expect("x < total")
                }
            };
            last = Some(model);
            (model, req)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn popularity_falls_with_rank_and_the_seed_names_the_workload() {
        let w = ModelsWorkload {
            requests: 3000,
            burst_pct: 0,
            ..ModelsWorkload::default()
        };
        let mut counts = [0u32; 4];
        for (m, _) in w.requests(4, 8192) {
            counts[m] += 1;
        }
        assert!(counts.windows(2).all(|p| p[0] > p[1]), "{counts:?}");
        let a: Vec<_> = w.requests(4, 8192).map(|(m, r)| (m, r.id)).collect();
        let b: Vec<_> = w.requests(4, 8192).map(|(m, r)| (m, r.id)).collect();
        assert_eq!(a, b);
        let other = ModelsWorkload { seed: 1, ..w };
        let c: Vec<_> = other.requests(4, 8192).map(|(m, _)| m).collect();
        assert_ne!(a.iter().map(|p| p.0).collect::<Vec<_>>(), c);
    }

    #[test]
    fn bursts_make_runs_of_one_model() {
        let runs = |burst_pct| {
            let w = ModelsWorkload {
                requests: 2000,
                burst_pct,
                ..ModelsWorkload::default()
            };
            let models: Vec<usize> = w.requests(5, 8192).map(|(m, _)| m).collect();
            models.windows(2).filter(|p| p[0] != p[1]).count()
        };
        assert!(runs(90) * 3 < runs(0), "{} vs {}", runs(90), runs(0));
    }

    #[test]
    fn bad_knobs_are_refused() {
        let ok = ModelsWorkload::default();
        assert!(ok.validate().is_ok());
        assert!(ModelsWorkload { requests: 0, ..ok }.validate().is_err());
        assert!(ModelsWorkload {
            rate_milli_per_s: 0,
            ..ok
        }
        .validate()
        .is_err());
        assert!(ModelsWorkload {
            burst_pct: 101,
            ..ok
        }
        .validate()
        .is_err());
    }
}
