//! One torrent's state, shared by its connections: the picker, who is
//! connected and who is banned, the verified pieces, the counters; and the
//! [`Torrent`] handle its callers hold.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use sha1w::ISha1;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::limit::Limiter;
use super::outbox::Outbox;
use super::picker::{Bits, Picker};
use super::trust::{Trust, canonical};
use super::verified::Verified;
use super::wire::{Lengths, PieceIndex, out};
use super::writer::Slots;
use super::{PeerId, Progress, until_true};
use crate::storage::DeviceStorage;

/// Memory for pieces being fetched, per torrent. At least one piece is
/// always allowed, whatever its size.
const FETCH_MEMORY: usize = 64 << 20;
/// Verified pieces kept for serving, per torrent (one piece at least): a
/// few seconds of a host's download, which its peers ask for next.
const VERIFIED_MEMORY: usize = 16 << 20;
/// A connection older than this is never replaced by a new one to the
/// same peer; younger ones are simultaneous dials, settled by peer id.
const SETTLED: Duration = Duration::from_secs(2);
/// Connections one torrent keeps at most (the server's seed has one per
/// host). A newcomer past it takes the place of the longest-idle peer the
/// server does not vouch for.
pub(super) const MAX_PEERS: usize = 1024;
/// Connections a torrent accepts from one address it does not vouch for.
const PEERS_PER_IP: usize = 8;
/// A host that connects this long after the torrent started is a late
/// joiner: its claims on the origin's pieces are not weighed against ours.
const LATE_JOIN: Duration = Duration::from_secs(5);
/// Pieces failing their hash, from one address, before it is banned.
pub(super) const MAX_BAD_PIECES: u32 = 3;

#[derive(Debug, Clone, PartialEq)]
pub(super) enum State {
    Checking,
    Live,
    Failed(String),
}

struct PeerEntry {
    conn: u64,
    ip: IpAddr,
    /// The server's seed: an outgoing connection to the configured origin.
    origin: bool,
    incoming: bool,
    /// Came within [`LATE_JOIN`] of this torrent's start: a vouched host's
    /// claims then count in this host's share of the origin's pieces.
    early: bool,
    /// Peer id of the side that dialled.
    dialer: PeerId,
    /// When it was added.
    since: Instant,
    out: Arc<Outbox>,
    /// Ends the connection (replaced, evicted or banned).
    kill: Arc<Notify>,
    /// When its last message other than a keep-alive came, in
    /// milliseconds since the torrent started.
    activity: Arc<AtomicU64>,
    /// A host the server vouches for, as its connection last saw (see
    /// [`Shared::now_a_host`]): it hears of our claims.
    host: Arc<AtomicBool>,
}

/// A connection [`Shared::register`] let in.
pub(super) struct Registered {
    pub conn: u64,
    pub early: bool,
    pub activity: Arc<AtomicU64>,
    pub host: Arc<AtomicBool>,
}

#[derive(Default)]
struct Bans {
    ips: HashSet<IpAddr>,
    ids: HashSet<PeerId>,
    strikes: HashMap<IpAddr, u32>,
}

/// What a torrent is made of (see [`super::SwarmSession::add`]).
pub(super) struct Params {
    pub info_hash: [u8; 20],
    pub peer_id: PeerId,
    pub lengths: Lengths,
    pub pieces: Vec<[u8; 20]>,
    pub storage: DeviceStorage,
    pub start_fraction: f64,
    pub up_limit: Arc<Limiter>,
    pub down_limit: Arc<Limiter>,
    pub slots: Option<Arc<Slots>>,
    pub origin: Option<SocketAddr>,
    pub trust: Arc<Trust>,
}

