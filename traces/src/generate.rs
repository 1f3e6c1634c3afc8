//! Seeded generators of allocation traces, so that gpumem runs with no data at all.
//!
//! Randomness comes only from a `ChaCha8Rng` seeded with the explicit `seed`; every quantity is
//! integer (sizes are sampled from integer ranges, log-uniform through a fixed-point table of
//! 2^(k/16)), so a seed names the same trace on any machine. Only `u64` ranges are sampled
//! (never `usize`), which keeps the random stream independent of the pointer width.

use crate::alloc_trace::{AllocOp, AllocTrace, OpKind, TraceSource, MAX_BYTES};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::VecDeque;

/// 2^(k/16) for k = 0..=16, in Q32 fixed point (rounded).
const POW2_SIXTEENTHS_Q32: [u64; 17] = [
    4294967296, 4485121744, 4683695048, 4891059943, 5107605667, 5333738689, 5569883475, 5816483285,
    6074001000, 6342919999, 6623745059, 6917003306, 7223245206, 7543045592, 7877004752, 8225749546,
    8589934592,
];

/// `min × 2^(step/16)`, saturating.
fn scaled(min: u64, step: u32) -> u128 {
    let oct = step / 16;
    let v = (u128::from(min) * u128::from(POW2_SIXTEENTHS_Q32[(step % 16) as usize])) >> 32;
    if oct >= 128 || v.leading_zeros() < oct {
        u128::MAX
    } else {
        v << oct
    }
}

/// Approximately log-uniform integers in `[min, max]`: the range is cut into bins of 1/16
/// octave (the last one partial), a bin is drawn uniformly, then a value uniformly inside it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LogUniform {
    min: u64,
    max: u64,
    bins: u32,
}

impl LogUniform {
    /// `min` is raised to 1 and `max` to `min` if needed.
    pub(crate) fn new(min: u64, max: u64) -> Self {
        let min = min.max(1);
        let max = max.max(min);
        let mut s = 0u32;
        while scaled(min, s + 1) <= u128::from(max) {
            s += 1;
        }
        LogUniform {
            min,
            max,
            bins: s + 1,
        }
    }

    pub(crate) fn sample(&self, rng: &mut ChaCha8Rng) -> u64 {
        let s = rng.gen_range(0..u64::from(self.bins)) as u32;
        let lo = scaled(self.min, s) as u64;
        let hi = if s + 1 < self.bins {
            (scaled(self.min, s + 1) as u64 - 1).max(lo)
        } else {
            self.max
        };
        rng.gen_range(lo..=hi)
    }
}

/// Appends ops with ids from a counter and a clock that never goes back.
struct Builder {
    trace: AllocTrace,
    next_id: u64,
    t_ns: u64,
}

impl Builder {
    fn new(name: String, cap: u64) -> Self {
        let mut trace = AllocTrace::new(name, TraceSource::Generated);
        trace.ops.reserve(cap.min(1 << 24) as usize);
        Builder {
            trace,
            next_id: 0,
            t_ns: 0,
        }
    }

    fn push(&mut self, kind: OpKind) {
        let line = self.trace.ops.len() as u64 + 1;
        self.trace.ops.push(AllocOp {
            t_ns: self.t_ns,
            line,
            kind,
        });
    }

    fn alloc(&mut self, bytes: u64, pinned: bool) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.push(OpKind::Alloc {
            id,
            bytes: bytes.min(MAX_BYTES),
            stream: 0,
            pinned,
        });
        id
    }

    fn free(&mut self, id: u64) {
        self.push(OpKind::Free { id });
    }
}

/// Parameters of [`occupancy`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OccupancyParams {
    pub seed: u64,
    /// Exact number of ops.
    pub ops: u64,
    pub capacity_bytes: u64,
    /// Live requested bytes hover around this percentage of `capacity_bytes`.
    pub target_occupancy_pct: u32,
    pub min_bytes: u64,
    pub max_bytes: u64,
}

impl Default for OccupancyParams {
    /// 100k ops on 80 GiB at 85 %, sizes 512 B to 64 MiB.
    fn default() -> Self {
        OccupancyParams {
            seed: 0,
            ops: 100_000,
            capacity_bytes: 80 << 30,
            target_occupancy_pct: 85,
            min_bytes: 512,
            max_bytes: 64 << 20,
        }
    }
}

