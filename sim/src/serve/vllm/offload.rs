//! The CPU tier inside the `vllm-0.33` engine: its configuration, and the worker side of
//! vLLM's `OffloadingConnector` in one engine step over a simulated copy engine.
//!
//! The worker, in `GPUModelRunner.execute_model` order: `handle_preemptions` submits the stores
//! deferred from the last step and this step's flushed ones, then waits for the flushed;
//! `start_load_kv` submits this step's loads; `wait_for_save` defers this step's other stores
//! to the next step's start; `get_finished` reports the jobs done. The copy engine runs one
//! queue per direction and reports each in submission order (a job only after the ones before
//! it), stores before loads:
//! - on the conformance clock ([`TransferTiming::Steps`]), a job submitted at engine step `s`
//!   is done at step `s + K`, a waited-for one at once (vLLM's oracle, `FakeTransferEngine`);
//! - with a link ([`TransferTiming::Link`]), each direction copies one job at a time: a job
//!   starts when it is submitted or when the job before it ends, and takes the link's time for
//!   its bytes (`Link::transfer_ns`, one latency per job). A step submits at its start; a wait
//!   holds the step's forward pass until the flushed jobs end; `get_finished` reports the jobs
//!   ended by the time the forward pass starts — so a job completes in the first step that
//!   starts (its forward pass, after any wait) at or after its modelled end. A step that has
//!   nothing to compute takes no time, and the driver moves the clock to the next job's end.

use std::collections::VecDeque;

use gpumem_core::kv::offload::{JobId, OffloadPolicyKind, StepJobs};
use gpumem_core::link::Link;
use serde::{Deserialize, Serialize};

use super::super::ServeError;

/// How long a job takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferTiming {
    /// `K` engine steps (the conformance clock's `offload_latency_steps`).
    Steps { latency: u64 },
    /// The host link's time for the job's bytes (`block_bytes` per GPU block).
    Link { link: Link, block_bytes: u64 },
}

/// The CPU tier of a run (vLLM's `--kv-offloading-size … --kv-offloading-backend native`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffloadEngineConfig {
    /// CPU blocks (chunks) in the tier.
    pub cpu_blocks: u32,
    /// Tokens per CPU block: a multiple of the GPU block size.
    pub block_size: u32,
    pub policy: OffloadPolicyKind,
    /// Only prompt tokens are offloaded (vLLM's default).
    pub prompt_only: bool,
    pub timing: TransferTiming,
}

impl OffloadEngineConfig {
    /// vLLM's start-up checks (the oracle's messages) for a GPU block of `gpu_block_size`
    /// tokens.
    pub fn check(&self, gpu_block_size: u32) -> Result<(), ServeError> {
        if self.cpu_blocks == 0 || self.block_size == 0 {
            return Err(ServeError::Input(
                "offload_cpu_blocks and offload_block_size must be positive".into(),
            ));
        }
        if gpu_block_size > 0 && !self.block_size.is_multiple_of(gpu_block_size) {
            return Err(ServeError::Input(format!(
                "offload_block_size {} is not a multiple of block_size {gpu_block_size}: vLLM's OffloadingConnector rejects this (kv_connector_extra_config 'block_size' must be a multiple of the GPU KV cache block size)",
                self.block_size
            )));
        }
        if let TransferTiming::Link { block_bytes: 0, .. } = self.timing {
            return Err(ServeError::Input(
                "the CPU tier's link timing needs the bytes of a KV block".into(),
            ));
        }
        Ok(())
    }
}

const STORE: usize = 0;
const LOAD: usize = 1;

/// The simulated copy engine: per direction, the jobs submitted and not yet reported, in
/// submission order, each with when it is done (an engine step, or a time in ns).
#[derive(Debug)]
struct CopyEngine {
    timing: TransferTiming,
    queues: [VecDeque<(JobId, u64)>; 2],
    /// With a link: when each direction's last job ends.
    busy_until: [u64; 2],
}

impl CopyEngine {
    fn submit(&mut self, dir: usize, job: JobId, blocks: u32, step: u64, now_ns: u64) {
        let done = match self.timing {
            TransferTiming::Steps { latency } => step.saturating_add(latency),
            TransferTiming::Link { link, block_bytes } => {
                let start = now_ns.max(self.busy_until[dir]);
                let end = start
                    .saturating_add(link.transfer_ns(block_bytes.saturating_mul(blocks as u64)));
                self.busy_until[dir] = end;
                end
            }
        };
        self.queues[dir].push_back((job, done));
    }

    /// `wait(jobs)`: on the step clock the jobs are done now; with a link the step waits for
    /// them. Returns when the wait ends (ns).
    fn wait(&mut self, jobs: &[JobId], step: u64, now_ns: u64) -> u64 {
        let mut until = now_ns;
        for q in &mut self.queues {
            for (job, done) in q.iter_mut() {
                if jobs.binary_search(job).is_ok() {
                    match self.timing {
                        TransferTiming::Steps { .. } => *done = (*done).min(step),
                        TransferTiming::Link { .. } => until = until.max(*done),
                    }
                }
            }
        }
        until
    }

