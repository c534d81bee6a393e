//! Which piece to ask which peer for. Pure bookkeeping, no I/O.
//!
//! - From the origin (the server's seed) a host takes only pieces that no
//!   other host holds or has claimed (is fetching from the origin), walking
//!   forward from the start offset the server gave it. When its walk runs
//!   into such pieces, it jumps to the middle of the largest run that nobody
//!   holds: each piece leaves the origin about once, and the room splits the
//!   payload between itself. Once every piece is out in the room, the idle
//!   origin serves the rarest ones too.
//! - A host that has taken more than its share of the origin's pieces (the
//!   median of the hosts it knows, plus a slack) leaves the next ones to the
//!   others: each such piece costs its holder N − 1 uploads.
//! - A host well behind its peers that also gains pieces more slowly (a slow
//!   port) takes nothing new from the origin; one behind only by a late
//!   start, as fast as they are, does.
//! - From any other peer it takes the rarest piece that peer holds, ties
//!   broken at random, so fresh pieces spread at once.
//! - When every missing piece is in flight, or once every piece is out in
//!   the room, an idle peer (the origin too, then) may fetch one a second
//!   time (end game); the first copy to arrive wins and the other is
//!   cancelled.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// At most this many peers fetch the same piece at once (end game).
const MAX_DUPLICATES: u8 = 2;
/// A host takes new pieces from the origin only while it has taken at most
/// this many more than the room's median: each one it takes it must pass on
/// to every other host, and the busiest uplink sets the room's time. (The
/// median, so that a slow host's few claims do not hold the others back.)
const ORIGIN_SHARE_SLACK: u64 = 2;
/// A host ahead of the room holds back only while other hosts are claiming
/// (their last claim came at most this long ago): the origin is never left
/// with pieces that every host leaves to the others.
const CLAIMING: Duration = Duration::from_millis(300);
/// A host this many pieces (plus 1/128 of them) behind its peers' mean takes
/// nothing new from the origin, if it is also slower than they are.
const BEHIND_SLACK: u64 = 16;
/// The other hosts' shares of the origin's pieces are sorted again at most
/// this often as their claims come (at once when a host comes or goes): a
/// pick follows most messages, and a sort of every host's share on each one
/// grew with the room.
const ROOM_REFRESH: Duration = Duration::from_millis(100);
/// How often a host compares how fast it gains pieces with its peers.
const PACE_WINDOW: Duration = Duration::from_secs(1);

/// One peer's pieces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bits {
    bits: Vec<bool>,
    count: usize,
}

impl Bits {
    pub fn new(n: usize) -> Self {
        Self {
            bits: vec![false; n],
            count: 0,
        }
    }

    #[cfg(test)]
    pub fn full(n: usize) -> Self {
        Self {
            bits: vec![true; n],
            count: n,
        }
    }

    /// From a BEP 3 bitfield; spare bits at the end are ignored.
    pub fn from_bytes(n: usize, bytes: &[u8]) -> Self {
        let mut b = Self::new(n);
        for i in 0..n {
            if bytes.get(i / 8).is_some_and(|x| x & (0x80 >> (i % 8)) != 0) {
                b.set(i);
            }
        }
        b
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.bits.len().div_ceil(8)];
        for (i, _) in self.bits.iter().enumerate().filter(|(_, b)| **b) {
            out[i / 8] |= 0x80 >> (i % 8);
        }
        out
    }

    pub fn get(&self, i: usize) -> bool {
        self.bits.get(i).copied().unwrap_or(false)
    }

    /// Returns false if it was already set or is out of range.
    pub fn set(&mut self, i: usize) -> bool {
        match self.bits.get_mut(i) {
            Some(b) if !*b => {
                *b = true;
                self.count += 1;
                true
            }
            _ => false,
        }
    }

    /// Returns false if it was not set.
    pub fn unset(&mut self, i: usize) -> bool {
        match self.bits.get_mut(i) {
            Some(b) if *b => {
                *b = false;
                self.count -= 1;
                true
            }
            _ => false,
        }
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn len(&self) -> usize {
        self.bits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bits.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.count == self.bits.len()
    }

    pub fn iter_set(&self) -> impl Iterator<Item = usize> + '_ {
        self.bits
            .iter()
            .enumerate()
            .filter(|(_, b)| **b)
            .map(|(i, _)| i)
    }
}

/// One peer's pieces, and those of them this side lacked when it heard of
/// them: picking from the peer looks at these only, not at every piece (a
/// pick follows most messages; a full scan each time grew with pieces ×
/// peers).
#[derive(Debug, Clone)]
pub struct PeerPieces {
    bits: Bits,
    /// Pruned lazily: pieces this side got since, or the peer lost.
    wanted: Vec<usize>,
}

impl PeerPieces {
    pub fn new(n: usize) -> Self {
        Self {
            bits: Bits::new(n),
            wanted: Vec::new(),
        }
    }

    #[cfg(test)]
    pub fn from_bits(bits: Bits, have: &Bits) -> Self {
        let wanted = bits.iter_set().filter(|&i| !have.get(i)).collect();
        Self { bits, wanted }
    }

