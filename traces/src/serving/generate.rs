//! Seeded serving workloads, so that `gpumem kv` runs with no data at all: Poisson or Gamma
//! arrivals, prompt and output lengths from integer distributions, a tree of shared prefixes
//! (system prompts and templates) and multi-turn sessions whose next prompt extends the last.
//!
//! Randomness comes only from a `ChaCha8Rng` seeded with the explicit `seed`, and no float
//! decides anything: exponential and Gamma variates are computed in Q32 fixed point (integer
//! logarithm and exponential), so a seed names the same workload on any machine.
//!
//! Prompts are in the hash-id form over 16-token blocks: a shared prefix is a run of shared
//! ids, a session's next turn keeps the previous prompt's ids (its last output and the new user
//! message get fresh ids, as the conformance expansion cannot name generated tokens).

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Prompt, Workload, WorkloadRequest};
use crate::generate::LogUniform;

/// Tokens per hash id of generated prompts.
pub const GEN_HASH_BLOCK: u64 = 16;

const ONE: u64 = 1 << 32;
/// ln 2 and log2 e in Q32.
const LN2_Q32: u128 = 2_977_044_472;
const LOG2E_Q32: u128 = 6_196_328_019;

/// log2 of `x` in Q32 (x > 0, Q32), in Q32.
fn log2_q32(x: u64) -> i64 {
    debug_assert!(x > 0);
    let p = 63 - x.leading_zeros() as i64;
    let mut m: u128 = if p >= 32 {
        (x >> (p - 32)) as u128
    } else {
        (x as u128) << (32 - p)
    };
    let mut frac: i64 = 0;
    for i in 1..=32 {
        m = (m * m) >> 32;
        if m >= 2 << 32 {
            m >>= 1;
            frac |= 1 << (32 - i);
        }
    }
    ((p - 32) << 32) + frac
}

/// ln of `x` (Q32, 0 < x), in Q32.
fn ln_q32(x: u64) -> i64 {
    let l = log2_q32(x) as i128;
    ((l * LN2_Q32 as i128) >> 32) as i64
}

fn isqrt(v: u128) -> u128 {
    if v < 2 {
        return v;
    }
    let mut x = 1u128 << (128 - v.leading_zeros()).div_ceil(2);
    loop {
        let y = (x + v / x) / 2;
        if y >= x {
            return x;
        }
        x = y;
    }
}

/// e^x for x <= 0 (Q32), in Q32.
fn exp_q32(x: i64) -> u64 {
    debug_assert!(x <= 0);
    let y = (x as i128 * LOG2E_Q32 as i128) >> 32; // log2 of the result, Q32
    let n = y >> 32; // floor
    let f = (y - (n << 32)) as u64; // [0, 1) in Q32
    let mut r: u128 = ONE as u128;
    let mut c: u128 = isqrt(2u128 << 64); // 2^(1/2) in Q32
    for i in 1..=32 {
        if f & (1 << (32 - i)) != 0 {
            r = (r * c) >> 32;
        }
        c = isqrt(c << 32);
    }
    if -n >= 64 {
        0
    } else {
        (r >> (-n)) as u64
    }
}

/// Uniform in (0, 1], Q32.
fn unit(rng: &mut ChaCha8Rng) -> u64 {
    (rng.next_u64() >> 32) + 1
}

/// Exp(1) in Q32.
fn exp1(rng: &mut ChaCha8Rng) -> u64 {
    (-ln_q32(unit(rng))) as u64
}

/// Gamma(shape_milli / 1000, 1) in Q32: a sum of exponentials for the whole part, Jöhnk's
/// method for the fraction.
fn gamma_q32(shape_milli: u64, rng: &mut ChaCha8Rng) -> u64 {
    let mut sum: u64 = (0..shape_milli / 1000).map(|_| exp1(rng)).sum();
    let a = shape_milli % 1000;
    if a > 0 {
        loop {
            let x = exp_q32((ln_q32(unit(rng)) as i128 * 1000 / a as i128) as i64) as u128;
            let y = exp_q32((ln_q32(unit(rng)) as i128 * 1000 / (1000 - a) as i128) as i64) as u128;
            if x + y <= ONE as u128 && x + y > 0 {
                sum += (exp1(rng) as u128 * x / (x + y)) as u64;
                break;
            }
        }
    }
    sum
}

