//! One peer connection: its reader, its [`Writer`], and the driver that
//! handles the peer's messages and fetches the pieces the
//! [`Picker`](super::picker::Picker) assigns it.
//!
//! The reader decodes each frame into a checked [`Message`] under a
//! deadline; the driver queues what the peer asks for in the connection's
//! bounded [`Outbox`] and keeps requests flowing. Each piece is fetched
//! whole from one peer into memory, hashed, and only then written to the
//! target. However a connection ends (even by a panic), [`Connection`]'s
//! drop gives its pieces back to the picker and unregisters it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::debug;

use super::outbox::Outbox;
use super::picker::{Bits, PeerPieces};
use super::torrent::{MAX_BAD_PIECES, Registered, Shared};
use super::wire::{
    BLOCK, Block, HANDSHAKE_LEN, Lengths, Message, PIECE_HEADER, PieceIndex, decode, out,
    parse_handshake,
};
use super::writer::{WRITE_BATCH, Writer};
use super::{PeerId, until_true};

/// A peer with requests pending that sends nothing for this long is dropped.
const STALL: Duration = Duration::from_secs(30);
/// Silence after which a connection is considered dead (peers send a
/// keep-alive every minute or two).
const IDLE: Duration = Duration::from_secs(180);
/// A message must arrive whole within this long of its length prefix.
const FRAME_TIME: Duration = Duration::from_secs(20);
/// Each side's handshake must arrive, or leave, within this long.
const HANDSHAKE_TIME: Duration = Duration::from_secs(10);
/// Unsent bytes the origin's socket holds at most, in pieces, so that what
/// the writer sends next (the upload-slot order) goes on the wire soon after.
const NOTSENT_PIECES: u64 = 1;
/// What a host's socket may hold unsent: one write batch. Blocks still
/// queued in the outbox can be cancelled (a copy that came from elsewhere)
/// instead of going out behind the ones already in the socket.
const HOST_NOTSENT: u32 = WRITE_BATCH as u32;
/// The reader's buffer for small messages.
const READ_BUFFER: usize = 4 << 10;
/// A frame's rest at least this long is waited for whole (see [`read_message`]).
const LOW_WATER_MIN: usize = 4 << 10;
/// How long a frame's rest is waited for whole at most (a 16 KiB block
/// takes 3 ms at 40 Mbit/s, 33 ms at 4).
const LOW_WATER_WAIT: Duration = Duration::from_millis(100);

/// A peer broke the protocol or a bound: it is dropped, and the reason
/// logged as a warning (other ends are routine).
#[derive(Debug)]
pub struct Misbehaved(pub String);

impl std::fmt::Display for Misbehaved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Misbehaved {}

/// Reads the other side's handshake: (info hash, peer id).
pub async fn read_handshake(s: &mut TcpStream) -> Result<([u8; 20], PeerId)> {
    let mut buf = [0u8; HANDSHAKE_LEN];
    tokio::time::timeout(HANDSHAKE_TIME, s.read_exact(&mut buf))
        .await
        .with_context(|| format!("no handshake within {} s", HANDSHAKE_TIME.as_secs()))??;
    Ok(parse_handshake(&buf)?)
}

pub async fn write_handshake(s: &mut TcpStream, h: &[u8]) -> Result<()> {
    tokio::time::timeout(HANDSHAKE_TIME, s.write_all(h))
        .await
        .context("our handshake could not be sent")??;
    Ok(())
}