    pub fn bits(&self) -> &Bits {
        &self.bits
    }

    pub fn get(&self, i: usize) -> bool {
        self.bits.get(i)
    }

    /// Returns false if it was already set or is out of range. `have`: this
    /// side's pieces.
    pub fn set(&mut self, i: usize, have: &Bits) -> bool {
        if !self.bits.set(i) {
            return false;
        }
        if !have.get(i) {
            self.wanted.push(i);
        }
        true
    }

    /// Returns false if it was not set.
    pub fn unset(&mut self, i: usize) -> bool {
        if !self.bits.unset(i) {
            return false;
        }
        self.wanted.retain(|&w| w != i);
        true
    }

    fn prune(&mut self, have: &Bits) {
        self.wanted.retain(|&i| !have.get(i));
    }
}

/// The pieces this side has, what its peers have, and what is in flight.
#[derive(Debug)]
pub struct Picker {
    have: Bits,
    /// Peers holding each piece.
    avail: Vec<u32>,
    /// Peers other than the origin holding or claiming each piece.
    relay_avail: Vec<u32>,
    /// Claims in `relay_avail`: pieces hosts are fetching from the origin.
    relay_claims: Vec<u32>,
    /// Peers each piece is being fetched from.
    inflight: Vec<u8>,
    /// Pieces being fetched from the origin, announced to other hosts as claims.
    claimed: Vec<bool>,
    inflight_pieces: usize,
    /// Pieces neither here nor held by another host (see [`Picker::all_out`]).
    not_out: usize,
    /// Next piece of the walk over the origin's pieces.
    cursor: usize,
    /// The walk ran into another host's walk: start a new one.
    rewalk: bool,
    /// Pieces this host claimed from the origin.
    own_claims: u64,
    /// Pieces each counted host (see [`Picker::set_hosts`]) claimed while
    /// connected to this one, by connection.
    shares: HashMap<u64, u64>,
    /// `shares` sorted, with a 0 for each counted host that claimed nothing,
    /// and when (`None`: to sort at the next look).
    room: Vec<u64>,
    room_at: Option<Instant>,
    /// When another host last claimed a piece.
    last_room_claim: Option<Instant>,
    /// Counted hosts connected.
    hosts: usize,
    /// Peers other than the origin connected, and the pieces they hold.
    relays: usize,
    relay_held: u64,
    pace: Pace,
    rng: u64,
}

/// Whether this host gains pieces more slowly than its peers, as measured
/// over the last [`PACE_WINDOW`].
#[derive(Debug)]
struct Pace {
    since: Instant,
    /// Pieces here, and the peers' mean, when the window began.
    have: usize,
    peers: f64,
    /// Until a window has passed: the count alone decides.
    slower: bool,
}

impl Pace {
    fn new(have: usize) -> Self {
        Self {
            since: Instant::now(),
            have,
            peers: 0.0,
            slower: true,
        }
    }
}

impl Picker {
    /// `start` is where the walk over the origin's pieces begins, as a
    /// fraction of the payload.
    pub fn new(have: Bits, start: f64, seed: u64) -> Self {
        let n = have.len();
        let cursor = ((start.clamp(0.0, 1.0) * n as f64) as usize).min(n.saturating_sub(1));
        let not_out = n.saturating_sub(have.count());
        let pace = Pace::new(have.count());
        Self {
            have,
            avail: vec![0; n],
            relay_avail: vec![0; n],
            relay_claims: vec![0; n],
            inflight: vec![0; n],
            claimed: vec![false; n],
            inflight_pieces: 0,
            not_out,
            cursor,
            rewalk: false,
            own_claims: 0,
            shares: HashMap::new(),
            room: Vec::new(),
            room_at: None,
            last_room_claim: None,
            hosts: 0,
            relays: 0,
            relay_held: 0,
            pace,
            rng: seed | 1,
        }
    }

    pub fn have(&self) -> &Bits {
        &self.have
    }

    pub fn is_complete(&self) -> bool {
        self.have.is_full()
    }

    pub fn peer_has(&mut self, piece: usize, origin: bool) {
        if piece >= self.avail.len() {
            return;
        }
        self.avail[piece] += 1;
        if !origin {
            self.track(piece, |p| p.relay_avail[piece] += 1);
            self.relay_held += 1;
        }
    }

    /// Whether `piece` is here or held by another host.
    fn is_out(&self, piece: usize) -> bool {
        self.have.get(piece) || self.relay_avail[piece] > self.relay_claims[piece]
    }

    /// Applies `change` to `piece`'s counts, keeping [`Picker::not_out`].
    fn track(&mut self, piece: usize, change: impl FnOnce(&mut Self)) {
        let before = self.is_out(piece);
        change(self);
        match (before, self.is_out(piece)) {
            (false, true) => self.not_out -= 1,
            (true, false) => self.not_out += 1,
            _ => {}
        }
    }