/// Gaps between arrivals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrivals {
    /// A Poisson process: exponential gaps.
    Poisson { rate_milli_per_s: u64 },
    /// Gamma-distributed gaps with the same mean; shape 1000 (= 1.0) is Poisson, smaller is
    /// burstier (coefficient of variation 1/sqrt(shape)).
    Gamma {
        rate_milli_per_s: u64,
        shape_milli: u64,
    },
}

impl Arrivals {
    /// The next gap in µs.
    fn gap_us(&self, rng: &mut ChaCha8Rng) -> u64 {
        let (rate, shape) = match *self {
            Arrivals::Poisson { rate_milli_per_s } => (rate_milli_per_s, 1000),
            Arrivals::Gamma {
                rate_milli_per_s,
                shape_milli,
            } => (rate_milli_per_s, shape_milli.max(1)),
        };
        let mean_us = 1_000_000_000u128 / rate.max(1) as u128;
        let x = if shape == 1000 {
            exp1(rng)
        } else {
            gamma_q32(shape, rng)
        } as u128;
        ((mean_us * x * 1000 / shape as u128) >> 32) as u64
    }
}

/// A length distribution over integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LengthDist {
    Fixed(u64),
    Uniform {
        min: u64,
        max: u64,
    },
    /// Each 1/16 octave of `[min, max]` equally likely (most real length histograms are
    /// closer to this than to uniform).
    LogUniform {
        min: u64,
        max: u64,
    },
}

impl LengthDist {
    pub fn sample(&self, rng: &mut ChaCha8Rng) -> u64 {
        match *self {
            LengthDist::Fixed(n) => n,
            LengthDist::Uniform { min, max } => rng.gen_range(min..=max.max(min)),
            LengthDist::LogUniform { min, max } => LogUniform::new(min, max).sample(rng),
        }
    }
}

/// Shared prefixes: `roots` system prompts, each with `children` templates below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixTree {
    pub roots: u32,
    pub root_tokens: LengthDist,
    pub children: u32,
    pub child_tokens: LengthDist,
    /// Percent of new conversations that start with a root (and one of its children).
    pub share_pct: u32,
}

/// Multi-turn sessions: a follow-up turn re-sends the whole conversation so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sessions {
    /// Percent of arrivals that continue an open session (when one is open).
    pub followup_pct: u32,
    /// Turns of a conversation, the first included.
    pub turns: LengthDist,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServingParams {
    pub seed: u64,
    pub requests: u64,
    pub arrivals: Arrivals,
    /// New user tokens of each turn (after any shared prefix).
    pub prompt_tokens: LengthDist,
    pub output_tokens: LengthDist,
    pub prefix: PrefixTree,
    pub sessions: Sessions,
    /// A conversation that would grow past this starts afresh.
    pub max_prompt_tokens: u64,
}

impl Default for ServingParams {
    /// 1000 requests at 8 per second (Poisson); prompts 64–4096 new tokens after a shared
    /// prefix (4 system prompts of 512–2048 tokens with 4 templates of 64–512 each, on 60 % of
    /// conversations); outputs 16–1024 tokens; 30 % of arrivals continue a session of 2–6 turns.
    fn default() -> Self {
        ServingParams {
            seed: 0,
            requests: 1000,
            arrivals: Arrivals::Poisson {
                rate_milli_per_s: 8000,
            },
            prompt_tokens: LengthDist::LogUniform { min: 64, max: 4096 },
            output_tokens: LengthDist::LogUniform { min: 16, max: 1024 },
            prefix: PrefixTree {
                roots: 4,
                root_tokens: LengthDist::LogUniform {
                    min: 512,
                    max: 2048,
                },
                children: 4,
                child_tokens: LengthDist::LogUniform { min: 64, max: 512 },
                share_pct: 60,
            },
            sessions: Sessions {
                followup_pct: 30,
                turns: LengthDist::Uniform { min: 2, max: 6 },
            },
            max_prompt_tokens: 16_384,
        }
    }
}

