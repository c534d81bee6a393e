//! One peer connection: the BEP 3 wire protocol, uploads, and fetching the
//! pieces the [`Picker`](super::picker::Picker) assigns it.
//!
//! Three tasks per connection: a reader that parses messages, a writer that
//! sends control messages first and then the requested blocks in order, and
//! a driver that keeps requests flowing. Each piece is fetched whole from one
//! peer into memory, hashed, and only then written to the target.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use librqbit_peer_protocol::{Handshake, Message, Request};
use sha1w::ISha1;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::picker::{Bits, PeerPieces};
use super::{PeerId, Shared, until_true};

/// Bytes per request (the size every client uses).
pub const BLOCK: u32 = 16 << 10;
/// Largest block a peer may ask for.
const MAX_REQUEST: u32 = 128 << 10;
/// Requests from one peer queued at most; more are dropped.
const MAX_QUEUED: usize = 1024;
/// A peer with requests pending that sends nothing for this long is dropped.
const STALL: Duration = Duration::from_secs(30);
/// Silence after which a connection is considered dead.
const IDLE: Duration = Duration::from_secs(180);
const KEEPALIVE: Duration = Duration::from_secs(60);
/// An upload slot is given up after this long (a slow or stuck peer), and
/// the piece finished without one.
const SLOT_HOLD: Duration = Duration::from_secs(5);
/// A slot whose peer asks for nothing more for this long is given up.
const SLOT_IDLE: Duration = Duration::from_millis(200);
/// Unsent bytes the origin's socket holds at most, in pieces, so that what
/// the writer sends next (the upload-slot order) goes on the wire soon after.
const NOTSENT_PIECES: u64 = 1;
/// What a host's socket may hold unsent: one write batch. Blocks still
/// queued here can be cancelled (a copy that came from elsewhere) instead of
/// going out behind the ones already in the socket.
const HOST_NOTSENT: u32 = WRITE_BATCH as u32;
/// A slot's piece counts as sent when its socket holds at most this much.
const DRAINED: usize = 32 << 10;
/// How often a draining slot looks at its socket.
const DRAIN_POLL: Duration = Duration::from_millis(2);
/// Queued blocks sent in one write at most (bytes; one block at least).
const WRITE_BATCH: usize = 64 << 10;
/// Pieces failing their hash before a peer is dropped.
const MAX_BAD_PIECES: u32 = 3;

const HANDSHAKE_LEN: usize = 68;
/// Our own message, sent only to other blockswarm hosts: "I am fetching
/// this piece from the origin", so that they leave it to us there. Other
/// clients skip ids they do not know.
const CLAIM_ID: u8 = 0xB5;
/// Length prefix, id, index and begin of a piece message.
const PIECE_HEADER: usize = 13;
/// The reader's buffer for small messages.
const READ_BUFFER: usize = 4 << 10;

/// Ours: no extensions, so peers send nothing beyond BEP 3.
pub fn handshake(info_hash: [u8; 20], peer_id: PeerId) -> [u8; HANDSHAKE_LEN] {
    let mut h = Handshake::new(
        librqbit_core::Id20::new(info_hash),
        librqbit_core::Id20::new(peer_id),
    );
    h.reserved = 0;
    let mut buf = [0u8; HANDSHAKE_LEN];
    let _ = h.serialize_unchecked_len(&mut buf);
    buf
}

/// Reads the other side's handshake: (info hash, peer id).
pub async fn read_handshake(s: &mut TcpStream) -> Result<([u8; 20], PeerId)> {
    let mut buf = [0u8; HANDSHAKE_LEN];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .context("no handshake within 10 s")??;
    let (h, _) = Handshake::deserialize(&buf).map_err(|e| anyhow::anyhow!("bad handshake: {e}"))?;
    Ok((h.info_hash.0, h.peer_id.0))
}

