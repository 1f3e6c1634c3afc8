//! The clock over several models' engines: arrivals, loads and offloads, and steps that take
//! turns on each GPU. At each instant, in this order:
//!
//! 1. loads that complete now make their models resident;
//! 2. steps that end now are published (finished requests measured);
//! 3. requests that arrive now join their model's queue (an offloaded model is loaded when
//!    room can be made; otherwise it waits until a model on its GPU goes idle);
//! 4. the `offloader` policy offloads and prefetches by its thresholds;
//! 5. on each GPU, the resident models due now step, one at a time: the one waiting longest
//!    first (ties: the lower model), the others when it ends.
//!
//! The order is fixed, so the run is a function of its inputs.

use std::collections::VecDeque;

use gpumem_core::balance::MultiGpuMemoryBalancer;
use gpumem_core::books::Books;
use gpumem_core::decision::{Decision, Refusal, SegmentId};
use gpumem_core::executor::Executor;
use gpumem_core::link::Links;
use gpumem_core::offloader::{Action, AutomaticOffloader, ModelView};
use gpumem_core::place::{DeviceId, DeviceSet, Owner, Place, Tier};
use gpumem_core::sleep::{CuMemPool, Handle, SleepError, SleepLevel, Tag};
use gpumem_core::weights::{ModelId, ModelWeightCache};
use gpumem_traces::serving::WorkloadRequest;

use super::report::{GpuReport, ModelReport, ModelsReport};
use super::trace::TraceArrivals;
use super::workload::ModelsWorkload;
use super::{ModelsSetup, Policy, DEFAULT_KV_BYTES, HOST_BYTES_PER_GPU};
use crate::executor::{AllocCostModel, SimExecutor, Timed};
use crate::serve::cost::{CostModel, Roofline};
use crate::serve::metrics::Latencies;
use crate::serve::profile::kv_sizing_bytes;
use crate::serve::vllm::{EngineConfig, SchedulingPolicy};
use crate::serve::{EvictionKind, Now, ServeError, VllmEngine};
use crate::sleep_watch::{SleepObservations, SleepWatch};

/// Longest prompt of the built-in workload (below every built-in model's context).
const MAX_PROMPT_TOKENS: u64 = 16_384;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Offloaded,
    Loading { ready_ns: u64 },
    Resident,
}

/// The sleep-mode allocations of one model's engine.
struct SleepHandles {
    pool: CuMemPool,
    weights: Handle,
}

struct Slot {
    name: String,
    device: DeviceId,
    cfg: EngineConfig,
    engine: VllmEngine<'static>,
    weight_bytes: u64,
    /// KV pool and activation reserve, reserved while resident.
    other_bytes: u64,
    model: ModelId,
    state: State,
    pending: VecDeque<WorkloadRequest>,
    next_step: u64,
    /// When it acts next: its step in flight ends, or its next step starts (None: idle).
    wake_ns: Option<u64>,
    /// Since when it has been ready to step (the longest-waiting steps first).
    due_since_ns: u64,
    unpublished: bool,
    finished_last: bool,
    last_used_ns: Option<u64>,
    sleep: Option<SleepHandles>,
    // Measurements.
    latencies: Latencies,
    requests: u64,
    requests_finished: u64,
    output_tokens: u64,
    weight_loads: u64,
    bytes_loaded: u64,
    offloads: u64,
}

impl Slot {
    fn idle(&self) -> bool {
        self.wake_ns.is_none()
            && self.pending.is_empty()
            && !self.engine.has_unfinished_requests()
            && !self.unpublished
    }

    fn footprint_bytes(&self) -> u64 {
        self.weight_bytes + self.other_bytes
    }
}

struct Gpu {
    device: DeviceId,
    compute_free_ns: u64,
    link_free_ns: u64,
    cache: ModelWeightCache,
}

/// The run: models, GPUs, the executor that keeps the books (with the simulator's modelled
/// time beside it, which the clock follows on any executor).
struct Run<E: Executor> {
    setup: ModelsSetup,
    slots: Vec<Slot>,
    gpus: Vec<Gpu>,
    exec: Timed<E>,
    watch: SleepWatch,
    links: Links,
    budget_bytes: u64,
    offloader: AutomaticOffloader,
    bytes_h2d: u64,
    bytes_d2h: u64,
    sleep_wake_ns: u64,
}

