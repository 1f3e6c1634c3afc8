//! vLLM 0.33.0's `OffloadingConnectorScheduler` for one full-attention group
//! (`distributed/kv_transfer/kv_connector/v1/offloading/scheduler.py`): what the scheduler
//! asks of the CPU tier and the jobs it hands the worker.
//!
//! - At admission ([`lookup`](OffloadConnector::get_num_new_matched_tokens)): the chunks past
//!   the block-aligned GPU hit, consecutive hits up to the last prompt token; a chunk still
//!   being stored, a chunk another admission is loading, or the request's own unfinished jobs
//!   defer the request (`None`). Storing restarts at chunk 0 for the request.
//! - After its blocks are allocated ([`update_state_after_alloc`]): one load job for the hit
//!   chunks (pinned until it completes); storing resumes after them.
//! - Once per step ([`build_connector_meta`]): the store jobs — for each scheduled request in
//!   scheduling order, then each request finished since the last step, the complete chunks of
//!   its first `num_computed + scheduled` tokens (a finished one: `max(prompt, tokens - 1)`)
//!   not offered yet, capped at the prompt unless all tokens are offloaded, in one
//!   `prepare_store` — and the jobs to flush: stores of requests preempted in this step, and
//!   stores of finished requests whose GPU blocks were handed out again in this step.
//! - [`update_connector_output`]: completed jobs complete their stores and loads.
//!
//! Placed on an executor ([`place`](OffloadConnector::place)), the tier is one pinned-host
//! segment of `num_chunks × blocks_per_chunk` GPU blocks, and every job is carried out when it
//! is created, one `Transfer` per GPU block (its content is the block's prefix hash, so a
//! chunk's last block holds the chunk's key): a store copies GPU → CPU as soon as the step's
//! blocks are written; a load copies CPU → GPU at admission and, the first refused block on,
//! loads nothing (the request recomputes from there, and the refused chunk is dropped from the
//! tier when the load completes). A finished request's chunks that its next step may still
//! store are first copied to a staging segment, since their GPU blocks may be handed out and
//! rewritten before that step builds its jobs.
//!
//! [`update_state_after_alloc`]: OffloadConnector::update_state_after_alloc
//! [`build_connector_meta`]: OffloadConnector::build_connector_meta
//! [`update_connector_output`]: OffloadConnector::update_connector_output

use std::collections::HashMap;

use super::access::RequestAccess;
use super::manager::{CpuOffloadManager, LookupResult, TierEvents};
use super::OffloadConfig;
use crate::decision::{Decision, Loc, SegmentId};
use crate::executor::Executor;
use crate::kv::block::{cdiv, BlockId};
use crate::kv::hash::{BlockHash, HashKeyHasher};
use crate::kv::manager::{KvPlacement, PlaceError};
use crate::place::{Owner, Place, Tier};

/// A job's id: vLLM's counter, shared by loads and stores.
pub type JobId = u64;

/// A request as the connector knows it (its own numbering: a request's state may outlive its
/// engine slot while its jobs finish).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OffloadReqId(pub u32);

type KeySet = std::collections::HashSet<u64, std::hash::BuildHasherDefault<HashKeyHasher>>;

/// The tier's segment and block size on an executor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffloadPlacement {
    /// The tier's chunks: chunk slot `s`, block `i` of it at `(s × blocks_per_chunk + i) ×
    /// block_bytes`.
    pub segment: SegmentId,
    pub block_bytes: u64,
}

impl OffloadPlacement {
    /// The CPU tier on device 0's pinned host memory.
    pub const SEGMENT: SegmentId =
        SegmentId::new(Place::new(0, Tier::PinnedHost), Owner::KvOffload, 0);
}

/// A request scheduled in this step, as `build_connector_meta` reads it.
#[derive(Clone, Copy, Debug)]
pub struct ScheduledRequest<'a> {
    pub id: OffloadReqId,
    /// Computed tokens before this step's batch.
    pub num_computed: u64,
    pub num_scheduled: u64,
    pub num_tokens: u64,
    pub num_prompt: u64,
    pub hashes: &'a [BlockHash],
    /// Its whole GPU block table.
    pub blocks: &'a [BlockId],
}

