//! CUDA-graph capture sizes: vLLM 0.33's default list against what vLLM's own function
//! computes, and the planner against brute force.

use gpumem_core::buffers::{plan_sizes, vllm_capture_sizes, CaptureSizes};
use proptest::prelude::*;

/// (max_num_seqs, max_num_batched_tokens, sizes), each list printed by vLLM 0.33.0's own
/// `VllmConfig._set_cudagraph_sizes` (`vllm/config/vllm.py` of the released wheel, the source
/// `../shared/conformance/vllm-oracle/setup.sh` unpacks), run on a stub config: no
/// speculative decoding, `performance_mode` balanced, cudagraph mode FULL_AND_PIECEWISE,
/// `max_cudagraph_capture_size` and `cudagraph_capture_sizes` unset, a platform that is not
/// data-center Blackwell. The script extracts the method with `ast` and executes it on a
/// `SimpleNamespace` standing for `self`.
fn vllms_own_lists() -> Vec<(u64, u64, Vec<u64>)> {
    let to_248 = |extra: &[u64]| {
        let mut v = vec![1, 2, 4];
        v.extend((8..=248).step_by(8));
        v.extend_from_slice(extra);
        v.sort_unstable();
        v
    };
    let mut cases = vec![
        (1, 1, vec![1]),
        (1, 2048, vec![1, 2]),
        (2, 8, vec![1, 2, 4]),
        (3, 5, vec![1, 2, 3, 4, 5]),
        (5, 6, vec![1, 2, 4, 5, 6]),
        (5, 64, vec![1, 2, 4, 5, 8]),
        (8, 64, vec![1, 2, 4, 8, 16]),
        (12, 64, vec![1, 2, 4, 8, 12, 16, 24]),
        (
            100,
            150,
            vec![
                1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 100, 104, 112, 120, 128,
                136, 144, 150,
            ],
        ),
        (
            64,
            4096,
            vec![
                1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128,
            ],
        ),
    ];
    // The longer lists: 1, 2, 4, multiples of 8 to 248, then what each case adds.
    let sixteens = |to: u64| (256..=to).step_by(16).collect::<Vec<u64>>();
    cases.push((127, 8192, to_248(&[127])));
    cases.push((128, 8192, to_248(&[256])));
    cases.push((200, 300, to_248(&[256, 272, 288, 300])));
    cases.push((255, 8192, to_248(&[&[255][..], &sixteens(496)].concat())));
    cases.push((256, 2048, to_248(&sixteens(512))));
    cases.push((256, 8192, to_248(&sixteens(512))));
    cases.push((300, 700, to_248(&[&[300][..], &sixteens(512)].concat())));
    cases.push((1024, 8192, to_248(&sixteens(512))));
    cases
}

#[test]
fn vllm_default_sizes_are_what_vllms_own_function_computes() {
    for (max_num_seqs, max_num_batched_tokens, want) in vllms_own_lists() {
        assert_eq!(
            vllm_capture_sizes(max_num_seqs, max_num_batched_tokens),
            want,
            "max_num_seqs {max_num_seqs}, max_num_batched_tokens {max_num_batched_tokens}"
        );
    }
    // vLLM's defaults on an H100 (1024 sequences, 8192 tokens): 51 sizes up to 512.
    let h100 = vllm_capture_sizes(1024, 8192);
    assert_eq!((h100.len(), h100[h100.len() - 1]), (51, 512));
}

/// Every set of at most `max_sizes` sizes from 1 to `largest` that contains `largest`.
fn every_plan(largest: u64, max_sizes: usize) -> Vec<Vec<u64>> {
    let below: Vec<u64> = (1..largest).collect();
    let mut plans = Vec::new();
    for mask in 0u32..(1 << below.len()) {
        if (mask.count_ones() as usize) < max_sizes {
            let mut sizes: Vec<u64> = below
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, &s)| s)
                .collect();
            sizes.push(largest);
            plans.push(sizes);
        }
    }
    plans
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// The planner's padding is the least over every admissible set of sizes, and its own
    /// sizes pad exactly what it says.
    #[test]
    fn the_plan_pads_as_little_as_the_best_of_every_set_of_sizes(
        largest in 1u64..=11,
        max_sizes in 1usize..=5,
        histogram in proptest::collection::vec((1u64..=14, 0u64..=20), 0..12),
    ) {
        let plan = plan_sizes(&histogram, max_sizes, largest);
        let sizes = plan.sizes.sizes();
        prop_assert!(sizes.len() <= max_sizes);
        prop_assert_eq!(plan.sizes.largest(), largest);
        prop_assert_eq!(plan.sizes.padded_tokens(&histogram), plan.padded_tokens);
        let brute = every_plan(largest, max_sizes)
            .into_iter()
            .map(|s| CaptureSizes::new(s).unwrap().padded_tokens(&histogram))
            .min()
            .unwrap();
        prop_assert_eq!(plan.padded_tokens, brute);
    }
}

#[test]
fn the_plan_beats_vllms_sizes_on_a_skewed_histogram() {
    // Decode batches of 9 to 15 requests: vLLM pads each to 16.
    let histogram: Vec<(u64, u64)> = (9..=15).map(|n| (n, 1000)).collect();
    let vllm = CaptureSizes::new(vllm_capture_sizes(1024, 8192)).unwrap();
    let plan = plan_sizes(&histogram, vllm.len(), vllm.largest());
    assert_eq!(vllm.padded_tokens(&histogram), (1..=7).sum::<u128>() * 1000);
    assert_eq!(plan.padded_tokens, 0);
    assert_eq!(plan.sizes.sizes(), [9, 10, 11, 12, 13, 14, 15, 512]);
}
