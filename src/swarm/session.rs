//! A session: one listening port and any number of torrents. Accepts peers
//! (their handshakes bounded per address and in time), and dials the peers
//! that trackers and callers name (the callers' again and again, with
//! backoff, until the torrent is complete).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::limit::Limiter;
use super::peer::{self, Misbehaved};
use super::torrent::{MAX_PEERS, Params, Shared, State, Torrent, haves_loop, rates_loop};
use super::trust::canonical;
use super::wire::{Lengths, handshake};
use super::writer::Slots;
use super::{
    HOST_PREFIX, Limits, ORIGIN_PREFIX, PeerId, SwarmConfig, announce, random_peer_id, until_true,
};
use crate::image::Image;
use crate::storage::DeviceStorage;

/// Handshakes under way from one address the session's torrents do not
/// vouch for, at most (each has [`peer`]'s handshake deadline), and from
/// all such addresses.
const HANDSHAKING_PER_IP: usize = 16;
const HANDSHAKING: usize = 1024;
/// How long a dial may take.
const CONNECT_TIME: Duration = Duration::from_secs(5);
/// A peer a tracker names is dialled again at most this often.
const REDIAL: Duration = Duration::from_secs(3);
/// Backoff between dials of a peer the caller named: doubling from the
/// first to the last.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_LAST: Duration = Duration::from_secs(30);

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
    slots: Option<Arc<Slots>>,
    http: reqwest::Client,
    /// Handshakes under way, by address.
    handshaking: Mutex<HashMap<IpAddr, usize>>,
}

impl SwarmSession {
    /// Limits are bytes per second for the whole session. `origin`: this is
    /// the server's seed, which uploads through a few slots (see
    /// [`Slots`]) and says so in its peer id (for the server's tracker;
    /// nobody takes a peer id as proof of anything).
    pub async fn start(listen: Option<SocketAddr>, limits: Limits, origin: bool) -> Result<Self> {
        let addr = listen.unwrap_or_else(|| "0.0.0.0:0".parse().expect("valid"));
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for peers on {addr}"))?;
        let listen = listener.local_addr()?;
        let prefix = if origin { ORIGIN_PREFIX } else { HOST_PREFIX };
        let inner = Arc::new(SessionInner {
            peer_id: random_peer_id(prefix),
            port: listen.port(),
            torrents: Mutex::default(),
            up_limit: Arc::new(Limiter::new(limits.upload)),
            down_limit: Arc::new(Limiter::new(limits.download)),
            slots: origin.then(|| Arc::new(Slots::new())),
            http: crate::util::http_client()?,
            handshaking: Mutex::default(),
        });
        let accept = tokio::spawn(accept_loop(listener, inner.clone()));
        Ok(Self {
            inner,
            listen,
            accept,
        })
    }

