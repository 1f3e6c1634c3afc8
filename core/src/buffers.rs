//! CUDA-graph capture sizes and the static input buffers every graph reads.
//!
//! vLLM 0.33 captures one CUDA graph per batch size of a list (`VllmConfig._set_cudagraph_sizes`
//! in `vllm/config/vllm.py`, reproduced by [`vllm_capture_sizes`]). A step whose batch — the
//! tokens it scheduled — is at most the largest size runs the graph of the next size up, its
//! batch padded with dummy tokens to that size (`CudagraphDispatcher._bs_to_padded_graph_size`
//! in `vllm/v1/cudagraph_dispatcher.py`); a larger batch runs eagerly, unpadded. The scheduler
//! never sees the padding: it changes no scheduling decision, only the work of the forward pass.
//!
//! Here: vLLM's default list, the padding of one batch ([`CaptureSizes::graph_size`]), a planner
//! that picks from a histogram of batch sizes at most `k` sizes with the same largest size that
//! pad the fewest tokens ([`plan_sizes`], dynamic programming), and the bytes of the static
//! input buffers ([`static_buffers`]). Integers only.

use std::fmt;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

/// vLLM's ceiling on the default capture sizes (`default_max_graph_size`: 512, 1024 only on
/// data-center Blackwell, which no built-in GPU profile is).
pub const VLLM_DEFAULT_MAX_GRAPH_SIZE: u64 = 512;

/// vLLM 0.33's default capture sizes, ascending, for a model without speculative decoding
/// (`uniform_decode_query_len` 1) in the default `balanced` performance mode on a GPU that is
/// not data-center Blackwell:
///
/// - the largest size is `min(2 × max_num_seqs, 512, max_num_batched_tokens)`;
/// - 1, 2 and 4, multiples of 8 below 256 and multiples of 16 from 256, up to it;
/// - plus `max_num_batched_tokens` when it is at most that largest size, and `max_num_seqs`
///   (the widest decode batch) when it is at most `min(2 × max_num_seqs, 512)` and at most
///   `max_num_batched_tokens`.
///
/// The largest size is then the largest of the list (not always the bound: 127 sequences give
/// a bound of 254 and a largest size of 248).
pub fn vllm_capture_sizes(max_num_seqs: u64, max_num_batched_tokens: u64) -> Vec<u64> {
    let decode_bound = max_num_seqs
        .saturating_mul(2)
        .min(VLLM_DEFAULT_MAX_GRAPH_SIZE);
    let widest_decode = (max_num_seqs <= decode_bound).then_some(max_num_seqs);
    let bound = decode_bound.min(max_num_batched_tokens);
    let mut sizes: Vec<u64> = [1, 2, 4].into_iter().filter(|&s| s <= bound).collect();
    sizes.extend((8..(bound + 1).min(256)).step_by(8));
    if bound >= 256 {
        sizes.extend((256..=bound).step_by(16));
    }
    if max_num_batched_tokens <= bound {
        sizes.push(max_num_batched_tokens);
    }
    sizes.extend(widest_decode.filter(|&s| s <= max_num_batched_tokens));
    sizes.retain(|&s| s >= 1);
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

/// Which capture sizes a run uses (`--cudagraph-sizes`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SizesChoice {
    /// vLLM 0.33's defaults for the run's scheduler limits.
    #[default]
    Vllm,
    /// Planned from the run's own batch sizes: at most as many sizes as vLLM's, with vLLM's
    /// largest size, padding the fewest tokens.
    Auto,
    /// These sizes (ascending, distinct, each at least 1).
    List(Vec<u64>),
}

impl SizesChoice {
    /// `vllm`, `auto`, or a comma-separated list of batch sizes (`1,2,4,8`), kept sorted and
    /// distinct.
    pub fn parse(text: &str) -> Result<SizesChoice, String> {
        match text.trim() {
            "vllm" => return Ok(SizesChoice::Vllm),
            "auto" => return Ok(SizesChoice::Auto),
            _ => {}
        }
        let mut sizes = Vec::new();
        for item in text.split(',').map(str::trim) {
            match item.parse::<u64>() {
                Ok(size) if size >= 1 => sizes.push(size),
                _ => {
                    return Err(format!(
                        "CUDA-graph sizes {text:?}: '{item}' is not a batch size (expected vllm, auto, or sizes >= 1 separated by commas, such as 1,2,4,8)"
                    ))
                }
            }
        }
        sizes.sort_unstable();
        sizes.dedup();
        Ok(SizesChoice::List(sizes))
    }