fn encode(m: &Message<'_>) -> Vec<u8> {
    let len = match m {
        Message::Bitfield(b) => b.as_ref().len() + 5,
        _ => 32,
    };
    let mut buf = vec![0u8; len];
    let n = m.serialize(&mut buf, &Default::default).unwrap_or(0);
    buf.truncate(n);
    buf
}

/// What the driver and the torrent hand to a connection's writer.
#[derive(Debug)]
pub enum Out {
    Raw(Vec<u8>),
    Upload(Request),
    Cancel(Request),
}

impl Out {
    pub fn have(piece: usize) -> Self {
        Out::Raw(encode(&Message::Have(piece as u32)))
    }

    pub fn claim(piece: usize) -> Self {
        let mut m = vec![0, 0, 0, 5, CLAIM_ID];
        m.extend_from_slice(&(piece as u32).to_be_bytes());
        Out::Raw(m)
    }
}

/// Messages the reader passes to the driver.
enum In {
    Choke,
    Unchoke,
    Have(u32),
    Claim(u32),
    Bitfield(Vec<u8>),
    Request(Request),
    Cancel(Request),
    /// The whole message; the block starts at [`PIECE_HEADER`].
    Piece {
        index: u32,
        begin: u32,
        frame: Vec<u8>,
    },
    Other,
}

/// Runs a connection whose handshakes are done, until it ends.
pub async fn run(
    t: Arc<Shared>,
    stream: TcpStream,
    their_id: PeerId,
    addr: SocketAddr,
    outgoing: bool,
) {
    let _ = stream.set_nodelay(true);
    let lowat = if t.slots.is_some() {
        (t.piece_len * NOTSENT_PIECES).clamp(128 << 10, 16 << 20) as u32
    } else {
        HOST_NOTSENT
    };
    let _ = socket2::SockRef::from(&stream).set_tcp_notsent_lowat(lowat);
    let (r, w) = stream.into_split();
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let kill = Arc::new(tokio::sync::Notify::new());
    let Some((conn_id, counted)) = t.register(their_id, outgoing, out_tx.clone(), kill.clone())
    else {
        debug!(%addr, "already connected to this peer");
        return;
    };
    let origin = their_id.starts_with(crate::server::tracker::ORIGIN_PREFIX);
    let (in_tx, in_rx) = mpsc::channel(64);
    let reader = tokio::spawn(reader(r, in_tx, t.pieces.len()));
    let writer = tokio::spawn(writer(w, out_rx, t.clone()));
    let mut d = Driver {
        addr,
        t: t.clone(),
        out: out_tx,
        bits: PeerPieces::new(t.pieces.len()),
        claims: Bits::new(t.pieces.len()),
        claim_times: VecDeque::new(),
        host: their_id.starts_with(super::HOST_PREFIX),
        counted: counted.then_some(conn_id),
        origin,
        choked: true,
        interested: false,
        fetches: Vec::new(),
        outstanding: 0,
        last_data: Instant::now(),
        bad: 0,
    };
    let r = tokio::select! {
        r = d.run(in_rx) => r,
        _ = kill.notified() => Ok(()),
    };
    match &r {
        Ok(()) => debug!(%addr, "peer closed"),
        Err(e) => debug!(%addr, "peer dropped: {e:#}"),
    }
    d.cleanup();
    t.unregister(their_id, conn_id);
    reader.abort();
    writer.abort();
}