    /// Another host is fetching `piece` from the origin: not ours to fetch
    /// there, not yet to be fetched from that host.
    /// `counted`: the connection of a host that counts in this host's share
    /// of the origin's pieces (see [`Picker::set_hosts`]).
    pub fn peer_claims(&mut self, piece: usize, counted: Option<u64>) {
        if piece >= self.relay_avail.len() {
            return;
        }
        if let Some(conn) = counted {
            *self.shares.entry(conn).or_default() += 1;
        }
        self.last_room_claim = Some(Instant::now());
        self.track(piece, |p| {
            p.relay_avail[piece] += 1;
            p.relay_claims[piece] += 1;
        });
    }

    /// A counted host claimed a piece it holds by now: a claim it made before
    /// the two hosts knew each other as hosts, told late. It counts in its
    /// share only.
    pub fn past_claim(&mut self, counted: Option<u64>) {
        if let Some(conn) = counted {
            *self.shares.entry(conn).or_default() += 1;
        }
    }

    /// How many other blockswarm hosts connected are counted in this host's
    /// share of the origin's pieces: those that came at about the same time
    /// as this one. A host that joins later has claimed nothing before it
    /// came, and would make every earlier one look ahead of the room.
    /// `relays`: all peers connected other than the origin.
    pub fn set_hosts(&mut self, hosts: usize, relays: usize) {
        if hosts != self.hosts {
            self.room_at = None;
        }
        self.hosts = hosts;
        self.relays = relays;
    }

    /// This host holds well under what its peers hold on average and gains
    /// pieces more slowly than they do: a slow port. A piece it took first
    /// from the origin would reach it late and leave it slowly, and the room
    /// would wait for it; it takes pieces the others already hold instead.
    ///
    /// A host that is behind only because it started late, and gains as
    /// fast as its peers, is not: waiting would tie it to the pace of the
    /// peers it takes from (one slow host ahead of a fast one fed it at the
    /// slow host's upload rate, and the fast one never caught up).
    fn behind(&mut self, now: Instant) -> bool {
        let mean = if self.relays > 0 {
            self.relay_held as f64 / self.relays as f64
        } else {
            0.0
        };
        if now.saturating_duration_since(self.pace.since) >= PACE_WINDOW {
            let own = self.have.count().saturating_sub(self.pace.have) as f64;
            let peers = mean - self.pace.peers;
            // Slower by a clear margin: equal ports measure within a few %.
            self.pace.slower = own * 4.0 < peers * 3.0;
            self.pace.since = now;
            self.pace.have = self.have.count();
            self.pace.peers = mean;
        }
        let slack = BEHIND_SLACK + self.have.len() as u64 / 128;
        self.relays > 0
            && (self.have.count() as u64 + slack) * self.relays as u64 <= self.relay_held
            && self.pace.slower
    }

    /// This host has taken its share of the origin's pieces and more, and
    /// other hosts are taking theirs: it leaves the next ones to them.
    fn over_origin_share(&mut self, now: Instant) -> bool {
        if self
            .last_room_claim
            .is_none_or(|t| now.saturating_duration_since(t) >= CLAIMING)
        {
            return false;
        }
        if self
            .room_at
            .is_none_or(|t| now.saturating_duration_since(t) >= ROOM_REFRESH)
        {
            self.room.clear();
            self.room.extend(self.shares.values().copied());
            // Counted hosts that have claimed nothing yet count as 0.
            self.room.resize(self.room.len().max(self.hosts), 0);
            self.room.sort_unstable();
            self.room_at = Some(now);
        }
        self.own_claims > self.room_median() + ORIGIN_SHARE_SLACK
    }

    /// The (lower) median of the room's shares and this host's own.
    fn room_median(&self) -> u64 {
        let own = self.own_claims;
        // Where `own` goes among the others, and the middle of them all.
        let at = self.room.partition_point(|&s| s < own);
        let mid = self.room.len() / 2;
        match mid.cmp(&at) {
            std::cmp::Ordering::Less => self.room[mid],
            std::cmp::Ordering::Equal => own,
            std::cmp::Ordering::Greater => self.room[mid - 1],
        }
    }

    /// A host now holds the piece it claimed.
    pub fn claim_held(&mut self, piece: usize) {
        if piece >= self.avail.len() {
            return;
        }
        self.avail[piece] += 1;
        self.track(piece, |p| {
            p.relay_claims[piece] = p.relay_claims[piece].saturating_sub(1)
        });
        self.relay_held += 1;
    }

    /// A host left (or failed) with a claim it did not fill.
    pub fn claim_dropped(&mut self, piece: usize) {
        if piece >= self.relay_avail.len() {
            return;
        }
        self.track(piece, |p| {
            p.relay_avail[piece] = p.relay_avail[piece].saturating_sub(1);
            p.relay_claims[piece] = p.relay_claims[piece].saturating_sub(1);
        });
    }

    /// A counted host's connection closed: its claims no longer count.
    pub fn peer_left(&mut self, conn: u64) {
        self.shares.remove(&conn);
        self.room_at = None;
    }

    pub fn peer_gone(&mut self, peer: &PeerPieces, origin: bool) {
        for i in peer.bits.iter_set() {
            self.peer_lost(i, origin);
        }
    }

