//! SHA-1 throughput of the backends at hand, on piece-sized buffers (issue
//! 21: is hashing a large part of the agents' CPU per byte?).
//!
//!   cargo run --release --example hash_bench [MIB]
//!
//! `sha1w` is what the swarm uses (librqbit-sha1-wrapper's `sha1-ring`
//! feature, which is AWS-LC underneath); `ring` is ring's own SHA-1.

use std::hint::black_box;
use std::time::Instant;

use sha1w::ISha1;

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(512);
    for piece in [16usize << 10, 128 << 10, 256 << 10] {
        let buf: Vec<u8> = (0..piece).map(|i| (i * 31 + 7) as u8).collect();
        let n = (mib << 20) / piece;
        let t = Instant::now();
        for _ in 0..n {
            let mut h = sha1w::Sha1::new();
            h.update(black_box(&buf));
            black_box(h.finish());
        }
        let a = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..n {
            black_box(ring::digest::digest(
                &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
                black_box(&buf),
            ));
        }
        let b = t.elapsed().as_secs_f64();
        println!(
            "pieces of {:>3} KiB: sha1w (AWS-LC) {:>6.0} MiB/s, ring {:>6.0} MiB/s",
            piece >> 10,
            mib as f64 / a,
            mib as f64 / b
        );
    }
}