/// A request that finished, as the connector keeps it until its last stores are issued.
#[derive(Clone, Debug, Default)]
pub struct FinishedRequest {
    pub hashes: Vec<BlockHash>,
    pub blocks: Vec<BlockId>,
    pub num_tokens: u64,
    pub num_prompt: u64,
}

/// What one step hands the worker (`OffloadingConnectorMetadata`), jobs in creation order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepJobs {
    /// (job, engine slot of the request, GPU blocks it fills).
    pub loads: Vec<(JobId, usize, u32)>,
    /// (job, GPU blocks it copies).
    pub stores: Vec<(JobId, u32)>,
    /// Store jobs to submit now and wait for.
    pub flush: Vec<JobId>,
}

/// The step log's four counters of one step (see the conformance README).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffloadStepCounts {
    /// Chunks in this step's store jobs.
    pub offload_stored: u64,
    /// Chunks in this step's load jobs.
    pub offload_loaded: u64,
    /// Chunks whose store completed in this step.
    pub cpu_stored: u64,
    /// Chunks evicted from the tier in this step.
    pub cpu_evicted: u64,
}

impl OffloadStepCounts {
    pub fn any(&self) -> bool {
        *self != OffloadStepCounts::default()
    }
}

/// A completed load, as the engine promotes its request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadDone {
    pub slot: usize,
    /// Tokens (GPU hit included) the load really delivered, when a copy was refused: the
    /// request recomputes from there.
    pub valid_tokens: Option<u64>,
}

#[derive(Clone, Debug)]
struct Job {
    req: OffloadReqId,
    store: bool,
    /// (key, slot) of each chunk.
    chunks: Vec<(u64, u32)>,
    /// A store's GPU source blocks (fenced once its request has finished).
    fence: Vec<BlockId>,
    /// The executor refused a store's copy: the chunks are dropped when it completes.
    failed: bool,
    /// A load whose copy was refused: tokens delivered and the chunk that proved wrong.
    refused: Option<(u64, (u64, u32))>,
}

#[derive(Clone, Debug, Default)]
struct ReqState {
    engine_slot: usize,
    next_stored: u32,
    num_local: u64,
    jobs: Vec<JobId>,
    access: RequestAccess,
    finished: Option<FinishedRequest>,
    /// A staging segment holding the finished request's chunks from `staged_from` on.
    staged: Option<(SegmentId, u32)>,
    finished_signaled: bool,
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct OffloadConnector {
    cfg: OffloadConfig,
    manager: CpuOffloadManager,
    reqs: Vec<Option<ReqState>>,
    free_ids: Vec<u32>,
    jobs: HashMap<JobId, Job, std::hash::BuildHasherDefault<HashKeyHasher>>,
    next_job: JobId,
    /// GPU block → store jobs of finished requests reading it (`_block_id_to_pending_jobs`).
    fences: HashMap<BlockId, Vec<JobId>>,
    /// Keys of the loads in flight (only with prefix caching, as vLLM keeps them).
    being_loaded: Option<KeySet>,
    /// Requests finished since the last `build_connector_meta`, in finish order.
    finished_queue: Vec<OffloadReqId>,
    /// This step's load jobs.
    step_loads: Vec<(JobId, usize, u32)>,
    /// GPU blocks allocated in this step: `allocated_stamp[b] == stamp`, and their list.
    allocated_stamp: Vec<u32>,
    allocated: Vec<BlockId>,
    stamp: u32,
    counts: OffloadStepCounts,
    totals: OffloadTotals,
    placement: Option<OffloadPlacement>,
    next_staging: u32,
}

/// Totals of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffloadTotals {
    pub offload_stored: u64,
    pub offload_loaded: u64,
    /// GPU blocks copied to / from the tier by the jobs issued.
    pub blocks_to_cpu: u64,
    pub blocks_from_cpu: u64,
    /// Loads whose copies the executor refused (the hit did not count).
    pub loads_refused: u64,
    pub stores_refused: u64,
}

