//! The swarm engine shared by the server's seeds and the agents: BitTorrent
//! (BEP 3) over TCP, on librqbit's wire-protocol and metainfo crates, with
//! its own piece scheduling (see [`picker`]).
//!
//! A [`SwarmSession`] owns one listening port and any number of torrents.
//! Each [`Torrent`] reads and writes its payload through a
//! [`DeviceStorage`], announces to its trackers, and connects to every peer
//! it learns of.

mod announce;
mod limit;
mod peer;
pub mod picker;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use librqbit_core::torrent_metainfo::torrent_from_bytes;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::image::Image;
pub use crate::protocol::Progress;
use crate::storage::DeviceStorage;
use limit::Limiter;
use peer::Out;
use picker::{Bits, Picker};

pub type PeerId = [u8; 20];

/// Block requests kept outstanding per peer (32 measured slower).
pub(crate) const REQUEST_WINDOW: usize = 16;
/// Memory for pieces being fetched, per torrent. At least one piece is
/// always allowed, whatever its size.
const FETCH_MEMORY: usize = 64 << 20;
/// Peer id prefix of the agents (the origin's is the tracker's).
pub(crate) const HOST_PREFIX: &[u8] = b"-BS0100-";
/// A connection older than this is never replaced by a new one to the
/// same peer; younger ones are simultaneous dials, settled by peer id.
const SETTLED: Duration = Duration::from_secs(2);
/// Connections one torrent keeps at most (the server's seed has one per host).
const MAX_PEERS: usize = 1024;
/// Pieces the server's seed uploads at once, each to one host, the others
/// waiting in line: a host gets a piece at a fraction of the port rate
/// rather than at 1/N of it, and passes it on that much sooner. A slot is
/// held until its piece has left the socket. Fewer slots leave the origin's
/// port idle while the hosts' ports are busy, more make each piece later
/// (docs/benchmarks.md, "Seventh look").
const ORIGIN_SLOTS: usize = 8;
/// A host that connects this long after the torrent started is a late
/// joiner: its claims on the origin's pieces are not weighed against ours.
const LATE_JOIN: Duration = Duration::from_secs(5);

/// How a torrent finds peers and orders its pieces.
#[derive(Debug, Clone, Default)]
pub struct SwarmConfig {
    /// Where to accept peers; `None` picks a free port on all addresses.
    pub listen: Option<SocketAddr>,
    /// Peers to connect to at once, besides the tracker's.
    pub peers: Vec<SocketAddr>,
    /// Replaces the torrent's trackers when not empty.
    pub trackers: Vec<String>,
    pub disable_trackers: bool,
    /// Where, as a fraction of the payload, this host starts taking pieces
    /// from the server's seed (assigned by the server, spread over the room).
    pub start_fraction: f64,
}

/// Rate caps of a session, bytes per second.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub upload: Option<u64>,
    pub download: Option<u64>,
}

fn random_peer_id(prefix: &[u8]) -> PeerId {
    let mut id = [0u8; 20];
    id[..prefix.len()].copy_from_slice(prefix);
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()).rotate_left(32);
    for b in &mut id[prefix.len()..] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = b'0' + (x % 10) as u8;
    }
    id
}

/// A BitTorrent session: one listening port, any number of torrents.
pub struct SwarmSession {
    inner: Arc<SessionInner>,
    listen: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
}

struct SessionInner {
    peer_id: PeerId,
    port: u16,
    /// Torrents by info hash, with how many callers added each.
    torrents: Mutex<HashMap<[u8; 20], (Torrent, usize)>>,
    up_limit: Arc<Limiter>,
    down_limit: Arc<Limiter>,
    /// The origin's upload slots, shared by its torrents (one port).
    slots: Option<Arc<tokio::sync::Semaphore>>,
    http: reqwest::Client,
}