async fn reader(r: OwnedReadHalf, tx: mpsc::Sender<In>, pieces: usize) -> Result<()> {
    let max = (pieces / 8 + 64).max(MAX_REQUEST as usize + 64);
    // Small messages (Haves, requests, headers) come many to one read; a
    // block larger than the buffer is read straight into its frame.
    let mut r = tokio::io::BufReader::with_capacity(READ_BUFFER, r);
    loop {
        let mut len = [0u8; 4];
        tokio::time::timeout(IDLE, r.read_exact(&mut len))
            .await
            .context("peer silent")??;
        let n = u32::from_be_bytes(len) as usize;
        if n > max {
            bail!("message of {n} bytes");
        }
        // Each message gets its own buffer: a block is then handed on
        // without another copy.
        let mut frame = vec![0u8; 4 + n];
        frame[..4].copy_from_slice(&len);
        r.read_exact(&mut frame[4..]).await?;
        let m = match frame.get(4) {
            // KeepAlive, or a message id outside BEP 3 (extensions we never
            // announced support for): skipped.
            None => In::Other,
            Some(&CLAIM_ID) if n == 5 => {
                In::Claim(u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]))
            }
            Some(id) if *id > 8 => In::Other,
            Some(_) => {
                let parsed = Message::deserialize(&frame, &[])
                    .map_err(|e| anyhow::anyhow!("bad message: {e}"))?
                    .0;
                match parsed {
                    Message::Choke => In::Choke,
                    Message::Unchoke => In::Unchoke,
                    Message::Have(i) => In::Have(i),
                    Message::Bitfield(b) => In::Bitfield(b.as_ref().to_vec()),
                    Message::Request(q) => In::Request(q),
                    Message::Cancel(q) => In::Cancel(q),
                    Message::Piece(p) => {
                        let (index, begin) = (p.index, p.begin);
                        In::Piece {
                            index,
                            begin,
                            frame,
                        }
                    }
                    _ => In::Other,
                }
            }
        };
        if tx.send(m).await.is_err() {
            return Ok(());
        }
    }
}

type Acquire = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<tokio::sync::OwnedSemaphorePermit, tokio::sync::AcquireError>,
            > + Send,
    >,
>;

/// An upload slot held for one piece.
struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    piece: u32,
    since: Instant,
    /// When its last block went out.
    last: Instant,
}