impl OffloadConnector {
    /// A tier for a GPU pool of `num_gpu_blocks` blocks.
    pub fn new(cfg: OffloadConfig, num_gpu_blocks: u32) -> Self {
        assert!(cfg.num_chunks > 0 && cfg.blocks_per_chunk > 0 && cfg.block_size > 0);
        OffloadConnector {
            manager: CpuOffloadManager::new(cfg.num_chunks, cfg.policy),
            cfg,
            reqs: Vec::new(),
            free_ids: Vec::new(),
            jobs: HashMap::default(),
            next_job: 0,
            fences: HashMap::new(),
            being_loaded: cfg.prefix_caching.then(KeySet::default),
            finished_queue: Vec::new(),
            step_loads: Vec::new(),
            allocated_stamp: vec![0; num_gpu_blocks as usize],
            allocated: Vec::new(),
            stamp: 1,
            counts: OffloadStepCounts::default(),
            totals: OffloadTotals::default(),
            placement: None,
            next_staging: 1,
        }
    }

    pub fn config(&self) -> &OffloadConfig {
        &self.cfg
    }

    pub fn manager(&self) -> &CpuOffloadManager {
        &self.manager
    }

    pub fn totals(&self) -> OffloadTotals {
        self.totals
    }

    pub fn tier_totals(&self) -> TierEvents {
        self.manager.totals()
    }

    /// Bytes the tier needs on an executor with `block_bytes` per GPU block.
    pub fn tier_bytes(&self, block_bytes: u64) -> Option<u64> {
        (self.cfg.num_chunks as u64)
            .checked_mul(self.cfg.blocks_per_chunk as u64)?
            .checked_mul(block_bytes)
    }

    /// Carries the tier out on `exec`: reserves its segment now. Call it before any request.
    pub fn place(&mut self, block_bytes: u64, exec: &mut dyn Executor) -> Result<(), PlaceError> {
        assert!(self.placement.is_none(), "the CPU tier is already placed");
        let bytes = self.tier_bytes(block_bytes).ok_or(PlaceError::TooLarge)?;
        let segment = OffloadPlacement::SEGMENT;
        exec.apply(Decision::Reserve { segment, bytes })
            .map_err(|why| PlaceError::Refused { bytes, why })?;
        self.placement = Some(OffloadPlacement {
            segment,
            block_bytes,
        });
        Ok(())
    }

    /// Jobs issued and not yet completed (vLLM's `has_pending_push_work`): the engine keeps
    /// stepping while there are any.
    pub fn has_pending_jobs(&self) -> bool {
        !self.jobs.is_empty()
    }

    fn state(&mut self, id: OffloadReqId) -> &mut ReqState {
        self.reqs[id.0 as usize]
            .as_mut()
            .expect("a live offload request")
    }

    fn key(&self, hashes: &[BlockHash], idx: u32) -> u64 {
        hashes[((idx + 1) * self.cfg.blocks_per_chunk - 1) as usize].0
    }

    /// vLLM's `on_new_request`.
    pub fn on_new_request(&mut self, engine_slot: usize) -> OffloadReqId {
        let st = ReqState {
            engine_slot,
            ..ReqState::default()
        };
        match self.free_ids.pop() {
            Some(i) => {
                self.reqs[i as usize] = Some(st);
                OffloadReqId(i)
            }
            None => {
                self.reqs.push(Some(st));
                OffloadReqId(self.reqs.len() as u32 - 1)
            }
        }
    }

