//! Host throughput of the block pattern and of `HostDevice` fill/verify.
//! `cargo run --release -p gpumem-gpu --example pattern_throughput [MiB]`

use std::time::Instant;

use gpumem_gpu::{pattern, Device, HostDevice};

fn rate(bytes: u64, f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    bytes as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let mib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(512);
    let bytes = mib << 20;
    let mut buf = vec![1u8; bytes as usize];
    let mut bad = 0;
    for round in 0..3 {
        let fill = rate(bytes, || pattern::fill(&mut buf, 7, 3));
        let check = rate(bytes, || bad = pattern::count_mismatches(&buf, 7, 3));
        println!("pattern on a {mib} MiB slice, round {round}: fill {fill:.2} GB/s, verify {check:.2} GB/s");
    }
    assert_eq!(bad, 0);

    let mut host = HostDevice::new();
    let base = host.reserve(gpumem_core::place::Tier::Gpu, bytes).unwrap();
    let first = rate(bytes, || host.fill(base, 0, bytes, 9).unwrap());
    let again = rate(bytes, || host.fill(base, 0, bytes, 9).unwrap());
    let check = rate(bytes, || {
        assert_eq!(host.verify(base, 0, bytes, 9).unwrap().mismatched_bytes, 0)
    });
    let copy = rate(bytes / 2, || {
        host.copy((base, 0), (base, 4096), bytes / 2).unwrap()
    });
    host.release(base).unwrap();
    let base = host.reserve(gpumem_core::place::Tier::Gpu, bytes).unwrap();
    let fresh = rate(bytes, || host.fill(base, 0, bytes, 9).unwrap());
    println!(
        "HostDevice {mib} MiB: fill {first:.2} GB/s first touch, {again:.2} GB/s touched, \
         {fresh:.2} GB/s fresh mapping again; verify {check:.2} GB/s; overlapping copy \
         {copy:.2} GB/s"
    );
}