impl SwarmSession {
    /// Limits are bytes per second for the whole session. `origin` marks
    /// the server's own seeds in their peer id, for the built-in tracker and
    /// the hosts' piece scheduling.
    pub async fn start(listen: Option<SocketAddr>, limits: Limits, origin: bool) -> Result<Self> {
        let addr = listen.unwrap_or_else(|| "0.0.0.0:0".parse().expect("valid"));
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for peers on {addr}"))?;
        let listen = listener.local_addr()?;
        let prefix: &[u8] = if origin {
            crate::server::tracker::ORIGIN_PREFIX
        } else {
            HOST_PREFIX
        };
        let inner = Arc::new(SessionInner {
            peer_id: random_peer_id(prefix),
            port: listen.port(),
            torrents: Mutex::default(),
            up_limit: Arc::new(Limiter::new(limits.upload)),
            down_limit: Arc::new(Limiter::new(limits.download)),
            slots: origin.then(|| Arc::new(tokio::sync::Semaphore::new(ORIGIN_SLOTS))),
            http: crate::util::http_client()?,
        });
        let accept = tokio::spawn(accept_loop(listener, inner.clone()));
        Ok(Self {
            inner,
            listen,
            accept,
        })
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Adds an image. A storage that is not fresh is checked piece by piece
    /// first (see [`Torrent::wait_initialized`]).
    pub async fn add(
        &self,
        image: &Image,
        storage: &DeviceStorage,
        cfg: &SwarmConfig,
    ) -> Result<Torrent> {
        let meta = torrent_from_bytes(&image.torrent)
            .map_err(|e| anyhow::anyhow!("the image's torrent: {e}"))?;
        let info_hash = meta.info_hash.0;
        let piece_len = u64::from(meta.info.data.piece_length);
        let total = meta
            .info
            .data
            .length
            .context("the image's torrent is not a single-file torrent")?;
        if total != storage.payload_len() {
            bail!(
                "the torrent's payload is {total} bytes, the image's {}",
                storage.payload_len()
            );
        }
        let hashes = meta.info.data.pieces.as_ref();
        let n = total.div_ceil(piece_len.max(1)) as usize;
        if piece_len == 0 || hashes.len() != n * 20 {
            bail!(
                "the image's torrent has {} piece hashes for {n} pieces",
                hashes.len() / 20
            );
        }
        let trackers: Vec<String> = if cfg.disable_trackers {
            Vec::new()
        } else if !cfg.trackers.is_empty() {
            cfg.trackers.clone()
        } else {
            let mut t: Vec<String> = meta
                .announce
                .iter()
                .map(|a| String::from_utf8_lossy(a.as_ref()).into_owned())
                .collect();
            for tier in meta.announce_list.iter() {
                for a in tier {
                    let a = String::from_utf8_lossy(a.as_ref()).into_owned();
                    if !t.contains(&a) {
                        t.push(a);
                    }
                }
            }
            t
        };
        // The same payload under two names is one torrent.
        if let Some((t, refs)) = self.inner.lock().get_mut(&info_hash) {
            *refs += 1;
            return Ok(t.clone());
        }
        let seed = u64::from_le_bytes(self.inner.peer_id[12..20].try_into().expect("8 bytes"));
        let shared = Arc::new(Shared {
            info_hash,
            peer_id: self.inner.peer_id,
            piece_len,
            total,
            pieces: hashes
                .chunks(20)
                .map(|c| c.try_into().expect("20 bytes"))
                .collect(),
            storage: storage.clone(),
            picker: Mutex::new(Picker::new(Bits::new(n), cfg.start_fraction, seed)),
            started: std::time::Instant::now(),
            peers: Mutex::default(),
            conn_serial: AtomicU64::new(0),
            changed: watch::channel(0).0,
            done: watch::channel(false).0,
            stopped: watch::channel(false).0,
            state: watch::channel(State::Checking).0,
            done_bytes: AtomicU64::new(0),
            uploaded: AtomicU64::new(0),
            downloaded: AtomicU64::new(0),
            rates: Mutex::new((0.0, 0.0)),
            fetch_memory: AtomicUsize::new(0),
            up_limit: self.inner.up_limit.clone(),
            down_limit: self.inner.down_limit.clone(),
            slots: self.inner.slots.clone(),
        });
        let mut tasks = JoinSet::new();
        let (peers_tx, peers_rx) = mpsc::unbounded_channel();
        for p in &cfg.peers {
            let _ = peers_tx.send(*p);
        }
        {
            let (t, inner, trackers) = (shared.clone(), self.inner.clone(), trackers.clone());
            tasks.spawn(async move {
                if let Err(e) = t.initial_check().await {
                    t.fail(format!("{e:#}"));
                    return;
                }
                let mut jobs = JoinSet::new();
                for url in trackers {
                    let (t, http, tx) = (t.clone(), inner.http.clone(), peers_tx.clone());
                    jobs.spawn(announce::run(url, t, inner.port, http, tx));
                }
                jobs.spawn(connect_loop(t.clone(), peers_rx));
                jobs.spawn(rates_loop(t.clone()));
                while jobs.join_next().await.is_some() {}
            });
        }
        let t = Torrent {
            shared,
            tasks: Arc::new(Mutex::new(tasks)),
        };
        self.inner.lock().insert(info_hash, (t.clone(), 1));
        Ok(t)
    }

    /// Stops one torrent; its storage is left as it is.
    pub async fn remove(&self, t: &Torrent) -> Result<()> {
        let last = {
            let mut g = self.inner.lock();
            match g.get_mut(&t.shared.info_hash) {
                Some((_, refs)) if *refs > 1 => {
                    *refs -= 1;
                    false
                }
                _ => {
                    g.remove(&t.shared.info_hash);
                    true
                }
            }
        };
        if last {
            t.stop().await;
        }
        Ok(())
    }

    pub async fn stop(&self) {
        let all: Vec<Torrent> = self.inner.lock().drain().map(|(_, (t, _))| t).collect();
        for t in &all {
            t.shared.stopped.send_replace(true);
        }
        // Lets the connections and the trackers hear of it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.accept.abort();
    }
}

impl Drop for SwarmSession {
    fn drop(&mut self) {
        for (_, (t, _)) in self.inner.lock().drain() {
            t.shared.stopped.send_replace(true);
        }
        self.accept.abort();
    }
}

impl SessionInner {
    fn lock(&self) -> MutexGuard<'_, HashMap<[u8; 20], (Torrent, usize)>> {
        self.torrents.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<SessionInner>) {
    loop {
        let (mut s, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!("accepting a peer: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let r: Result<()> = async {
                let (info_hash, their_id) = peer::read_handshake(&mut s).await?;
                let t = inner.lock().get(&info_hash).map(|(t, _)| t.shared.clone());
                let Some(t) = t.filter(|t| *t.state.borrow() == State::Live) else {
                    bail!("asked for a torrent this session does not serve");
                };
                if their_id == t.peer_id {
                    bail!("connected to ourselves");
                }
                tokio::io::AsyncWriteExt::write_all(&mut s, &peer::handshake(info_hash, t.peer_id))
                    .await?;
                peer::run(t, s, their_id, addr, false).await;
                Ok(())
            }
            .await;
            if let Err(e) = r {
                debug!(%addr, "incoming peer: {e:#}");
            }
        });
    }
}