    /// Whether `peer` holds anything this side lacks.
    pub fn wants_from(&self, peer: &mut PeerPieces) -> bool {
        peer.prune(&self.have);
        !peer.wanted.is_empty()
    }

    fn free(&self, i: usize, peer: &Bits, origin: bool) -> bool {
        !self.have.get(i)
            && self.inflight[i] == 0
            && peer.get(i)
            && (!origin || self.relay_avail[i] == 0)
    }

    #[cfg(test)]
    pub fn pick(&mut self, peer: &Bits, origin: bool) -> Option<usize> {
        self.pick_fetching(peer, origin, &[])
    }

    #[cfg(test)]
    pub fn pick_fetching(
        &mut self,
        peer: &Bits,
        origin: bool,
        fetching: &[usize],
    ) -> Option<usize> {
        let mut peer = PeerPieces::from_bits(peer.clone(), &self.have);
        self.pick_except(&mut peer, origin, fetching)
    }

    /// The next piece to fetch from `peer`, marked in flight; `None` if the
    /// peer has nothing useful that is not already coming. Never one of
    /// `fetching`, the pieces already being fetched from this peer.
    pub fn pick_except(
        &mut self,
        peer: &mut PeerPieces,
        origin: bool,
        fetching: &[usize],
    ) -> Option<usize> {
        peer.prune(&self.have);
        let p = if origin {
            // Once every piece is out in the room, the origin's port is
            // free: it helps spread the rarest ones.
            self.pick_origin(&peer.bits).or_else(|| {
                if self.all_out() {
                    self.pick_rarest(peer)
                } else {
                    None
                }
            })
        } else {
            self.pick_rarest(peer)
        }
        .or_else(|| self.pick_duplicate(peer, origin, fetching))?;
        if self.inflight[p] == 0 {
            self.inflight_pieces += 1;
        }
        self.inflight[p] += 1;
        Some(p)
    }

    /// Every piece is here or held by another host (not merely claimed:
    /// the origin still has those to send).
    fn all_out(&self) -> bool {
        self.not_out == 0
    }

    fn pick_origin(&mut self, peer: &Bits) -> Option<usize> {
        let n = self.have.len();
        let now = Instant::now();
        if n == 0 || self.behind(now) || self.over_origin_share(now) {
            return None;
        }
        if self.rewalk || !self.free(self.cursor, peer, true) {
            self.rewalk = false;
            self.cursor = self.largest_gap(peer)?;
        }
        let p = self.cursor;
        self.cursor = (p + 1) % n;
        Some(p)
    }

    /// Start of a new walk: about the middle of the largest circular run of
    /// free pieces (the whole ring: where the walk is). The point is
    /// jittered so that two hosts choosing at once do not walk in step. When
    /// only short runs are left, any free piece at random: hosts choosing at
    /// once would otherwise all take the same one.
    fn largest_gap(&mut self, peer: &Bits) -> Option<usize> {
        let n = self.have.len();
        // Begin the scan just after a piece that is not free, so no run wraps.
        let Some(anchor) = (0..n).find(|&i| !self.free(i, peer, true)) else {
            return Some(self.cursor);
        };
        let (mut best, mut best_len) = (None, 0usize);
        let (mut run_start, mut run_len) = (0, 0usize);
        // A free piece chosen uniformly (reservoir sampling).
        let (mut any, mut free_seen) = (None, 0u64);
        for k in 1..=n {
            let i = (anchor + k) % n;
            if self.free(i, peer, true) {
                free_seen += 1;
                if self.next_rand().is_multiple_of(free_seen) {
                    any = Some(i);
                }
                if run_len == 0 {
                    run_start = i;
                }
                run_len += 1;
            } else {
                if run_len > best_len {
                    best = Some(run_start);
                    best_len = run_len;
                }
                run_len = 0;
            }
        }
        let start = best?;
        if best_len < 4 {
            return any;
        }
        let jitter = (self.next_rand() % (best_len as u64 / 3 + 1)) as usize;
        Some((start + best_len / 3 + jitter) % n)
    }

    fn pick_rarest(&mut self, peer: &PeerPieces) -> Option<usize> {
        let n = peer.wanted.len();
        if n == 0 {
            return None;
        }
        let from = (self.next_rand() % n as u64) as usize;
        let mut best: Option<(u32, usize)> = None;
        for k in 0..n {
            let i = peer.wanted[(from + k) % n];
            if self.free(i, &peer.bits, false) && best.is_none_or(|(a, _)| self.avail[i] < a) {
                best = Some((self.avail[i], i));
            }
        }
        best.map(|(_, i)| i)
    }