/// Runs a connection whose handshakes are done, until it ends; the error
/// says why it did (a [`Misbehaved`] one: the peer's fault).
pub async fn run(
    t: Arc<Shared>,
    stream: TcpStream,
    their_id: PeerId,
    addr: SocketAddr,
    outgoing: bool,
) -> Result<()> {
    let _ = stream.set_nodelay(true);
    let lowat = if t.slots.is_some() {
        (u64::from(t.lengths.piece_len()) * NOTSENT_PIECES).clamp(128 << 10, 16 << 20) as u32
    } else {
        HOST_NOTSENT
    };
    let _ = socket2::SockRef::from(&stream).set_tcp_notsent_lowat(lowat);
    let out = Arc::new(Outbox::new(t.control_cap()));
    let kill = Arc::new(Notify::new());
    let reg = t
        .register(their_id, addr, outgoing, out.clone(), kill.clone())
        .map_err(|e| anyhow::anyhow!("not let in: {e}"))?;
    let (r, w) = stream.into_split();
    let (in_tx, in_rx) = mpsc::channel(64);
    let origin = outgoing && t.origin == Some(addr);
    let mut c = Connection {
        reader: tokio::spawn(reader(r, in_tx, t.lengths)),
        writer: tokio::spawn(Writer::new(w, out.clone(), t.clone(), addr.ip()).run()),
        conn: reg.conn,
        d: Driver::new(addr, their_id, t, out, &reg, origin),
    };
    tokio::select! {
        r = c.d.run(in_rx) => r,
        r = &mut c.writer => match r {
            Ok(r) => r,
            Err(e) => Err(anyhow::anyhow!("the writer failed: {e}")),
        },
        _ = kill.notified() => Ok(()),
    }
}

/// A running connection. Dropped however its task ends, it gives the
/// pieces in flight back to the picker and unregisters the peer.
struct Connection {
    d: Driver,
    reader: JoinHandle<()>,
    writer: JoinHandle<Result<()>>,
    conn: u64,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
        self.d.cleanup();
        self.d.t.unregister(self.d.id, self.conn);
    }
}

/// What the reader passes on: a message, with its frame if it is a block.
type Incoming = Result<(Message, Option<Vec<u8>>)>;

async fn reader(r: OwnedReadHalf, tx: mpsc::Sender<Incoming>, l: Lengths) {
    let mut r = tokio::io::BufReader::with_capacity(READ_BUFFER, r);
    loop {
        let m = read_message(&mut r, &l).await;
        let end = !matches!(m, Ok(Some(_)));
        let m = match m {
            Ok(Some(m)) => Ok(m),
            Ok(None) => return,
            Err(e) => Err(e),
        };
        if tx.send(m).await.is_err() || end {
            return;
        }
    }
}