    /// The origin feeds this many rooms, each behind its own uplink (see
    /// [`Slots::set_rooms`]); nothing on a session that is not the origin.
    pub fn set_origin_rooms(&self, rooms: usize) {
        if let Some(s) = &self.inner.slots {
            s.set_rooms(rooms);
        }
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Adds an image. A storage that is not fresh is checked piece by piece
    /// first (see [`Torrent::wait_initialized`]). The manifest's pieces come
    /// from the image, in memory.
    pub async fn add(
        &self,
        image: &Image,
        storage: &DeviceStorage,
        cfg: &SwarmConfig,
    ) -> Result<Torrent> {
        let storage = storage.with_prefix(image.prefix.to_vec(), true);
        self.add_torrent(&image.torrent, &storage, cfg).await
    }

    /// Adds an image's torrent (see [`crate::image::torrent::layout`]) over a
    /// storage that holds its prefix (the manifest's pieces) in memory.
    pub async fn add_torrent(
        &self,
        torrent: &[u8],
        storage: &DeviceStorage,
        cfg: &SwarmConfig,
    ) -> Result<Torrent> {
        let layout = crate::image::torrent::layout(torrent).context("the image's torrent")?;
        let info_hash = layout.info_hash;
        let piece_len = u64::from(layout.piece_length);
        let total = layout.total();
        if total != storage.torrent_len() || layout.prefix_len != storage.prefix_len() {
            bail!(
                "the torrent holds {total} bytes ({} before the payload), the storage {} ({})",
                layout.prefix_len,
                storage.torrent_len(),
                storage.prefix_len()
            );
        }
        let lengths = Lengths::new(total, piece_len)
            .with_context(|| format!("the image's torrent has pieces of {piece_len} bytes"))?;
        let hashes = layout.pieces.as_slice();
        let n = lengths.count();
        if hashes.len() != n * 20 {
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
            layout.trackers.clone()
        };
        // The same payload under two names is one torrent.
        if let Some((t, refs)) = self.inner.lock().get_mut(&info_hash) {
            *refs += 1;
            return Ok(t.clone());
        }
        let trackers: Vec<String> = trackers
            .into_iter()
            .filter(|u| announce::supported(u))
            .collect();
        let shared = Arc::new(Shared::new(Params {
            info_hash,
            peer_id: self.inner.peer_id,
            lengths,
            pieces: hashes
                .chunks_exact(20)
                .map(|c| c.try_into().expect("20 bytes"))
                .collect(),
            storage: storage.clone(),
            start_fraction: cfg.start_fraction,
            up_limit: self.inner.up_limit.clone(),
            down_limit: self.inner.down_limit.clone(),
            slots: self.inner.slots.clone(),
            origin: cfg.origin,
            trust: cfg.trust.clone(),
        }));
        let mut tasks = JoinSet::new();
        {
            let (t, inner, explicit) = (shared.clone(), self.inner.clone(), cfg.peers.clone());
            tasks.spawn(async move {
                if let Err(e) = t.initial_check().await {
                    t.fail(format!("{e:#}"));
                    return;
                }
                let dialer = Arc::new(Dialer::new(t.clone()));
                let (peers_tx, peers_rx) = mpsc::channel(MAX_PEERS);
                let mut jobs = JoinSet::new();
                for url in trackers {
                    let (t, http, tx) = (t.clone(), inner.http.clone(), peers_tx.clone());
                    jobs.spawn(announce::run(url, t, inner.port, http, tx));
                }
                for addr in explicit {
                    jobs.spawn(keep_dialling(dialer.clone(), addr));
                }
                jobs.spawn(connect_loop(dialer, peers_rx));
                jobs.spawn(rates_loop(t.clone()));
                jobs.spawn(haves_loop(t.clone()));
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

    /// A place for one more handshake from `ip`, given back when dropped;
    /// `None` if too many are under way (from that address, or from all,
    /// unless a torrent vouches for it).
    fn handshake_slot(self: &Arc<Self>, ip: IpAddr) -> Option<Handshaking> {
        let vouched = self.lock().values().any(|(t, _)| t.shared.vouches(ip));
        let mut g = self.handshaking.lock().unwrap_or_else(|e| e.into_inner());
        let full = g.get(&ip).is_some_and(|&n| n >= HANDSHAKING_PER_IP)
            || g.values().sum::<usize>() >= HANDSHAKING;
        if full && !vouched {
            return None;
        }
        *g.entry(ip).or_default() += 1;
        Some(Handshaking {
            inner: self.clone(),
            ip,
        })
    }
}

/// One handshake under way (see [`SessionInner::handshake_slot`]).
struct Handshaking {
    inner: Arc<SessionInner>,
    ip: IpAddr,
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        let mut g = self
            .inner
            .handshaking
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = g.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                g.remove(&self.ip);
            }
        }
    }
}

/// How a connection ended, in the log: a peer's misbehaviour as a warning,
/// anything else for debugging.
fn log_end(addr: SocketAddr, r: &Result<()>) {
    match r {
        Ok(()) => debug!(%addr, "peer closed"),
        Err(e) if e.is::<Misbehaved>() => warn!("peer {addr}: {e:#}; dropped"),
        Err(e) => debug!(%addr, "peer dropped: {e:#}"),
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<SessionInner>) {
    loop {
        let (s, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!("accepting a peer: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = inner.handshake_slot(canonical(addr.ip())) else {
            debug!(%addr, "too many handshakes from this address; refused");
            continue;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let r = incoming(&inner, s, addr, slot).await;
            log_end(addr, &r);
        });
    }
}

async fn incoming(
    inner: &SessionInner,
    mut s: TcpStream,
    addr: SocketAddr,
    slot: Handshaking,
) -> Result<()> {
    let (info_hash, their_id) = peer::read_handshake(&mut s).await?;
    let t = inner.lock().get(&info_hash).map(|(t, _)| t.shared.clone());
    let Some(t) = t.filter(|t| *t.state.borrow() == State::Live) else {
        bail!("asked for a torrent this session does not serve");
    };
    if their_id == t.peer_id {
        bail!("connected to ourselves");
    }
    if t.is_banned(addr.ip(), Some(&their_id)) {
        bail!("banned from this torrent; refused");
    }
    peer::write_handshake(&mut s, &handshake(info_hash, t.peer_id)).await?;
    drop(slot);
    peer::run(t, s, their_id, addr, false).await
}

/// Dials peers for one torrent.
struct Dialer {
    t: Arc<Shared>,
    /// Addresses being dialled or connected by us.
    active: Mutex<HashSet<SocketAddr>>,
    /// When each address a tracker named was last dialled.
    attempts: Mutex<HashMap<SocketAddr, Instant>>,
    /// Who answered at each address: no need to dial a peer connected to us.
    ids: Mutex<HashMap<SocketAddr, PeerId>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An address in [`Dialer::active`], taken out when dropped.
struct Active<'a>(&'a Dialer, SocketAddr);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        lock(&self.0.active).remove(&self.1);
    }
}

impl Dialer {
    fn new(t: Arc<Shared>) -> Self {
        Self {
            t,
            active: Mutex::default(),
            attempts: Mutex::default(),
            ids: Mutex::default(),
        }
    }