/// Runs the built-in workload through the models of `setup`, on the simulator.
pub fn simulate_models(
    setup: &ModelsSetup,
    workload: &ModelsWorkload,
    progress: &mut dyn FnMut(u64),
) -> Result<ModelsReport, ServeError> {
    let links = setup.gpu.links().map_err(ServeError::Input)?;
    let exec = SimExecutor::with_books(models_books(setup)?, AllocCostModel::default(), links);
    simulate_models_on(setup, workload, exec, progress).map(|(report, _)| report)
}

/// The places a `models` run books, with their capacities: each GPU's budget (its memory at
/// the utilization) and its pinned host memory. A device executor for the run is made with
/// these books.
pub fn models_books(setup: &ModelsSetup) -> Result<Books, ServeError> {
    let devices = DeviceSet::first(setup.gpus).map_err(ServeError::Input)?;
    let budget_bytes = budget_bytes(setup);
    let mut places = Vec::new();
    for d in devices.iter() {
        places.push((Place::gpu(d.0), budget_bytes));
        places.push((Place::new(d.0, Tier::PinnedHost), HOST_BYTES_PER_GPU));
    }
    Ok(Books::with_places(&places))
}

fn budget_bytes(setup: &ModelsSetup) -> u64 {
    (setup.gpu.memory_bytes as u128 * setup.utilization_ppm as u128 / 1_000_000) as u64
}

/// The run of [`simulate_models`] on any executor (books from [`models_books`]): the same
/// decisions, the same clock (the simulator's modelled time of each load and sleep), hence the
/// same report and digest as the simulation when the executor refuses nothing the simulator
/// accepts; and what the executor observed of sleeps and wakes (`sleep` policy).
pub fn simulate_models_on<E: Executor>(
    setup: &ModelsSetup,
    workload: &ModelsWorkload,
    exec: E,
    progress: &mut dyn FnMut(u64),
) -> Result<(ModelsReport, SleepObservations), ServeError> {
    let max_model_len: Vec<u64> = setup
        .models
        .iter()
        .map(|m| m.profile.max_model_len.min(MAX_PROMPT_TOKENS + 8192))
        .collect();
    let arrivals = workload
        .requests(setup.models.len(), MAX_PROMPT_TOKENS)
        .map(Ok);
    drive(
        Run::new(setup, exec, &max_model_len, false)?,
        arrivals,
        progress,
    )
}

/// Runs a trace's requests through the models of `setup`, each request given to the model it
/// names ([`TraceArrivals`]); `progress` is told how many requests have arrived. Each model
/// takes prompts up to its profile's `max_model_len`, or what its KV pool holds if less (a
/// longer prompt is refused with its file and line).
pub fn simulate_models_trace(
    setup: &ModelsSetup,
    arrivals: &mut TraceArrivals<'_>,
    progress: &mut dyn FnMut(u64),
) -> Result<ModelsReport, ServeError> {
    let links = setup.gpu.links().map_err(ServeError::Input)?;
    let exec = SimExecutor::with_books(models_books(setup)?, AllocCostModel::default(), links);
    simulate_models_trace_on(setup, arrivals, exec, progress).map(|(report, _)| report)
}

/// [`simulate_models_trace`] on any executor, as [`simulate_models_on`].
pub fn simulate_models_trace_on<E: Executor>(
    setup: &ModelsSetup,
    arrivals: &mut TraceArrivals<'_>,
    exec: E,
    progress: &mut dyn FnMut(u64),
) -> Result<(ModelsReport, SleepObservations), ServeError> {
    let profile: Vec<u64> = setup
        .models
        .iter()
        .map(|m| m.profile.max_model_len)
        .collect();
    let run = Run::new(setup, exec, &profile, true)?;
    arrivals.set_max_model_len(run.slots.iter().map(|s| s.cfg.max_model_len).collect());
    drive(run, arrivals, progress)
}