struct Session {
    ids: Vec<i64>,
    len: u64,
    last_output: u64,
    turns_left: u64,
}

/// Fresh ids for `tokens` more tokens after a prompt of `len` tokens held in `ids`.
fn extend(ids: &mut Vec<i64>, len: u64, tokens: u64, next_id: &mut i64) {
    let need = (len + tokens).div_ceil(GEN_HASH_BLOCK) as usize;
    while ids.len() < need {
        ids.push(*next_id);
        *next_id += 1;
    }
}

/// A workload named `generated:serving seed=N`, requests `r0, r1, …` in arrival order.
pub fn serving(p: &ServingParams) -> Workload {
    let mut w = Workload {
        source: serving_source(p),
        ..Workload::default()
    };
    w.requests.reserve(p.requests.min(1 << 20) as usize);
    w.requests.extend(ServingRequests::new(p));
    w
}

/// The name of the workload [`serving`] generates.
pub fn serving_source(p: &ServingParams) -> String {
    format!("generated:serving seed={}", p.seed)
}

/// The requests of [`serving`], made one at a time as they are taken (a run streams them).
pub struct ServingRequests {
    p: ServingParams,
    rng: ChaCha8Rng,
    next_id: i64,
    /// Shared system prompts: (root ids, children's ids).
    tree: Vec<(Vec<i64>, Vec<Vec<i64>>)>,
    /// Conversations with turns left.
    open: Vec<Session>,
    t_us: u64,
    made: u64,
}

impl ServingRequests {
    pub fn new(p: &ServingParams) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
        let mut next_id: i64 = 0;
        let round = |n: u64| n.max(1).div_ceil(GEN_HASH_BLOCK) * GEN_HASH_BLOCK;
        let mut tree: Vec<(Vec<i64>, Vec<Vec<i64>>)> = Vec::new();
        for _ in 0..p.prefix.roots {
            let mut root = Vec::new();
            extend(
                &mut root,
                0,
                round(p.prefix.root_tokens.sample(&mut rng)),
                &mut next_id,
            );
            let mut children = Vec::new();
            for _ in 0..p.prefix.children {
                let mut c = Vec::new();
                extend(
                    &mut c,
                    0,
                    round(p.prefix.child_tokens.sample(&mut rng)),
                    &mut next_id,
                );
                children.push(c);
            }
            tree.push((root, children));
        }
        ServingRequests {
            p: *p,
            rng,
            next_id,
            tree,
            open: Vec::new(),
            t_us: 0,
            made: 0,
        }
    }

    /// The conversation the next request belongs to: a follow-up turn of an open one, or a
    /// new one (maybe under a shared system prompt).
    fn session(&mut self) -> usize {
        let (p, rng) = (&self.p, &mut self.rng);
        if !self.open.is_empty() && rng.gen_range(0..100u64) < p.sessions.followup_pct as u64 {
            let s = rng.gen_range(0..self.open.len() as u64) as usize;
            let add = self.open[s].last_output + p.prompt_tokens.sample(rng).max(1);
            if self.open[s].len + add <= p.max_prompt_tokens {
                let o = &mut self.open[s];
                extend(&mut o.ids, o.len, add, &mut self.next_id);
                o.len += add;
                return s;
            }
            self.open.swap_remove(s);
        }
        let mut ids = Vec::new();
        if !self.tree.is_empty() && rng.gen_range(0..100u64) < p.prefix.share_pct as u64 {
            let (root, children) = &self.tree[rng.gen_range(0..self.tree.len() as u64) as usize];
            ids.extend_from_slice(root);
            if !children.is_empty() {
                let c = rng.gen_range(0..children.len() as u64) as usize;
                ids.extend_from_slice(&children[c]);
            }
        }
        let shared = ids.len() as u64 * GEN_HASH_BLOCK;
        let own = p
            .prompt_tokens
            .sample(rng)
            .clamp(1, p.max_prompt_tokens.saturating_sub(shared).max(1));
        extend(&mut ids, shared, own, &mut self.next_id);
        self.open.push(Session {
            ids,
            len: shared + own,
            last_output: 0,
            turns_left: p.sessions.turns.sample(rng).max(1),
        });
        self.open.len() - 1
    }
}

