//! Property tests run against every strategy: one body, every allocator.

use gpumem_core::alloc::{
    build, AllocConfig, AllocRequest, Allocator, Strategy as AllocStrategy, MIB,
};
use gpumem_core::books::Books;
use gpumem_core::decision::{AllocId, Decision, Refusal};
use gpumem_core::digest::Digest;
use gpumem_core::executor::Executor;
use proptest::prelude::*;

/// Books that also remember every decision and its outcome.
#[derive(Clone)]
struct Recorder {
    books: Books,
    digest: Digest,
    log: Vec<(Decision, Result<(), Refusal>)>,
}

impl Executor for Recorder {
    fn apply(&mut self, d: Decision) -> Result<(), Refusal> {
        let outcome = self.books.apply(d);
        self.digest.decision(&d, outcome);
        self.log.push((d, outcome));
        outcome
    }
    fn books(&self) -> &Books {
        &self.books
    }
    fn digest(&self) -> &Digest {
        &self.digest
    }
}

#[derive(Clone, Debug)]
enum Op {
    Alloc {
        bytes: u64,
        stream: u32,
        pinned: bool,
    },
    /// Frees the live allocation at this index (mod the number live).
    Free(usize),
    EmptyCache,
    Compact,
}

fn op() -> impl Strategy<Value = Op> {
    let bytes = prop_oneof![
        4 => 1u64..4096,
        4 => 4096u64..(2 * MIB),
        2 => (2 * MIB)..(24 * MIB),
        1 => (24 * MIB)..(96 * MIB),
    ];
    prop_oneof![
        10 => (bytes, 0u32..2, proptest::bool::weighted(0.1))
            .prop_map(|(bytes, stream, pinned)| Op::Alloc { bytes, stream, pinned }),
        8 => any::<usize>().prop_map(Op::Free),
        1 => Just(Op::EmptyCache),
        1 => Just(Op::Compact),
    ]
}

fn config() -> AllocConfig {
    AllocConfig {
        capacity_bytes: 512 * MIB,
        alignment_bytes: 512,
        page_bytes: 2 * MIB,
    }
}

struct Run {
    alloc: Box<dyn Allocator>,
    mem: Recorder,
    live: Vec<(AllocId, u64)>,
    next_id: u64,
}

impl Run {
    fn new(strategy: AllocStrategy) -> Run {
        let config = config();
        Run {
            alloc: build(strategy, &config),
            mem: Recorder {
                books: Books::new(config.capacity_bytes),
                digest: Digest::new(),
                log: Vec::new(),
            },
            live: Vec::new(),
            next_id: 0,
        }
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Alloc {
                bytes,
                stream,
                pinned,
            } => {
                let id = AllocId(self.next_id);
                self.next_id += 1;
                let req = AllocRequest {
                    id,
                    bytes,
                    stream,
                    pinned,
                };
                if self.alloc.alloc(req, &mut self.mem).is_ok() {
                    self.live.push((id, bytes));
                }
            }
            Op::Free(i) if !self.live.is_empty() => {
                let (id, _) = self.live.swap_remove(i % self.live.len());
                self.alloc.free(id, &mut self.mem);
            }
            Op::Free(_) => {}
            Op::EmptyCache => self.alloc.empty_cache(&mut self.mem),
            Op::Compact => {
                if let Some(c) = self.alloc.compact(&mut self.mem) {
                    assert!(c.largest_free_bytes_after >= c.largest_free_bytes_before);
                }
            }
        }
    }

    /// Everything that must hold after any operation.
    fn check(&self) -> Result<(), TestCaseError> {
        let name = self.alloc.strategy().name();
        self.alloc
            .check_invariants()
            .map_err(|e| TestCaseError::fail(format!("{name}: {e}")))?;
        let books = &self.mem.books;
        let blocks = self.alloc.live_blocks();
        prop_assert_eq!(blocks.len() as u64, books.live_count);
        for pair in blocks.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            prop_assert!(a.at < b.at, "{}: blocks not in address order", name);
            if a.at.segment == b.at.segment {
                prop_assert!(a.at.offset + a.bytes <= b.at.offset, "{}: overlap", name);
            }
        }
        for b in &blocks {
            prop_assert_eq!(books.location(b.id), Some((b.at, b.bytes)));
            prop_assert!(b.bytes >= b.requested_bytes);
            prop_assert_eq!(b.at.offset % 512, 0, "{}: misaligned", name);
            let seg = books.segment_bytes(b.at.segment).expect("segment exists");
            prop_assert!(b.at.offset + b.bytes <= seg);
        }
        prop_assert_eq!(
            self.alloc.reserved_bytes(),
            books.reserved_bytes(),
            "{}",
            name
        );
        let free = self.alloc.free_summary();
        prop_assert_eq!(
            books.allocated_bytes + free.free_bytes(),
            books.reserved_bytes(),
            "{}: allocated + free != reserved",
            name
        );
        let frag = free.external_fragmentation();
        prop_assert!((0.0..=1.0).contains(&frag));
        Ok(())
    }
}

