//! A byte-rate cap shared by the connections of a session.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Bursts up to this long at full rate are let through at once.
const BURST: Duration = Duration::from_millis(100);

pub struct Limiter {
    bytes_per_sec: Option<u64>,
    /// When the bytes let through so far have been paid for.
    paid_until: Mutex<Instant>,
}

impl Limiter {
    pub fn new(bytes_per_sec: Option<u64>) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.filter(|&r| r > 0),
            paid_until: Mutex::new(Instant::now()),
        }
    }

    pub fn is_capped(&self) -> bool {
        self.bytes_per_sec.is_some()
    }

    /// Waits until `n` more bytes fit under the cap.
    pub async fn take(&self, n: usize) {
        let Some(rate) = self.bytes_per_sec else {
            return;
        };
        let wait_until = {
            let mut paid = self.paid_until.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let start = (*paid).max(now.checked_sub(BURST).unwrap_or(now));
            *paid = start + Duration::from_secs_f64(n as f64 / rate as f64);
            start
        };
        tokio::time::sleep_until(wait_until).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn caps_the_rate() {
        let l = Limiter::new(Some(1_000_000));
        let t0 = Instant::now();
        for _ in 0..100 {
            l.take(100_000).await;
        }
        // 10 MB at 1 MB/s, less the burst and the last chunk's payment.
        let s = t0.elapsed().as_secs_f64();
        assert!((9.7..=10.1).contains(&s), "{s}");
    }

    #[tokio::test(start_paused = true)]
    async fn no_cap_no_wait() {
        let l = Limiter::new(None);
        let t0 = Instant::now();
        l.take(1 << 30).await;
        assert_eq!(t0.elapsed(), Duration::ZERO);
    }
}