    /// vLLM's `get_num_new_matched_tokens` for a request with `num_tokens` tokens (full-block
    /// `hashes`) whose GPU hit is `local` tokens (block-aligned): tokens past it to load from
    /// the tier, or None to defer the request this step.
    pub fn get_num_new_matched_tokens(
        &mut self,
        id: OffloadReqId,
        hashes: &[BlockHash],
        num_tokens: u64,
        local: u64,
    ) -> Option<u64> {
        let st = self.state(id);
        // Restarting at token 0: every chunk is offered again.
        st.next_stored = 0;
        if !st.jobs.is_empty() {
            return None;
        }
        st.num_local = local;
        let tpc = self.cfg.tokens_per_chunk();
        let num_keys = (hashes.len() / self.cfg.blocks_per_chunk as usize) as u64;
        let mut max_hit = num_tokens.min(num_keys * tpc);
        if max_hit < local + tpc {
            return Some(0);
        }
        let start = local / tpc;
        let end = max_hit.div_ceil(tpc).min(num_keys);
        let (mut hits, mut pending) = (0u64, false);
        for idx in start..end {
            match self.manager.lookup(self.key(hashes, idx as u32)) {
                LookupResult::Miss => break,
                LookupResult::Hit => hits += 1,
                LookupResult::HitPending => {
                    hits += 1;
                    pending = true;
                }
            }
        }
        if hits == 0 {
            return Some(0);
        }
        if pending {
            return None;
        }
        max_hit = max_hit.min(tpc * (start + hits));
        let new = max_hit - local;
        if new < tpc {
            return Some(0);
        }
        if let Some(loading) = self.being_loaded.as_ref().filter(|s| !s.is_empty()) {
            let last = (local + new).div_ceil(tpc);
            if (start..last).any(|i| loading.contains(&self.key(hashes, i as u32))) {
                return None;
            }
        }
        Some(new)
    }

    /// GPU blocks handed out in this step (a running request's new ones; an admission's whole
    /// table is noted by [`update_state_after_alloc`](Self::update_state_after_alloc)).
    pub fn note_allocated(&mut self, blocks: &[BlockId]) {
        for &b in blocks {
            if b != 0 && self.allocated_stamp[b as usize] != self.stamp {
                self.allocated_stamp[b as usize] = self.stamp;
                self.allocated.push(b);
            }
        }
    }

    fn allocated_now(&self, b: BlockId) -> bool {
        self.allocated_stamp[b as usize] == self.stamp
    }

    /// vLLM's `update_state_after_alloc`: after an admission allocated `blocks` (its whole
    /// table) with `external` tokens to load past its GPU hit, creates the load job (and,
    /// placed, copies the chunks into the blocks).
    pub fn update_state_after_alloc(
        &mut self,
        id: OffloadReqId,
        hashes: &[BlockHash],
        blocks: &[BlockId],
        external: u64,
        gpu: Option<(KvPlacement, &mut dyn Executor)>,
    ) {
        self.note_allocated(blocks);
        if external == 0 {
            return;
        }
        let (bs, bpc, tpc) = (
            self.cfg.block_size as u64,
            self.cfg.blocks_per_chunk as u64,
            self.cfg.tokens_per_chunk(),
        );
        let local = self.state(id).num_local;
        let cached = local + external;
        let num_gpu_blocks = cdiv(cached, bs);
        let load_start = cdiv(local, bs);
        let (first, end) = (load_start / bpc, cdiv(cached, tpc));
        let keys: Vec<(u32, u64)> = (first..end)
            .map(|i| (i as u32, self.key(hashes, i as u32)))
            .collect();
        let st = self.reqs[id.0 as usize]
            .as_mut()
            .expect("a live offload request");
        st.next_stored = end as u32;
        let slots = self.manager.prepare_load(&mut st.access, &keys);
        let job_id = self.next_job;
        self.next_job += 1;
        st.jobs.push(job_id);
        let engine_slot = st.engine_slot;
        let chunks: Vec<(u64, u32)> = keys.iter().map(|&(_, k)| k).zip(slots).collect();
        if let Some(loading) = self.being_loaded.as_mut() {
            loading.extend(chunks.iter().map(|&(k, _)| k));
        }
        let gpu_blocks = (num_gpu_blocks - load_start) as u32;
        let mut job = Job {
            req: id,
            store: false,
            chunks,
            fence: Vec::new(),
            failed: false,
            refused: None,
        };
        if let (Some(cpu), Some((gpu, exec))) = (self.placement, gpu) {
            for b in load_start..num_gpu_blocks {
                let (chunk, within) = (b / bpc - first, b % bpc);
                let (key, slot) = job.chunks[chunk as usize];
                let copy = Decision::Transfer {
                    from: cpu_loc(cpu, bpc, slot, within),
                    to: gpu_loc(gpu, blocks[b as usize]),
                    bytes: cpu.block_bytes,
                    content: hashes[b as usize].0,
                };
                if exec.apply(copy).is_err() {
                    job.refused = Some((b * bs, (key, slot)));
                    self.totals.loads_refused += 1;
                    break;
                }
            }
        }
        self.jobs.insert(job_id, job);
        self.step_loads.push((job_id, engine_slot, gpu_blocks));
        self.counts.offload_loaded += keys.len() as u64;
        self.totals.offload_loaded += keys.len() as u64;
        self.totals.blocks_from_cpu += gpu_blocks as u64;
    }