async fn writer(
    mut w: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Out>,
    t: Arc<Shared>,
) -> Result<()> {
    let mut queue: VecDeque<Request> = VecDeque::new();
    let mut buf = Vec::new();
    let mut control = Vec::new();
    let mut blocks: Vec<(Request, u64, usize)> = Vec::new();
    let mut slot: Option<Slot> = None;
    // A piece whose slot expired: it is finished without one.
    let mut unslotted: Option<u32> = None;
    let mut acquiring: Option<Acquire> = None;
    loop {
        // The slot goes back when the next block is of another piece, or
        // when a slow peer has held it too long.
        if let (Some(s), Some(q)) = (&slot, queue.front()) {
            if s.piece != q.index {
                slot = None;
            } else if s.since.elapsed() > SLOT_HOLD {
                unslotted = Some(s.piece);
                slot = None;
            }
        }
        let need_slot = t.slots.is_some()
            && slot.is_none()
            && queue.front().is_some_and(|q| unslotted != Some(q.index));
        if !need_slot {
            // A waiting acquire is granted a permit even while not polled.
            acquiring = None;
        } else if acquiring.is_none()
            && let Some(sem) = &t.slots
        {
            acquiring = Some(Box::pin(sem.clone().acquire_owned()));
        }
        let first = if queue.is_empty() || need_slot {
            let idle = slot.as_ref().map(|s| s.last + SLOT_IDLE);
            tokio::select! {
                o = rx.recv() => match o {
                    Some(o) => Some(o),
                    None => return Ok(()),
                },
                p = async {
                    match acquiring.as_mut() {
                        Some(a) => a.await,
                        None => std::future::pending().await,
                    }
                }, if need_slot => {
                    acquiring = None;
                    if let (Ok(p), Some(q)) = (p, queue.front()) {
                        let now = Instant::now();
                        slot = Some(Slot { _permit: p, piece: q.index, since: now, last: now });
                    }
                    continue;
                }
                // A peer that stops asking gives its slot back.
                _ = tokio::time::sleep_until(idle.unwrap_or_else(Instant::now)), if idle.is_some() && queue.is_empty() => {
                    slot = None;
                    continue;
                }
                _ = tokio::time::sleep(KEEPALIVE), if queue.is_empty() => {
                    w.write_all(&encode(&Message::KeepAlive)).await?;
                    continue;
                }
            }
        } else {
            None
        };
        // Everything queued is taken at once: control messages go out in
        // one write (one packet) rather than one each.
        let mut next = first;
        loop {
            let o = match next.take() {
                Some(o) => o,
                None => match rx.try_recv() {
                    Ok(o) => o,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return Ok(()),
                },
            };
            match o {
                Out::Raw(b) => control.extend_from_slice(&b),
                Out::Upload(q) => {
                    if queue.len() < MAX_QUEUED {
                        queue.push_back(q);
                    }
                }
                Out::Cancel(q) => {
                    let same =
                        |x: &Request| (x.index, x.begin, x.length) == (q.index, q.begin, q.length);
                    queue.retain(|x| !same(x));
                }
            }
        }
        // Queued blocks go out together, up to WRITE_BATCH bytes; from the
        // origin, only blocks of one piece (its slot's).
        blocks.clear();
        let mut len = 0;
        while !need_slot && len < WRITE_BATCH {
            let Some(q) = queue.front().copied() else {
                break;
            };
            if t.slots.is_some() && blocks.first().is_some_and(|b| b.0.index != q.index) {
                break;
            }
            queue.pop_front();
            let Some(off) = t.block_offset(q.index, q.begin, q.length, MAX_REQUEST) else {
                bail!("invalid request {q:?}");
            };
            // Not announced by us: a confused peer.
            if t.has(q.index as usize) {
                blocks.push((q, off, 0));
                len += q.length as usize;
            }
        }
        // Under an upload cap the blocks may wait; control does not.
        if (blocks.is_empty() || t.up_limit.is_capped()) && !control.is_empty() {
            w.write_all(&control).await?;
            control.clear();
        }
        if blocks.is_empty() {
            continue;
        }
        // Control messages ride in the same write as the blocks (no packet
        // of their own), which are read straight into their messages. Reads
        // mostly hit the page cache; a disk read parks this worker only.
        buf.clear();
        buf.append(&mut control);
        for (q, _, at) in blocks.iter_mut() {
            buf.extend_from_slice(&(9 + q.length).to_be_bytes());
            buf.push(7);
            buf.extend_from_slice(&q.index.to_be_bytes());
            buf.extend_from_slice(&q.begin.to_be_bytes());
            *at = buf.len();
            buf.resize(*at + q.length as usize, 0);
        }
        blocking(|| -> Result<()> {
            for &(q, off, at) in &blocks {
                t.storage.read(off, &mut buf[at..at + q.length as usize])?;
            }
            Ok(())
        })?;
        t.up_limit.take(len).await;
        w.write_all(&buf).await?;
        t.uploaded.fetch_add(len as u64, Ordering::Relaxed);
        let (q, _, _) = blocks[blocks.len() - 1];
        if (q.begin + q.length) as usize >= t.piece_size(q.index as usize) {
            if let Some(s) = &slot {
                drain(&w, s.since + SLOT_HOLD).await;
            }
            slot = None;
        } else if let Some(s) = &mut slot {
            s.last = Instant::now();
        }
    }
}

nix::ioctl_read_bad!(siocoutqnsd, 0x894B, nix::libc::c_int);