impl Iterator for ServingRequests {
    type Item = WorkloadRequest;

    fn next(&mut self) -> Option<WorkloadRequest> {
        let i = self.made;
        if i >= self.p.requests {
            return None;
        }
        self.made += 1;
        if i > 0 {
            self.t_us = self
                .t_us
                .saturating_add(self.p.arrivals.gap_us(&mut self.rng));
        }
        let s = self.session();
        let output = self.p.output_tokens.sample(&mut self.rng).max(1);
        let sess = &mut self.open[s];
        let request = WorkloadRequest {
            priority: 0,
            id: format!("r{i}"),
            arrival_us: self.t_us,
            prompt: Prompt::HashIds {
                hash_ids: sess.ids.clone(),
                input_length: sess.len,
                hash_block: GEN_HASH_BLOCK,
            },
            max_tokens: output,
            line: i + 1,
            model: None,
        };
        sess.last_output = output;
        sess.turns_left -= 1;
        if sess.turns_left == 0 {
            self.open.swap_remove(s);
        }
        Some(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(x: f64) -> u64 {
        (x * ONE as f64) as u64
    }

    #[test]
    fn fixed_point_math() {
        for x in [0.001, 0.25, 0.5, 0.9, 1.0] {
            let got = ln_q32(q(x)) as f64 / ONE as f64;
            assert!((got - x.ln()).abs() < 1e-6, "ln {x}: {got}");
        }
        for x in [0.0, -0.5, -1.0, -7.25, -30.0] {
            let got = exp_q32((x * ONE as f64) as i64) as f64 / ONE as f64;
            assert!((got - x.exp()).abs() < 1e-6, "exp {x}: {got}");
        }
        assert_eq!(exp_q32(-(100 << 32)), 0);
    }

    #[test]
    fn variates_have_their_means() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let n = 50_000u64;
        let mean = |f: &mut dyn FnMut() -> u64| {
            (0..n).map(|_| f() as f64).sum::<f64>() / n as f64 / ONE as f64
        };
        let e = mean(&mut || exp1(&mut rng));
        assert!((e - 1.0).abs() < 0.02, "Exp(1) mean {e}");
        for shape in [300u64, 1000, 2500] {
            let g = mean(&mut || gamma_q32(shape, &mut rng));
            let want = shape as f64 / 1000.0;
            assert!(
                (g - want).abs() < 0.03 * want.max(1.0),
                "Gamma({want}) mean {g}"
            );
        }
    }

    #[test]
    fn seeded_and_shaped() {
        let p = ServingParams::default();
        let a = serving(&p);
        assert_eq!(a, serving(&p));
        assert_ne!(a, serving(&ServingParams { seed: 1, ..p }));
        assert_eq!(a.requests.len(), 1000);
        let mut last = 0;
        for r in &a.requests {
            assert!(r.arrival_us >= last);
            last = r.arrival_us;
            let n = r.prompt.len();
            assert!(n >= 1 && n <= p.max_prompt_tokens, "{n}");
            let Prompt::HashIds { hash_ids, .. } = &r.prompt else {
                panic!()
            };
            assert_eq!(hash_ids.len() as u64, n.div_ceil(GEN_HASH_BLOCK));
        }
        // About 8 requests per second.
        let secs = last as f64 / 1e6;
        assert!((secs - 125.0).abs() < 15.0, "{secs} s");
        // Shared prefixes and sessions: many requests start like an earlier one.
        let firsts: std::collections::BTreeSet<i64> = a
            .requests
            .iter()
            .map(|r| match &r.prompt {
                Prompt::HashIds { hash_ids, .. } => hash_ids[0],
                _ => unreachable!(),
            })
            .collect();
        assert!(firsts.len() < 700, "{} distinct first blocks", firsts.len());
        let bursty = serving(&ServingParams {
            arrivals: Arrivals::Gamma {
                rate_milli_per_s: 8000,
                shape_milli: 250,
            },
            ..p
        });
        let end = bursty.requests.last().unwrap().arrival_us as f64 / 1e6;
        assert!((end - 125.0).abs() < 40.0, "{end} s");
    }
}