    /// vLLM's `request_finished`, before the request's blocks go back to the pool: it keeps
    /// what its last stores need, and fences the GPU blocks of its stores in flight.
    pub fn request_finished(
        &mut self,
        id: OffloadReqId,
        fin: FinishedRequest,
        gpu: Option<(KvPlacement, &mut dyn Executor)>,
    ) {
        let jobs = self.state(id).jobs.clone();
        for job in jobs {
            let fence = self.jobs[&job].fence.clone();
            for b in fence {
                add_fence(&mut self.fences, b, job);
            }
        }
        if let (Some(cpu), Some((gpu, exec))) = (self.placement, gpu) {
            self.stage(id, &fin, cpu, gpu, exec);
        }
        self.state(id).finished = Some(fin);
        self.finished_queue.push(id);
    }

    /// Copies the chunks a finished request's next step may still store into a staging
    /// segment (rarely any: only chunks whose earlier offers found no room).
    fn stage(
        &mut self,
        id: OffloadReqId,
        fin: &FinishedRequest,
        cpu: OffloadPlacement,
        gpu: KvPlacement,
        exec: &mut dyn Executor,
    ) {
        let (from, to) = (self.state(id).next_stored, self.storable_chunks(fin, true));
        if to <= from {
            return;
        }
        let bpc = self.cfg.blocks_per_chunk as u64;
        let blocks = (to - from) as u64 * bpc;
        let segment = SegmentId::new(cpu.segment.place, Owner::KvOffload, self.next_staging);
        self.next_staging += 1;
        let bytes = blocks * cpu.block_bytes;
        if exec.apply(Decision::Reserve { segment, bytes }).is_err() {
            // Unstaged, the store reads the GPU blocks; a rewritten one refuses the copy.
            return;
        }
        for i in 0..blocks {
            let b = from as u64 * bpc + i;
            let copy = Decision::Transfer {
                from: gpu_loc(gpu, fin.blocks[b as usize]),
                to: Loc {
                    segment,
                    offset: i * cpu.block_bytes,
                },
                bytes: cpu.block_bytes,
                content: fin.hashes[b as usize].0,
            };
            // A refused staging copy is found again by the store that reads it.
            let _ = exec.apply(copy);
        }
        self.state(id).staged = Some((segment, from));
    }

    /// Chunks of a request eligible for storing: complete chunks of its offloadable tokens that
    /// it has blocks and keys for.
    fn storable_chunks(&self, fin: &FinishedRequest, finished: bool) -> u32 {
        let t = if finished {
            fin.num_prompt.max(fin.num_tokens.saturating_sub(1))
        } else {
            fin.num_tokens
        };
        self.storable(
            t,
            fin.num_tokens,
            fin.num_prompt,
            fin.blocks.len(),
            fin.hashes.len(),
        )
    }