/// The clock of `run` over `arrivals` (model index and request, in arrival order).
fn drive<E: Executor>(
    mut run: Run<E>,
    mut arrivals: impl Iterator<Item = Result<(usize, WorkloadRequest), ServeError>>,
    progress: &mut dyn FnMut(u64),
) -> Result<(ModelsReport, SleepObservations), ServeError> {
    run.place_at_start()?;
    let mut next = arrivals.next().transpose()?;
    let mut arrived = 0u64;
    while let Some(now_ns) = run.next_event(next.as_ref().map(|(_, r)| r.arrival_us * 1000)) {
        run.complete_loads(now_ns);
        run.publish_steps(now_ns);
        while let Some((m, req)) = next.take_if(|(_, r)| r.arrival_us * 1000 <= now_ns) {
            run.arrive(m, req, now_ns);
            arrived += 1;
            if arrived.is_multiple_of(1024) {
                progress(arrived);
            }
            next = arrivals.next().transpose()?;
        }
        run.start_blocked_loads(now_ns)?;
        if run.setup.policy == Policy::Offloader {
            run.offload_by_thresholds(now_ns)?;
        }
        run.step_gpus(now_ns)?;
        // A model that just went idle may make room for one that waits.
        run.start_blocked_loads(now_ns)?;
    }
    progress(arrived);
    run.finish()
}

impl<E: Executor> Run<E> {
    /// Model `i`'s engine takes prompts shorter than `max_model_len[i]` (`within_pool`: or
    /// than its KV pool holds, if less).
    fn new(
        setup: &ModelsSetup,
        exec: E,
        max_model_len: &[u64],
        within_pool: bool,
    ) -> Result<Run<E>, ServeError> {
        let input = ServeError::Input;
        let devices = DeviceSet::first(setup.gpus).map_err(input)?;
        let links = setup.gpu.links().map_err(ServeError::Input)?;
        let budget_bytes = budget_bytes(setup);
        let homes = plan_homes(setup, &devices, budget_bytes)?;
        let exec = Timed::new(exec, AllocCostModel::default(), links);
        let mut run = Run {
            setup: setup.clone(),
            slots: Vec::new(),
            gpus: devices
                .iter()
                .map(|device| Gpu {
                    device,
                    compute_free_ns: 0,
                    link_free_ns: 0,
                    cache: ModelWeightCache::new(device, budget_bytes),
                })
                .collect(),
            exec,
            watch: SleepWatch::new(),
            links,
            budget_bytes,
            offloader: AutomaticOffloader::new(setup.offloader, setup.models.len()),
            bytes_h2d: 0,
            bytes_d2h: 0,
            sleep_wake_ns: 0,
        };
        for (i, choice) in setup.models.iter().enumerate() {
            let p = &choice.profile;
            let (device, kv_budget) = homes[i];
            let (blocks, kv_bytes) = kv_sizing_bytes(p, kv_budget, setup.block_size as u64)
                .map_err(|e| ServeError::Input(format!("model {}: {e}", choice.name)))?;
            let weight_bytes = p.weight_bytes();
            let other_bytes = kv_bytes + p.activation_reserve_bytes;
            let footprint = weight_bytes + other_bytes;
            if footprint > budget_bytes {
                return Err(ServeError::Input(format!(
                    "model {} needs {} (weights {}, KV {}, reserve {}) but one {} offers {} at this utilization",
                    choice.name,
                    gib(footprint),
                    gib(weight_bytes),
                    gib(kv_bytes),
                    gib(p.activation_reserve_bytes),
                    setup.gpu.name,
                    gib(budget_bytes)
                )));
            }
            let cfg = EngineConfig {
                num_gpu_blocks: blocks,
                block_size: setup.block_size,
                max_num_seqs: setup.gpu.default_max_num_seqs,
                max_num_batched_tokens: setup.gpu.default_max_num_batched_tokens,
                max_model_len: match within_pool {
                    true => max_model_len[i]
                        .min((blocks as u64).saturating_sub(1) * setup.block_size as u64),
                    false => max_model_len[i],
                },
                enable_prefix_caching: true,
                cost: CostModel::Roofline(Roofline::new(&setup.gpu, p)),
                eviction: EvictionKind::Lru,
                watermark_blocks: 0,
                policy: SchedulingPolicy::Fcfs,
                offload: None,
            };
            let engine = VllmEngine::new(cfg)?;
            let g = run.gpu_index(device);
            let model = if setup.policy == Policy::Sleep {
                // Sleep mode keeps no second host copy: a sleeping model's weights are in its
                // backup (level 1) or on disk (level 2).
                ModelId(i as u32)
            } else {
                let layer_bytes = vec![weight_bytes / p.layers; p.layers as usize];
                let layer_bytes = with_remainder(layer_bytes, weight_bytes);
                run.gpus[g]
                    .cache
                    .register(&layer_bytes, i as u64 + 1, &mut run.exec)
                    .map_err(|e| ServeError::Input(format!("model {}: {e}", choice.name)))?
            };
            run.slots.push(Slot {
                name: choice.name.clone(),
                device,
                cfg,
                engine,
                weight_bytes,
                other_bytes,
                model,
                state: State::Offloaded,
                pending: VecDeque::new(),
                next_step: 0,
                wake_ns: None,
                due_since_ns: 0,
                unpublished: false,
                finished_last: false,
                last_used_ns: None,
                sleep: None,
                latencies: Latencies::default(),
                requests: 0,
                requests_finished: 0,
                output_tokens: 0,
                weight_loads: 0,
                bytes_loaded: 0,
                offloads: 0,
            });
        }
        Ok(run)
    }

