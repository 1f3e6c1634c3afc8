//! `gpumem kv --replicas N`'s run: the cluster driver over a trace, what it measures, and the
//! report ([`ClusterReport`]).

use gpumem_core::place::{DeviceSet, Place};

use super::driver::Cluster;
use super::report::{fleet_summary, ClusterReport, ReplicaReport, RouterReport};
use super::RouterPolicy;
use crate::serve::metrics::{Latencies, Measured};
use crate::serve::vllm::KV_SEGMENT;
use crate::serve::{Arrivals, EngineConfig, KvReport, RunInfo, ServeError};

/// A cluster: one engine config for every replica, the devices they run on, the router.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSetup {
    pub engine: EngineConfig,
    pub devices: DeviceSet,
    pub router: RouterPolicy,
    /// How late the engines' KV events reach the router, µs.
    pub router_lag_us: u64,
}

/// Runs `arrivals` through the cluster, calling `progress` with the tokens scheduled so far.
pub fn simulate_cluster(
    arrivals: &mut Arrivals<'_>,
    setup: &ClusterSetup,
    info: RunInfo,
    progress: &mut dyn FnMut(u64),
) -> Result<ClusterReport, ServeError> {
    let mut cluster = Cluster::new(
        setup.engine,
        &setup.devices,
        setup.router,
        setup.router_lag_us,
    )?;
    let kv_places: Vec<_> = setup
        .devices
        .iter()
        .map(|device| Place {
            device,
            ..KV_SEGMENT.place
        })
        .collect();
    let mut measured = Measured::fleet(&setup.engine, &info, &kv_places);
    let mut ttft = vec![Latencies::default(); setup.devices.len()];
    cluster.drive(arrivals, &mut |replica, rec, fleet| {
        measured.observe_in_fleet(replica, rec, fleet);
        rec.outcomes.iter().for_each(|o| ttft[replica].record(o));
        progress(measured.scheduled_tokens);
        Ok(())
    })?;
    measured.rejected = arrivals.rejected();
    measured.prefix_hits_refused = cluster
        .replicas
        .iter()
        .map(|r| r.engine.hits_refused())
        .sum();
    let summaries: Vec<_> = cluster.replicas.iter().map(|r| r.summary.clone()).collect();
    let router_digest = cluster.router.digest_hex();
    let fleet = KvReport::new(&fleet_summary(&summaries, &router_digest), measured, info);
    let replicas = cluster
        .replicas
        .iter()
        .zip(&mut ttft)
        .enumerate()
        .map(|(i, (r, lat))| {
            let [ttft_us, _, _] = lat.percentiles();
            ReplicaReport::new(i, r.device.0, &r.summary, ttft_us)
        })
        .collect();
    let router = RouterReport::new(
        setup.router.name(),
        setup.router_lag_us,
        cluster.router.stats(),
        router_digest,
    );
    Ok(ClusterReport {
        fleet,
        replicas,
        router,
    })
}