/// One torrent's state, shared by its connections.
pub(crate) struct Shared {
    pub(super) info_hash: [u8; 20],
    pub(super) peer_id: PeerId,
    pub(super) lengths: Lengths,
    /// Piece hashes, [`Lengths::count`] of them.
    pieces: Vec<[u8; 20]>,
    pub(super) storage: DeviceStorage,
    picker: Mutex<Picker>,
    /// When this torrent's session began.
    started: Instant,
    peers: Mutex<HashMap<PeerId, PeerEntry>>,
    conn_serial: AtomicU64,
    /// Bumped when pieces arrive or go back to the picker.
    pub(super) changed: watch::Sender<u64>,
    pub(super) done: watch::Sender<bool>,
    pub(super) stopped: watch::Sender<bool>,
    pub(super) state: watch::Sender<State>,
    done_bytes: AtomicU64,
    pub(super) uploaded: AtomicU64,
    downloaded: AtomicU64,
    /// Of `downloaded`, what came from the origin.
    from_origin: AtomicU64,
    /// Download and upload, bytes per second.
    rates: Mutex<(f64, f64)>,
    fetch_memory: AtomicUsize,
    pub(super) up_limit: Arc<Limiter>,
    pub(super) down_limit: Arc<Limiter>,
    /// The origin's upload slots: this is the server's seed.
    pub(super) slots: Option<Arc<Slots>>,
    /// The server's seed as this host dials it.
    pub(super) origin: Option<SocketAddr>,
    pub(super) trust: Arc<Trust>,
    bans: Mutex<Bans>,
    verified: Verified,
    /// Pieces of this host's target found changed, logged once each.
    mismatched: Mutex<HashSet<PieceIndex>>,
    /// Every piece this host claimed, for the hosts the server vouches for
    /// only later (see [`Shared::now_a_host`]).
    own_claims: Mutex<Vec<PieceIndex>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a connection to a peer stays when another one to the same peer
/// comes: always once settled; of two young ones, the one dialled by the
/// smaller peer id (both sides decide alike).
fn keeps_old(old_dialer: &PeerId, old_age: Duration, new_dialer: &PeerId) -> bool {
    old_age > SETTLED || old_dialer <= new_dialer
}

impl Shared {
    pub(super) fn new(p: Params) -> Self {
        let seed = u64::from_le_bytes(p.peer_id[12..20].try_into().expect("8 bytes"));
        let n = p.lengths.count();
        Self {
            info_hash: p.info_hash,
            peer_id: p.peer_id,
            lengths: p.lengths,
            pieces: p.pieces,
            storage: p.storage,
            picker: Mutex::new(Picker::new(Bits::new(n), p.start_fraction, seed)),
            started: Instant::now(),
            peers: Mutex::default(),
            conn_serial: AtomicU64::new(0),
            changed: watch::channel(0).0,
            done: watch::channel(false).0,
            stopped: watch::channel(false).0,
            state: watch::channel(State::Checking).0,
            done_bytes: AtomicU64::new(0),
            uploaded: AtomicU64::new(0),
            downloaded: AtomicU64::new(0),
            from_origin: AtomicU64::new(0),
            rates: Mutex::new((0.0, 0.0)),
            fetch_memory: AtomicUsize::new(0),
            up_limit: p.up_limit,
            down_limit: p.down_limit,
            slots: p.slots,
            origin: p.origin,
            trust: p.trust,
            bans: Mutex::default(),
            verified: Verified::new(VERIFIED_MEMORY.max(p.lengths.piece_len() as usize)),
            mismatched: Mutex::default(),
            own_claims: Mutex::default(),
        }
    }

    pub(super) fn picker(&self) -> MutexGuard<'_, Picker> {
        lock(&self.picker)
    }

    pub(super) fn has(&self, p: PieceIndex) -> bool {
        self.picker().have().get(p.get())
    }

    pub(super) fn have_bytes(&self) -> Vec<u8> {
        self.picker().have().to_bytes()
    }

    pub(super) fn blocks_per_piece(&self) -> usize {
        self.lengths.piece_len().div_ceil(super::wire::BLOCK) as usize
    }

    /// Milliseconds since this torrent started, for [`PeerEntry::activity`].
    pub(super) fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// What a connection's unsent messages may add up to (see [`Outbox::new`]).
    pub(super) fn control_cap(&self) -> usize {
        (64 << 10) + 2 * 9 * self.lengths.count() + self.lengths.bitfield_len()
    }