    fn gpu_index(&self, device: DeviceId) -> usize {
        self.gpus
            .iter()
            .position(|g| g.device == device)
            .expect("a device of the run")
    }

    fn free_bytes(&self, device: DeviceId) -> u64 {
        let used = self
            .exec
            .books()
            .account(Place::gpu(device.0))
            .reserved_bytes;
        self.budget_bytes - used
    }

    /// Models resident before the first request, in model order while they fit (not counted
    /// as loads).
    fn place_at_start(&mut self) -> Result<(), ServeError> {
        for i in 0..self.slots.len() {
            let dev = self.slots[i].device;
            if self.slots[i].footprint_bytes() > self.free_bytes(dev) {
                continue;
            }
            self.load(i, 0)?;
            let s = &mut self.slots[i];
            s.state = State::Resident;
            s.weight_loads = 0;
            s.bytes_loaded = 0;
        }
        for g in &mut self.gpus {
            g.link_free_ns = 0;
        }
        self.bytes_h2d = 0;
        self.sleep_wake_ns = 0;
        if self.setup.policy == Policy::Static {
            if let Some(s) = self.slots.iter().find(|s| s.state != State::Resident) {
                return Err(ServeError::Internal(format!(
                    "static: model {} was not placed",
                    s.name
                )));
            }
        }
        Ok(())
    }

    fn next_event(&self, next_arrival_ns: Option<u64>) -> Option<u64> {
        let wakes = self.slots.iter().filter_map(|s| s.wake_ns);
        let loads = self.slots.iter().filter_map(|s| match s.state {
            State::Loading { ready_ns } => Some(ready_ns),
            _ => None,
        });
        wakes.chain(loads).chain(next_arrival_ns).min()
    }

    fn complete_loads(&mut self, now_ns: u64) {
        for s in &mut self.slots {
            if s.state == (State::Loading { ready_ns: now_ns }) {
                s.state = State::Resident;
                if !s.pending.is_empty() && s.wake_ns.is_none() {
                    s.wake_ns = Some(now_ns);
                    s.due_since_ns = now_ns;
                }
            }
        }
    }

    fn publish_steps(&mut self, now_ns: u64) {
        for s in &mut self.slots {
            if !s.unpublished || s.wake_ns != Some(now_ns) {
                continue;
            }
            s.unpublished = false;
            s.last_used_ns = Some(now_ns);
            let rec = s.engine.last_step();
            for o in &rec.outcomes {
                s.latencies.record(o);
                s.requests_finished += 1;
                s.output_tokens += o.output_tokens;
            }
        }
    }

    fn arrive(&mut self, m: usize, req: WorkloadRequest, now_ns: u64) {
        self.offloader
            .observe_arrival(ModelId(m as u32), req.arrival_us);
        let s = &mut self.slots[m];
        s.requests += 1;
        s.pending.push_back(req);
        if s.state == State::Resident && s.wake_ns.is_none() {
            s.wake_ns = Some(now_ns);
            s.due_since_ns = now_ns;
        }
    }

    /// Offloaded models with requests waiting are loaded, in model order, when room can be
    /// made on their GPU.
    fn start_blocked_loads(&mut self, now_ns: u64) -> Result<(), ServeError> {
        for i in 0..self.slots.len() {
            if self.slots[i].state == State::Offloaded && !self.slots[i].pending.is_empty() {
                self.try_load(i, now_ns)?;
            }
        }
        Ok(())
    }

