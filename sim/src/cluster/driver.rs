//! The cluster driver: several engines behind one router, on one simulated clock.
//!
//! Each replica is a `vllm-0.33` engine with its own pool on its own device, driven exactly as
//! the single-engine driver ([`crate::serve::drive`]) drives one: a step starts when the
//! previous one ends, every request that has arrived by then is added first, an idle engine
//! wakes at its next request (on the fixed clock, at the step at or after it), and after a step
//! that finished a request one more step runs. The replicas only share the clock and the
//! router. At each instant, in this order:
//!
//! 1. the steps that end now are published, replica by replica in index order: their finished
//!    requests reach the router, their KV events leave for it, the measurements see them;
//! 2. the requests that arrive now are routed, in trace order;
//! 3. the replicas due now add what was routed to them and run their next step, in index
//!    order.
//!
//! The order is fixed, so the run is a function of its inputs, never of threads or timing.
//! With one replica it is the single-engine run, step for step.

use std::collections::VecDeque;

use gpumem_core::place::{DeviceId, DeviceSet};

use super::router::{Router, RouterSetup};
use crate::serve::driver::ArrivalStream;
use crate::serve::metrics::EngineState;
use crate::serve::{
    CostModel, EngineConfig, Now, RunSummary, ServeError, StepRecord, VllmEngine, WorkloadRequest,
};

/// One engine of the cluster and its place on the shared clock.
pub struct Replica<'x> {
    pub device: DeviceId,
    pub engine: VllmEngine<'x>,
    /// The engine's totals, as the single-engine driver keeps them.
    pub summary: RunSummary,
    /// Requests routed here and not yet added (they are added when the replica next acts).
    pending: VecDeque<WorkloadRequest>,
    /// The number its next step takes.
    next_step: u64,
    /// When it acts next: its step in flight ends, or its next step starts (None: idle).
    wake_ns: Option<u64>,
    /// A step ran whose end has not been published.
    unpublished: bool,
    finished_last: bool,
    /// After the last published step.
    state: EngineState,
}

impl<'x> Replica<'x> {
    fn new(device: DeviceId, engine: VllmEngine<'x>) -> Self {
        let num_gpu_blocks = engine.config().num_gpu_blocks;
        Replica {
            device,
            engine,
            summary: RunSummary {
                kv_blocks: num_gpu_blocks,
                ..RunSummary::default()
            },
            pending: VecDeque::new(),
            next_step: 0,
            wake_ns: None,
            unpublished: false,
            finished_last: false,
            state: EngineState::default(),
        }
    }

    /// An idle replica wakes for a request arriving at `arrival_us`: on the fixed clock at the
    /// step at or after it, else at the arrival itself.
    fn wake_for(&mut self, arrival_us: u64, cost: CostModel) {
        self.wake_ns = Some(match cost {
            CostModel::Fixed { step_us } => {
                self.next_step = arrival_us.div_ceil(step_us);
                self.next_step.saturating_mul(step_us).saturating_mul(1000)
            }
            CostModel::Roofline(_) => arrival_us.saturating_mul(1000),
        });
    }

    /// Adds what was routed here, then runs a step at `now_ns` or goes idle.
    fn act(&mut self, now_ns: u64) -> Result<(), ServeError> {
        while let Some(req) = self.pending.pop_front() {
            self.engine.add_request(req)?;
        }
        if !self.engine.has_unfinished_requests() && !self.finished_last {
            self.wake_ns = None;
            return Ok(());
        }
        let step = self.next_step;
        self.engine.step(Now { step, ns: now_ns });
        let rec = self.engine.last_step();
        if rec.end_ns == u64::MAX {
            return Err(ServeError::Input(format!(
                "step {step}: the simulated clock overflows 2^64 ns"
            )));
        }
        if !rec.is_logged() && self.engine.has_unfinished_requests() {
            return Err(ServeError::Stall(format!(
                "replica on device {}, step {step}: {}",
                self.device.0,
                self.engine.stall_reason()
            )));
        }
        self.finished_last = !rec.finished.is_empty();
        self.wake_ns = Some(rec.end_ns);
        self.next_step += 1;
        self.unpublished = true;
        Ok(())
    }
}

/// Engines and the router in front of them.
pub struct Cluster<'x> {
    pub replicas: Vec<Replica<'x>>,
    pub router: Router,
    cost: CostModel,
    usable_blocks: u32,
    /// The replicas' states after their last published steps, summed.
    fleet: EngineState,
}