    pub(super) fn reserve_memory(&self) -> bool {
        let p = self.lengths.piece_len() as usize;
        self.fetch_memory
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| {
                (m == 0 || m + p <= FETCH_MEMORY).then_some(m + p)
            })
            .is_ok()
    }

    pub(super) fn release_memory(&self) {
        let p = self.lengths.piece_len() as usize;
        let _ = self
            .fetch_memory
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| {
                Some(m.saturating_sub(p))
            });
    }

    pub(super) fn bump(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    pub(super) fn done_bytes(&self) -> u64 {
        self.done_bytes.load(Ordering::Relaxed)
    }

    pub(super) fn uploaded(&self) -> u64 {
        self.uploaded.load(Ordering::Relaxed)
    }

    pub(super) fn downloaded(&self) -> u64 {
        self.downloaded.load(Ordering::Relaxed)
    }

    pub(super) fn peer_count(&self) -> usize {
        lock(&self.peers).len()
    }

    pub(super) fn is_complete(&self) -> bool {
        *self.done.borrow()
    }

    pub(super) fn fail(&self, e: String) {
        warn!("swarm: {e}");
        self.state.send_replace(State::Failed(e));
        self.stopped.send_replace(true);
    }

    pub(super) fn vouches(&self, ip: IpAddr) -> bool {
        self.trust.vouches(ip)
    }

    /// Adds a connection, or says why not: banned; this peer already has a
    /// connection that stays (when both sides dial each other at once, both
    /// keep the one dialled by the smaller peer id; a settled connection
    /// always stays); too many from its address; no room, not even in the
    /// place of an idle peer nobody vouches for.
    pub(super) fn register(
        &self,
        id: PeerId,
        addr: SocketAddr,
        outgoing: bool,
        out: Arc<Outbox>,
        kill: Arc<Notify>,
    ) -> Result<Registered, String> {
        let ip = canonical(addr.ip());
        if self.is_banned(ip, Some(&id)) {
            return Err("banned from this torrent".into());
        }
        let vouched = self.vouches(ip);
        let mut peers = lock(&self.peers);
        let dialer = if outgoing { self.peer_id } else { id };
        if let Some(old) = peers.get(&id) {
            // A connection that has been up a while stays: the new one is a
            // second dial to a peer that dialled us first (the tracker names
            // its listening port, which we had not seen). Both sides see it
            // so and drop the new one, and nothing in flight is lost.
            if keeps_old(&old.dialer, old.since.elapsed(), &dialer) {
                return Err("already connected to this peer".into());
            }
            old.kill.notify_one();
        } else {
            if !outgoing && !vouched {
                let from_ip = peers.values().filter(|p| p.incoming && p.ip == ip).count();
                if from_ip >= PEERS_PER_IP {
                    return Err(format!("{from_ip} connections from {ip} already"));
                }
            }
            if peers.len() >= MAX_PEERS {
                let trust = self.trust.read();
                let idlest = peers
                    .iter()
                    .filter(|(_, p)| !p.origin && !trust.contains(&p.ip))
                    .min_by_key(|(_, p)| p.activity.load(Ordering::Relaxed))
                    .map(|(k, _)| *k);
                drop(trust);
                let Some(gone) = idlest.and_then(|k| peers.remove(&k)) else {
                    return Err(format!("{MAX_PEERS} peers connected already"));
                };
                debug!(ip = %gone.ip, "evicted, the longest idle, for a newcomer");
                gone.kill.notify_one();
            }
        }
        let conn = self.conn_serial.fetch_add(1, Ordering::Relaxed);
        let early = self.started.elapsed() < LATE_JOIN;
        let activity = Arc::new(AtomicU64::new(self.now_ms()));
        let host = Arc::new(AtomicBool::new(false));
        peers.insert(
            id,
            PeerEntry {
                conn,
                ip,
                origin: outgoing && self.origin == Some(addr),
                incoming: !outgoing,
                early,
                dialer,
                since: Instant::now(),
                out,
                kill,
                activity: activity.clone(),
                host: host.clone(),
            },
        );
        self.count_hosts(peers);
        Ok(Registered {
            conn,
            early,
            activity,
            host,
        })
    }

    pub(super) fn is_connected(&self, id: &PeerId) -> bool {
        lock(&self.peers).contains_key(id)
    }

    pub(super) fn unregister(&self, id: PeerId, conn: u64) {
        let mut peers = lock(&self.peers);
        if peers.get(&id).is_some_and(|p| p.conn == conn) {
            peers.remove(&id);
        }
        self.count_hosts(peers);
        self.bump();
    }

    /// The trust set changed: who counts as a host may have.
    pub(super) fn recount_hosts(&self) {
        self.count_hosts(lock(&self.peers));
        self.bump();
    }

    /// Tells the picker how many counted hosts (vouched for, come early) are
    /// connected. Takes the peers' lock and lets it go before taking the
    /// picker's.
    fn count_hosts(&self, peers: MutexGuard<'_, HashMap<PeerId, PeerEntry>>) {
        let trust = self.trust.read();
        let hosts = peers
            .values()
            .filter(|p| p.early && !p.origin && trust.contains(&p.ip))
            .count();
        let relays = peers.values().filter(|p| !p.origin).count();
        drop(trust);
        drop(peers);
        self.picker().set_hosts(hosts, relays);
    }

    /// A piece picked from the origin: the other hosts hear of it at once,
    /// so none of them asks the origin for it too.
    pub(super) fn claim(&self, p: PieceIndex) {
        if !self.picker().claim(p.get()) {
            return;
        }
        // Under the log's lock: each host hears of each claim once, here
        // or in [`Shared::now_a_host`].
        let mut log = lock(&self.own_claims);
        log.push(p);
        let m = out::claim(p);
        for e in lock(&self.peers).values() {
            if e.host.load(Ordering::Relaxed) {
                e.out.control(&m);
            }
        }
    }

    /// A connection's peer is now a host the server vouches for (`host` is
    /// its flag): returns all our claims so far, for it to hear of.
    pub(super) fn now_a_host(&self, host: &AtomicBool) -> Vec<u8> {
        let log = lock(&self.own_claims);
        host.store(true, Ordering::Relaxed);
        log.iter().flat_map(|&p| out::claim(p)).collect()
    }

    /// A piece passed its hash and is on the target; `data` is it, for
    /// serving from memory.
    pub(super) fn piece_done(&self, p: PieceIndex, from_origin: bool, data: Arc<Vec<u8>>) {
        let (new, complete) = {
            let mut k = self.picker();
            (k.complete(p.get(), from_origin), k.is_complete())
        };
        if new {
            self.verified.insert(p, data);
            let len = u64::from(self.lengths.size(p));
            self.done_bytes.fetch_add(len, Ordering::Relaxed);
            self.downloaded.fetch_add(len, Ordering::Relaxed);
            if from_origin {
                self.from_origin.fetch_add(len, Ordering::Relaxed);
            }
            // A piece from the origin is new to the room: its have goes at
            // once, the others ask us for it. One from a peer came to the
            // others from the same peer meanwhile: its have rides with the
            // connection's next write or waits for [`haves_loop`]. The last
            // one goes at once.
            let m = out::have(p);
            for e in lock(&self.peers).values() {
                match from_origin || complete {
                    true => e.out.control(&m),
                    false => e.out.control_later(&m),
                }
            }
        }
        self.bump();
        if complete {
            self.done.send_replace(true);
        }
    }

    pub(super) fn hash_matches(&self, p: PieceIndex, data: &[u8]) -> bool {
        let mut h = sha1w::Sha1::new();
        h.update(data);
        self.pieces.get(p.get()) == Some(&h.finish())
    }

    /// Piece `p` if it is in memory, hashed and found good.
    pub(super) fn cached(&self, p: PieceIndex) -> Option<Arc<Vec<u8>>> {
        self.verified.get(p)
    }

    /// Piece `p` read from the storage and hashed, to serve; `None` if this
    /// host's copy no longer matches (logged once). On a read-only source
    /// (a seed) a mismatch fails the torrent: the source changed since
    /// capture, and nothing more of it is served. Blocks this thread for a
    /// disk read and a hash.
    pub(super) fn verify(&self, p: PieceIndex) -> Result<Option<Arc<Vec<u8>>>> {
        let off = self.lengths.offset(p);
        let mut buf = vec![0u8; self.lengths.size(p) as usize];
        self.storage.read(off, &mut buf)?;
        if self.hash_matches(p, &buf) {
            let d = Arc::new(buf);
            self.verified.insert(p, d.clone());
            return Ok(Some(d));
        }
        // Named by payload offsets: the manifest's pieces come first.
        let pre = self.storage.prefix_len();
        let (off, end) = (
            off.saturating_sub(pre),
            (off + buf.len() as u64).saturating_sub(pre),
        );
        if !self.storage.is_writable() {
            let e = format!(
                "piece {p} (payload bytes {off}..{end}) no longer matches its hash: \
                 the source changed since capture; stopped serving it"
            );
            self.fail(e.clone());
            bail!(e);
        }
        if lock(&self.mismatched).insert(p) {
            warn!(
                "piece {p} (payload bytes {off}..{end}) on this host's target no longer matches \
                 its hash (written over since it arrived?): not serving it"
            );
        }
        Ok(None)
    }

    pub(super) fn is_banned(&self, ip: IpAddr, id: Option<&PeerId>) -> bool {
        let b = lock(&self.bans);
        b.ips.contains(&canonical(ip)) || id.is_some_and(|id| b.ids.contains(id))
    }

    /// A piece from `ip` failed its hash. At [`MAX_BAD_PIECES`], the address
    /// and the peer id are banned for this torrent's life, and every
    /// connection of theirs ends. Returns the strikes so far.
    pub(super) fn strike(&self, ip: IpAddr, id: PeerId) -> u32 {
        let ip = canonical(ip);
        let n = {
            let mut b = lock(&self.bans);
            let n = b.strikes.entry(ip).or_default();
            *n += 1;
            let n = *n;
            if n >= MAX_BAD_PIECES {
                b.ips.insert(ip);
                b.ids.insert(id);
            }
            n
        };
        if n >= MAX_BAD_PIECES {
            for e in lock(&self.peers).iter() {
                if e.1.ip == ip || *e.0 == id {
                    e.1.kill.notify_one();
                }
            }
        }
        n
    }

    /// Hashes what the storage already holds: all of it, or only the
    /// manifest's pieces of a fresh one.
    pub(super) async fn initial_check(self: &Arc<Self>) -> Result<()> {
        let n = self.lengths.count();
        let fresh = self.storage.is_fresh();
        // A fresh target holds nothing yet, but the manifest's pieces are in
        // memory when the image is known: they are checked (a few pieces).
        let check_len = if !fresh {
            self.lengths.total()
        } else if self.storage.prefix_known() {
            self.storage.prefix_len()
        } else {
            0
        };
        if check_len > 0 {
            let t = self.clone();
            let good = tokio::task::spawn_blocking(move || -> Result<Bits> {
                let read = |off: u64, buf: &mut [u8]| t.storage.read(off, buf);
                let got = crate::image::torrent::hash_payload(
                    &read,
                    check_len,
                    t.lengths.piece_len(),
                    None,
                    &|_| {},
                )?;
                let mut bits = Bits::new(n);
                for (i, want) in t.pieces.iter().enumerate() {
                    if got.get(i * 20..i * 20 + 20) == Some(&want[..]) {
                        bits.set(i);
                    }
                }
                Ok(bits)
            })
            .await??;
            let bytes: u64 = good
                .iter_set()
                .filter_map(|i| self.lengths.piece_at(i))
                .map(|p| u64::from(self.lengths.size(p)))
                .sum();
            self.done_bytes.store(bytes, Ordering::Relaxed);
            let mut p = self.picker();
            for i in good.iter_set() {
                p.complete(i, false);
            }
        }
        if self.picker().is_complete() {
            self.done.send_replace(true);
        }
        self.state.send_replace(State::Live);
        Ok(())
    }
}