/// A stationary trace for benchmarks: while live requested bytes are below the target
/// (`capacity × pct / 100`) allocate a log-uniform size in `[min_bytes, max_bytes]`, otherwise
/// free a uniformly drawn live allocation (O(1) per op). After the warm-up, live bytes stay
/// within `[target − max_bytes, target + max_bytes)`. Ids count up from 0 and are never
/// reused; `t_ns` is 1 µs per op. Exactly `ops` ops. Name: `generated:occupancy seed=N`.
pub fn occupancy(p: &OccupancyParams) -> AllocTrace {
    let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
    let sizes = LogUniform::new(p.min_bytes.min(MAX_BYTES), p.max_bytes.min(MAX_BYTES));
    let target = (u128::from(p.capacity_bytes) * u128::from(p.target_occupancy_pct) / 100)
        .min(u128::from(u64::MAX)) as u64;
    let mut b = Builder::new(format!("generated:occupancy seed={}", p.seed), p.ops);
    let mut live: Vec<(u64, u64)> = Vec::new();
    let mut live_bytes: u64 = 0;
    for i in 0..p.ops {
        b.t_ns = i.saturating_mul(1000);
        if live_bytes < target || live.is_empty() {
            let bytes = sizes.sample(&mut rng);
            let id = b.alloc(bytes, false);
            live.push((id, bytes));
            live_bytes = live_bytes.saturating_add(bytes);
        } else {
            let k = rng.gen_range(0..live.len() as u64) as usize;
            let (id, bytes) = live.swap_remove(k);
            live_bytes -= bytes;
            b.free(id);
        }
    }
    b.trace
}

/// Parameters of [`llm_serving`]. The defaults model Llama-3.1-8B in bf16 serving with a
/// batch of up to 64 requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LlmServingParams {
    pub seed: u64,
    /// Engine steps (one forward pass each).
    pub steps: u32,
    /// Total bytes of weight tensors (allocated first, pinned, never freed).
    pub weights_bytes: u64,
    pub layers: u32,
    /// Most requests running at once.
    pub max_batch: u32,
    /// KV-cache bytes per token over all layers (8B: 2 × 32 layers × 8 heads × 128 × 2 B).
    pub kv_bytes_per_token: u64,
    /// Hidden-state bytes per token (8B: 4096 × 2 B); also the size of a norm weight.
    pub hidden_bytes_per_token: u64,
    /// MLP intermediate bytes per token (8B: gate and up, 2 × 14336 × 2 B).
    pub mlp_bytes_per_token: u64,
    /// Logits bytes per running request and step (8B: 128256 × 4 B).
    pub logits_bytes_per_seq: u64,
    /// Most prompt tokens prefilled in one step (a longer prompt is admitted alone).
    pub max_prefill_tokens: u32,
    pub min_prompt_tokens: u32,
    pub max_prompt_tokens: u32,
    pub min_output_tokens: u32,
    pub max_output_tokens: u32,
    /// Mean arrivals per 100 steps (e.g. 60: 0.6 a step).
    pub arrivals_per_100_steps: u32,
    /// KV is allocated in chunks of this many tokens (chunked requests), and reallocated
    /// buffers grow by at least this much.
    pub kv_chunk_tokens: u32,
    /// Percentage of requests whose KV is one buffer, grown by allocating a bigger one and
    /// freeing the old (the others add chunks).
    pub realloc_pct: u32,
    /// Nominal step duration.
    pub step_ns: u64,
}

impl Default for LlmServingParams {
    /// About 35k ops, peak of live bytes about 25 GiB.
    fn default() -> Self {
        LlmServingParams {
            seed: 0,
            steps: 256,
            weights_bytes: 16_060_522_496,
            layers: 32,
            max_batch: 64,
            kv_bytes_per_token: 128 << 10,
            hidden_bytes_per_token: 4096 * 2,
            mlp_bytes_per_token: 2 * 14336 * 2,
            logits_bytes_per_seq: 128_256 * 4,
            max_prefill_tokens: 8192,
            min_prompt_tokens: 32,
            max_prompt_tokens: 4096,
            min_output_tokens: 16,
            max_output_tokens: 512,
            arrivals_per_100_steps: 60,
            kv_chunk_tokens: 256,
            realloc_pct: 50,
            step_ns: 25_000_000,
        }
    }
}

struct Request {
    prompt: u64,
    output: u64,
    generated: u64,
    /// Tokens whose KV is stored.
    context: u64,
    /// Tokens the KV allocations can hold.
    capacity: u64,
    realloc: bool,
    kv: Vec<u64>,
}