/// Waits until the socket has sent all but [`DRAINED`] bytes of what it was
/// given (or until `deadline`): a slot's piece is on the wire before the
/// slot goes to the next one, so the origin sends few pieces at a time.
async fn drain(w: &OwnedWriteHalf, deadline: Instant) {
    while unsent(w).is_some_and(|n| n > DRAINED) && Instant::now() < deadline {
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// Bytes the socket holds that it has not sent yet.
fn unsent(w: &OwnedWriteHalf) -> Option<usize> {
    let mut n: nix::libc::c_int = 0;
    // SAFETY: SIOCOUTQNSD writes one int; the fd is an open TCP socket.
    unsafe { siocoutqnsd(w.as_ref().as_raw_fd(), &mut n) }.ok()?;
    usize::try_from(n).ok()
}

/// Runs a short blocking call on this worker, letting the runtime move its
/// other tasks elsewhere (when it has other workers).
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A piece being fetched from this peer.
struct Fetch {
    index: usize,
    buf: Vec<u8>,
    /// Next byte to request.
    next: u32,
    /// Which blocks have arrived.
    got: Vec<bool>,
    received: usize,
    /// When it was asked for, or its last block came.
    last: Instant,
}

struct Driver {
    addr: SocketAddr,
    t: Arc<Shared>,
    out: mpsc::UnboundedSender<Out>,
    bits: PeerPieces,
    /// Pieces the peer is fetching from the origin (not held yet), and
    /// when it said so: a claim not filled within [`STALL`] is forgotten.
    claims: Bits,
    claim_times: VecDeque<(Instant, usize)>,
    /// Another blockswarm host: the only kind whose claims count.
    host: bool,
    /// Its claims count in this host's share of the origin's pieces: its
    /// connection's id.
    counted: Option<u64>,
    origin: bool,
    /// The peer chokes us.
    choked: bool,
    interested: bool,
    fetches: Vec<Fetch>,
    /// Block requests sent and not answered.
    outstanding: usize,
    last_data: Instant,
    bad: u32,
}

impl Driver {
    async fn run(&mut self, mut rx: mpsc::Receiver<In>) -> Result<()> {
        let have = self.t.have_bytes();
        if have.iter().any(|&b| b != 0) {
            self.send(Out::Raw(encode(&Message::Bitfield(have.as_slice().into()))));
        }
        self.send(Out::Raw(encode(&Message::Unchoke)));
        let mut changed = self.t.changed.subscribe();
        let mut stopped = self.t.stopped.subscribe();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            self.fill();
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => self.handle(m).await?,
                    None => return Ok(()),
                },
                r = changed.changed() => r?,
                _ = until_true(&mut stopped) => return Ok(()),
                _ = tick.tick() => {
                    if self.outstanding > 0 && self.last_data.elapsed() > STALL {
                        bail!("no data for {} s with requests pending", STALL.as_secs());
                    }
                    self.drop_stuck();
                    self.expire_claims();
                }
            }
        }
    }

    fn send(&self, o: Out) {
        let _ = self.out.send(o);
    }

    async fn handle(&mut self, m: In) -> Result<()> {
        match m {
            In::Choke => {
                self.choked = true;
                // A choking peer drops our requests.
                self.drop_fetches(false);
            }
            In::Unchoke => self.choked = false,
            In::Have(i) => {
                let i = i as usize;
                let mut p = self.t.picker();
                if self.bits.set(i, p.have()) {
                    if self.claims.unset(i) {
                        p.claim_held(i);
                    } else {
                        p.peer_has(i, self.origin);
                    }
                    drop(p);
                    self.update_interest();
                }
            }
            In::Claim(i) => {
                let i = i as usize;
                if self.host
                    && i < self.bits.bits().len()
                    && !self.bits.get(i)
                    && self.claims.set(i)
                {
                    self.claim_times.push_back((Instant::now(), i));
                    self.t.picker().peer_claims(i, self.counted);
                }
            }
            In::Bitfield(b) => {
                let new = Bits::from_bytes(self.bits.bits().len(), &b);
                let mut p = self.t.picker();
                for i in new.iter_set() {
                    if self.bits.set(i, p.have()) {
                        if self.claims.unset(i) {
                            p.claim_held(i);
                        } else {
                            p.peer_has(i, self.origin);
                        }
                    }
                }
                drop(p);
                self.update_interest();
            }
            In::Request(q) => self.send(Out::Upload(q)),
            In::Cancel(q) => self.send(Out::Cancel(q)),
            In::Piece {
                index,
                begin,
                frame,
            } => self.on_block(index, begin, &frame[PIECE_HEADER..]).await?,
            In::Other => {}
        }
        Ok(())
    }

    fn update_interest(&mut self) {
        let want = self.t.picker().wants_from(&mut self.bits);
        if want != self.interested {
            self.interested = want;
            let m = if want {
                Message::Interested
            } else {
                Message::NotInterested
            };
            self.send(Out::Raw(encode(&m)));
        }
    }

    /// Keeps up to the request window outstanding.
    fn fill(&mut self) {
        // Pieces that arrived through another peer meanwhile.
        if self.fetches.iter().any(|f| self.t.has(f.index)) {
            let (gone, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.fetches)
                .into_iter()
                .partition(|f| self.t.has(f.index));
            self.fetches = keep;
            for f in gone {
                self.abandon(f, true);
            }
        }
        if self.choked || !self.interested {
            return;
        }
        let window = super::REQUEST_WINDOW;
        while self.outstanding < window {
            if let Some(f) = self
                .fetches
                .iter_mut()
                .find(|f| (f.next as usize) < f.buf.len())
            {
                let len = BLOCK.min(f.buf.len() as u32 - f.next);
                let q = Request::new(f.index as u32, f.next, len);
                f.next += len;
                self.outstanding += 1;
                let _ = self.out.send(Out::Raw(encode(&Message::Request(q))));
                continue;
            }
            let max_fetches = window.div_ceil(self.t.blocks_per_piece()).max(1) + 1;
            if self.fetches.len() >= max_fetches || !self.t.reserve_memory() {
                break;
            }
            let fetching: Vec<usize> = self.fetches.iter().map(|f| f.index).collect();
            let picked = self
                .t
                .picker()
                .pick_except(&mut self.bits, self.origin, &fetching);
            let Some(index) = picked else {
                self.t.release_memory();
                break;
            };
            let size = self.t.piece_size(index);
            self.fetches.push(Fetch {
                index,
                buf: vec![0u8; size],
                next: 0,
                got: vec![false; size.div_ceil(BLOCK as usize)],
                received: 0,
                last: Instant::now(),
            });
            if self.origin {
                self.t.claim(index);
            }
        }
    }

    async fn on_block(&mut self, index: u32, begin: u32, data: &[u8]) -> Result<()> {
        let Some(pos) = self.fetches.iter().position(|f| f.index == index as usize) else {
            return Ok(()); // cancelled or a late duplicate
        };
        let f = &mut self.fetches[pos];
        let b = (begin / BLOCK) as usize;
        if !begin.is_multiple_of(BLOCK)
            || begin + data.len() as u32 > f.next
            || f.got.get(b).is_none_or(|g| *g)
            || data.len() as u32 != BLOCK.min(f.buf.len() as u32 - begin)
        {
            bail!("unrequested block {index}:{begin}+{}", data.len());
        }
        f.buf[begin as usize..begin as usize + data.len()].copy_from_slice(data);
        f.got[b] = true;
        f.received += data.len();
        f.last = Instant::now();
        self.outstanding -= 1;
        self.last_data = Instant::now();
        self.t.down_limit.take(data.len()).await;
        if f.received < f.buf.len() {
            return Ok(());
        }
        let f = self.fetches.swap_remove(pos);
        self.t.release_memory();
        let index = f.index;
        if self.t.has(index) {
            self.t.picker().release(index);
            return Ok(());
        }
        let t = self.t.clone();
        let ok = tokio::task::spawn_blocking(move || -> Result<bool> {
            let mut h = sha1w::Sha1::new();
            h.update(&f.buf);
            if h.finish() != t.pieces[index] {
                return Ok(false);
            }
            t.storage.write(index as u64 * t.piece_len, &f.buf)?;
            Ok(true)
        })
        .await?;
        match ok {
            Ok(true) => self.t.piece_done(index, self.origin),
            Ok(false) => {
                self.t.picker().release(index);
                self.t.bump();
                self.bad += 1;
                debug!(piece = index, "piece failed its hash");
                if self.bad >= MAX_BAD_PIECES {
                    warn!(
                        "peer {}: {} pieces it sent failed their hash; dropped",
                        self.addr, self.bad
                    );
                    bail!("{} pieces failed their hash", self.bad);
                }
            }
            Err(e) => {
                self.t.picker().release(index);
                self.t.fail(format!("{e:#}"));
                return Err(e);
            }
        }
        Ok(())
    }

    /// Gives a fetch back to the picker, cancelling its pending blocks.
    fn abandon(&mut self, f: Fetch, cancel: bool) {
        let mut off = 0u32;
        for &got in &f.got {
            if off >= f.next {
                break;
            }
            if !got {
                self.outstanding = self.outstanding.saturating_sub(1);
                if cancel {
                    let len = BLOCK.min(f.buf.len() as u32 - off);
                    let q = Request::new(f.index as u32, off, len);
                    let _ = self.out.send(Out::Raw(encode(&Message::Cancel(q))));
                }
            }
            off += BLOCK;
        }
        self.t.release_memory();
        {
            let mut p = self.t.picker();
            p.release(f.index);
            if self.origin {
                p.reclaim_next(f.index);
            }
        }
        self.t.bump();
    }

    /// A piece the peer announced but does not deliver (a claim it could not
    /// fill): asked elsewhere, and not of this peer until it announces it again.
    fn drop_stuck(&mut self) {
        let stuck: Vec<usize> = self
            .fetches
            .iter()
            .filter(|f| f.last.elapsed() > STALL)
            .map(|f| f.index)
            .collect();
        for i in stuck {
            if let Some(pos) = self.fetches.iter().position(|f| f.index == i) {
                let f = self.fetches.swap_remove(pos);
                debug!(addr = %self.addr, piece = i, "piece stuck at this peer");
                self.abandon(f, true);
                if self.bits.unset(i) {
                    self.t.picker().peer_lost(i, self.origin);
                }
            }
        }
    }

    /// A claim the peer did not fill in time: the origin's again.
    fn expire_claims(&mut self) {
        while let Some(&(at, i)) = self.claim_times.front() {
            if at.elapsed() <= STALL {
                break;
            }
            self.claim_times.pop_front();
            if self.claims.unset(i) {
                self.t.picker().claim_dropped(i);
                self.t.bump();
            }
        }
    }

    fn drop_fetches(&mut self, cancel: bool) {
        for f in std::mem::take(&mut self.fetches) {
            self.abandon(f, cancel);
        }
        self.outstanding = 0;
    }

    fn cleanup(&mut self) {
        self.drop_fetches(false);
        let mut p = self.t.picker();
        p.peer_gone(&self.bits, self.origin);
        for i in self.claims.iter_set() {
            p.claim_dropped(i);
        }
        if let Some(c) = self.counted {
            p.peer_left(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_slot_is_held_until_its_piece_has_left_the_socket() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        // A receiver that takes little at a time, like a busy host's port.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut rx = sock.connect(l.local_addr().unwrap()).await.unwrap();
        let (tx, _) = l.accept().await.unwrap();
        socket2::SockRef::from(&tx)
            .set_send_buffer_size(8 << 20)
            .unwrap();
        let (_r, mut w) = tx.into_split();
        let piece = vec![7u8; 512 << 10];
        w.write_all(&piece).await.unwrap();
        assert!(
            unsent(&w).unwrap() > DRAINED,
            "the piece left the socket at once"
        );

        let t = Instant::now();
        drain(&w, t + Duration::from_millis(300)).await;
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "drain returned with {:?} bytes unsent",
            unsent(&w)
        );

        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 512 << 10];
            rx.read_exact(&mut got).await.map(|_| got)
        });
        let t = Instant::now();
        drain(&w, t + Duration::from_secs(20)).await;
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "drain waited out its deadline"
        );
        assert!(unsent(&w).unwrap() <= DRAINED);
        assert_eq!(reader.await.unwrap().unwrap(), piece);
    }
}
