//! CUDA-graph padding of a serving run: every step's batch (the tokens it scheduled) padded to
//! the next captured size, or run eagerly above the largest (`gpumem_core::buffers`).
//!
//! Padding decides nothing: vLLM's scheduler never sees it, and the step cost model charges
//! the tokens scheduled, not the padded batch (the roofline is an optimistic bound; padding
//! only happens at or below the largest size, 512 tokens by default, where decode steps are
//! bound by reading the weights). So the run is observed once, and each size list is judged
//! on the same steps: the list in use per step, vLLM's and the `auto` plan from the histogram
//! of batch sizes at most vLLM's largest — what that plan would have padded on this run.

use gpumem_core::buffers::{
    plan_sizes, static_buffers, vllm_capture_sizes, BufferLimits, CaptureSizes, SizesChoice,
};
use serde::Serialize;

use super::vllm::EngineConfig;

/// What a run's steps were padded to, step by step.
#[derive(Clone, Debug)]
pub struct GraphPadding {
    choice: SizesChoice,
    /// The sizes in use (for `auto`, vLLM's until the plan is made at the end).
    sizes: CaptureSizes,
    vllm: CaptureSizes,
    /// Steps per batch size, 1 to vLLM's largest size (index 0 unused).
    histogram: Vec<u64>,
    graph_steps: u64,
    eager_steps: u64,
    tokens: u64,
    padded_tokens: u64,
    max_num_seqs: u64,
    buffers: BufferLimits,
    bytes_per_graph: u64,
}

impl GraphPadding {
    /// Padding of the sizes `choice` names for an engine with `cfg`; `bytes_per_graph` is the
    /// model profile's memory per captured graph. A list larger than `max_num_batched_tokens`
    /// is refused before (`SizesChoice::check`); here its sizes above are dropped, as vLLM
    /// drops them.
    pub fn new(choice: &SizesChoice, cfg: &EngineConfig, bytes_per_graph: u64) -> GraphPadding {
        let vllm_sizes = vllm_capture_sizes(cfg.max_num_seqs, cfg.max_num_batched_tokens);
        let vllm = CaptureSizes::new(vllm_sizes).expect("vLLM captures at least size 1");
        let sizes = match choice {
            SizesChoice::List(list) => {
                let fits = list
                    .iter()
                    .copied()
                    .filter(|&s| s <= cfg.max_num_batched_tokens);
                CaptureSizes::new(fits.collect()).unwrap_or_else(|| vllm.clone())
            }
            SizesChoice::Vllm | SizesChoice::Auto => vllm.clone(),
        };
        GraphPadding {
            choice: choice.clone(),
            histogram: vec![0; vllm.largest() as usize + 1],
            sizes,
            vllm,
            graph_steps: 0,
            eager_steps: 0,
            tokens: 0,
            padded_tokens: 0,
            max_num_seqs: cfg.max_num_seqs,
            buffers: BufferLimits {
                max_num_batched_tokens: cfg.max_num_batched_tokens,
                max_num_seqs: cfg.max_num_seqs,
                max_model_len: cfg.max_model_len,
                block_size: cfg.block_size as u64,
            },
            bytes_per_graph,
        }
    }

    /// A step that scheduled `tokens` (a step that scheduled none runs no forward pass).
    #[inline]
    pub fn observe(&mut self, tokens: u64) {
        if tokens == 0 {
            return;
        }
        self.tokens += tokens;
        if let Some(steps) = self.histogram.get_mut(tokens as usize) {
            *steps += 1;
        }
        match self.sizes.graph_size(tokens) {
            Some(size) => {
                self.graph_steps += 1;
                self.padded_tokens += size - tokens;
            }
            None => self.eager_steps += 1,
        }
    }

    /// (batch size, steps) of every batch size at most vLLM's largest that occurred.
    fn observed(&self) -> Vec<(u64, u64)> {
        let sizes = self.histogram.iter().enumerate().skip(1);
        sizes
            .filter(|&(_, &steps)| steps > 0)
            .map(|(tokens, &steps)| (tokens as u64, steps))
            .collect()
    }

    /// The report; for `auto`, the plan made from the run's batch sizes.
    pub fn report(&self) -> CudagraphReport {
        let histogram = self.observed();
        let vllm_padded = saturate(self.vllm.padded_tokens(&histogram));
        let (sizes, padded_tokens) = match self.choice {
            SizesChoice::Auto => {
                let plan = plan_sizes(&histogram, self.vllm.len(), self.vllm.largest());
                (plan.sizes, saturate(plan.padded_tokens))
            }
            _ => (self.sizes.clone(), self.padded_tokens),
        };
        let graphs = sizes.graphs_captured(self.max_num_seqs);
        let buffers = static_buffers(self.buffers);
        CudagraphReport {
            choice: self.choice.kind(),
            sizes: sizes.len() as u64,
            largest_size: sizes.largest(),
            capture_sizes: sizes.sizes().to_vec(),
            graph_steps: self.graph_steps,
            eager_steps: self.eager_steps,
            padded_tokens,
            padding_ratio: ratio(padded_tokens, self.tokens),
            vllm_padded_tokens: vllm_padded,
            buffer_bytes: buffers.device_bytes,
            buffer_pinned_host_bytes: buffers.pinned_host_bytes,
            graphs,
            graph_bytes: graphs.saturating_mul(self.bytes_per_graph),
        }
    }
}