    /// Makes room for model `i` by offloading idle models of its GPU, least recently used
    /// first, and starts its load; false when the room cannot be made yet.
    fn try_load(&mut self, i: usize, now_ns: u64) -> Result<bool, ServeError> {
        let dev = self.slots[i].device;
        let need = self.slots[i].footprint_bytes();
        let mut victims: Vec<usize> = (0..self.slots.len())
            .filter(|&j| {
                let s = &self.slots[j];
                j != i && s.device == dev && s.state == State::Resident && s.idle()
            })
            .collect();
        let evictable: u64 = victims
            .iter()
            .map(|&j| self.slots[j].footprint_bytes())
            .sum();
        if self.free_bytes(dev) + evictable < need {
            return Ok(false);
        }
        victims.sort_by_key(|&j| (self.slots[j].last_used_ns, j));
        for j in victims {
            if self.free_bytes(dev) >= need {
                break;
            }
            self.offload(j, now_ns)?;
        }
        let ready_ns = self.load(i, now_ns)?;
        self.slots[i].state = State::Loading { ready_ns };
        Ok(true)
    }

    /// Carries out model `i`'s load now; returns when it is done (loads on one GPU's link
    /// queue behind each other).
    fn load(&mut self, i: usize, now_ns: u64) -> Result<u64, ServeError> {
        let g = self.gpu_index(self.slots[i].device);
        let before = self.exec.modelled_ns_total();
        let mut extra_ns = 0;
        let mut written = false;
        let s = &self.slots[i];
        let (model, other, weight_bytes) = (s.model, s.other_bytes, s.weight_bytes);
        let name = s.name.clone();
        let internal = |what: String| ServeError::Internal(format!("model {name}: {what}"));
        match self.setup.policy {
            Policy::Sleep => match &mut self.slots[i].sleep {
                Some(h) => {
                    let mut reload = self.setup.sleep_level == SleepLevel::Two;
                    let stats = match h.pool.wake_up(None, &mut self.exec) {
                        Ok(stats) => stats,
                        Err(SleepError::Refused {
                            refusal: Refusal::Mismatch,
                            ..
                        }) => {
                            // The backup held other bytes than the weights (a device executor
                            // checked them): never used; the rest wakes and the weights are
                            // reloaded from storage, as after a level-2 sleep.
                            self.watch.restore_refused();
                            reload = true;
                            h.pool
                                .wake_up(None, &mut self.exec)
                                .map_err(|e| internal(format!("wake: {e}")))?
                        }
                        Err(e) => return Err(internal(format!("wake: {e}"))),
                    };
                    if reload {
                        written = true;
                        h.pool.write(h.weights, i as u64 + 1, &mut self.exec);
                        extra_ns = self.links.disk.transfer_ns(weight_bytes);
                    }
                    self.watch.after_wake(&h.pool, &self.exec);
                    self.bytes_h2d += stats.bytes_copied;
                }
                None => {
                    // Above the weight cache's host copies (at most MAX_LAYERS of them).
                    let first = (i as u32 + 1) << 20;
                    let mut pool = CuMemPool::numbered_from(self.gpus[g].device, first);
                    let weights = pool
                        .allocate(Tag::Weights, weight_bytes, i as u64 + 1, &mut self.exec)
                        .map_err(|r| internal(format!("weights refused ({r:?})")))?;
                    pool.allocate(Tag::KvCache, other, 0, &mut self.exec)
                        .map_err(|r| internal(format!("KV pool refused ({r:?})")))?;
                    written = true;
                    // The first load reads the weights from the host copy, as the others do.
                    extra_ns = self.links.host_pinned.transfer_ns(weight_bytes);
                    self.bytes_h2d += weight_bytes;
                    self.watch.allocated(&pool, &self.exec);
                    self.slots[i].sleep = Some(SleepHandles { pool, weights });
                }
            },
            _ => {
                let loaded = self.gpus[g]
                    .cache
                    .load_model(model, &mut self.exec)
                    .map_err(|r| internal(format!("weights refused ({r:?})")))?;
                self.bytes_h2d += loaded.bytes;
                self.exec
                    .apply(Decision::Reserve {
                        segment: kv_segment(self.slots[i].device, i),
                        bytes: other,
                    })
                    .map_err(|r| internal(format!("KV pool refused ({r:?})")))?;
            }
        }
        let took_ns = self.exec.modelled_ns_total() - before + extra_ns;
        if self.setup.policy == Policy::Sleep {
            self.sleep_wake_ns += took_ns;
            if written {
                // Weights written in place (a first load, or a reload from storage) have had
                // no copy check: a device executor re-checks every content it holds now, these
                // and every other model's, backups included (a restored backup was checked at
                // both ends of its copy). Observation only: no decision follows.
                self.exec.checkpoint();
            }
        }
        let start = now_ns.max(self.gpus[g].link_free_ns);
        let ready_ns = start + took_ns;
        self.gpus[g].link_free_ns = ready_ns;
        let s = &mut self.slots[i];
        s.weight_loads += 1;
        s.bytes_loaded += weight_bytes;
        s.last_used_ns = Some(now_ns);
        Ok(ready_ns)
    }