    /// `get_finished`: each direction's done jobs from its head, stores first.
    fn finished(&mut self, step: u64, now_ns: u64, out: &mut Vec<JobId>) {
        let now = match self.timing {
            TransferTiming::Steps { .. } => step,
            TransferTiming::Link { .. } => now_ns,
        };
        for q in &mut self.queues {
            while let Some(&(job, done)) = q.front() {
                if done > now {
                    break;
                }
                out.push(job);
                q.pop_front();
            }
        }
    }

    /// When the next job ends (a link only).
    fn next_done_ns(&self) -> Option<u64> {
        match self.timing {
            TransferTiming::Steps { .. } => None,
            TransferTiming::Link { .. } => self
                .queues
                .iter()
                .filter_map(|q| q.front().map(|&(_, done)| done))
                .min(),
        }
    }
}

/// The worker side of the connector, over the copy engine.
#[derive(Debug)]
pub(super) struct Worker {
    /// Stores deferred to the next step's start: (job, GPU blocks).
    unsubmitted: Vec<(JobId, u32)>,
    engine: CopyEngine,
}

impl Worker {
    pub fn new(timing: TransferTiming) -> Self {
        Worker {
            unsubmitted: Vec::new(),
            engine: CopyEngine {
                timing,
                queues: [VecDeque::new(), VecDeque::new()],
                busy_until: [0; 2],
            },
        }
    }

    /// One step's worker phase at engine step `step`, starting at `now_ns`. Fills `done` with
    /// the jobs reported (stores first, each direction in submission order) and returns when
    /// the step's forward pass can start (after any flush wait).
    pub fn run_step(
        &mut self,
        mut jobs: StepJobs,
        step: u64,
        now_ns: u64,
        done: &mut Vec<JobId>,
    ) -> u64 {
        // handle_preemptions: this step's flushed stores join the deferred ones, all submitted.
        if !jobs.flush.is_empty() {
            let flush = &jobs.flush;
            let (now, later): (Vec<_>, Vec<_>) = jobs
                .stores
                .into_iter()
                .partition(|(j, _)| flush.binary_search(j).is_ok());
            jobs.stores = later;
            self.unsubmitted.extend(now);
        }
        for (job, blocks) in self.unsubmitted.drain(..) {
            self.engine.submit(STORE, job, blocks, step, now_ns);
        }
        let start = if jobs.flush.is_empty() {
            now_ns
        } else {
            self.engine.wait(&jobs.flush, step, now_ns)
        };
        // start_load_kv
        for &(job, _, blocks) in &jobs.loads {
            self.engine.submit(LOAD, job, blocks, step, start);
        }
        // wait_for_save: the rest start with the next step.
        self.unsubmitted = jobs.stores;
        // get_finished
        self.engine.finished(step, start, done);
        start
    }

    pub fn next_done_ns(&self) -> Option<u64> {
        self.engine.next_done_ns()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jobs(loads: &[JobId], stores: &[JobId], flush: &[JobId]) -> StepJobs {
        StepJobs {
            loads: loads.iter().map(|&j| (j, 0, 1)).collect(),
            stores: stores.iter().map(|&j| (j, 1)).collect(),
            flush: flush.to_vec(),
        }
    }

    #[test]
    fn steps_clock_defers_stores_and_reports_in_submission_order() {
        let mut w = Worker::new(TransferTiming::Steps { latency: 2 });
        let mut done = Vec::new();
        // Step 0: store 0 is deferred; load 1 submitted, due at step 2.
        w.run_step(jobs(&[1], &[0], &[]), 0, 0, &mut done);
        assert!(done.is_empty());
        // Step 1: store 0 submitted (due 3); store 2 created and flushed: due now, but behind 0.
        w.run_step(jobs(&[], &[2], &[2]), 1, 0, &mut done);
        assert!(done.is_empty());
        w.run_step(jobs(&[], &[], &[]), 2, 0, &mut done);
        assert_eq!(done, vec![1]);
        done.clear();
        w.run_step(jobs(&[], &[], &[]), 3, 0, &mut done);
        assert_eq!(done, vec![0, 2]);
    }

    #[test]
    fn a_link_serialises_each_direction_and_waits_hold_the_step() {
        let link = Link {
            bytes_per_s: 1_000_000_000,
            latency_ns: 0,
        };
        let mut w = Worker::new(TransferTiming::Link {
            link,
            block_bytes: 1000,
        });
        let mut done = Vec::new();
        // Two loads of 1 block (1 us each) at t=0: the second ends at 2 us.
        let start = w.run_step(jobs(&[1, 2], &[], &[]), 0, 0, &mut done);
        assert_eq!((start, w.next_done_ns()), (0, Some(1000)));
        w.run_step(jobs(&[], &[], &[]), 1, 1500, &mut done);
        assert_eq!(done, vec![1]);
        done.clear();
        // A store created now and flushed: the step waits 1 us for it.
        let start = w.run_step(jobs(&[], &[3], &[3]), 2, 1600, &mut done);
        assert_eq!(start, 2600);
        assert_eq!(done, vec![3, 2]);
    }
}
