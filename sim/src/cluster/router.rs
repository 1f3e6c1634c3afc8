//! The router in front of a cluster's replicas: it sees every request when it arrives and
//! picks the replica that serves it.
//!
//! - `round-robin`: request `k` (in arrival order) goes to replica `k mod N`.
//! - `least-loaded`: the replica with the fewest outstanding tokens. A request counts, from
//!   routing to its finish, the tokens its sequence will hold (prompt plus the output it will
//!   generate: `max_tokens`, or up to `max_model_len`), as its KV blocks will.
//! - `kv-aware:W`: the cost Dynamo's KV router and llm-d's prefix-cache scorer weigh, per
//!   replica: `W × (prompt tokens the replica must compute: those not in its prefix cache) +
//!   outstanding tokens`, the lowest cost wins. Which prefix a replica holds comes from a
//!   [`CacheIndex`] per replica fed by the engine's KV events, the index `gpumem kv-events`
//!   builds; the events reach the router `lag` after the step that published them ends, as
//!   they would over a real deployment's event bus. `kv-aware:0` is `least-loaded`.
//!
//! Every tie goes to the lowest replica index, and the cost is an integer: the router decides
//! on integers only, in arrival order.

use std::collections::VecDeque;
use std::fmt;

use gpumem_core::digest::Digest;
use gpumem_core::kv::index::{CacheIndex, EventHash, POOL_MEDIUM};
use gpumem_core::kv::{BlockHash, KvEvent};
use gpumem_traces::serving::import::parse_decimal;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use super::prompt_hashes::prompt_block_hashes;
use crate::serve::{RequestOutcome, ServeError, WorkloadRequest};

/// Weights are kept in thousandths.
const WEIGHT_SCALE: u64 = 1000;
/// Largest `kv-aware` weight: beyond it the load no longer counts at all.
pub const MAX_KV_WEIGHT: u64 = 1_000_000;

/// How the router picks a replica (`--router`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterPolicy {
    RoundRobin,
    LeastLoaded,
    /// Prefix-cache aware; the weight of the prefill tokens against the load, in thousandths.
    KvAware {
        weight_milli: u64,
    },
}

impl RouterPolicy {
    /// `kv-aware` alone: prefill tokens and outstanding tokens weigh the same (Dynamo's default
    /// overlap weight).
    pub const KV_AWARE: RouterPolicy = RouterPolicy::KvAware {
        weight_milli: WEIGHT_SCALE,
    };

    /// `round-robin`, `least-loaded`, `kv-aware` or `kv-aware:W` (W a decimal, up to three
    /// places, at most 1000).
    pub fn parse(text: &str) -> Result<RouterPolicy, String> {
        match text {
            "round-robin" => return Ok(RouterPolicy::RoundRobin),
            "least-loaded" => return Ok(RouterPolicy::LeastLoaded),
            "kv-aware" => return Ok(RouterPolicy::KV_AWARE),
            _ => {}
        }
        let bad = || {
            format!("unknown router '{text}'; known: round-robin, least-loaded, kv-aware, kv-aware:W (W a weight from 0 to 1000, e.g. kv-aware:0.5)")
        };
        let weight = text.strip_prefix("kv-aware:").ok_or_else(bad)?;
        match parse_decimal(weight.trim(), 3) {
            Some(weight_milli) if weight_milli <= MAX_KV_WEIGHT => {
                Ok(RouterPolicy::KvAware { weight_milli })
            }
            _ => Err(bad()),
        }
    }

    /// The name `--router` takes, the weight written shortest (`kv-aware:1`, `kv-aware:0.25`).
    pub fn name(self) -> String {
        match self {
            RouterPolicy::RoundRobin => "round-robin".into(),
            RouterPolicy::LeastLoaded => "least-loaded".into(),
            RouterPolicy::KvAware { weight_milli } => {
                let text = format!(
                    "{}.{:03}",
                    weight_milli / WEIGHT_SCALE,
                    weight_milli % WEIGHT_SCALE
                );
                format!(
                    "kv-aware:{}",
                    text.trim_end_matches('0').trim_end_matches('.')
                )
            }
        }
    }