    /// Takes idle model `i` off its GPU: weights released (their host copy stays) or, under
    /// `sleep`, the engine put to sleep; its KV cache is discarded either way.
    fn offload(&mut self, i: usize, now_ns: u64) -> Result<(), ServeError> {
        let s = &self.slots[i];
        debug_assert!(
            s.state == State::Resident && s.idle(),
            "offload of a busy model"
        );
        let g = self.gpu_index(s.device);
        let before = self.exec.modelled_ns_total();
        match self.setup.policy {
            Policy::Sleep => {
                let h = self.slots[i].sleep.as_mut().expect("a loaded model");
                self.watch.before_sleep(&mut self.exec);
                let stats = h
                    .pool
                    .sleep(self.setup.sleep_level, &mut self.exec)
                    .map_err(|e| ServeError::Internal(format!("sleep: {e}")))?;
                self.watch.after_sleep(&mut self.exec);
                self.bytes_d2h += stats.bytes_copied;
            }
            _ => {
                let model = self.slots[i].model;
                self.gpus[g].cache.unload(model, &mut self.exec);
                self.exec
                    .apply(Decision::Release {
                        segment: kv_segment(self.slots[i].device, i),
                    })
                    .expect("a release is never refused");
            }
        }
        let took_ns = self.exec.modelled_ns_total() - before;
        if self.setup.policy == Policy::Sleep {
            self.sleep_wake_ns += took_ns;
            let start = now_ns.max(self.gpus[g].link_free_ns);
            self.gpus[g].link_free_ns = start + took_ns;
        }
        let s = &mut self.slots[i];
        s.engine = VllmEngine::new(s.cfg)?;
        s.state = State::Offloaded;
        s.offloads += 1;
        Ok(())
    }