/// Connects to the peers trackers and the caller name, again after a
/// failure or a lost connection when they are named again.
async fn connect_loop(t: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<SocketAddr>) {
    let attempts: Arc<Mutex<HashMap<SocketAddr, tokio::time::Instant>>> = Arc::default();
    let active: Arc<Mutex<HashSet<SocketAddr>>> = Arc::default();
    // Who answered at each address: no need to dial a peer connected to us.
    let ids: Arc<Mutex<HashMap<SocketAddr, PeerId>>> = Arc::default();
    let mut stopped = t.stopped.subscribe();
    loop {
        let addr = tokio::select! {
            a = rx.recv() => match a { Some(a) => a, None => return },
            _ = until_true(&mut stopped) => return,
        };
        {
            let mut act = active.lock().unwrap_or_else(|e| e.into_inner());
            let mut att = attempts.lock().unwrap_or_else(|e| e.into_inner());
            let recent = att
                .get(&addr)
                .is_some_and(|at| at.elapsed() < Duration::from_secs(3));
            let known = ids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&addr)
                .is_some_and(|id| t.is_connected(id));
            if act.contains(&addr) || recent || known || t.peer_count() >= MAX_PEERS {
                continue;
            }
            act.insert(addr);
            att.insert(addr, tokio::time::Instant::now());
        }
        let (t, active, ids) = (t.clone(), active.clone(), ids.clone());
        tokio::spawn(async move {
            let r: Result<()> = async {
                let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
                    .await
                    .context("connect timed out")??;
                tokio::io::AsyncWriteExt::write_all(
                    &mut s,
                    &peer::handshake(t.info_hash, t.peer_id),
                )
                .await?;
                let (info_hash, their_id) = peer::read_handshake(&mut s).await?;
                if info_hash != t.info_hash {
                    bail!("peer answered for another torrent");
                }
                if their_id == t.peer_id {
                    bail!("connected to ourselves");
                }
                ids.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(addr, their_id);
                peer::run(t, s, their_id, addr, true).await;
                Ok(())
            }
            .await;
            if let Err(e) = r {
                debug!(%addr, "outgoing peer: {e:#}");
            }
            active
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&addr);
        });
    }
}