    /// As `--cudagraph-sizes` spells it.
    pub fn name(&self) -> String {
        match self {
            SizesChoice::Vllm => "vllm".into(),
            SizesChoice::Auto => "auto".into(),
            SizesChoice::List(sizes) => {
                let items: Vec<String> = sizes.iter().map(u64::to_string).collect();
                items.join(",")
            }
        }
    }

    /// The kind of choice, for reports: `vllm`, `auto` or `list`.
    pub fn kind(&self) -> &'static str {
        match self {
            SizesChoice::Vllm => "vllm",
            SizesChoice::Auto => "auto",
            SizesChoice::List(_) => "list",
        }
    }

    /// Why a list cannot serve a run whose batches hold at most `max_num_batched_tokens`.
    pub fn check(&self, max_num_batched_tokens: u64) -> Result<(), String> {
        let SizesChoice::List(sizes) = self else {
            return Ok(());
        };
        match sizes.last() {
            None => Err("CUDA-graph sizes: the list is empty".into()),
            Some(&largest) if largest > max_num_batched_tokens => Err(format!(
                "CUDA-graph size {largest} is larger than max_num_batched_tokens {max_num_batched_tokens}: no batch is ever that large (vLLM drops such sizes)"
            )),
            Some(_) => Ok(()),
        }
    }
}

impl Serialize for SizesChoice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for SizesChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        SizesChoice::parse(&text).map_err(de::Error::custom)
    }
}

impl fmt::Display for SizesChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Captured batch sizes: ascending, distinct, at least one, each at least 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureSizes {
    sizes: Vec<u64>,
}

impl CaptureSizes {
    /// The sizes, sorted and deduplicated; `None` when none is at least 1.
    pub fn new(mut sizes: Vec<u64>) -> Option<CaptureSizes> {
        sizes.retain(|&s| s >= 1);
        sizes.sort_unstable();
        sizes.dedup();
        (!sizes.is_empty()).then_some(CaptureSizes { sizes })
    }

    pub fn sizes(&self) -> &[u64] {
        &self.sizes
    }

    pub fn len(&self) -> usize {
        self.sizes.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The largest size: bigger batches run eagerly.
    pub fn largest(&self) -> u64 {
        self.sizes[self.sizes.len() - 1]
    }

    /// The graph a batch of `tokens` runs in, its batch padded to that size; `None` when it
    /// runs eagerly (larger than every size).
    #[inline]
    pub fn graph_size(&self, tokens: u64) -> Option<u64> {
        let i = self.sizes.partition_point(|&s| s < tokens);
        self.sizes.get(i).copied()
    }

    /// Graphs vLLM 0.33 captures with these sizes in its default mode, `FULL_AND_PIECEWISE`:
    /// a piecewise graph for every size (mixed prefill and decode batches) and a full graph for
    /// every size up to `max_num_seqs` (uniform decode batches of one token per request).
    pub fn graphs_captured(&self, max_num_seqs: u64) -> u64 {
        let decode = self.sizes.partition_point(|&s| s <= max_num_seqs);
        (self.sizes.len() + decode) as u64
    }

    /// Dummy tokens these sizes add to the batches of `histogram` ((batch tokens, steps)
    /// pairs); batches above the largest size run eagerly and add none.
    pub fn padded_tokens(&self, histogram: &[(u64, u64)]) -> u128 {
        histogram
            .iter()
            .filter_map(|&(tokens, steps)| {
                let size = self.graph_size(tokens)?;
                Some((size - tokens) as u128 * steps as u128)
            })
            .sum()
    }
}

/// Capture sizes planned from a histogram, and the dummy tokens they pad.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub sizes: CaptureSizes,
    pub padded_tokens: u128,
}