    /// End game: a second copy of a piece in flight, from another peer.
    /// - When every missing piece is in flight.
    /// - Or once every piece is out in the room: no new piece will come, and
    ///   the last ones wait behind their first holders, each sending them to
    ///   every other host at once, while other peers (and the origin) idle.
    ///
    /// It is the piece that most peers hold (ties broken at random): its
    /// first fetch is the one most likely stuck behind a busy holder, and the
    /// most peers can serve it.
    fn pick_duplicate(
        &mut self,
        peer: &PeerPieces,
        origin: bool,
        fetching: &[usize],
    ) -> Option<usize> {
        let missing = self.have.len() - self.have.count();
        if missing == 0 {
            return None;
        }
        let out = self.all_out();
        if self.inflight_pieces < missing && !out {
            return None;
        }
        let n = peer.wanted.len();
        if n == 0 {
            return None;
        }
        let from = (self.next_rand() % n as u64) as usize;
        (0..n)
            .map(|k| peer.wanted[(from + k) % n])
            .filter(|&i| {
                !self.have.get(i)
                    && peer.get(i)
                    && (1..MAX_DUPLICATES).contains(&self.inflight[i])
                    && (!origin || out || self.relay_avail[i] == 0)
                    && !fetching.contains(&i)
            })
            .min_by_key(|&i| std::cmp::Reverse(self.avail[i]))
    }

    /// Marks a piece picked from the origin as claimed; true if it was not.
    pub fn claim(&mut self, piece: usize) -> bool {
        match self.claimed.get_mut(piece) {
            Some(c) if !*c && !self.have.get(piece) => {
                *c = true;
                self.own_claims += 1;
                true
            }
            _ => false,
        }
    }

    fn is_claimed(&self, piece: usize) -> bool {
        self.claimed.get(piece).copied().unwrap_or(false)
    }

    /// The origin fetch of a claimed piece failed: the other hosts were told
    /// it is here, so it is fetched again from the origin next.
    pub fn reclaim_next(&mut self, piece: usize) {
        if self.is_claimed(piece) && !self.have.get(piece) {
            self.cursor = piece;
            self.rewalk = false;
        }
    }

    /// A peer announced `piece` but could not deliver it: forget it there.
    pub fn peer_lost(&mut self, piece: usize, origin: bool) {
        if piece >= self.avail.len() {
            return;
        }
        self.avail[piece] = self.avail[piece].saturating_sub(1);
        if !origin {
            self.track(piece, |p| {
                p.relay_avail[piece] = p.relay_avail[piece].saturating_sub(1)
            });
            self.relay_held = self.relay_held.saturating_sub(1);
        }
    }

    /// A fetch of `piece` ended without it (peer gone, choked, bad hash).
    pub fn release(&mut self, piece: usize) {
        if let Some(f) = self.inflight.get_mut(piece)
            && *f > 0
        {
            *f -= 1;
            if *f == 0 {
                self.inflight_pieces -= 1;
            }
        }
    }

    #[cfg(test)]
    pub fn inflight(&self, piece: usize) -> u8 {
        self.inflight[piece]
    }

    /// `piece` arrived and passed its hash. Returns false if another copy
    /// got here first. The fetch counts as ended either way. A piece from the
    /// origin that a relay holds too means another host walks the same run:
    /// the next piece from the origin starts a new walk.
    pub fn complete(&mut self, piece: usize, from_origin: bool) -> bool {
        self.release(piece);
        if from_origin && self.relay_avail.get(piece).is_some_and(|&a| a > 0) {
            self.rewalk = true;
        }
        if let Some(c) = self.claimed.get_mut(piece) {
            *c = false;
        }
        if piece >= self.have.len() {
            return false;
        }
        let mut new = false;
        self.track(piece, |p| new = p.have.set(piece));
        new
    }