    /// Whether `addr` need not be dialled: banned, being dialled, or the
    /// peer that answered there last is connected.
    fn skip(&self, addr: SocketAddr) -> bool {
        self.t.is_banned(addr.ip(), None)
            || lock(&self.active).contains(&addr)
            || lock(&self.ids)
                .get(&addr)
                .is_some_and(|id| self.t.is_connected(id))
    }

    /// Connects to `addr` and trades handshakes; `Ok(None)` if it need not
    /// be dialled (see [`Dialer::skip`]).
    async fn connect(&self, addr: SocketAddr) -> Result<Option<(TcpStream, PeerId, Active<'_>)>> {
        if self.skip(addr) || !lock(&self.active).insert(addr) {
            return Ok(None);
        }
        let active = Active(self, addr);
        let t = &self.t;
        let mut s = tokio::time::timeout(CONNECT_TIME, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {} s", CONNECT_TIME.as_secs()))??;
        peer::write_handshake(&mut s, &handshake(t.info_hash, t.peer_id)).await?;
        let (info_hash, their_id) = peer::read_handshake(&mut s).await?;
        if info_hash != t.info_hash {
            bail!("the peer answered for another torrent");
        }
        if their_id == t.peer_id {
            bail!("connected to ourselves");
        }
        if t.is_banned(addr.ip(), Some(&their_id)) {
            bail!("banned from this torrent");
        }
        lock(&self.ids).insert(addr, their_id);
        Ok(Some((s, their_id, active)))
    }
}

/// Dials the peers trackers name, again after a failure or a lost
/// connection when they are named again.
async fn connect_loop(d: Arc<Dialer>, mut rx: mpsc::Receiver<SocketAddr>) {
    let mut stopped = d.t.stopped.subscribe();
    loop {
        let addr = tokio::select! {
            a = rx.recv() => match a { Some(a) => a, None => return },
            _ = until_true(&mut stopped) => return,
        };
        {
            let mut att = lock(&d.attempts);
            if att.get(&addr).is_some_and(|at| at.elapsed() < REDIAL)
                || d.t.peer_count() >= MAX_PEERS
            {
                continue;
            }
            if att.len() >= 4 * MAX_PEERS {
                att.retain(|_, at| at.elapsed() < REDIAL);
            }
            att.insert(addr, Instant::now());
        }
        let d = d.clone();
        tokio::spawn(async move {
            let r = match d.connect(addr).await {
                Ok(Some((s, id, _active))) => peer::run(d.t.clone(), s, id, addr, true).await,
                Ok(None) => return,
                Err(e) => Err(e),
            };
            log_end(addr, &r);
        });
    }
}

/// What went wrong dialling, in a few words.
fn describe(e: &anyhow::Error) -> String {
    match e.downcast_ref::<std::io::Error>().map(|e| e.kind()) {
        Some(std::io::ErrorKind::ConnectionRefused) => "connection refused".into(),
        Some(std::io::ErrorKind::ConnectionReset) => "connection reset".into(),
        _ => format!("{e:#}"),
    }
}

/// Keeps a peer the caller named connected, dialling it again with backoff
/// while the torrent is not complete. Says each new failure once, and when
/// it is reached after one.
async fn keep_dialling(d: Arc<Dialer>, addr: SocketAddr) {
    let t = d.t.clone();
    let mut stopped = t.stopped.subscribe();
    let mut done = t.done.subscribe();
    let mut delay = RETRY_FIRST;
    let mut said: Option<String> = None;
    let mut first = true;
    loop {
        if *stopped.borrow() || (t.is_complete() && !first) {
            return;
        }
        first = false;
        if t.is_banned(addr.ip(), None) {
            info!("peer {addr}: banned; not dialled again");
            return;
        }
        let wait = match d.connect(addr).await {
            Ok(Some((s, id, _active))) => {
                if said.take().is_some() {
                    info!("peer {addr}: connected");
                }
                delay = RETRY_FIRST;
                let r = peer::run(t.clone(), s, id, addr, true).await;
                log_end(addr, &r);
                RETRY_FIRST
            }
            // Connected the other way, or being dialled for a tracker.
            Ok(None) => RETRY_FIRST,
            Err(e) => {
                let why = describe(&e);
                if said.as_deref() != Some(why.as_str()) {
                    info!("peer {addr}: {why}; retrying in {} s", delay.as_secs());
                    said = Some(why);
                }
                let wait = delay;
                delay = (delay * 2).min(RETRY_LAST);
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = until_true(&mut stopped) => return,
            _ = until_true(&mut done) => return,
        }
    }
}