/// At most `max_sizes` capture sizes (at least 1), the largest being `largest`, that pad the
/// batches of `histogram` ((batch tokens, steps) pairs, any order) with the fewest dummy
/// tokens. Batches above `largest` run eagerly and cost nothing: fixing the largest size keeps
/// the set of batches that run in a graph what it was, so only the padding changes. Ties go to
/// the fewest sizes, then to the lowest size below each (deterministic).
///
/// Dynamic programming over the distinct batch sizes `v_1 < … < v_m` at most `largest`
/// (`largest` appended when not among them): an optimal plan only captures sizes that occur
/// (any other size can be lowered to the next batch size below it, padding less), and a size
/// serves exactly the batches between the size below it and itself. `best[t][j]` is the least
/// padding of `v_1..v_j` with `t` sizes, the largest `v_j`; O(k·m²) time, O(k·m) memory.
pub fn plan_sizes(histogram: &[(u64, u64)], max_sizes: usize, largest: u64) -> Plan {
    let points = distinct_batches(histogram, largest);
    let m = points.len();
    let k = max_sizes.clamp(1, m);
    // Prefix sums of steps and of steps × tokens: the padding of points i..=j served by v_j
    // is v_j × steps(i..=j) − tokens(i..=j).
    let mut steps = vec![0u128; m + 1];
    let mut tokens = vec![0u128; m + 1];
    for (j, &(v, c)) in points.iter().enumerate() {
        steps[j + 1] = steps[j] + c as u128;
        tokens[j + 1] = tokens[j] + v as u128 * c as u128;
    }
    let padding = |i: usize, j: usize| {
        points[j].0 as u128 * (steps[j + 1] - steps[i]) - (tokens[j + 1] - tokens[i])
    };
    // best[t - 1][j]: t sizes, the largest v_j; from[t - 1][j]: the index of the size below.
    let mut best: Vec<Vec<u128>> = vec![(0..m).map(|j| padding(0, j)).collect()];
    let mut from: Vec<Vec<usize>> = vec![vec![usize::MAX; m]];
    for t in 2..=k {
        let prev = &best[t - 2];
        let mut row = vec![u128::MAX; m];
        let mut back = vec![usize::MAX; m];
        for j in t - 1..m {
            for (i, &below) in prev.iter().enumerate().take(j).skip(t - 2) {
                let cost = below.saturating_add(padding(i + 1, j));
                if cost < row[j] {
                    row[j] = cost;
                    back[j] = i;
                }
            }
        }
        best.push(row);
        from.push(back);
    }
    let last = m - 1;
    let (mut t, padded_tokens) = (1..=k)
        .map(|t| (t, best[t - 1][last]))
        .min_by_key(|&(t, cost)| (cost, t))
        .expect("at least one size");
    let mut sizes = Vec::with_capacity(t);
    let mut j = last;
    loop {
        sizes.push(points[j].0);
        if t == 1 {
            break;
        }
        j = from[t - 1][j];
        t -= 1;
    }
    Plan {
        sizes: CaptureSizes::new(sizes).expect("sizes are at least 1"),
        padded_tokens,
    }
}

/// The distinct batch sizes of `histogram` from 1 to `largest` with their steps, ascending,
/// ending with `largest` (0 steps when no batch had that size).
fn distinct_batches(histogram: &[(u64, u64)], largest: u64) -> Vec<(u64, u64)> {
    let largest = largest.max(1);
    let mut points: Vec<(u64, u64)> = histogram
        .iter()
        .copied()
        .filter(|&(tokens, steps)| (1..=largest).contains(&tokens) && steps > 0)
        .collect();
    points.sort_unstable();
    points.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            kept.1 += later.1;
        }
        same
    });
    if points.last().map(|p| p.0) != Some(largest) {
        points.push((largest, 0));
    }
    points
}

/// The scheduler limits the static buffers are sized by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BufferLimits {
    pub max_num_batched_tokens: u64,
    pub max_num_seqs: u64,
    pub max_model_len: u64,
    pub block_size: u64,
}

/// Bytes of the static input buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StaticBuffers {
    /// On the GPU.
    pub device_bytes: u64,
    /// Their pinned host mirrors (vLLM's `CpuGpuBuffer`), which the step's inputs are prepared
    /// in and copied from.
    pub pinned_host_bytes: u64,
}