/// Called for every logged step (one that scheduled or preempted something) of any replica,
/// when it ends, in time order: the replica's index, the step, and the fleet's state after it.
pub type OnClusterStep<'a> =
    dyn FnMut(usize, &StepRecord, EngineState) -> Result<(), ServeError> + 'a;

impl Cluster<'static> {
    /// One engine with `cfg` per device of `devices`, behind a router.
    pub fn new(
        cfg: EngineConfig,
        devices: &DeviceSet,
        router: super::RouterPolicy,
        router_lag_us: u64,
    ) -> Result<Self, ServeError> {
        let setup = RouterSetup {
            policy: router,
            replicas: devices.len(),
            lag_ns: router_lag_us.saturating_mul(1000),
            block_size: cfg.block_size,
            max_model_len: cfg.max_model_len,
            num_gpu_blocks: cfg.num_gpu_blocks,
        };
        let router = Router::new(setup);
        let replicas = devices
            .iter()
            .map(|device| {
                let mut engine = VllmEngine::new(cfg)?;
                if router.wants_kv_events() {
                    engine.publish_kv_events();
                }
                Ok(Replica::new(device, engine))
            })
            .collect::<Result<Vec<_>, ServeError>>()?;
        Ok(Cluster {
            replicas,
            router,
            cost: cfg.cost,
            usable_blocks: cfg.num_gpu_blocks - 1,
            fleet: EngineState::default(),
        })
    }
}

impl Cluster<'_> {
    /// Runs until `arrivals` are exhausted and every replica has finished its requests.
    pub fn drive(
        &mut self,
        arrivals: &mut ArrivalStream<'_>,
        on_step: &mut OnClusterStep<'_>,
    ) -> Result<(), ServeError> {
        let mut next = arrivals.next().transpose()?;
        loop {
            let next_arrival_ns = next.as_ref().map(arrival_ns);
            let next_wake_ns = self.replicas.iter().filter_map(|r| r.wake_ns).min();
            let now_ns = match (next_arrival_ns, next_wake_ns) {
                (Some(a), Some(w)) => a.min(w),
                (Some(t), None) | (None, Some(t)) => t,
                (None, None) => break,
            };
            self.publish_steps_ending(now_ns, on_step)?;
            while let Some(req) = next.take_if(|r| arrival_ns(r) <= now_ns) {
                self.route(req, now_ns)?;
                next = arrivals.next().transpose()?;
            }
            for r in &mut self.replicas {
                if r.wake_ns == Some(now_ns) {
                    r.act(now_ns)?;
                }
            }
        }
        for r in &mut self.replicas {
            r.summary.close(&r.engine);
        }
        Ok(())
    }

    /// Phase 1: the steps that end at `now_ns`, in replica order.
    fn publish_steps_ending(
        &mut self,
        now_ns: u64,
        on_step: &mut OnClusterStep<'_>,
    ) -> Result<(), ServeError> {
        let usable = self.usable_blocks;
        for (i, r) in self.replicas.iter_mut().enumerate() {
            if !r.unpublished || r.wake_ns != Some(now_ns) {
                continue;
            }
            r.unpublished = false;
            if self.router.wants_kv_events() {
                let events = r.engine.take_kv_events();
                self.router.published(i, now_ns, events);
            }
            let rec = r.engine.last_step();
            r.summary.add_step(rec, usable);
            let state = EngineState::after(rec, usable as u64);
            self.fleet = EngineState {
                kv_blocks_used: self.fleet.kv_blocks_used + state.kv_blocks_used
                    - r.state.kv_blocks_used,
                running: self.fleet.running + state.running - r.state.running,
                waiting: self.fleet.waiting + state.waiting - r.state.waiting,
            };
            r.state = state;
            for o in &rec.outcomes {
                self.router.finished(i, o);
            }
            if rec.is_logged() {
                on_step(i, rec, self.fleet)?;
            }
        }
        Ok(())
    }

    /// Phase 2: one arrival to the replica the router picks (an idle one wakes for it).
    fn route(&mut self, req: WorkloadRequest, now_ns: u64) -> Result<(), ServeError> {
        let i = self.router.route(&req, now_ns)?;
        let r = &mut self.replicas[i];
        if r.wake_ns.is_none() {
            r.wake_for(req.arrival_us, self.cost);
        }
        r.pending.push_back(req);
        Ok(())
    }
}

fn arrival_ns(r: &WorkloadRequest) -> u64 {
    r.arrival_us.saturating_mul(1000)
}