    fn storable(
        &self,
        t: u64,
        num_tokens: u64,
        num_prompt: u64,
        blocks: usize,
        hashes: usize,
    ) -> u32 {
        let mut offloadable = t.min(num_tokens);
        if self.cfg.prompt_only {
            offloadable = offloadable.min(num_prompt);
        }
        let bpc = self.cfg.blocks_per_chunk as u64;
        (offloadable / self.cfg.tokens_per_chunk())
            .min(blocks as u64 / bpc)
            .min(hashes as u64 / bpc) as u32
    }

    /// vLLM's `build_connector_meta`, after `schedule()` picked `scheduled` (in order) and
    /// preempted `preempted`: this step's store jobs, the loads created during scheduling, and
    /// the jobs to flush. Placed, the stores are copied now.
    pub fn build_connector_meta(
        &mut self,
        scheduled: &[ScheduledRequest<'_>],
        preempted: &[OffloadReqId],
        mut gpu: Option<(KvPlacement, &mut dyn Executor)>,
    ) -> StepJobs {
        let mut flush: Vec<JobId> = Vec::new();
        for &id in preempted {
            let loads = &self.step_loads;
            let st = self.reqs[id.0 as usize]
                .as_ref()
                .expect("a live offload request");
            flush.extend(st.jobs.iter().filter(|j| !loads.iter().any(|l| l.0 == **j)));
        }
        if !self.fences.is_empty() {
            for &b in &self.allocated {
                if let Some(jobs) = self.fences.get(&b) {
                    flush.extend(jobs);
                }
            }
        }
        let mut stores = Vec::new();
        for r in scheduled {
            let t = r.num_computed + r.num_scheduled;
            let to = self.storable(
                t,
                r.num_tokens,
                r.num_prompt,
                r.blocks.len(),
                r.hashes.len(),
            );
            let src = Source {
                hashes: r.hashes,
                blocks: r.blocks,
                staged: None,
            };
            let exec = gpu.as_mut().map(|(p, e)| (*p, &mut **e));
            self.store_job(r.id, to, src, false, exec, &mut stores, &mut flush);
        }
        let finished = std::mem::take(&mut self.finished_queue);
        for &id in &finished {
            let st = self.reqs[id.0 as usize]
                .as_mut()
                .expect("a live offload request");
            let fin = st.finished.take().expect("a finished request's record");
            let staged = st.staged.take();
            let to = self.storable_chunks(&fin, true);
            let src = Source {
                hashes: &fin.hashes,
                blocks: &fin.blocks,
                staged,
            };
            let exec = gpu.as_mut().map(|(p, e)| (*p, &mut **e));
            self.store_job(id, to, src, true, exec, &mut stores, &mut flush);
            if let (Some((segment, _)), Some((_, exec))) = (staged, gpu.as_mut()) {
                exec.apply(Decision::Release { segment })
                    .expect("a staging segment is released");
            }
            let st = self.reqs[id.0 as usize]
                .as_mut()
                .expect("a live offload request");
            st.finished = Some(fin);
        }
        for &id in &finished {
            let bpc = self.cfg.blocks_per_chunk as usize;
            let st = self.reqs[id.0 as usize]
                .as_mut()
                .expect("a live offload request");
            st.finished_signaled = true;
            let hashes = &st.finished.as_ref().expect("a finished record").hashes;
            self.manager
                .on_request_finished(&mut st.access, &|i| hashes[(i as usize + 1) * bpc - 1].0);
            if st.jobs.is_empty() {
                self.release(id);
            }
        }
        flush.sort_unstable();
        flush.dedup();
        let loads = std::mem::take(&mut self.step_loads);
        self.allocated.clear();
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            self.allocated_stamp.fill(0);
            self.stamp = 1;
        }
        StepJobs {
            loads,
            stores,
            flush,
        }
    }

