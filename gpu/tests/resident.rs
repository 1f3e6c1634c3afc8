//! Resident memory follows touched host memory. Alone in its own test binary: the figure is
//! the whole process's, so tests running beside it in other threads would disturb it.

use gpumem_core::alloc::MIB;
use gpumem_core::decision::{AllocId, Decision, Loc, SegmentId};
use gpumem_core::executor::Executor;
use gpumem_core::place::Tier;
use gpumem_gpu::{Device, DeviceExecutor, HostDevice};

const CAPACITY: u64 = 64 * MIB;

fn loc(segment: u32, offset: u64) -> Loc {
    Loc {
        segment: SegmentId::arena(segment),
        offset,
    }
}

#[test]
fn resident_bytes_grow_when_mapped_memory_is_touched() {
    let mut host = HostDevice::new();
    let base = host.reserve_va(Tier::Gpu, 256 * MIB).unwrap();
    host.map(base, 0, 64 * MIB).unwrap();
    let before = host.resident_bytes().expect("/proc/self/statm");
    host.fill(base, 0, 64 * MIB, 3).unwrap();
    let after = host.resident_bytes().unwrap();
    assert!(after >= before + 60 * MIB, "{before} -> {after}");
    host.unmap(base, 0, 64 * MIB).unwrap();
    let dropped = host.resident_bytes().unwrap();
    assert!(dropped + 60 * MIB <= after, "{after} -> {dropped}");

    // The executor samples the same figure.
    let mut ex = DeviceExecutor::new(HostDevice::new(), CAPACITY, &[], 0);
    let s = SegmentId::arena(0);
    ex.apply(Decision::ReserveVa {
        segment: s,
        bytes: 32 * MIB,
    })
    .unwrap();
    ex.apply(Decision::Map {
        segment: s,
        offset: 0,
        bytes: 32 * MIB,
    })
    .unwrap();
    let at = loc(0, 0);
    ex.apply(Decision::Place {
        id: AllocId(0),
        at,
        bytes: 32 * MIB,
    })
    .unwrap();
    ex.apply(Decision::Free {
        id: AllocId(0),
        at,
        bytes: 32 * MIB,
    })
    .unwrap();
    ex.apply(Decision::Unmap {
        segment: s,
        offset: 0,
        bytes: 32 * MIB,
    })
    .unwrap();
    let report = ex.finish();
    let start = report.resident_bytes_start.unwrap();
    assert!(
        report.resident_bytes_peak.unwrap() >= start + 30 * MIB,
        "{report:?}"
    );
}