/// The next message, `None` at the end of the stream. Small messages
/// (haves, requests, headers) come many to one read; a block larger than
/// the buffer is read straight into its frame.
async fn read_message(
    r: &mut tokio::io::BufReader<OwnedReadHalf>,
    l: &Lengths,
) -> Result<Option<(Message, Option<Vec<u8>>)>> {
    let mut len = [0u8; 4];
    match tokio::time::timeout(IDLE, r.read_exact(&mut len)).await {
        Err(_) => bail!("silent for {} s", IDLE.as_secs()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Ok(r) => r?,
    };
    let n = u32::from_be_bytes(len) as usize;
    if 4 + n > l.max_frame() {
        bail!(Misbehaved(format!(
            "a message of {n} bytes (at most {} here)",
            l.max_frame() - 4
        )));
    }
    // Each message gets its own buffer: a block is then handed on without
    // another copy.
    let mut frame = vec![0u8; 4 + n];
    frame[..4].copy_from_slice(&len);
    let read = tokio::time::timeout(FRAME_TIME, read_body(r, &mut frame[4..])).await;
    read.map_err(|_| {
        Misbehaved(format!(
            "a message of {n} bytes did not arrive whole within {} s",
            FRAME_TIME.as_secs()
        ))
    })??;
    let m = decode(&frame, l).map_err(|e| Misbehaved(e.to_string()))?;
    let frame = matches!(m, Message::Piece(_)).then_some(frame);
    Ok(Some((m, frame)))
}

/// Reads all of `buf`, the rest of a frame. A block's rest is waited for
/// whole: the socket wakes us once, not at every segment (about ten per
/// block, a wake-up and a read each). Only within a frame, whose bytes the
/// peer must send, so a short message after it is never held back; and the
/// first wait is bounded by [`LOW_WATER_WAIT`], after which the bytes are
/// read as they come (the kernel can hold a frame's tail back behind a
/// receive window smaller than it).
async fn read_body(r: &mut tokio::io::BufReader<OwnedReadHalf>, buf: &mut [u8]) -> Result<()> {
    let rest = buf.len().saturating_sub(r.buffer().len());
    let mut low_water = rest >= LOW_WATER_MIN;
    if low_water {
        set_low_water(r, rest);
    }
    let until = Instant::now() + LOW_WATER_WAIT;
    let mut got = 0;
    while got < buf.len() {
        let n = if low_water {
            match tokio::time::timeout_at(until, r.read(&mut buf[got..])).await {
                Ok(n) => n,
                Err(_) => {
                    set_low_water(r, 1);
                    low_water = false;
                    continue;
                }
            }
        } else {
            r.read(&mut buf[got..]).await
        };
        match n? {
            0 => bail!("the connection closed in the middle of a message"),
            n => got += n,
        }
    }
    if low_water {
        set_low_water(r, 1);
    }
    Ok(())
}

/// SO_RCVLOWAT: the socket is readable once `bytes` have arrived (the
/// kernel caps it at half its receive buffer). Best effort: without it the
/// reader only wakes more often.
fn set_low_water(r: &tokio::io::BufReader<OwnedReadHalf>, bytes: usize) {
    use nix::libc;
    use std::os::fd::AsRawFd;
    let s: &TcpStream = r.get_ref().as_ref();
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: SO_RCVLOWAT reads one int from a pointer to a live one; the
    // fd is this connection's open socket.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A piece being fetched from this peer.
struct Fetch {
    index: PieceIndex,
    buf: Vec<u8>,
    /// Next byte to request.
    next: u32,
    /// Which blocks have arrived.
    got: Vec<bool>,
    received: usize,
    /// When it was asked for, or its last block came.
    last: Instant,
}

impl Fetch {
    /// The block at `begin` (the last one may be short).
    fn block(&self, l: &Lengths, begin: u32) -> Option<Block> {
        let left = (self.buf.len() as u32).checked_sub(begin)?;
        l.block(self.index, begin, BLOCK.min(left))
    }
}

struct Driver {
    addr: SocketAddr,
    id: PeerId,
    t: Arc<Shared>,
    out: Arc<Outbox>,
    bits: PeerPieces,
    /// Pieces the peer is fetching from the origin (not held yet), and
    /// when it said so: a claim not filled within [`STALL`] is forgotten.
    claims: Bits,
    claim_times: VecDeque<(Instant, usize)>,
    /// Came early: a vouched host's claims count in this host's share of
    /// the origin's pieces, under its connection's id.
    early: Option<u64>,
    /// The server vouches for it (as last seen, see [`Driver::refresh_host`]).
    host: Arc<AtomicBool>,
    /// Claims it sent before the server vouched for it: they count once it
    /// does (the hosts' trust sets fill as they announce).
    unvouched_claims: Bits,
    unvouched_times: Vec<(Instant, usize)>,
    /// The server's seed (the configured origin, dialled by us).
    origin: bool,
    /// The peer chokes us.
    choked: bool,
    interested: bool,
    fetches: Vec<Fetch>,
    /// Block requests sent and not answered.
    outstanding: usize,
    last_data: Instant,
    /// See the torrent's peer entries.
    activity: Arc<AtomicU64>,
}

impl Driver {
    /// A driver for a registered connection; choked until the peer says.
    fn new(
        addr: SocketAddr,
        id: PeerId,
        t: Arc<Shared>,
        out: Arc<Outbox>,
        reg: &Registered,
        origin: bool,
    ) -> Self {
        let n = t.lengths.count();
        Self {
            addr,
            id,
            t,
            out,
            bits: PeerPieces::new(n),
            claims: Bits::new(n),
            claim_times: VecDeque::new(),
            early: reg.early.then_some(reg.conn),
            host: reg.host.clone(),
            unvouched_claims: Bits::new(n),
            unvouched_times: Vec::new(),
            origin,
            choked: true,
            interested: false,
            fetches: Vec::new(),
            outstanding: 0,
            last_data: Instant::now(),
            activity: reg.activity.clone(),
        }
    }

    async fn run(&mut self, mut rx: mpsc::Receiver<Incoming>) -> Result<()> {
        let have = self.t.have_bytes();
        if have.iter().any(|&b| b != 0) {
            self.out.control(&out::bitfield(&have));
        }
        self.out.control(&out::unchoke());
        let mut changed = self.t.changed.subscribe();
        let mut stopped = self.t.stopped.subscribe();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            self.refresh_host();
            self.fill();
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => self.handle(m?).await?,
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

    /// Another blockswarm host the server vouches for: its claims count,
    /// and it hears of ours.
    fn is_host(&self) -> bool {
        !self.origin && self.t.vouches(self.addr.ip())
    }

    /// Once the server vouches for the peer (at once, or when the trust set
    /// grows), what each side claimed before counts: it hears of all our
    /// claims, and the ones it sent meanwhile take effect. Otherwise the
    /// hosts' shares of the origin's pieces would miss the room's first
    /// seconds, and each would think itself ahead of the others.
    fn refresh_host(&mut self) {
        let now = self.is_host();
        if now == self.host.load(Ordering::Relaxed) {
            return;
        }
        if !now {
            self.host.store(false, Ordering::Relaxed);
            return;
        }
        let ours = self.t.now_a_host(&self.host);
        if !ours.is_empty() {
            self.out.control(&ours);
        }
        for (at, i) in std::mem::take(&mut self.unvouched_times) {
            self.unvouched_claims.unset(i);
            if at.elapsed() <= STALL {
                self.on_claim(i);
            } else {
                self.t.picker().past_claim(self.early);
            }
        }
    }

    /// A claim of a vouched host: the origin's piece `i` is its to fetch,
    /// unless it already holds it (a claim told late).
    fn on_claim(&mut self, i: usize) {
        if self.bits.get(i) {
            self.t.picker().past_claim(self.early);
        } else if self.claims.set(i) {
            self.claim_times.push_back((Instant::now(), i));
            self.t.picker().peer_claims(i, self.early);
        }
    }

    async fn handle(&mut self, (m, frame): (Message, Option<Vec<u8>>)) -> Result<()> {
        if m != Message::KeepAlive {
            self.activity.store(self.t.now_ms(), Ordering::Relaxed);
        }
        match m {
            Message::Choke => {
                self.choked = true;
                // A choking peer drops our requests.
                self.drop_fetches(false);
            }
            Message::Unchoke => self.choked = false,
            Message::Have(p) => {
                self.peer_has([p.get()].into_iter());
                self.update_interest();
            }
            Message::Claim(p) => {
                self.refresh_host();
                if self.host.load(Ordering::Relaxed) {
                    self.on_claim(p.get());
                } else if self.unvouched_claims.set(p.get()) {
                    self.unvouched_times.push((Instant::now(), p.get()));
                }
            }
            Message::Bitfield(b) => {
                self.peer_has(b.iter_set());
                self.update_interest();
            }
            Message::Request(b) => self.out.request(b).map_err(Misbehaved)?,
            Message::Cancel(b) => self.out.cancel(&b),
            Message::Piece(b) => {
                let data = frame
                    .as_deref()
                    .and_then(|f| f.get(PIECE_HEADER..))
                    .unwrap_or_default();
                self.on_block(b, data).await?;
            }
            Message::KeepAlive
            | Message::Interested
            | Message::NotInterested
            | Message::Other(_) => {}
        }
        Ok(())
    }

    fn peer_has(&mut self, pieces: impl Iterator<Item = usize>) {
        let mut p = self.t.picker();
        for i in pieces {
            if self.bits.set(i, p.have()) {
                if self.claims.unset(i) {
                    p.claim_held(i);
                } else {
                    p.peer_has(i, self.origin);
                }
            }
        }
    }

    fn update_interest(&mut self) {
        let want = self.t.picker().wants_from(&mut self.bits);
        if want != self.interested {
            self.interested = want;
            self.out.control(&out::interested(want));
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
        let l = self.t.lengths;
        while self.outstanding < window {
            if let Some(f) = self
                .fetches
                .iter_mut()
                .find(|f| (f.next as usize) < f.buf.len())
            {
                let Some(b) = f.block(&l, f.next) else {
                    f.next = f.buf.len() as u32;
                    continue;
                };
                f.next = b.end();
                self.outstanding += 1;
                self.out.control(&out::request(&b));
                continue;
            }
            let max_fetches = window.div_ceil(self.t.blocks_per_piece()).max(1) + 1;
            if self.fetches.len() >= max_fetches || !self.t.reserve_memory() {
                break;
            }
            let fetching: Vec<usize> = self.fetches.iter().map(|f| f.index.get()).collect();
            let picked = self
                .t
                .picker()
                .pick_except(&mut self.bits, self.origin, &fetching);
            let Some(index) = picked.and_then(|i| l.piece_at(i)) else {
                self.t.release_memory();
                break;
            };
            let size = l.size(index) as usize;
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

    /// A block arrived. `b` lies inside its piece and `data` is `b.len()`
    /// bytes (the decoder checked both).
    async fn on_block(&mut self, b: Block, data: &[u8]) -> Result<()> {
        let Some(pos) = self.fetches.iter().position(|f| f.index == b.piece()) else {
            return Ok(()); // cancelled or a late duplicate
        };
        let l = self.t.lengths;
        let f = &mut self.fetches[pos];
        let k = (b.begin() / BLOCK) as usize;
        let range = b.begin() as usize..b.end() as usize;
        let expected = b.begin().is_multiple_of(BLOCK)
            && b.end() <= f.next
            && f.got.get(k) == Some(&false)
            && f.block(&l, b.begin()) == Some(b)
            && data.len() == range.len();
        let Some(dst) = f.buf.get_mut(range).filter(|_| expected) else {
            bail!(Misbehaved(format!(
                "a block we did not ask for: piece {} bytes {}+{}",
                b.piece(),
                b.begin(),
                data.len()
            )));
        };
        dst.copy_from_slice(data);
        f.got[k] = true;
        f.received += data.len();
        f.last = Instant::now();
        self.outstanding = self.outstanding.saturating_sub(1);
        self.last_data = Instant::now();
        self.t.down_limit.take(data.len()).await;
        if f.received < f.buf.len() {
            return Ok(());
        }
        let f = self.fetches.swap_remove(pos);
        self.t.release_memory();
        let index = f.index;
        if self.t.has(index) {
            self.t.picker().release(index.get());
            return Ok(());
        }
        let t = self.t.clone();
        let checked = tokio::task::spawn_blocking(move || -> Result<Option<Vec<u8>>> {
            if !t.hash_matches(index, &f.buf) {
                return Ok(None);
            }
            t.storage.write(t.lengths.offset(index), &f.buf)?;
            Ok(Some(f.buf))
        })
        .await?;
        match checked {
            Ok(Some(buf)) => self.t.piece_done(index, self.origin, Arc::new(buf)),
            Ok(None) => {
                self.t.picker().release(index.get());
                self.t.bump();
                let n = self.t.strike(self.addr.ip(), self.id);
                debug!(addr = %self.addr, piece = %index, "piece failed its hash");
                if n >= MAX_BAD_PIECES {
                    bail!(Misbehaved(format!(
                        "{n} pieces it sent failed their hash; banned for this torrent"
                    )));
                }
            }
            Err(e) => {
                self.t.picker().release(index.get());
                self.t.fail(format!("{e:#}"));
                return Err(e);
            }
        }
        Ok(())
    }

    /// Gives a fetch back to the picker, cancelling its pending blocks.
    fn abandon(&mut self, f: Fetch, cancel: bool) {
        let l = self.t.lengths;
        let mut off = 0u32;
        for &got in &f.got {
            if off >= f.next {
                break;
            }
            if !got {
                self.outstanding = self.outstanding.saturating_sub(1);
                if cancel && let Some(b) = f.block(&l, off) {
                    self.out.control(&out::cancel(&b));
                }
            }
            off = off.saturating_add(BLOCK);
        }
        self.t.release_memory();
        {
            let mut p = self.t.picker();
            p.release(f.index.get());
            if self.origin {
                p.reclaim_next(f.index.get());
            }
        }
        self.t.bump();
    }

    /// A piece the peer announced but does not deliver (a claim it could not
    /// fill): asked elsewhere, and not of this peer until it announces it again.
    fn drop_stuck(&mut self) {
        let stuck: Vec<PieceIndex> = self
            .fetches
            .iter()
            .filter(|f| f.last.elapsed() > STALL)
            .map(|f| f.index)
            .collect();
        for p in stuck {
            if let Some(pos) = self.fetches.iter().position(|f| f.index == p) {
                let f = self.fetches.swap_remove(pos);
                debug!(addr = %self.addr, piece = %p, "piece stuck at this peer");
                self.abandon(f, true);
                if self.bits.unset(p.get()) {
                    self.t.picker().peer_lost(p.get(), self.origin);
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

    /// Takes back from the picker all this connection put there. Runs in
    /// [`Connection`]'s drop: nothing here may panic.
    fn cleanup(&mut self) {
        self.drop_fetches(false);
        let mut p = self.t.picker();
        p.peer_gone(&self.bits, self.origin);
        for i in self.claims.iter_set() {
            p.claim_dropped(i);
        }
        if let Some(c) = self.early {
            p.peer_left(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn driver(t: &Arc<Shared>, id: PeerId, addr: SocketAddr, out: Arc<Outbox>) -> (Driver, u64) {
        let reg: Registered = t
            .register(id, addr, false, out.clone(), Arc::default())
            .unwrap();
        let mut d = Driver::new(addr, id, t.clone(), out, &reg, false);
        d.choked = false;
        (d, reg.conn)
    }

    #[tokio::test]
    async fn a_connection_gives_its_pieces_back_even_when_its_task_panics() {
        let t = Shared::for_test(4, 1 << 16);
        let (id, addr): (PeerId, SocketAddr) = ([9; 20], "127.0.0.2:7000".parse().unwrap());
        let (mut d, conn) = driver(&t, id, addr, Arc::new(Outbox::new(1 << 20)));
        d.peer_has([2].into_iter());
        d.update_interest();
        d.fill();
        assert_eq!(d.fetches.len(), 1, "piece 2 is being fetched");
        assert_eq!(t.picker().inflight(2), 1);
        assert!(t.fetch_memory_used() > 0 && t.is_connected(&id));
        let c = Connection {
            d,
            reader: tokio::spawn(std::future::pending()),
            writer: tokio::spawn(std::future::pending()),
            conn,
        };
        let r = tokio::spawn(async move {
            let _c = c;
            panic!("a bug in the driver");
        })
        .await;
        assert!(r.unwrap_err().is_panic());
        assert_eq!(t.picker().inflight(2), 0, "piece 2 is still in flight");
        assert_eq!(t.fetch_memory_used(), 0);
        assert!(!t.is_connected(&id), "the peer is still registered");
    }

    #[tokio::test]
    async fn a_block_that_trickles_in_and_a_short_message_after_it_are_read() {
        let l = Lengths::new(4 << 20, 1 << 16).unwrap();
        let b = l.block(l.piece(3).unwrap(), 16384, BLOCK).unwrap();
        let mut frame = Vec::new();
        out::piece_header(&b, &mut frame);
        frame.extend((0..BLOCK).map(|i| (i * 7) as u8));
        let have = out::have(l.piece(5).unwrap());
        let lis = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut tx = TcpStream::connect(lis.local_addr().unwrap()).await.unwrap();
        let (rx, _) = lis.accept().await.unwrap();
        let sent = frame.clone();
        let sender = tokio::spawn(async move {
            // A segment at a time, as a slow port delivers it; then a have,
            // and nothing more: the low-water mark must not hold it back.
            for c in sent.chunks(1448) {
                tx.write_all(c).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tx.write_all(&have).await.unwrap();
            tx
        });
        let (r, _w) = rx.into_split();
        let mut r = tokio::io::BufReader::with_capacity(READ_BUFFER, r);
        let deadline = Duration::from_secs(5);
        let (m, f) = tokio::time::timeout(deadline, read_message(&mut r, &l))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m, Message::Piece(b));
        assert_eq!(f.unwrap(), frame);
        let (m, _) = tokio::time::timeout(deadline, read_message(&mut r, &l))
            .await
            .expect("the have after the block was held back")
            .unwrap()
            .unwrap();
        assert_eq!(m, Message::Have(l.piece(5).unwrap()));
        drop(sender.await.unwrap());
    }

    #[tokio::test]
    async fn claims_count_once_the_server_vouches_for_their_sender() {
        let t = Shared::for_test(4, 1 << 16);
        let (id, addr): (PeerId, SocketAddr) = ([9; 20], "127.0.0.2:7000".parse().unwrap());
        let out = Arc::new(Outbox::new(1 << 20));
        let (mut d, _) = driver(&t, id, addr, out.clone());
        let p = |i| t.lengths.piece(i).unwrap();
        let sent = || {
            let (mut c, mut q) = (Vec::new(), Vec::new());
            out.take(false, false, 0, &mut c, &mut q);
            c
        };
        // Both sides claim a piece of the origin's before the server
        // vouches for the other.
        t.claim(p(3));
        d.refresh_host();
        d.handle((Message::Claim(p(1)), None)).await.unwrap();
        assert!(!d.claims.get(1), "a stranger's claim was taken");
        assert!(
            !sent().windows(9).any(|w| w == out::claim(p(3))),
            "a stranger heard of our claim"
        );
        // The tracker names it a host: both claims count now.
        t.trust.extend([addr.ip()]);
        d.refresh_host();
        assert!(d.claims.get(1), "its claim was lost");
        assert!(
            sent().windows(9).any(|w| w == out::claim(p(3))),
            "it never heard of our claim"
        );
    }

    #[tokio::test]
    async fn a_relayed_piece_s_have_waits_an_origin_piece_s_and_the_last_go_at_once() {
        let t = Shared::for_test(3, 1 << 16);
        let p = |i| t.lengths.piece(i).unwrap();
        let out = Arc::new(Outbox::new(1 << 20));
        let _d = driver(&t, [9; 20], "127.0.0.2:7000".parse().unwrap(), out.clone());
        async fn woken(o: &Outbox) -> bool {
            let zero = Duration::ZERO;
            tokio::time::timeout(zero, o.changed()).await.is_ok()
        }
        let sent = || {
            let (mut c, mut q) = (Vec::new(), Vec::new());
            out.take(false, false, 0, &mut c, &mut q);
            c
        };
        let piece = || Arc::new(vec![0; 1 << 16]);
        t.piece_done(p(0), false, piece());
        assert!(!woken(&out).await, "a relayed piece's have woke the writer");
        out.flush_later();
        assert!(woken(&out).await);
        assert_eq!(sent(), out::have(p(0)));
        t.piece_done(p(1), true, piece());
        assert!(woken(&out).await, "an origin piece's have waited");
        assert_eq!(sent(), out::have(p(1)));
        t.piece_done(p(2), false, piece());
        assert!(woken(&out).await, "the last piece's have waited");
        assert_eq!(sent(), out::have(p(2)));
    }
}
