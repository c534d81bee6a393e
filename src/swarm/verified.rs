//! Pieces hashed and found good, kept for serving: every piece is hashed
//! before it is served (a payload changed in place is never sent), and a
//! piece a host has just fetched (and hashed) is served to the room from
//! memory, without a disk read. Bounded in bytes, least recently used out;
//! one piece always fits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::wire::PieceIndex;

pub struct Verified {
    cap: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    pieces: HashMap<PieceIndex, (Arc<Vec<u8>>, u64)>,
    bytes: usize,
    clock: u64,
}

impl Verified {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            inner: Mutex::default(),
        }
    }

    pub fn get(&self, p: PieceIndex) -> Option<Arc<Vec<u8>>> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.clock += 1;
        let now = g.clock;
        let (data, used) = g.pieces.get_mut(&p)?;
        *used = now;
        Some(data.clone())
    }

    /// Keeps `data`, which passed its hash, as piece `p`.
    pub fn insert(&self, p: PieceIndex, data: Arc<Vec<u8>>) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.clock += 1;
        let now = g.clock;
        let len = data.len();
        if let Some((old, _)) = g.pieces.insert(p, (data, now)) {
            g.bytes -= old.len();
        }
        g.bytes += len;
        while g.bytes > self.cap && g.pieces.len() > 1 {
            let Some((&oldest, _)) = g
                .pieces
                .iter()
                .filter(|(k, _)| **k != p)
                .min_by_key(|(_, (_, used))| *used)
            else {
                break;
            };
            if let Some((d, _)) = g.pieces.remove(&oldest) {
                g.bytes -= d.len();
            }
        }
    }

    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.inner.lock().unwrap().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::swarm::wire::Lengths;

    #[test]
    fn holds_at_most_its_cap_and_always_one_piece() {
        let l = Lengths::new(100, 10).unwrap();
        let p = |i| l.piece(i).unwrap();
        let v = Verified::new(25);
        v.insert(p(0), Arc::new(vec![0; 10]));
        v.insert(p(1), Arc::new(vec![1; 10]));
        assert!(v.get(p(0)).is_some());
        // Piece 1 was used least recently.
        v.insert(p(2), Arc::new(vec![2; 10]));
        assert!(v.get(p(1)).is_none());
        assert_eq!(v.get(p(2)).unwrap()[0], 2);
        assert_eq!(v.bytes(), 20);
        // A piece larger than the cap is still kept, alone.
        v.insert(p(3), Arc::new(vec![3; 40]));
        assert_eq!(v.bytes(), 40);
        assert!(v.get(p(3)).is_some() && v.get(p(0)).is_none());
    }
}