/// Smooths the byte counters into rates, once a second.
pub(super) async fn rates_loop(t: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let (mut down0, mut up0) = (t.downloaded(), t.uploaded());
    let mut stopped = t.stopped.subscribe();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = until_true(&mut stopped) => return,
        }
        let (down, up) = (t.downloaded(), t.uploaded());
        let mut r = lock(&t.rates);
        r.0 = 0.5 * r.0 + 0.5 * (down - down0) as f64;
        r.1 = 0.5 * r.1 + 0.5 * (up - up0) as f64;
        (down0, up0) = (down, up);
    }
}

/// How long a have of a relayed piece may wait for its connection's next
/// write before it is sent with the others that waited: per connection, a
/// host's haves come at its piece rate (7 a second at 8 Mbit/s and 128 KiB),
/// so only a wait of several piece-times puts several in one write.
const HAVE_DELAY: Duration = Duration::from_millis(500);

/// Sends the haves that waited [`HAVE_DELAY`] (see [`Outbox::control_later`]).
pub(super) async fn haves_loop(t: Arc<Shared>) {
    let mut tick = tokio::time::interval(HAVE_DELAY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopped = t.stopped.subscribe();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = until_true(&mut stopped) => return,
        }
        for e in lock(&t.peers).values() {
            e.out.flush_later();
        }
    }
}

