//! What one connection has to send: our control messages and the blocks
//! the peer asked for, each under a bound. The driver and the torrent put
//! things here without ever waiting; the connection's writer takes them.
//! A peer that asks for more than [`MAX_QUEUED`] blocks, or does not read
//! what we send, passes a bound and is dropped: nothing grows while a
//! write is blocked.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use super::wire::{Block, PieceIndex};

/// Block requests queued per peer at most: stock clients keep up to about
/// 500 outstanding, ours [`super::REQUEST_WINDOW`].
pub const MAX_QUEUED: usize = 2048;

pub struct Outbox {
    state: Mutex<State>,
    wake: Notify,
    /// Bytes of our messages that may wait unsent.
    control_cap: usize,
}

#[derive(Default)]
struct State {
    control: Vec<u8>,
    /// Of `control`, messages that wait for [`Outbox::flush_later`] (or any
    /// other write) to go out.
    later: bool,
    requests: VecDeque<Block>,
    /// Why the connection must end: a bound was passed.
    broken: Option<String>,
}

impl Outbox {
    /// `control_cap`: what our messages to a peer may add up to unsent. It
    /// is above what they can reach while the peer reads (a have and a claim
    /// per piece, a window of requests and cancels).
    pub fn new(control_cap: usize) -> Self {
        Self {
            state: Mutex::default(),
            wake: Notify::new(),
            control_cap,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a message of ours.
    pub fn control(&self, bytes: &[u8]) {
        self.push(bytes, false);
        self.wake.notify_one();
    }

    /// Queues a message of ours that may wait a little: it goes out with
    /// the next write, or at [`Outbox::flush_later`]. A have to each of N − 1
    /// peers per piece, each woken for it and written alone, cost every host
    /// a wake-up and a syscall per peer and piece on both ends.
    pub fn control_later(&self, bytes: &[u8]) {
        self.push(bytes, true);
    }

    fn push(&self, bytes: &[u8], later: bool) {
        let mut s = self.lock();
        if s.broken.is_some() {
            return;
        }
        if s.control.len() + bytes.len() > self.control_cap {
            s.broken = Some(format!(
                "{} bytes of our messages wait unsent: the peer does not read",
                s.control.len()
            ));
        } else {
            s.control.extend_from_slice(bytes);
            s.later |= later;
        }
    }

    /// Wakes the writer if messages queued with [`Outbox::control_later`]
    /// wait.
    pub fn flush_later(&self) {
        if std::mem::take(&mut self.lock().later) {
            self.wake.notify_one();
        }
    }

    /// Queues a block the peer asked for; past [`MAX_QUEUED`], the
    /// connection is broken.
    pub fn request(&self, b: Block) -> Result<(), String> {
        let r = {
            let mut s = self.lock();
            if s.requests.len() >= MAX_QUEUED {
                let why = format!("more than {MAX_QUEUED} block requests queued");
                s.broken = Some(why.clone());
                Err(why)
            } else {
                s.requests.push_back(b);
                Ok(())
            }
        };
        self.wake.notify_one();
        r
    }

    /// Forgets a request not sent yet.
    pub fn cancel(&self, b: &Block) {
        self.lock().requests.retain(|q| q != b);
    }

    pub fn broken(&self) -> Option<String> {
        self.lock().broken.clone()
    }

    /// The piece of the next block to send, and whether messages of ours wait.
    pub fn peek(&self) -> (Option<PieceIndex>, bool) {
        let s = self.lock();
        (s.requests.front().map(Block::piece), !s.control.is_empty())
    }

    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.lock().requests.len()
    }

    /// Moves every waiting message of ours to `control` and, with `blocks`,
    /// queued blocks up to `max` bytes (one at least) to `out`; with
    /// `one_piece`, only blocks of the first one's piece.
    pub fn take(
        &self,
        blocks: bool,
        one_piece: bool,
        max: usize,
        control: &mut Vec<u8>,
        out: &mut Vec<Block>,
    ) {
        let mut s = self.lock();
        control.append(&mut s.control);
        s.later = false;
        out.clear();
        let mut len = 0;
        while blocks && len < max {
            let Some(&b) = s.requests.front() else { break };
            if one_piece && out.first().is_some_and(|f| f.piece() != b.piece()) {
                break;
            }
            s.requests.pop_front();
            out.push(b);
            len += b.len() as usize;
        }
    }

    /// Returns when something was put here since the last call.
    pub async fn changed(&self) {
        self.wake.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::swarm::wire::Lengths;

    #[test]
    fn every_queue_has_a_bound() {
        let l = Lengths::new(1 << 20, 1 << 16).unwrap();
        let b = l.block(l.piece(3).unwrap(), 0, 16384).unwrap();
        let o = Outbox::new(100);
        for _ in 0..MAX_QUEUED {
            o.request(b).unwrap();
        }
        assert!(o.request(b).unwrap_err().contains("requests queued"));
        assert_eq!(o.queued(), MAX_QUEUED, "nothing past the bound is kept");
        assert!(o.broken().is_some());

        let o = Outbox::new(100);
        o.control(&[0; 60]);
        assert!(o.broken().is_none());
        o.control(&[0; 60]);
        assert!(o.broken().unwrap().contains("does not read"));
        let (mut c, mut q) = (Vec::new(), Vec::new());
        o.take(true, true, 1 << 20, &mut c, &mut q);
        assert_eq!(c.len(), 60);
    }

    #[tokio::test]
    async fn later_messages_wait_for_a_flush_or_another_write() {
        // A stored wake-up completes the wait at its first poll.
        async fn woken(o: &Outbox) -> bool {
            let zero = std::time::Duration::ZERO;
            tokio::time::timeout(zero, o.changed()).await.is_ok()
        }
        let o = Outbox::new(1000);
        o.control_later(&[1]);
        o.control_later(&[2]);
        assert!(!woken(&o).await, "a later message woke the writer");
        assert_eq!(o.peek(), (None, true), "the writer would not take it along");
        o.flush_later();
        assert!(woken(&o).await);
        o.flush_later();
        assert!(
            !woken(&o).await,
            "a flush with nothing waiting woke the writer"
        );
        // Taken along by a write of another message: no flush wake after it.
        o.control_later(&[3]);
        o.control(&[4]);
        assert!(woken(&o).await);
        let (mut c, mut q) = (Vec::new(), Vec::new());
        o.take(false, false, 0, &mut c, &mut q);
        assert_eq!(c, vec![1, 2, 3, 4]);
        o.flush_later();
        assert!(!woken(&o).await);
    }

    #[test]
    fn the_origin_sends_one_piece_per_batch() {
        let l = Lengths::new(1 << 20, 1 << 16).unwrap();
        let blk = |p, at| l.block(l.piece(p).unwrap(), at, 16384).unwrap();
        let o = Outbox::new(1000);
        for (p, at) in [(1, 0), (1, 16384), (2, 0), (2, 16384)] {
            o.request(blk(p, at)).unwrap();
        }
        o.cancel(&blk(1, 16384));
        let (mut c, mut q) = (Vec::new(), Vec::new());
        o.take(true, true, 1 << 20, &mut c, &mut q);
        assert_eq!(q, vec![blk(1, 0)]);
        o.take(true, false, 1 << 20, &mut c, &mut q);
        assert_eq!(q, vec![blk(2, 0), blk(2, 16384)]);
    }
}