    fn next_rand(&mut self) -> u64 {
        // xorshift64
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picker(n: usize, start: f64) -> Picker {
        Picker::new(Bits::new(n), start, 7)
    }

    #[test]
    fn bitfield_round_trip() {
        let mut b = Bits::new(11);
        for i in [0, 3, 8, 10] {
            b.set(i);
        }
        let bytes = b.to_bytes();
        assert_eq!(bytes, vec![0b1001_0000, 0b1010_0000]);
        let back = Bits::from_bytes(11, &bytes);
        assert_eq!(back.iter_set().collect::<Vec<_>>(), vec![0, 3, 8, 10]);
        assert_eq!(back.count(), 4);
        assert!(!back.get(11));
    }

    #[test]
    fn origin_walk_starts_at_the_offset_and_goes_forward() {
        let mut p = picker(100, 0.25);
        let seed = Bits::full(100);
        for want in 25..35 {
            assert_eq!(p.pick(&seed, true), Some(want));
        }
    }

    #[test]
    fn origin_walk_skips_what_peers_hold_and_splits_the_largest_gap() {
        let mut p = picker(100, 0.0);
        let seed = Bits::full(100);
        // A relay holds 0..50 (it walked there): our walk jumps to the middle
        // of the free run 50..100.
        for i in 0..50 {
            p.peer_has(i, false);
        }
        let a = p.pick(&seed, true).unwrap();
        assert!((66..=84).contains(&a), "{a}");
        assert_eq!(p.pick(&seed, true), Some(a + 1));
        // Another host turns out to walk the same run: start anew.
        p.peer_has(a, false);
        assert!(p.complete(a, true));
        let b = p.pick(&seed, true).unwrap();
        assert_ne!(b, a + 2);
        assert!(!p.have().get(b) && b >= 50);
    }

    #[test]
    fn when_only_single_pieces_are_free_hosts_take_different_ones() {
        let seed = Bits::full(100);
        let mut firsts = std::collections::HashSet::new();
        for host in 1..=16u64 {
            let mut p = Picker::new(Bits::new(100), 0.0, host);
            for i in (0..100).filter(|i| ![10, 50, 90].contains(i)) {
                p.peer_has(i, false);
            }
            let got = p.pick(&seed, true).unwrap();
            assert!([10, 50, 90].contains(&got), "{got}");
            firsts.insert(got);
        }
        assert!(firsts.len() > 1, "all 16 hosts chose piece {firsts:?}");
    }

    #[test]
    fn a_claimed_piece_is_left_to_its_claimer_until_the_claim_is_dropped() {
        let mut p = picker(3, 0.0);
        let seed = Bits::full(3);
        p.peer_claims(0, Some(1));
        p.peer_claims(1, Some(2));
        assert_eq!(p.pick(&seed, true), Some(2));
        assert!(p.complete(2, true));
        assert_eq!(
            p.pick(&seed, true),
            None,
            "claimed pieces are still the origin's to send"
        );
        // The claimer got piece 0; the claimer of piece 1 went away.
        p.claim_held(0);
        p.claim_dropped(1);
        assert_eq!(p.pick(&seed, true), Some(1));
        let mut relay = Bits::new(3);
        relay.set(0);
        assert_eq!(p.pick(&relay, false), Some(0));
    }

    #[test]
    fn origin_pieces_held_by_a_relay_are_not_taken_from_the_origin() {
        let mut p = picker(4, 0.0);
        let seed = Bits::full(4);
        for i in 0..4 {
            p.peer_has(i, true);
        }
        p.peer_has(1, false);
        p.peer_has(2, false);
        let mut got = vec![p.pick(&seed, true).unwrap(), p.pick(&seed, true).unwrap()];
        got.sort();
        assert_eq!(got, vec![0, 3]);
        // 1 and 2 come from the relay; nothing more from the origin, not
        // even as duplicates, while a relay holds them.
        assert_eq!(p.pick(&seed, true), None);
        // Once every piece is out in the room, the idle origin helps with
        // the rarest.
        assert!(p.complete(0, true) && p.complete(3, true));
        p.peer_has(1, false);
        assert_eq!(p.pick(&seed, true), Some(2));
        assert_eq!(p.pick(&seed, true), Some(1));
    }

    #[test]
    fn rarest_first_from_relays() {
        let mut p = picker(3, 0.0);
        let mut a = Bits::new(3);
        let mut b = Bits::new(3);
        for i in 0..3 {
            a.set(i);
            p.peer_has(i, false);
        }
        b.set(0);
        b.set(1);
        p.peer_has(0, false);
        p.peer_has(1, false);
        // Piece 2 is held by one peer only: first.
        assert_eq!(p.pick(&a, false), Some(2));
        let next = p.pick(&b, false).unwrap();
        assert!(next == 0 || next == 1);
    }

    #[test]
    fn end_game_duplicates_then_first_copy_wins() {
        let mut p = picker(2, 0.0);
        let full = Bits::full(2);
        for i in 0..2 {
            p.peer_has(i, false);
            p.peer_has(i, false);
        }
        let a = p.pick(&full, false).unwrap();
        let b = p.pick(&full, false).unwrap();
        assert_ne!(a, b);
        // All missing pieces in flight: a second peer may double one.
        let d = p.pick(&full, false).unwrap();
        assert!(d == a || d == b);
        let e = p.pick(&full, false).unwrap();
        assert_ne!(d, e);
        // No third copy.
        assert_eq!(p.pick(&full, false), None);
        assert!(p.complete(d, false));
        assert!(
            !p.complete(d, false),
            "the second copy is not counted twice"
        );
        p.release(e);
        p.release(e);
        assert!(p.pick(&full, false) == Some(e));
        assert!(p.complete(e, false));
        assert!(p.is_complete());
        assert_eq!(p.pick(&full, false), None);
    }

    #[test]
    fn once_every_piece_is_out_idle_peers_double_the_piece_most_peers_hold() {
        let mut p = picker(3, 0.0);
        let seed = Bits::full(3);
        for i in 0..3 {
            p.peer_has(i, true);
        }
        // Piece 0 is held by three hosts, 1 and 2 by one each.
        for i in [0, 0, 0, 1, 2] {
            p.peer_has(i, false);
        }
        let only = |i: usize| {
            let mut b = Bits::new(3);
            b.set(i);
            b
        };
        assert_eq!(p.pick(&only(0), false), Some(0));
        assert_eq!(p.pick(&only(1), false), Some(1));
        // Piece 2 is not in flight yet, but every piece is out: an idle
        // peer holding 0 and 1 doubles 0, which most peers hold.
        let mut both = only(0);
        both.set(1);
        assert_eq!(p.pick(&both, false), Some(0));
        // The origin, idle now, sends piece 2 first, then a second copy of 1.
        assert_eq!(p.pick_fetching(&seed, true, &[]), Some(2));
        assert_eq!(p.pick_fetching(&seed, true, &[2]), Some(1));
        // No third copy of anything.
        assert_eq!(p.pick_fetching(&seed, true, &[2, 1]), None);
        assert_eq!(p.pick(&both, false), None);
    }

    #[test]
    fn end_game_never_doubles_a_piece_on_the_connection_fetching_it() {
        let mut p = picker(1, 0.0);
        let seed = Bits::full(1);
        assert_eq!(p.pick_fetching(&seed, true, &[]), Some(0));
        // The origin's connection already fetches it: no second copy there.
        assert_eq!(p.pick_fetching(&seed, true, &[0]), None);
        // A relay that holds it may send a second copy.
        let mut relay = Bits::new(1);
        relay.set(0);
        p.peer_has(0, false);
        assert_eq!(p.pick_fetching(&relay, false, &[]), Some(0));
    }

    #[test]
    fn released_pieces_are_picked_again() {
        let mut p = picker(1, 0.0);
        let seed = Bits::full(1);
        assert_eq!(p.pick(&seed, true), Some(0));
        // In flight: only the end game may double it.
        assert_eq!(p.pick(&seed, true), Some(0));
        assert_eq!(p.pick(&seed, true), None);
        p.release(0);
        p.release(0);
        assert_eq!(p.pick(&seed, true), Some(0));
    }

    #[test]
    fn a_host_far_behind_its_peers_takes_only_what_they_hold() {
        // 1024 pieces: behind by 16 + 8 pieces or more.
        let mut p = picker(1024, 0.0);
        let seed = Bits::full(1024);
        let mut relay = Bits::new(1024);
        p.set_hosts(2, 2);
        for i in 0..40 {
            relay.set(i);
            p.peer_has(i, false);
            p.peer_has(i, false);
        }
        // Peers hold 40 on average, this host nothing: nothing new from the
        // origin, but what the peers hold.
        assert_eq!(p.pick(&seed, true), None);
        let i = p.pick(&relay, false).expect("a piece the relays hold");
        assert!(i < 40);
        p.complete(i, false);
        for i in (0..40).filter(|&k| k != i).take(15) {
            p.complete(i, false);
        }
        // 16 held and a slack of 24: not above the peers' 40 yet.
        assert_eq!(p.pick(&seed, true), None);
        // Caught up to within the slack: the origin's pieces again.
        let next = (0..40).find(|&k| !p.have().get(k)).expect("a piece left");
        p.complete(next, false);
        assert!(p.pick(&seed, true).is_some_and(|i| i >= 40));
        // Alone with the origin, a host is never behind.
        let mut q = picker(1024, 0.0);
        q.set_hosts(0, 0);
        assert!(q.pick(&seed, true).is_some());
    }

    /// Moves the start of the pace window back by one window: the next
    /// pick from the origin compares what was gained since.
    fn window_passes(p: &mut Picker) {
        p.pace.since = p.pace.since.checked_sub(PACE_WINDOW).expect("a clock");
    }

    #[test]
    fn a_late_host_as_fast_as_its_slow_peer_still_takes_from_the_origin() {
        // The lab's case: a slow host started first, and the fast host,
        // fed only what the slow one held, stayed 28+ pieces behind it at
        // the slow host's pace until both ended together (2.2 × S/B).
        let n = 1024;
        let seed = Bits::full(n);
        let mut p = picker(n, 0.0);
        p.set_hosts(1, 1);
        let mut next = 0;
        let mut gain = |p: &mut Picker, peer: usize, own: usize| {
            for i in next..next + peer {
                p.peer_has(i, false);
            }
            next += peer;
            let mut got = 0;
            for i in 0..n {
                if got == own {
                    break;
                }
                if p.relay_avail[i] > 0 && !p.have().get(i) {
                    p.complete(i, false);
                    got += 1;
                }
            }
        };
        // The peer holds 40 pieces, this host none: behind, and slower in
        // the first window.
        gain(&mut p, 40, 0);
        assert_eq!(p.pick(&seed, true), None);
        window_passes(&mut p);
        assert_eq!(p.pick(&seed, true), None);
        // It gains as fast as the peer does, 20 pieces a window each, and
        // stays 40 behind: waiting would never close the gap. It is not
        // behind any longer.
        window_passes(&mut p);
        gain(&mut p, 20, 20);
        let i = p.pick(&seed, true).expect("an origin piece");
        assert!(i >= 60, "{i} is held by the peer");
        p.release(i);
        // A host that gains at half its peer's pace (a slow port) is.
        window_passes(&mut p);
        gain(&mut p, 40, 20);
        window_passes(&mut p);
        assert_eq!(p.pick(&seed, true), None);
    }

    /// A picker of 100 pieces that has claimed `n` from the origin, with
    /// `hosts` counted hosts around it.
    fn claimed(n: usize, hosts: usize) -> Picker {
        let mut p = picker(100, 0.0);
        p.set_hosts(hosts, hosts);
        for _ in 0..n {
            let i = p.pick(&Bits::full(100), true).expect("nobody else claims");
            assert!(p.claim(i));
        }
        p
    }

    #[test]
    fn a_host_ahead_of_the_room_leaves_origin_pieces_to_the_others() {
        let seed = Bits::full(100);
        let mut p = claimed(4, 3);
        // Another host claims: 4 against the room's 0, 0, 1 and 4, whose
        // median (the lower middle one) is 0: more than 2 ahead.
        p.peer_claims(90, Some(1));
        assert_eq!(p.pick(&seed, true), None);
        // The others catch up: 1, 2, 2 and 4, median 2, back within 2
        // (once the room's shares are sorted again).
        for (i, host) in (91..95).zip([1, 2, 2, 3]) {
            p.peer_claims(i, Some(host));
        }
        p.room_at = None;
        assert!(p.pick(&seed, true).is_some());
    }

    #[test]
    fn a_slow_host_claiming_little_does_not_hold_the_others_back() {
        // Six hosts have claimed 19 pieces each, a slow one 3, this one 21:
        // 2 over the median. (The mean, 17.25, would hold it back.)
        let mut p = claimed(21, 7);
        let mut i = 30;
        for host in 1..=7 {
            for _ in 0..if host == 7 { 3 } else { 19 } {
                p.peer_claims(i % 100, Some(host));
                i += 1;
            }
        }
        assert!(!p.over_origin_share(Instant::now()));
        // One more and it is over.
        p.own_claims += 1;
        assert!(p.over_origin_share(Instant::now()));
        // The slow host leaves: the median stays 19.
        p.own_claims -= 1;
        p.peer_left(7);
        assert!(!p.over_origin_share(Instant::now()));
    }

    #[test]
    fn the_room_s_median_is_that_of_every_share_sorted() {
        let mut rng = 99u64;
        for _ in 0..2000 {
            let mut p = picker(8, 0.0);
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let hosts = (rng % 9) as usize;
            p.room = (0..hosts).map(|k| (rng >> (k * 3)) % 6).collect();
            p.room.sort_unstable();
            p.own_claims = (rng >> 40) % 7;
            let mut all = p.room.clone();
            all.push(p.own_claims);
            all.sort_unstable();
            assert_eq!(p.room_median(), all[(all.len() - 1) / 2], "{all:?}");
        }
    }

    #[test]
    fn a_host_ahead_holds_back_only_while_others_claim() {
        let mut p = claimed(10, 1);
        p.peer_claims(99, Some(1));
        let now = Instant::now();
        assert!(p.over_origin_share(now));
        // Nobody has claimed for a while (every host holding back, or a
        // claim that came late): it goes on.
        assert!(!p.over_origin_share(now + CLAIMING));
    }

    #[test]
    fn claims_of_hosts_that_came_later_do_not_count() {
        // A host that joined late claims; this one, counting only the hosts
        // that came with it (none here), is not ahead of anybody.
        let mut p = claimed(10, 0);
        p.peer_claims(99, None);
        assert!(!p.over_origin_share(Instant::now()));
        assert!(p.pick(&Bits::full(100), true).is_some());
    }

    #[test]
    fn the_count_of_pieces_not_out_follows_every_change() {
        let n = 24;
        let mut p = picker(n, 0.0);
        let mut rng = 12345u64;
        let mut next = |m: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % m) as usize
        };
        for _ in 0..5000 {
            let i = next(n as u64);
            match next(6) {
                0 => p.peer_has(i, next(4) == 0),
                1 => p.peer_claims(i, None),
                2 => p.claim_held(i),
                3 => p.claim_dropped(i),
                4 => p.peer_lost(i, next(4) == 0),
                _ => {
                    p.complete(i, false);
                }
            }
            let slow = (0..n)
                .filter(|&i| !p.have.get(i) && p.relay_avail[i] <= p.relay_claims[i])
                .count();
            assert_eq!(p.not_out, slow);
        }
    }

    #[test]
    fn a_peer_s_wanted_pieces_are_those_this_side_lacks() {
        let mut p = picker(8, 0.0);
        p.complete(1, false);
        let mut peer = PeerPieces::new(8);
        for i in [1, 2, 5] {
            assert!(peer.set(i, p.have()));
            p.peer_has(i, false);
        }
        assert!(!peer.set(2, p.have()));
        assert!(p.wants_from(&mut peer));
        assert_eq!(peer.wanted, vec![2, 5]);
        // 5 arrives through someone else; 2 the peer could not deliver.
        p.complete(5, false);
        assert!(peer.unset(2));
        p.peer_lost(2, false);
        assert!(!p.wants_from(&mut peer));
        assert_eq!(p.pick_except(&mut peer, false, &[]), None);
        // It has 2 again.
        assert!(peer.set(2, p.have()));
        p.peer_has(2, false);
        assert_eq!(p.pick_except(&mut peer, false, &[]), Some(2));
    }
}