/// One image in a session.
#[derive(Clone)]
pub struct Torrent {
    pub(super) shared: Arc<Shared>,
    pub(super) tasks: Arc<Mutex<JoinSet<()>>>,
}

impl Torrent {
    /// Waits for the check of what the storage holds.
    pub async fn wait_initialized(&self) -> Result<()> {
        let mut rx = self.shared.state.subscribe();
        let s = rx
            .wait_for(|s| *s != State::Checking)
            .await
            .map_err(|_| anyhow::anyhow!("the torrent was dropped"))?
            .clone();
        match s {
            State::Failed(e) => bail!("{e}"),
            _ => Ok(()),
        }
    }

    pub async fn wait_completed(&self) -> Result<()> {
        let mut done = self.shared.done.subscribe();
        tokio::select! {
            r = done.wait_for(|d| *d) => {
                r.map_err(|_| anyhow::anyhow!("the torrent was dropped"))?;
                Ok(())
            }
            e = self.wait_failed() => Err(e),
        }
    }

    /// Returns once the torrent has failed (a seed whose source changed, a
    /// target that cannot be written), with why.
    pub async fn wait_failed(&self) -> anyhow::Error {
        let mut state = self.shared.state.subscribe();
        match state.wait_for(|s| matches!(s, State::Failed(_))).await {
            Ok(s) => match &*s {
                State::Failed(e) => anyhow::anyhow!("swarm: {e}"),
                _ => anyhow::anyhow!("swarm: failed"),
            },
            Err(_) => anyhow::anyhow!("the torrent was dropped"),
        }
    }