/// Whether a connection to a peer stays when another one to the same peer
/// comes: always once settled; of two young ones, the one dialled by the
/// smaller peer id (both sides decide alike).
fn keeps_old(old_dialer: &PeerId, old_age: Duration, new_dialer: &PeerId) -> bool {
    old_age > SETTLED || old_dialer <= new_dialer
}

/// Returns once the flag is set (or its sender is gone).
async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Smooths the byte counters into rates, once a second.
async fn rates_loop(t: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let (mut down0, mut up0) = (t.downloaded(), t.uploaded());
    let mut stopped = t.stopped.subscribe();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = until_true(&mut stopped) => return,
        }
        let (down, up) = (t.downloaded(), t.uploaded());
        let mut r = t.rates.lock().unwrap_or_else(|e| e.into_inner());
        r.0 = 0.5 * r.0 + 0.5 * (down - down0) as f64;
        r.1 = 0.5 * r.1 + 0.5 * (up - up0) as f64;
        (down0, up0) = (down, up);
    }
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Checking,
    Live,
    Failed(String),
}

struct PeerEntry {
    conn: u64,
    /// Another blockswarm host (not the origin): told of our claims.
    host: bool,
    /// A host that came within [`LATE_JOIN`] of this torrent's start: it
    /// counts in this host's share of the origin's pieces.
    counted: bool,
    /// Peer id of the side that dialled.
    dialer: PeerId,
    /// When it was added.
    since: std::time::Instant,
    out: mpsc::UnboundedSender<Out>,
    /// Ends the connection (a better one to the same peer replaced it).
    kill: Arc<tokio::sync::Notify>,
}

/// One torrent's state, shared by its connections.
pub(crate) struct Shared {
    info_hash: [u8; 20],
    peer_id: PeerId,
    piece_len: u64,
    total: u64,
    pieces: Vec<[u8; 20]>,
    storage: DeviceStorage,
    picker: Mutex<Picker>,
    /// When this torrent's session began.
    started: std::time::Instant,
    peers: Mutex<HashMap<PeerId, PeerEntry>>,
    conn_serial: AtomicU64,
    /// Bumped when pieces arrive or go back to the picker.
    changed: watch::Sender<u64>,
    done: watch::Sender<bool>,
    stopped: watch::Sender<bool>,
    state: watch::Sender<State>,
    done_bytes: AtomicU64,
    uploaded: AtomicU64,
    downloaded: AtomicU64,
    /// Download and upload, bytes per second.
    rates: Mutex<(f64, f64)>,
    fetch_memory: AtomicUsize,
    up_limit: Arc<Limiter>,
    down_limit: Arc<Limiter>,
    slots: Option<Arc<tokio::sync::Semaphore>>,
}

impl Shared {
    fn picker(&self) -> MutexGuard<'_, Picker> {
        self.picker.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn has(&self, piece: usize) -> bool {
        self.picker().have().get(piece)
    }