fn strategies() -> impl Strategy<Value = AllocStrategy> {
    proptest::sample::select(AllocStrategy::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_after_every_operation(
        strategy in strategies(),
        ops in proptest::collection::vec(op(), 1..300),
    ) {
        let mut run = Run::new(strategy);
        for op in &ops {
            run.step(op);
            run.check()?;
        }
    }

    #[test]
    fn freeing_everything_restores_the_initial_state(
        strategy in strategies(),
        ops in proptest::collection::vec(op(), 1..200),
    ) {
        let mut run = Run::new(strategy);
        for op in &ops {
            run.step(op);
        }
        while let Some((id, _)) = run.live.pop() {
            run.alloc.free(id, &mut run.mem);
        }
        run.check()?;
        prop_assert_eq!(run.mem.books.allocated_bytes, 0);
        let free = run.alloc.free_summary();
        if !strategy.is_caching() {
            // One maximal extent: nothing left of any earlier layout.
            prop_assert_eq!(free.external_fragmentation(), 0.0, "{}", strategy.name());
            let layout = run.alloc.layout();
            prop_assert!(layout.iter().all(|s| s.blocks.len() == 1 && !s.blocks[0].1));
        }
        run.alloc.empty_cache(&mut run.mem);
        prop_assert_eq!(run.mem.books.reserved_bytes(), 0, "{}", strategy.name());
        prop_assert_eq!(run.alloc.reserved_bytes(), 0);
        // Fresh and emptied allocators now answer the same request at the same place.
        let mut fresh = Run::new(strategy);
        let probe = AllocRequest { id: AllocId(run.next_id), bytes: 3 * MIB, stream: 0, pinned: false };
        let a = run.alloc.alloc(probe, &mut run.mem);
        let b = fresh.alloc.alloc(probe, &mut fresh.mem);
        if !strategy.is_caching() {
            prop_assert_eq!(a.map(|l| l.offset), b.map(|l| l.offset));
        } else {
            prop_assert_eq!(a.is_ok(), b.is_ok());
        }
    }

    #[test]
    fn a_run_resumed_from_a_snapshot_ends_identical(
        strategy in strategies(),
        ops in proptest::collection::vec(op(), 2..200),
        cut in any::<proptest::sample::Index>(),
    ) {
        let cut = cut.index(ops.len());
        let mut run = Run::new(strategy);
        for op in &ops[..cut] {
            run.step(op);
        }
        let json = serde_json::to_string(&run.alloc.snapshot()).expect("snapshot serializes");
        let state: gpumem_core::alloc::AllocatorState =
            serde_json::from_str(&json).expect("snapshot deserializes");
        let mut resumed = Run {
            alloc: state.restore(),
            mem: run.mem.clone(),
            live: run.live.clone(),
            next_id: run.next_id,
        };
        for op in &ops[cut..] {
            run.step(op);
            resumed.step(op);
        }
        prop_assert_eq!(&run.mem.log, &resumed.mem.log);
        prop_assert_eq!(run.alloc.snapshot(), resumed.alloc.snapshot());
    }
}

#[test]
fn a_request_larger_than_capacity_is_refused_not_a_panic() {
    for strategy in AllocStrategy::ALL {
        let mut run = Run::new(strategy);
        for bytes in [u64::MAX, u64::MAX - 511, 1 << 62, 600 * MIB] {
            let id = AllocId(run.next_id);
            run.next_id += 1;
            let req = AllocRequest {
                id,
                bytes,
                stream: 0,
                pinned: false,
            };
            assert!(
                run.alloc.alloc(req, &mut run.mem).is_err(),
                "{}",
                strategy.name()
            );
        }
        run.check().unwrap();
    }
}