fn saturate(n: u128) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// `num / den` to a millionth, for the report only.
fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        (num as u128 * 1_000_000 / den as u128) as f64 / 1e6
    }
}

/// CUDA graphs of a run, for the JSON report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CudagraphReport {
    /// `vllm`, `auto` or `list` (`--cudagraph-sizes`).
    pub choice: &'static str,
    /// How many sizes are captured, the largest, and the sizes.
    pub sizes: u64,
    pub largest_size: u64,
    pub capture_sizes: Vec<u64>,
    /// Steps run in a graph (batch at most the largest size) and eagerly.
    pub graph_steps: u64,
    pub eager_steps: u64,
    /// Dummy tokens the graph steps were padded with, and their ratio to the tokens scheduled.
    pub padded_tokens: u64,
    pub padding_ratio: f64,
    /// What vLLM's default sizes pad on the same steps.
    pub vllm_padded_tokens: u64,
    /// The static input buffers on the GPU (sized by max_num_batched_tokens and max_num_seqs,
    /// shared by every graph), and their pinned host mirrors.
    pub buffer_bytes: u64,
    pub buffer_pinned_host_bytes: u64,
    /// Graphs captured (FULL_AND_PIECEWISE: one piecewise graph per size, one full decode graph
    /// per size up to max_num_seqs) and their memory at the model profile's bytes per graph
    /// (counted in its activation reserve: the KV pool's size does not change).
    pub graphs: u64,
    pub graph_bytes: u64,
}

impl CudagraphReport {
    /// One line for the text report.
    pub fn summary(&self) -> String {
        use crate::report::human_bytes;
        use crate::serve::report::grouped;
        format!(
            "{} sizes up to {} ({}): {} padded tokens ({:.2}%; vLLM's sizes {}), {} steps in graphs, {} eager; buffers {} (+ {} pinned host), {} graphs {}",
            self.sizes,
            self.largest_size,
            self.choice,
            grouped(self.padded_tokens),
            self.padding_ratio * 100.0,
            grouped(self.vllm_padded_tokens),
            grouped(self.graph_steps),
            grouped(self.eager_steps),
            human_bytes(self.buffer_bytes),
            human_bytes(self.buffer_pinned_host_bytes),
            self.graphs,
            human_bytes(self.graph_bytes),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::cost::CostModel;
    use crate::serve::vllm::SchedulingPolicy;
    use crate::serve::EvictionKind;

    fn config(max_num_seqs: u64, max_num_batched_tokens: u64) -> EngineConfig {
        EngineConfig {
            num_gpu_blocks: 100,
            block_size: 16,
            max_num_seqs,
            max_num_batched_tokens,
            max_model_len: 1024,
            enable_prefix_caching: true,
            cost: CostModel::Fixed { step_us: 1 },
            eviction: EvictionKind::Lru,
            watermark_blocks: 0,
            policy: SchedulingPolicy::Fcfs,
            offload: None,
        }
    }

    #[test]
    fn steps_pad_to_the_next_size_and_large_ones_run_eagerly() {
        // vLLM's sizes for 8 sequences and 64 tokens: 1, 2, 4, 8, 16.
        let mut g = GraphPadding::new(&SizesChoice::Vllm, &config(8, 64), 1 << 20);
        for tokens in [0, 3, 8, 9, 17, 64] {
            g.observe(tokens);
        }
        let r = g.report();
        assert_eq!(r.capture_sizes, [1, 2, 4, 8, 16]);
        assert_eq!((r.graph_steps, r.eager_steps), (3, 2));
        // 3 pads to 4, 8 fits, 9 pads to 16.
        assert_eq!(r.padded_tokens, 8);
        assert_eq!(r.vllm_padded_tokens, r.padded_tokens);
        assert_eq!(r.padding_ratio, 0.079207, "8 of 101 tokens");
        // Piecewise graphs for all five sizes, full decode graphs for 1, 2, 4 and 8.
        assert_eq!((r.graphs, r.graph_bytes), (9, 9 << 20));
    }

    #[test]
    fn auto_plans_as_many_sizes_as_vllm_from_the_batches_seen() {
        let cfg = config(8, 64);
        let mut g = GraphPadding::new(&SizesChoice::Auto, &cfg, 0);
        for tokens in [3, 3, 5, 6, 7, 7, 40] {
            g.observe(tokens);
        }
        let r = g.report();
        assert_eq!(r.choice, "auto");
        assert_eq!(r.capture_sizes, [3, 5, 6, 7, 16]);
        assert_eq!(r.padded_tokens, 0);
        assert_eq!(r.vllm_padded_tokens, 1 + 1 + 3 + 2 + 1 + 1);
        assert_eq!(r.eager_steps, 1);
    }

    #[test]
    fn a_list_pads_to_its_own_sizes() {
        let list = SizesChoice::parse("4,32").unwrap();
        let mut g = GraphPadding::new(&list, &config(8, 64), 0);
        g.observe(5);
        g.observe(33);
        let r = g.report();
        assert_eq!((r.sizes, r.padded_tokens, r.eager_steps), (2, 27, 1));
        assert_eq!(
            r.vllm_padded_tokens, 3,
            "5 -> 8; 33 runs eagerly under vLLM's 16 too"
        );
    }
}