/// The static input buffers of vLLM 0.33's GPU model runner that every graph reads, allocated
/// once for the largest batch the runner takes — `max_num_batched_tokens` tokens of
/// `max_num_seqs` requests, never less than the largest capture size — and shared by every
/// graph and by eager steps (each uses a prefix of them). From `GPUModelRunner.__init__`
/// (`vllm/v1/worker/gpu_model_runner.py`) and `BlockTable.__init__`
/// (`vllm/v1/worker/block_table.py`), one KV cache group:
///
/// | buffer | dtype | elements | host mirror |
/// |---|---|---|---|
/// | `input_ids` | int32 | `max_num_batched_tokens` | yes |
/// | `positions` | int64 | `max_num_batched_tokens` | no |
/// | `slot_mapping` | int64 | `max_num_batched_tokens` | yes |
/// | `block_table` | int32 | `max_num_seqs × ⌈max_model_len / block_size⌉` | yes |
/// | `query_start_loc` | int32 | `max_num_seqs + 1` | yes |
///
/// So 20 bytes per token on the GPU (12 mirrored on the host) and per request 4 bytes per
/// block of `max_model_len` plus 4 (both sides), plus 4 once. The logits indices are no buffer
/// of their own in 0.33: each step reads them as `query_start_loc[1:] - 1`. Buffers of other
/// features (`inputs_embeds`, speculative decoding, M-RoPE, …) are not counted.
pub fn static_buffers(l: BufferLimits) -> StaticBuffers {
    let blocks_per_request = l.max_model_len.div_ceil(l.block_size.max(1));
    let tokens = l.max_num_batched_tokens as u128;
    let requests = l.max_num_seqs as u128;
    // block_table rows and query_start_loc: mirrored.
    let per_request = (4 * blocks_per_request as u128 + 4) * requests + 4;
    let saturate = |bytes: u128| u64::try_from(bytes).unwrap_or(u64::MAX);
    StaticBuffers {
        // input_ids (4) + positions (8) + slot_mapping (8).
        device_bytes: saturate(20 * tokens + per_request),
        // input_ids (4) + slot_mapping (8).
        pinned_host_bytes: saturate(12 * tokens + per_request),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_goes_to_the_next_size_and_beyond_the_largest_runs_eagerly() {
        let s = CaptureSizes::new(vec![8, 1, 4, 2, 4]).unwrap();
        assert_eq!(s.sizes(), [1, 2, 4, 8]);
        let got: Vec<Option<u64>> = (1..=9).map(|n| s.graph_size(n)).collect();
        let want = [1, 2, 4, 4, 8, 8, 8, 8].map(Some);
        assert_eq!(got[..8], want);
        assert_eq!(got[8], None);
        assert_eq!(s.padded_tokens(&[(3, 10), (5, 1), (9, 100)]), 10 + 3);
        assert_eq!(s.graphs_captured(2), 4 + 2);
        assert!(CaptureSizes::new(vec![0]).is_none());
    }

    #[test]
    fn choices_parse_and_print_as_the_flag_spells_them() {
        assert_eq!(SizesChoice::parse("vllm"), Ok(SizesChoice::Vllm));
        assert_eq!(SizesChoice::parse("auto"), Ok(SizesChoice::Auto));
        let list = SizesChoice::parse("8, 1,4,4").unwrap();
        assert_eq!(list, SizesChoice::List(vec![1, 4, 8]));
        assert_eq!(list.name(), "1,4,8");
        for bad in ["", "0", "1,,2", "x", "-1", "1.5", "99999999999999999999"] {
            assert!(SizesChoice::parse(bad).is_err(), "{bad:?}");
        }
        assert!(list.check(8).is_ok());
        let e = list.check(7).unwrap_err();
        assert!(e.contains("larger than max_num_batched_tokens 7"), "{e}");
    }

    #[test]
    fn a_plan_with_room_for_every_batch_size_pads_nothing() {
        let hist = [(3, 5), (7, 2), (100, 9), (600, 4)];
        let plan = plan_sizes(&hist, 10, 512);
        assert_eq!(plan.sizes.sizes(), [3, 7, 100, 512]);
        assert_eq!(plan.padded_tokens, 0);
    }

    #[test]
    fn one_size_is_the_largest_and_pads_everything_up_to_it() {
        let plan = plan_sizes(&[(1, 3), (4, 1)], 1, 8);
        assert_eq!(plan.sizes.sizes(), [8]);
        assert_eq!(plan.padded_tokens, 3 * 7 + 4);
        // An empty histogram still captures the largest size.
        assert_eq!(plan_sizes(&[], 5, 16).sizes.sizes(), [16]);
    }

    #[test]
    fn static_buffers_of_the_default_h100_run() {
        // 8192 tokens, 1024 sequences, Llama-3.1-8B's 131072-token context in 16-token blocks.
        let b = static_buffers(BufferLimits {
            max_num_batched_tokens: 8192,
            max_num_seqs: 1024,
            max_model_len: 131072,
            block_size: 16,
        });
        let block_table = 1024 * 8192 * 4;
        let query_start_loc = 4 * 1025;
        assert_eq!(b.device_bytes, 20 * 8192 + block_table + query_start_loc);
        assert_eq!(
            b.pinned_host_bytes,
            12 * 8192 + block_table + query_start_loc
        );
    }
}
