//! How a host passes a piece on: to a few other hosts at a time.
//!
//! A piece a host has just fetched is the rarest in the room, so every other
//! host asks it for that piece at once. Served to all of them together, it
//! reaches all of them at about the same moment, N − 1 piece-times later,
//! and none of them can pass it on meanwhile: at the end of a run, when the
//! last pieces leave the origin, the room waits that long for them. Served
//! to [`SERVES_PER_PIECE`] at a time, it reaches those within a piece-time
//! or two; the others hear "busy" ([`super::wire::BUSY_ID`]), take other
//! pieces meanwhile, and fetch this one from whoever holds it next, so the
//! copies grow as a tree instead of a star.
//!
//! Only between blockswarm hosts the server vouches for (others know no
//! "busy"); the server's seed has its upload slots instead
//! ([`super::writer::Slots`]).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Other hosts a host serves one piece to at once.
pub(super) const SERVES_PER_PIECE: usize = 2;
/// A serve counts against its piece's limit until its host announces the
/// piece, or for this long at most (a slow or vanished host).
const SERVE_HOLD: Duration = Duration::from_secs(3);
/// Pieces with serves on record at most, before expired ones are swept.
const SWEEP_AT: usize = 1024;

/// The serves of this host's pieces under way, by piece: (connection, since).
#[derive(Default)]
pub(super) struct Spread {
    serves: Mutex<HashMap<usize, Vec<(u64, Instant)>>>,
}

impl Spread {
    /// Whether connection `conn` may be served `piece` now; if so, it counts
    /// until [`Spread::done`] or [`SERVE_HOLD`].
    pub fn admit(&self, piece: usize, conn: u64, now: Instant) -> bool {
        let mut m = self.serves.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= SWEEP_AT {
            m.retain(|_, v| {
                v.retain(|&(_, at)| now.saturating_duration_since(at) < SERVE_HOLD);
                !v.is_empty()
            });
        }
        let v = m.entry(piece).or_default();
        v.retain(|&(_, at)| now.saturating_duration_since(at) < SERVE_HOLD);
        if v.iter().any(|&(c, _)| c == conn) {
            return true;
        }
        if v.len() >= SERVES_PER_PIECE {
            return false;
        }
        v.push((conn, now));
        true
    }

    /// Connection `conn` holds `piece` now, or is gone.
    pub fn done(&self, piece: usize, conn: u64) {
        let mut m = self.serves.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = m.get_mut(&piece) {
            v.retain(|&(c, _)| c != conn);
            if v.is_empty() {
                m.remove(&piece);
            }
        }
    }

    #[cfg(test)]
    fn recorded(&self) -> usize {
        self.serves.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_piece_goes_to_a_few_hosts_at_a_time() {
        let s = Spread::default();
        let t = Instant::now();
        assert!(s.admit(7, 1, t));
        assert!(s.admit(7, 2, t));
        assert!(!s.admit(7, 3, t), "a third host was served piece 7 at once");
        // Admitted ones keep their serve (their next blocks), and other
        // pieces have limits of their own.
        assert!(s.admit(7, 1, t));
        assert!(s.admit(8, 3, t));
        // Host 1 announced the piece: its place goes to the next.
        s.done(7, 1);
        assert!(s.admit(7, 3, t));
        assert!(!s.admit(7, 4, t));
        // A host that never announces it holds its place for a while only.
        assert!(s.admit(7, 4, t + SERVE_HOLD));
    }

    #[test]
    fn serves_on_record_stay_bounded() {
        let s = Spread::default();
        let t = Instant::now();
        for p in 0..10 * SWEEP_AT {
            assert!(s.admit(p, 1, t + SERVE_HOLD * p as u32 / SWEEP_AT as u32));
        }
        assert!(
            s.recorded() <= 2 * SWEEP_AT,
            "{} pieces on record",
            s.recorded()
        );
        for p in 0..10 * SWEEP_AT {
            s.done(p, 1);
        }
        assert_eq!(s.recorded(), 0);
    }
}