    fn is_kv_aware(self) -> bool {
        matches!(self, RouterPolicy::KvAware { .. })
    }
}

impl fmt::Display for RouterPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl Serialize for RouterPolicy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for RouterPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        RouterPolicy::parse(&text).map_err(de::Error::custom)
    }
}

/// What the engines of a cluster share that the router needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouterSetup {
    pub policy: RouterPolicy,
    pub replicas: usize,
    /// How long after a step ends its KV events reach the router, ns.
    pub lag_ns: u64,
    pub block_size: u32,
    pub max_model_len: u64,
    /// Blocks of one replica's pool (bounds its index).
    pub num_gpu_blocks: u32,
}

/// What the router did, for the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RouterStats {
    pub requests_routed: u64,
    /// Full prompt blocks a prefix-cache hit could serve (all but the last token), over the
    /// requests routed by `kv-aware`.
    pub prompt_blocks: u64,
    /// Of those, the blocks the chosen replica held when the router looked (what it expected
    /// the replica to hit).
    pub expected_hit_blocks: u64,
    /// KV-cache events the router's index applied.
    pub kv_events_applied: u64,
}

/// Events of one step of one replica, on their way to the router.
struct InTransit {
    visible_ns: u64,
    replica: usize,
    events: Vec<KvEvent>,
}

pub struct Router {
    setup: RouterSetup,
    /// Per replica: tokens of the requests routed to it and not finished.
    outstanding_tokens: Vec<u64>,
    /// Per replica, for `kv-aware`: the blocks its events say it holds.
    indexes: Vec<CacheIndex>,
    in_transit: VecDeque<InTransit>,
    stats: RouterStats,
    /// The choices, in arrival order.
    digest: Digest,
    hashes: Vec<BlockHash>,
    tokens: Vec<u32>,
}

impl Router {
    pub fn new(setup: RouterSetup) -> Router {
        let indexes = if setup.policy.is_kv_aware() {
            let max_blocks = setup.num_gpu_blocks as usize;
            (0..setup.replicas)
                .map(|_| CacheIndex::with_max_blocks(max_blocks))
                .collect()
        } else {
            Vec::new()
        };
        Router {
            setup,
            outstanding_tokens: vec![0; setup.replicas],
            indexes,
            in_transit: VecDeque::new(),
            stats: RouterStats::default(),
            digest: Digest::new(),
            hashes: Vec::new(),
            tokens: Vec::new(),
        }
    }

    /// Whether the engines must publish their KV events.
    pub fn wants_kv_events(&self) -> bool {
        self.setup.policy.is_kv_aware()
    }

    /// The replica that serves `req`, arriving at `now_ns`.
    pub fn route(&mut self, req: &WorkloadRequest, now_ns: u64) -> Result<usize, ServeError> {
        self.deliver_events(now_ns)?;
        let replica = match self.setup.policy {
            RouterPolicy::RoundRobin => {
                (self.stats.requests_routed % self.setup.replicas as u64) as usize
            }
            RouterPolicy::LeastLoaded => lowest(self.outstanding_tokens.iter().map(|&t| t as u128)),
            RouterPolicy::KvAware { weight_milli } => self.kv_aware_choice(req, weight_milli),
        };
        self.outstanding_tokens[replica] += self.sequence_tokens(req);
        self.stats.requests_routed += 1;
        self.digest.word(replica as u64);
        Ok(replica)
    }

    /// The lowest `W × uncached prompt tokens + outstanding tokens` (in thousandths).
    fn kv_aware_choice(&mut self, req: &WorkloadRequest, weight_milli: u64) -> usize {
        let bs = self.setup.block_size as u64;
        let len = req.prompt.len();
        // vLLM never serves a prompt's last token from the cache.
        let hit_blocks_max = len.saturating_sub(1) / bs;
        prompt_block_hashes(
            &req.prompt,
            self.setup.block_size,
            hit_blocks_max,
            &mut self.tokens,
            &mut self.hashes,
        );
        let held: Vec<u64> = self
            .indexes
            .iter()
            .map(|index| {
                let hashes = self.hashes.iter().map(|h| EventHash::Int(h.0));
                index.prefix_blocks(Some(POOL_MEDIUM), None, hashes)
            })
            .collect();
        let costs = held
            .iter()
            .zip(&self.outstanding_tokens)
            .map(|(&h, &load)| {
                let uncached = len - h * bs;
                weight_milli as u128 * uncached as u128 + WEIGHT_SCALE as u128 * load as u128
            });
        let replica = lowest(costs);
        self.stats.prompt_blocks += hit_blocks_max;
        self.stats.expected_hit_blocks += held[replica];
        replica
    }