/// LLM serving: weight tensors first (embedding, per layer norm / qkv / o / norm / gate-up /
/// down, final norm, lm_head; pinned, never freed); then per engine step:
/// 1. arrivals join a queue (prompt and output lengths log-uniform);
/// 2. requests are admitted while the batch has room and the prefill budget allows, and their
///    prompt KV is allocated; running requests store one more token and grow their KV when
///    full: chunked requests allocate one more chunk, the others allocate a bigger buffer
///    (×1.5, at least one chunk more) and free the old one;
/// 3. the forward pass: a residual buffer for the step's tokens, per layer an attention and an
///    MLP buffer allocated and freed, logits for the batch, then the residual freed;
/// 4. requests that produced their last token free all their KV.
///
/// Name: `generated:llm-serving seed=N`. Every free names a live id.
pub fn llm_serving(p: &LlmServingParams) -> AllocTrace {
    let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
    let layers = u64::from(p.layers.max(1));
    let chunk = u64::from(p.kv_chunk_tokens.max(1));
    let prompts = LogUniform::new(
        u64::from(p.min_prompt_tokens),
        u64::from(p.max_prompt_tokens),
    );
    let outputs = LogUniform::new(
        u64::from(p.min_output_tokens),
        u64::from(p.max_output_tokens),
    );
    let kv_bytes = |tokens: u64| tokens.saturating_mul(p.kv_bytes_per_token);
    let ops_estimate = u64::from(p.steps) * (layers * 4 + 8) + layers * 6 + 8;
    let mut b = Builder::new(
        format!("generated:llm-serving seed={}", p.seed),
        ops_estimate,
    );

    // Weights: Llama-like proportions.
    let embed = p.weights_bytes / 16;
    let norm = p.hidden_bytes_per_token;
    let per_layer = p.weights_bytes.saturating_sub(2 * embed + norm) / layers;
    let qkv = per_layer / 1000 * 115;
    let o = per_layer / 1000 * 77;
    let gate_up = per_layer / 1000 * 538;
    let down = per_layer.saturating_sub(qkv + o + gate_up + 2 * norm);
    b.alloc(embed, true);
    for _ in 0..layers {
        for bytes in [norm, qkv, o, norm, gate_up, down] {
            b.alloc(bytes, true);
        }
    }
    b.alloc(norm, true);
    b.alloc(embed, true);

    let mut waiting: VecDeque<Request> = VecDeque::new();
    let mut running: Vec<Request> = Vec::new();
    for step in 0..u64::from(p.steps) {
        b.t_ns = b.t_ns.max(step.saturating_mul(p.step_ns));
        let tick = |b: &mut Builder| b.t_ns += 1000;

        // 1. Arrivals.
        let per100 = u64::from(p.arrivals_per_100_steps);
        let arrivals = per100 / 100 + u64::from(rng.gen_range(0..100u64) < per100 % 100);
        for _ in 0..arrivals {
            let prompt = prompts.sample(&mut rng);
            let output = outputs.sample(&mut rng);
            let realloc = rng.gen_range(0..100u64) < u64::from(p.realloc_pct);
            waiting.push_back(Request {
                prompt,
                output,
                generated: 0,
                context: 0,
                capacity: 0,
                realloc,
                kv: Vec::new(),
            });
        }

        // 2. Decode KV growth of the running requests, then admissions with their prompt KV.
        let decode_tokens = running.len() as u64;
        for r in running.iter_mut() {
            r.context += 1;
            grow_kv(r, chunk, &kv_bytes, &mut b, tick);
        }
        let mut prefill_tokens = 0u64;
        while running.len() < p.max_batch.max(1) as usize {
            let Some(front) = waiting.front() else { break };
            if prefill_tokens > 0 && prefill_tokens + front.prompt > u64::from(p.max_prefill_tokens)
            {
                break;
            }
            let Some(mut r) = waiting.pop_front() else {
                break;
            };
            prefill_tokens += r.prompt;
            r.context = r.prompt;
            grow_kv(&mut r, chunk, &kv_bytes, &mut b, tick);
            running.push(r);
        }

        // 3. Forward pass over the step's tokens.
        let tokens = decode_tokens + prefill_tokens;
        if tokens > 0 {
            let residual = b.alloc(tokens.saturating_mul(p.hidden_bytes_per_token), false);
            tick(&mut b);
            for _ in 0..layers {
                let attn = b.alloc(tokens.saturating_mul(p.hidden_bytes_per_token * 2), false);
                tick(&mut b);
                b.free(attn);
                tick(&mut b);
                let mlp = b.alloc(tokens.saturating_mul(p.mlp_bytes_per_token), false);
                tick(&mut b);
                b.free(mlp);
                tick(&mut b);
            }
            let logits = b.alloc(
                (running.len() as u64).saturating_mul(p.logits_bytes_per_seq),
                false,
            );
            tick(&mut b);
            b.free(logits);
            b.free(residual);
            tick(&mut b);
        }

        // 4. Each running request produced a token; finished ones release their KV.
        let mut k = 0;
        while k < running.len() {
            running[k].generated += 1;
            if running[k].generated >= running[k].output {
                let r = running.remove(k);
                for id in r.kv {
                    b.free(id);
                }
                tick(&mut b);
            } else {
                k += 1;
            }
        }
    }
    b.trace
}

/// Makes `r`'s KV hold `r.context` tokens.
fn grow_kv(
    r: &mut Request,
    chunk: u64,
    kv_bytes: &impl Fn(u64) -> u64,
    b: &mut Builder,
    tick: impl Fn(&mut Builder),
) {
    if r.context <= r.capacity {
        return;
    }
    if r.realloc {
        let grown = r.capacity + (r.capacity / 2).max(chunk);
        let new_cap = grown.max(r.context.div_ceil(16) * 16);
        let id = b.alloc(kv_bytes(new_cap), false);
        tick(b);
        for old in r.kv.drain(..) {
            b.free(old);
        }
        r.kv.push(id);
        r.capacity = new_cap;
    } else {
        while r.capacity < r.context {
            let id = b.alloc(kv_bytes(chunk), false);
            r.kv.push(id);
            r.capacity += chunk;
        }
    }
    tick(b);
}

#[cfg(test)]
mod tests;