    fn have_bytes(&self) -> Vec<u8> {
        self.picker().have().to_bytes()
    }

    fn piece_size(&self, i: usize) -> usize {
        let off = i as u64 * self.piece_len;
        self.piece_len.min(self.total - off) as usize
    }

    fn blocks_per_piece(&self) -> usize {
        self.piece_len.div_ceil(u64::from(peer::BLOCK)) as usize
    }

    /// Payload offset of a requested block, if the request is valid.
    fn block_offset(&self, index: u32, begin: u32, len: u32, max: u32) -> Option<u64> {
        let i = index as usize;
        (i < self.pieces.len()
            && len > 0
            && len <= max
            && u64::from(begin) + u64::from(len) <= self.piece_size(i) as u64)
            .then(|| i as u64 * self.piece_len + u64::from(begin))
    }

    fn reserve_memory(&self) -> bool {
        let p = self.piece_len as usize;
        self.fetch_memory
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| {
                (m == 0 || m + p <= FETCH_MEMORY).then_some(m + p)
            })
            .is_ok()
    }

    fn release_memory(&self) {
        let p = self.piece_len as usize;
        let _ = self
            .fetch_memory
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| {
                Some(m.saturating_sub(p))
            });
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    fn done_bytes(&self) -> u64 {
        self.done_bytes.load(Ordering::Relaxed)
    }

    fn uploaded(&self) -> u64 {
        self.uploaded.load(Ordering::Relaxed)
    }

    fn downloaded(&self) -> u64 {
        self.downloaded.load(Ordering::Relaxed)
    }

    fn peer_count(&self) -> usize {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn fail(&self, e: String) {
        warn!("swarm: {e}");
        self.state.send_replace(State::Failed(e));
        self.stopped.send_replace(true);
    }

    /// Adds a connection; `None` if this peer is already connected by a
    /// connection that stays. When both sides dial each other at once, both
    /// keep the one dialled by the smaller peer id; a settled connection
    /// always stays.
    fn register(
        &self,
        id: PeerId,
        outgoing: bool,
        out: mpsc::UnboundedSender<Out>,
        kill: Arc<tokio::sync::Notify>,
    ) -> Option<(u64, bool)> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let dialer = if outgoing { self.peer_id } else { id };
        if let Some(old) = peers.get(&id) {
            // A connection that has been up a while stays: the new one is a
            // second dial to a peer that dialled us first (the tracker names
            // its listening port, which we had not seen). Both sides see it
            // so and drop the new one, and nothing in flight is lost.
            if keeps_old(&old.dialer, old.since.elapsed(), &dialer) {
                return None;
            }
            old.kill.notify_one();
        } else if peers.len() >= MAX_PEERS {
            return None;
        }
        let conn = self.conn_serial.fetch_add(1, Ordering::Relaxed);
        let host = id.starts_with(HOST_PREFIX);
        let counted = host && self.started.elapsed() < LATE_JOIN;
        peers.insert(
            id,
            PeerEntry {
                conn,
                host,
                counted,
                dialer,
                since: std::time::Instant::now(),
                out,
                kill,
            },
        );
        self.count_hosts(peers);
        Some((conn, counted))
    }

    fn is_connected(&self, id: &PeerId) -> bool {
        self.peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
    }

    fn unregister(&self, id: PeerId, conn: u64) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if peers.get(&id).is_some_and(|p| p.conn == conn) {
            peers.remove(&id);
        }
        self.count_hosts(peers);
        self.bump();
    }

    /// Tells the picker how many counted hosts are connected. Takes the
    /// peers' lock and lets it go before taking the picker's.
    fn count_hosts(&self, peers: MutexGuard<'_, HashMap<PeerId, PeerEntry>>) {
        let hosts = peers.values().filter(|p| p.counted).count();
        let relays = peers
            .keys()
            .filter(|id| !id.starts_with(crate::server::tracker::ORIGIN_PREFIX))
            .count();
        drop(peers);
        self.picker().set_hosts(hosts, relays);
    }

    /// A piece picked from the origin: the other hosts hear of it at once,
    /// so none of them asks the origin for it too.
    fn claim(&self, i: usize) {
        if !self.picker().claim(i) {
            return;
        }
        for p in self
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            if p.host {
                let _ = p.out.send(Out::claim(i));
            }
        }
    }

    /// A piece passed its hash and is on the target.
    fn piece_done(&self, i: usize, from_origin: bool) {
        let (new, complete) = {
            let mut p = self.picker();
            (p.complete(i, from_origin), p.is_complete())
        };
        if new {
            let len = self.piece_size(i) as u64;
            self.done_bytes.fetch_add(len, Ordering::Relaxed);
            self.downloaded.fetch_add(len, Ordering::Relaxed);
            for p in self
                .peers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
            {
                let _ = p.out.send(Out::have(i));
            }
        }
        self.bump();
        if complete {
            self.done.send_replace(true);
        }
    }

    /// Hashes what the storage already holds, unless it is fresh.
    async fn initial_check(self: &Arc<Self>) -> Result<()> {
        let n = self.pieces.len();
        if !self.storage.is_fresh() {
            let t = self.clone();
            let good = tokio::task::spawn_blocking(move || -> Result<Bits> {
                let read = |off: u64, buf: &mut [u8]| t.storage.read(off, buf);
                let got = crate::image::torrent::hash_payload(
                    &read,
                    t.total,
                    t.piece_len as u32,
                    None,
                    &|_| {},
                )?;
                let mut bits = Bits::new(n);
                for (i, want) in t.pieces.iter().enumerate() {
                    if got[i * 20..i * 20 + 20] == want[..] {
                        bits.set(i);
                    }
                }
                Ok(bits)
            })
            .await??;
            let bytes: u64 = good.iter_set().map(|i| self.piece_size(i) as u64).sum();
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

/// One image in a session.
#[derive(Clone)]
pub struct Torrent {
    shared: Arc<Shared>,
    tasks: Arc<Mutex<JoinSet<()>>>,
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
        let mut state = self.shared.state.subscribe();
        tokio::select! {
            r = done.wait_for(|d| *d) => { r.map_err(|_| anyhow::anyhow!("the torrent was dropped"))?; Ok(()) }
            s = state.wait_for(|s| matches!(s, State::Failed(_))) => {
                let s = s.map_err(|_| anyhow::anyhow!("the torrent was dropped"))?.clone();
                match s { State::Failed(e) => bail!("{e}"), _ => Ok(()) }
            }
        }
    }

    /// Whether the initial check is over and the torrent is up.
    pub fn is_live(&self) -> bool {
        *self.shared.state.borrow() == State::Live
    }

    pub fn progress(&self) -> Progress {
        let s = &self.shared;
        let (down, up) = *s.rates.lock().unwrap_or_else(|e| e.into_inner());
        Progress {
            done_bytes: s.done_bytes(),
            total_bytes: s.total,
            uploaded_bytes: s.uploaded(),
            down_bps: down,
            up_bps: up,
            peers: s.peer_count(),
            finished: *s.done.borrow(),
        }
    }

    /// Fails if the torrent stopped with an error.
    pub fn check_error(&self) -> Result<()> {
        if let State::Failed(e) = &*self.shared.state.borrow() {
            bail!("swarm: {e}");
        }
        Ok(())
    }

    async fn stop(&self) {
        self.shared.stopped.send_replace(true);
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .abort_all();
    }
}

/// A session carrying a single torrent: a seed, or an agent.
pub struct Swarm {
    pub session: SwarmSession,
    pub torrent: Torrent,
}

impl Swarm {
    pub async fn join(image: &Image, storage: &DeviceStorage, cfg: &SwarmConfig) -> Result<Self> {
        let session = SwarmSession::start(cfg.listen, Limits::default(), false).await?;
        let torrent = session.add(image, storage, cfg).await?;
        Ok(Self { session, torrent })
    }

    pub async fn stop(self) {
        self.torrent.stop().await;
        self.session.stop().await;
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