    /// Tokens `req`'s sequence will hold when it finishes: the engine stops at `max_tokens`
    /// outputs (at least one) or at `max_model_len` tokens.
    fn sequence_tokens(&self, req: &WorkloadRequest) -> u64 {
        let prompt = req.prompt.len();
        let room = self.setup.max_model_len.saturating_sub(prompt);
        prompt + req.max_tokens.min(room).max(1)
    }

    /// `outcome` finished on `replica`: its tokens are no longer outstanding.
    pub fn finished(&mut self, replica: usize, outcome: &RequestOutcome) {
        let tokens = outcome.prompt_tokens + outcome.output_tokens;
        let t = &mut self.outstanding_tokens[replica];
        *t = t.saturating_sub(tokens);
    }

    /// `replica`'s step that ended at `end_ns` published `events`.
    pub fn published(&mut self, replica: usize, end_ns: u64, events: Vec<KvEvent>) {
        if events.is_empty() {
            return;
        }
        self.in_transit.push_back(InTransit {
            visible_ns: end_ns.saturating_add(self.setup.lag_ns),
            replica,
            events,
        });
    }

    /// Applies the events that have reached the router by `now_ns` (steps end in time order,
    /// so the queue is in arrival order).
    fn deliver_events(&mut self, now_ns: u64) -> Result<(), ServeError> {
        let bs = self.setup.block_size as u64;
        while let Some(t) = self.in_transit.front() {
            if t.visible_ns > now_ns {
                break;
            }
            let t = self.in_transit.pop_front().expect("a front");
            for ev in &t.events {
                self.indexes[t.replica]
                    .apply_pool_event(ev, bs)
                    .map_err(|e| ServeError::Internal(format!("the router's index: {e}")))?;
            }
            self.stats.kv_events_applied += t.events.len() as u64;
        }
        Ok(())
    }

    pub fn stats(&self) -> RouterStats {
        self.stats
    }

    pub fn outstanding_tokens(&self) -> &[u64] {
        &self.outstanding_tokens
    }

    /// Hex digest of the choices so far.
    pub fn digest_hex(&self) -> String {
        self.digest.hex()
    }
}

/// Index of the lowest value, the first on ties.
fn lowest(values: impl Iterator<Item = u128>) -> usize {
    let mut best = (u128::MAX, 0);
    for (i, v) in values.enumerate() {
        if v < best.0 {
            best = (v, i);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_names_read_back_to_themselves() {
        for name in [
            "round-robin",
            "least-loaded",
            "kv-aware:1",
            "kv-aware:0",
            "kv-aware:0.25",
            "kv-aware:1000",
        ] {
            assert_eq!(RouterPolicy::parse(name).unwrap().name(), name);
        }
        assert_eq!(
            RouterPolicy::parse("kv-aware").unwrap().name(),
            "kv-aware:1"
        );
        assert_eq!(
            RouterPolicy::parse("kv-aware:2.50").unwrap().name(),
            "kv-aware:2.5"
        );
        for bad in [
            "random",
            "kv-aware:",
            "kv-aware:-1",
            "kv-aware:1001",
            "kv-aware:x",
        ] {
            let e = RouterPolicy::parse(bad).unwrap_err();
            assert!(e.contains("known: round-robin"), "{bad}: {e}");
        }
    }

    #[test]
    fn ties_go_to_the_lowest_index() {
        assert_eq!(lowest([3, 1, 1, 2].into_iter()), 1);
        assert_eq!(lowest([0, 0].into_iter()), 0);
    }
}