    /// Whether the initial check is over and the torrent is up.
    pub fn is_live(&self) -> bool {
        *self.shared.state.borrow() == State::Live
    }

    /// Of the payload: the manifest's pieces (held in memory) do not count.
    pub fn progress(&self) -> Progress {
        let s = &self.shared;
        let (down, up) = *lock(&s.rates);
        let plen = u64::from(s.lengths.piece_len());
        let pre = s.storage.prefix_len();
        let pre_done = {
            let k = s.picker();
            (0..(pre / plen) as usize)
                .filter(|&i| k.have().get(i))
                .count() as u64
                * plen
        };
        Progress {
            done_bytes: s.done_bytes().saturating_sub(pre_done),
            total_bytes: s.lengths.total() - pre,
            uploaded_bytes: s.uploaded(),
            down_bps: down,
            up_bps: up,
            peers: s.peer_count(),
            finished: *s.done.borrow(),
            origin_bytes: s.from_origin.load(Ordering::Relaxed),
        }
    }

    /// Whether the first `n` pieces are verified (an image's manifest).
    pub fn has_first(&self, n: usize) -> bool {
        let k = self.shared.picker();
        (0..n).all(|i| k.have().get(i))
    }

    /// Fails if the torrent stopped with an error.
    pub fn check_error(&self) -> Result<()> {
        if let State::Failed(e) = &*self.shared.state.borrow() {
            bail!("swarm: {e}");
        }
        Ok(())
    }

    pub(super) async fn stop(&self) {
        self.shared.stopped.send_replace(true);
        tokio::time::sleep(Duration::from_millis(100)).await;
        lock(&self.tasks).abort_all();
    }
}

#[cfg(test)]
impl Shared {
    /// A torrent of `n` pieces of `len` bytes over a blank read-only file.
    pub(super) fn for_test(n: usize, len: u32) -> Arc<Self> {
        let total = n as u64 * u64::from(len);
        let f = tempfile::tempfile().unwrap();
        f.set_len(total).unwrap();
        Arc::new(Self::new(Params {
            info_hash: [1; 20],
            peer_id: [2; 20],
            lengths: Lengths::new(total, u64::from(len)).unwrap(),
            pieces: vec![[0; 20]; n],
            storage: DeviceStorage::reader(
                Arc::new(f),
                crate::image::map::PayloadMap::identity(total),
            ),
            start_fraction: 0.0,
            up_limit: Arc::new(Limiter::new(None)),
            down_limit: Arc::new(Limiter::new(None)),
            slots: None,
            origin: None,
            trust: Arc::default(),
        }))
    }

    pub(super) fn fetch_memory_used(&self) -> usize {
        self.fetch_memory.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_settled_connection_is_never_replaced() {
        let (small, big) = ([1u8; 20], [2u8; 20]);
        let young = Duration::from_millis(100);
        // Simultaneous dials: the smaller dialer's connection wins, seen
        // from either side.
        assert!(keeps_old(&small, young, &big));
        assert!(!keeps_old(&big, young, &small));
        // A second dial to a peer that dialled us long ago: the first stays,
        // whoever dialled it.
        assert!(keeps_old(&big, SETTLED * 2, &small));
        assert!(keeps_old(&small, SETTLED * 2, &big));
    }
}
