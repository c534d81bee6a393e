//! SHA-1 throughput of the backends at hand, on piece-sized buffers (issue
//! 21: is hashing a large part of the agents' CPU per byte?).
//!
//!   cargo run --release --example hash_bench [MIB]
//!
//! `sha1w` is what the swarm uses (librqbit-sha1-wrapper's `sha1-ring`
//! feature, which is AWS-LC underneath); `ring` is ring's own SHA-1;
//! RustCrypto's `sha1` picks SHA-NI at run time when the CPU has it.

use std::hint::black_box;

use sha1w::ISha1;

/// This thread's CPU seconds: the machine is shared, wall time would
/// count the others' work.
fn cpu() -> f64 {
    use nix::time::{ClockId, clock_gettime};
    let t = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).expect("thread CPU clock");
    t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(512);
    for piece in [16usize << 10, 128 << 10, 256 << 10] {
        let buf: Vec<u8> = (0..piece).map(|i| (i * 31 + 7) as u8).collect();
        let n = (mib << 20) / piece;
        let t = cpu();
        for _ in 0..n {
            let mut h = sha1w::Sha1::new();
            h.update(black_box(&buf));
            black_box(h.finish());
        }
        let a = cpu() - t;
        let t = cpu();
        for _ in 0..n {
            black_box(ring::digest::digest(
                &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
                black_box(&buf),
            ));
        }
        let b = cpu() - t;
        let t = cpu();
        for _ in 0..n {
            use sha1::Digest;
            black_box(sha1::Sha1::digest(black_box(&buf)));
        }
        let c = cpu() - t;
        println!(
            "pieces of {:>3} KiB: sha1w (AWS-LC) {:>6.0} MiB/CPU-s, ring {:>6.0} MiB/CPU-s, \
             RustCrypto sha1 {:>6.0} MiB/CPU-s",
            piece >> 10,
            mib as f64 / a,
            mib as f64 / b,
            mib as f64 / c
        );
    }
}