    /// The `offloader` policy: per GPU, offload idle models above the offload threshold and
    /// prefetch expected ones below the restore threshold.
    fn offload_by_thresholds(&mut self, now_ns: u64) -> Result<(), ServeError> {
        for g in 0..self.gpus.len() {
            let dev = self.gpus[g].device;
            let views: Vec<ModelView> = (0..self.slots.len())
                .filter(|&j| self.slots[j].device == dev)
                .map(|j| {
                    let s = &self.slots[j];
                    ModelView {
                        id: ModelId(j as u32),
                        resident_bytes: match s.state {
                            State::Offloaded => 0,
                            _ => s.footprint_bytes(),
                        },
                        bytes: s.footprint_bytes(),
                        busy: s.state != State::Resident || !s.idle(),
                        last_used_us: s.last_used_ns.map(|t| t / 1000),
                    }
                })
                .collect();
            let used = self.budget_bytes - self.free_bytes(dev);
            for action in self
                .offloader
                .plan(now_ns / 1000, used, self.budget_bytes, &views)
            {
                match action {
                    Action::Offload(m) => self.offload(m.0 as usize, now_ns)?,
                    Action::Restore(m) => {
                        let i = m.0 as usize;
                        if self.slots[i].footprint_bytes() <= self.free_bytes(dev) {
                            let ready_ns = self.load(i, now_ns)?;
                            self.slots[i].state = State::Loading { ready_ns };
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Phase 5: on each GPU, the resident models due now step one at a time.
    fn step_gpus(&mut self, now_ns: u64) -> Result<(), ServeError> {
        for g in 0..self.gpus.len() {
            let dev = self.gpus[g].device;
            let mut due: Vec<usize> = (0..self.slots.len())
                .filter(|&j| self.slots[j].device == dev && self.slots[j].wake_ns == Some(now_ns))
                .collect();
            due.sort_by_key(|&j| (self.slots[j].due_since_ns, j));
            for j in due {
                let free_at = self.gpus[g].compute_free_ns;
                if free_at > now_ns {
                    self.slots[j].wake_ns = Some(free_at);
                    continue;
                }
                if let Some(end_ns) = self.act(j, now_ns)? {
                    self.gpus[g].compute_free_ns = end_ns;
                }
            }
        }
        Ok(())
    }

    /// Adds the waiting requests and runs one step of model `j` at `now_ns` (or lets it go
    /// idle); returns when the step ends.
    fn act(&mut self, j: usize, now_ns: u64) -> Result<Option<u64>, ServeError> {
        let s = &mut self.slots[j];
        while let Some(req) = s.pending.pop_front() {
            s.engine.add_request(req)?;
        }
        if !s.engine.has_unfinished_requests() && !s.finished_last {
            s.wake_ns = None;
            return Ok(None);
        }
        let step = s.next_step;
        s.engine.step(Now { step, ns: now_ns });
        let rec = s.engine.last_step();
        if rec.end_ns == u64::MAX {
            return Err(ServeError::Input(format!(
                "model {}, step {step}: the simulated clock overflows 2^64 ns",
                s.name
            )));
        }
        if !rec.is_logged() && s.engine.has_unfinished_requests() {
            return Err(ServeError::Stall(format!(
                "model {}, step {step}: {}",
                s.name,
                s.engine.stall_reason()
            )));
        }
        s.finished_last = !rec.finished.is_empty();
        s.wake_ns = Some(rec.end_ns);
        s.due_since_ns = rec.end_ns;
        s.next_step += 1;
        s.unpublished = true;
        Ok(Some(rec.end_ns))
    }

    fn finish(mut self) -> Result<(ModelsReport, SleepObservations), ServeError> {
        if let Some(s) = self.slots.iter().find(|s| !s.pending.is_empty()) {
            return Err(ServeError::Stall(format!(
                "model {}: {} requests wait and it can never be loaded (every model of its GPU is busy)",
                s.name,
                s.pending.len()
            )));
        }
        let sim_time_ns = self
            .slots
            .iter()
            .map(|s| s.engine.last_step().end_ns)
            .chain(self.gpus.iter().map(|g| g.link_free_ns))
            .max()
            .unwrap_or(0);
        let mut all = Latencies::default();
        let models: Vec<ModelReport> = self
            .slots
            .iter_mut()
            .map(|s| {
                all.absorb(&s.latencies);
                let [ttft_us, tpot_us, _] = s.latencies.percentiles();
                ModelReport {
                    model: s.name.clone(),
                    device: s.device.0,
                    weight_bytes: s.weight_bytes,
                    kv_blocks: s.cfg.num_gpu_blocks as u64,
                    requests: s.requests,
                    requests_finished: s.requests_finished,
                    ttft_us,
                    tpot_us,
                    weight_loads: s.weight_loads,
                    bytes_loaded: s.bytes_loaded,
                    offloads: s.offloads,
                }
            })
            .collect();
        let gpus: Vec<GpuReport> = self
            .gpus
            .iter()
            .map(|g| GpuReport {
                device: g.device.0,
                models: self
                    .slots
                    .iter()
                    .filter(|s| s.device == g.device)
                    .map(|s| s.name.clone())
                    .collect(),
                capacity_bytes: self.budget_bytes,
                peak_bytes: self
                    .exec
                    .books()
                    .account(Place::gpu(g.device.0))
                    .reserved_bytes_peak,
            })
            .collect();
        let [ttft_us, tpot_us, _] = all.percentiles();
        let output_tokens: u64 = self.slots.iter().map(|s| s.output_tokens).sum();
        let observed = self.watch.observations();
        let report = ModelsReport {
            policy: self.setup.policy.name().into(),
            gpu: self.setup.gpu.name.clone(),
            placement: self.setup.placement.name().into(),
            requests: self.slots.iter().map(|s| s.requests).sum(),
            requests_finished: self.slots.iter().map(|s| s.requests_finished).sum(),
            sim_time_us: sim_time_ns / 1000,
            throughput_tokens_per_s: if sim_time_ns == 0 {
                0.0
            } else {
                output_tokens as f64 * 1e9 / sim_time_ns as f64
            },
            ttft_us,
            tpot_us,
            weight_loads: models.iter().map(|m| m.weight_loads).sum(),
            bytes_h2d: self.bytes_h2d,
            bytes_d2h: self.bytes_d2h,
            sleep_wake_us: self.sleep_wake_ns / 1000,
            gpu_bytes: self.budget_bytes * self.gpus.len() as u64,
            peak_gpu_bytes: gpus.iter().map(|g| g.peak_bytes).sum(),
            models,
            gpus,
            digest: self.exec.digest_hex(),
        };
        Ok((report, observed))
    }
}

/// The KV pool and activation reserve of model `i` (lru and offloader policies).
fn kv_segment(device: DeviceId, i: usize) -> SegmentId {
    SegmentId::new(Place::gpu(device.0), Owner::KvPool, i as u32)
}

/// Each model's home GPU and KV pool. Under `static` without `--kv-cache-gib`, models are
/// placed by their weights and reserve, and each GPU's remaining memory is split evenly among
/// its models' KV pools; otherwise every pool is the given size (or [`DEFAULT_KV_BYTES`]) and
/// models are placed by their whole footprint — past the GPUs' memory for the dynamic
/// policies, which swap.
fn plan_homes(
    setup: &ModelsSetup,
    devices: &DeviceSet,
    budget_bytes: u64,
) -> Result<Vec<(DeviceId, u64)>, ServeError> {
    let mut balancer = MultiGpuMemoryBalancer::new(devices.clone(), budget_bytes, setup.placement);
    let fixed =
        |m: &super::ModelChoice| m.profile.weight_bytes() + m.profile.activation_reserve_bytes;
    let split = setup.policy == Policy::Static && setup.kv_bytes_per_model.is_none();
    let kv_each = setup.kv_bytes_per_model.unwrap_or(DEFAULT_KV_BYTES);
    let mut homes = Vec::with_capacity(setup.models.len());
    for m in &setup.models {
        let bytes = if split { fixed(m) } else { fixed(m) + kv_each };
        let device = match balancer.allocate(bytes) {
            Some(d) => d,
            None if setup.policy == Policy::Static => {
                let kv = if split { 0 } else { kv_each };
                return Err(ServeError::Input(static_refusal(setup, budget_bytes, kv)));
            }
            // More models than fit at once: the point of the dynamic policies.
            None => balancer.oversubscribe(bytes),
        };
        homes.push((device, kv_each));
    }
    if split {
        let shares: Vec<u64> = homes
            .iter()
            .map(|&(d, _)| {
                let sharing = homes.iter().filter(|&&(e, _)| e == d).count() as u64;
                balancer.free_bytes(d) / sharing
            })
            .collect();
        for ((_, kv), share) in homes.iter_mut().zip(shares) {
            *kv = share;
        }
    }
    Ok(homes)
}

fn static_refusal(setup: &ModelsSetup, budget_bytes: u64, kv_each: u64) -> String {
    let weights: u64 = setup.models.iter().map(|m| m.profile.weight_bytes()).sum();
    let reserve: u64 = setup
        .models
        .iter()
        .map(|m| m.profile.activation_reserve_bytes)
        .sum();
    let kv = kv_each * setup.models.len() as u64;
    format!(
        "static: the {} models need {} (weights {}, activation reserve {}, KV {}) to stay resident, but {} x {} offer{} {} at this utilization; use --policy lru, offloader or sleep, more --gpus, or fewer models",
        setup.models.len(),
        gib(weights + reserve + kv),
        gib(weights),
        gib(reserve),
        gib(kv),
        setup.gpus,
        setup.gpu.name,
        if setup.gpus == 1 { "s" } else { "" },
        gib(budget_bytes * setup.gpus as u64),
    )
}

fn with_remainder(mut layers: Vec<u64>, total: u64) -> Vec<u64> {
    let sum: u64 = layers.iter().sum();
    if let Some(last) = layers.last_mut() {
        *last += total - sum;
    }
    layers
}

pub(crate) fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}
