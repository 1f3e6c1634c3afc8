//! The CUDA device on a real GPU: an opt-in tier for machines that have one.
//!
//! `GPUMEM_CUDA=1 cargo test --release -p gpumem-gpu --test cuda_device` runs it; with the
//! variable set, a device that does not open FAILS the tests (they never skip). Without it,
//! every test returns at once (no GPU on CI).
//!
//! Device memory is not zeroed when it is created: nothing here assumes its content before a
//! fill.

use gpumem_core::place::Tier;
use gpumem_gpu::{CudaDevice, Device, DeviceErrorKind};

const MIB: u64 = 1 << 20;

/// The device, when this run asked for the hardware tier; `None` otherwise.
fn device() -> Option<CudaDevice> {
    std::env::var_os("GPUMEM_CUDA")?;
    match CudaDevice::open(0) {
        Ok(d) => Some(d),
        Err(e) => panic!("GPUMEM_CUDA is set but no CUDA device opens: {e}"),
    }
}

fn clean(d: &mut CudaDevice, base: u64, offset: u64, bytes: u64, seed: u64) -> bool {
    d.verify(base, offset, bytes, seed)
        .unwrap()
        .mismatched_bytes
        == 0
}

#[test]
fn physical_segment_fill_verify_copy_corrupt() {
    let Some(mut d) = device() else { return };
    let base = d.reserve(Tier::Gpu, 3 * MIB + 5).unwrap();
    d.fill(base, 100, 1000, 7).unwrap();
    assert!(clean(&mut d, base, 100, 1000, 7));
    d.copy((base, 100), (base, 110), 1000).unwrap();
    assert!(clean(&mut d, base, 110, 1000, 7));
    d.corrupt(base, 110 + 999).unwrap();
    let check = d.verify(base, 110, 1000, 7).unwrap();
    assert_eq!(
        (check.mismatched_bytes, check.first_mismatch),
        (1, Some(999))
    );
    d.fill(base, 3 * MIB + 4, 1, 1).unwrap();
    assert_eq!(
        d.fill(base, 3 * MIB + 4, 2, 1).unwrap_err().kind,
        DeviceErrorKind::Invalid
    );
    d.release(base).unwrap();
    assert!(d.verify(base, 0, 1, 1).is_err(), "released memory is gone");
}

#[test]
fn overlapping_copies_larger_than_the_scratch_buffer_shift_both_ways() {
    let Some(mut d) = device() else { return };
    let bytes = 20 * MIB + 123;
    let base = d.reserve(Tier::Gpu, 64 * MIB).unwrap();
    for (from, to) in [(MIB, MIB + 4097), (5 * MIB, 5 * MIB - 3 * MIB - 1)] {
        d.fill(base, from, bytes, 11).unwrap();
        d.copy((base, from), (base, to), bytes).unwrap();
        assert!(clean(&mut d, base, to, bytes, 11), "{from} -> {to}");
    }
}

#[test]
fn virtual_ranges_map_fill_across_pages_unmap_and_release_while_mapped() {
    let Some(mut d) = device() else { return };
    let g = d.granularity_bytes();
    let base = d.reserve_va(Tier::Gpu, 32 * g).unwrap();
    assert!(d.fill(base, 0, 8, 1).is_err(), "nothing is mapped yet");
    d.map(base, 2 * g, g).unwrap();
    d.map(base, 3 * g, g).unwrap();
    // A block across two separately mapped pages.
    d.fill(base, 2 * g + g / 2, g, 9).unwrap();
    assert!(clean(&mut d, base, 2 * g + g / 2, g, 9));
    assert!(d.map(base, 3 * g, g).is_err(), "mapped twice");
    assert_eq!(
        d.map(base, 5 * g + 1, g).unwrap_err().kind,
        DeviceErrorKind::Unsupported,
        "unaligned"
    );
    let before = d.resident_bytes().unwrap();
    d.unmap(base, 3 * g, g).unwrap();
    let after = d.resident_bytes().unwrap();
    // Device-wide: other processes may allocate meanwhile, so only the direction is asserted.
    assert!(
        after < before,
        "resident {before} -> {after} after an unmap"
    );
    assert!(d.verify(base, 2 * g + g / 2, g, 9).is_err());
    // Released with a page still mapped: everything goes.
    d.release_va(base).unwrap();
    assert!(d.verify(base, 2 * g, 1, 9).is_err());
}

#[test]
fn host_tiers_and_transfers_between_them() {
    let Some(mut d) = device() else { return };
    let gpu = d.reserve(Tier::Gpu, 16 * MIB).unwrap();
    let pinned = d.reserve(Tier::PinnedHost, 16 * MIB).unwrap();
    let pageable = d.reserve(Tier::PageableHost, 16 * MIB).unwrap();
    d.fill(gpu, 0, 4 * MIB, 5).unwrap();
    for host in [pinned, pageable] {
        d.copy((gpu, 0), (host, MIB), 4 * MIB).unwrap();
        assert!(clean(&mut d, host, MIB, 4 * MIB, 5));
        d.copy((host, MIB), (gpu, 8 * MIB), 4 * MIB).unwrap();
        assert!(clean(&mut d, gpu, 8 * MIB, 4 * MIB, 5));
    }
    d.copy((pinned, MIB), (pageable, 0), 4 * MIB).unwrap();
    assert!(clean(&mut d, pageable, 0, 4 * MIB, 5));
    for base in [gpu, pinned, pageable] {
        d.release(base).unwrap();
    }
}

#[test]
fn an_absurd_reservation_is_refused_as_out_of_memory() {
    let Some(mut d) = device() else { return };
    let free = d.available_bytes().unwrap();
    let e = d.reserve(Tier::Gpu, free.saturating_mul(4)).unwrap_err();
    assert_eq!(e.kind, DeviceErrorKind::OutOfMemory, "{e}");
    let e = d.reserve(Tier::Gpu, 1 << 62).unwrap_err();
    assert_eq!(e.kind, DeviceErrorKind::OutOfMemory, "{e}");
}