    /// The store job of one request for its chunks `next_stored..to`, if `prepare_store`
    /// takes any (vLLM's `_build_store_jobs` for one request).
    #[allow(clippy::too_many_arguments)]
    fn store_job<'x>(
        &mut self,
        id: OffloadReqId,
        to: u32,
        src: Source<'_>,
        finished: bool,
        gpu: Option<(KvPlacement, &mut (dyn Executor + 'x))>,
        stores: &mut Vec<(JobId, u32)>,
        flush: &mut Vec<JobId>,
    ) {
        let bpc = self.cfg.blocks_per_chunk;
        let from = self.state(id).next_stored;
        if to <= from {
            return;
        }
        let offer: Vec<(u32, u64)> = (from..to).map(|i| (i, self.key(src.hashes, i))).collect();
        let st = self.reqs[id.0 as usize]
            .as_mut()
            .expect("a live offload request");
        let Some(out) = self.manager.prepare_store(&mut st.access, &offer) else {
            return; // offered again next step
        };
        st.next_stored = st.next_stored.max(to);
        if out.stored.is_empty() {
            return;
        }
        let job_id = self.next_job;
        self.next_job += 1;
        st.jobs.push(job_id);
        let mut fence = Vec::with_capacity(out.stored.len() * bpc as usize);
        for &(idx, _) in &out.stored {
            let b = (idx * bpc) as usize;
            fence.extend_from_slice(&src.blocks[b..b + bpc as usize]);
        }
        let chunks: Vec<(u64, u32)> = out
            .stored
            .iter()
            .map(|&(idx, slot)| (self.key(src.hashes, idx), slot))
            .collect();
        let mut job = Job {
            req: id,
            store: true,
            chunks,
            fence,
            failed: false,
            refused: None,
        };
        if finished {
            for &b in &job.fence {
                add_fence(&mut self.fences, b, job_id);
            }
            if job.fence.iter().any(|&b| self.allocated_now(b)) {
                flush.push(job_id);
            }
        }
        if let (Some(cpu), Some((gpu, exec))) = (self.placement, gpu) {
            job.failed = !self.copy_store(&out.stored, &src, cpu, gpu, exec);
            self.totals.stores_refused += job.failed as u64;
        }
        let n = out.stored.len() as u64;
        let blocks = job.fence.len() as u32;
        self.jobs.insert(job_id, job);
        stores.push((job_id, blocks));
        self.counts.offload_stored += n;
        self.totals.offload_stored += n;
        self.totals.blocks_to_cpu += blocks as u64;
    }

    /// Copies a store's chunks into their slots, block by block; false if a copy was refused
    /// (the rest is not copied).
    fn copy_store(
        &self,
        stored: &[(u32, u32)],
        src: &Source<'_>,
        cpu: OffloadPlacement,
        gpu: KvPlacement,
        exec: &mut dyn Executor,
    ) -> bool {
        let bpc = self.cfg.blocks_per_chunk as u64;
        for &(idx, slot) in stored {
            for within in 0..bpc {
                let b = idx as u64 * bpc + within;
                let from = match src.staged {
                    Some((segment, first)) if idx >= first => Loc {
                        segment,
                        offset: (b - first as u64 * bpc) * cpu.block_bytes,
                    },
                    _ => gpu_loc(gpu, src.blocks[b as usize]),
                };
                let copy = Decision::Transfer {
                    from,
                    to: cpu_loc(cpu, bpc, slot, within),
                    bytes: cpu.block_bytes,
                    content: src.hashes[b as usize].0,
                };
                if exec.apply(copy).is_err() {
                    return false;
                }
            }
        }
        true
    }

    /// vLLM's `update_connector_output`: the jobs the worker reported complete, in its order.
    /// Returns the completed loads.
    pub fn update_connector_output(&mut self, completed: &[JobId]) -> Vec<LoadDone> {
        let mut loads = Vec::new();
        for id in completed {
            let job = self.jobs.remove(id).expect("a completed job was issued");
            if job.store {
                self.manager.complete_store(&job.chunks, !job.failed);
            } else {
                let slots: Vec<u32> = job.chunks.iter().map(|&(_, s)| s).collect();
                self.manager.complete_load(&slots);
                if let Some(loading) = self.being_loaded.as_mut() {
                    for (k, _) in &job.chunks {
                        loading.remove(k);
                    }
                }
                if let Some((_, (key, slot))) = job.refused {
                    self.manager.drop_chunk(key, slot);
                }
            }
            let st = self.state(job.req);
            if !job.store {
                loads.push(LoadDone {
                    slot: st.engine_slot,
                    valid_tokens: job.refused.map(|(t, _)| t),
                });
            }
            let finished = st.finished_signaled || st.finished.is_some();
            st.jobs.retain(|j| j != id);
            let release = st.finished_signaled && st.jobs.is_empty();
            if finished && !self.fences.is_empty() {
                for b in &job.fence {
                    remove_fence(&mut self.fences, *b, *id);
                }
            }
            if release {
                self.release(job.req);
            }
        }
        loads
    }

    fn release(&mut self, id: OffloadReqId) {
        self.reqs[id.0 as usize] = None;
        self.free_ids.push(id.0);
    }

    /// The step's counters; the CPU tier's events since the last call are included.
    pub fn take_step_counts(&mut self) -> OffloadStepCounts {
        let ev = self.manager.take_events();
        let mut c = std::mem::take(&mut self.counts);
        c.cpu_stored = ev.stored;
        c.cpu_evicted = ev.evicted;
        c
    }

    /// Requests the connector still tracks (finished ones whose jobs are in flight included).
    pub fn live_requests(&self) -> usize {
        self.reqs.len() - self.free_ids.len()
    }

    /// The manager's full walk, and every job and fence names a live request and job.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.manager.check_invariants()?;
        for (id, job) in &self.jobs {
            let st = self.reqs.get(job.req.0 as usize).and_then(Option::as_ref);
            match st {
                Some(st) if st.jobs.contains(id) => {}
                _ => return Err(format!("offload job {id} belongs to no live request")),
            }
        }
        for (i, st) in self.reqs.iter().enumerate() {
            let Some(st) = st else { continue };
            if st.jobs.iter().any(|j| !self.jobs.contains_key(j)) {
                return Err(format!("offload request {i} names a job that is gone"));
            }
            let loads = st.jobs.iter().filter(|j| !self.jobs[j].store).count();
            if loads > 1 || (loads == 1 && st.jobs.len() > 1) {
                return Err(format!("offload request {i} has a load beside other jobs"));
            }
        }
        for (b, jobs) in &self.fences {
            if jobs.iter().any(|j| !self.jobs.contains_key(j)) {
                return Err(format!("GPU block {b} is fenced by a job that is gone"));
            }
        }
        Ok(())
    }
}

/// Where a store's blocks come from.
struct Source<'a> {
    hashes: &'a [BlockHash],
    blocks: &'a [BlockId],
    /// A staging segment holding chunks from this index on.
    staged: Option<(SegmentId, u32)>,
}

fn add_fence(fences: &mut HashMap<BlockId, Vec<JobId>>, b: BlockId, job: JobId) {
    let jobs = fences.entry(b).or_default();
    if !jobs.contains(&job) {
        jobs.push(job);
    }
}

fn remove_fence(fences: &mut HashMap<BlockId, Vec<JobId>>, b: BlockId, job: JobId) {
    if let Some(jobs) = fences.get_mut(&b) {
        jobs.retain(|&j| j != job);
        if jobs.is_empty() {
            fences.remove(&b);
        }
    }
}

fn gpu_loc(gpu: KvPlacement, block: BlockId) -> Loc {
    Loc {
        segment: gpu.segment,
        offset: block as u64 * gpu.block_bytes,
    }
}

fn cpu_loc(cpu: OffloadPlacement, bpc: u64, slot: u32, within: u64) -> Loc {
    Loc {
        segment: cpu.segment,
        offset: (slot as u64 * bpc + within) * cpu.block_bytes,
    }
}
