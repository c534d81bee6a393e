//! A connection's writer: sends our control messages first, then the blocks
//! the peer asked for, in order, each served from a piece that passed its
//! hash ([`Shared::verify`]).
//!
//! On the server's seed (the origin), blocks go out one piece at a time
//! under an upload slot (see [`Slots`]). Every write has deadlines: a slot
//! whose piece does not leave within [`SLOT_HOLD`] goes to another peer,
//! even in the middle of a write, and a connection whose writes make no
//! progress for [`WRITE_STALL`] is dropped. A peer that does not read
//! blocks nobody but its own writer.

use std::io::IoSlice;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::outbox::Outbox;
use super::peer::Misbehaved;
use super::torrent::Shared;
use super::wire::{Block, PIECE_HEADER, PieceIndex, out};

/// Pieces the server's seed uploads at once, each to one host, the others
/// waiting in line: a host gets a piece at a fraction of the port rate
/// rather than at 1/N of it, and passes it on that much sooner. A slot is
/// held until its piece has left the socket. Fewer slots leave the origin's
/// port idle while the hosts' ports are busy, more make each piece later
/// (docs/benchmarks.md, "Seventh look").
const ORIGIN_SLOTS: usize = 8;
/// Rooms behind uplinks get ORIGIN_SLOTS each (see [`Slots::set_rooms`]),
/// up to this many rooms' worth.
const MAX_ROOMS: usize = 32;
/// Of those, how many peers the server does not vouch for may hold at once
/// (while it vouches for any): strangers cannot take the origin's port from
/// the room.
const STRANGER_SLOTS: usize = 1;
/// An upload slot is given up after this long (a slow or stuck peer), and
/// the piece finished without one.
const SLOT_HOLD: Duration = Duration::from_secs(5);
/// A slot whose peer asks for nothing more for this long is given up.
const SLOT_IDLE: Duration = Duration::from_millis(200);
/// A connection whose writes make no progress for this long is dropped.
const WRITE_STALL: Duration = Duration::from_secs(30);
const KEEPALIVE: Duration = Duration::from_secs(60);
/// A slot's piece counts as sent when its socket holds at most this much.
const DRAINED: usize = 32 << 10;
/// How often a draining slot looks at its socket if the kernel's wake-up
/// (see [`drain`]) does not come.
const DRAIN_POLL: Duration = Duration::from_millis(25);
/// Queued blocks sent in one write at most (bytes; one block at least).
pub(super) const WRITE_BATCH: usize = 64 << 10;

/// The origin's upload slots, shared by the torrents of its session (one
/// port).
pub struct Slots {
    all: Arc<Semaphore>,
    strangers: Arc<Semaphore>,
    /// Permits `all` has in all (held or not).
    size: std::sync::Mutex<usize>,
}

impl Slots {
    pub fn new() -> Self {
        Self {
            all: Arc::new(Semaphore::new(ORIGIN_SLOTS)),
            strangers: Arc::new(Semaphore::new(STRANGER_SLOTS)),
            size: std::sync::Mutex::new(ORIGIN_SLOTS),
        }
    }

    /// The origin feeds `rooms` rooms, each behind its own uplink: slots
    /// for each, or the slots that happen to go to one room leave the
    /// others' uplinks idle (docs/benchmarks.md, "Issue 21"). Held slots
    /// are taken away once they are given back (on a later call).
    pub fn set_rooms(&self, rooms: usize) {
        let want = ORIGIN_SLOTS * rooms.clamp(1, MAX_ROOMS);
        let mut size = self.size.lock().unwrap_or_else(|e| e.into_inner());
        if want > *size {
            self.all.add_permits(want - *size);
            *size = want;
        } else if want < *size {
            *size -= self.all.forget_permits(*size - want);
        }
    }

    /// A slot for a vouched-for host (`vouched`), or one of the strangers'
    /// for anyone else; `None` once the session is gone.
    fn acquire(&self, vouched: bool) -> Acquire {
        let (all, strangers) = (self.all.clone(), self.strangers.clone());
        Box::pin(async move {
            let stranger = match vouched {
                true => None,
                false => Some(strangers.acquire_owned().await.ok()?),
            };
            let all = all.acquire_owned().await.ok()?;
            Some(Permits {
                _all: all,
                _stranger: stranger,
            })
        })
    }
}

impl Default for Slots {
    fn default() -> Self {
        Self::new()
    }
}

struct Permits {
    _all: OwnedSemaphorePermit,
    _stranger: Option<OwnedSemaphorePermit>,
}

type Acquire = std::pin::Pin<Box<dyn std::future::Future<Output = Option<Permits>> + Send>>;

/// An upload slot held for one piece.
struct Slot {
    _permits: Permits,
    piece: PieceIndex,
    since: Instant,
    /// When its last block went out.
    last: Instant,
}

pub(super) struct Writer {
    w: OwnedWriteHalf,
    out: Arc<Outbox>,
    t: Arc<Shared>,
    ip: IpAddr,
    slot: Option<Slot>,
    /// A piece whose slot expired: it is finished without one.
    unslotted: Option<PieceIndex>,
    acquiring: Option<Acquire>,
    control: Vec<u8>,
    blocks: Vec<Block>,
    buf: Vec<u8>,
}

impl Writer {
    pub fn new(w: OwnedWriteHalf, out: Arc<Outbox>, t: Arc<Shared>, ip: IpAddr) -> Self {
        Self {
            w,
            out,
            t,
            ip,
            slot: None,
            unslotted: None,
            acquiring: None,
            control: Vec::new(),
            blocks: Vec::new(),
            buf: Vec::new(),
        }
    }

    /// Runs until the connection breaks (a bound passed, a write stalled).
    pub async fn run(mut self) -> Result<()> {
        loop {
            if let Some(why) = self.out.broken() {
                return Err(Misbehaved(why).into());
            }
            let (front, control) = self.out.peek();
            self.settle_slot(front);
            let need_slot = self.t.slots.is_some()
                && self.slot.is_none()
                && front.is_some_and(|p| self.unslotted != Some(p));
            if !need_slot {
                // A waiting acquire is granted a permit even while not polled.
                self.acquiring = None;
            } else if self.acquiring.is_none()
                && let Some(s) = &self.t.slots
            {
                // Strangers are held to their slot only when there is a room
                // to protect: with nobody vouched for, every peer is plain.
                let plain = self.t.trust.is_empty() || self.t.vouches(self.ip);
                self.acquiring = Some(s.acquire(plain));
            }
            if (front.is_none() || need_slot) && !control {
                self.wait(need_slot, front.is_none()).await?;
                continue;
            }
            // Everything queued is taken at once: control messages go out in
            // one write (one packet) rather than one each; from the origin,
            // blocks of one piece only (its slot's).
            self.out.take(
                !need_slot,
                self.t.slots.is_some(),
                WRITE_BATCH,
                &mut self.control,
                &mut self.blocks,
            );
            self.send().await?;
        }
    }

    /// The slot goes back when the next block is of another piece, or when
    /// a slow peer has held it too long.
    fn settle_slot(&mut self, front: Option<PieceIndex>) {
        let (Some(s), Some(p)) = (&self.slot, front) else {
            return;
        };
        if s.piece != p {
            self.slot = None;
        } else if s.since.elapsed() > SLOT_HOLD {
            self.unslotted = Some(s.piece);
            self.slot = None;
        }
    }

    /// Waits for something to send, a slot, or a keep-alive's time.
    async fn wait(&mut self, need_slot: bool, queue_empty: bool) -> Result<()> {
        let idle = self
            .slot
            .as_ref()
            .filter(|_| queue_empty)
            .map(|s| s.last + SLOT_IDLE);
        tokio::select! {
            _ = self.out.changed() => {}
            p = async {
                match self.acquiring.as_mut() {
                    Some(a) => a.await,
                    None => std::future::pending().await,
                }
            }, if need_slot => {
                self.acquiring = None;
                if let (Some(p), (Some(piece), _)) = (p, self.out.peek()) {
                    let now = Instant::now();
                    self.slot = Some(Slot { _permits: p, piece, since: now, last: now });
                }
            }
            // A peer that stops asking gives its slot back.
            _ = tokio::time::sleep_until(idle.unwrap_or_else(Instant::now)), if idle.is_some() => {
                self.slot = None;
            }
            _ = tokio::time::sleep(KEEPALIVE), if queue_empty => {
                let k = out::keepalive();
                self.write(&k).await?;
            }
        }
        Ok(())
    }

    /// Sends what [`Outbox::take`] gave: control messages, then blocks.
    async fn send(&mut self) -> Result<()> {
        let t = self.t.clone();
        // Not announced by us: a confused peer.
        self.blocks.retain(|b| t.has(b.piece()));
        // Under an upload cap the blocks may wait; control does not.
        if (self.blocks.is_empty() || t.up_limit.is_capped()) && !self.control.is_empty() {
            let c = std::mem::take(&mut self.control);
            self.write(&c).await?;
            self.control = c;
            self.control.clear();
        }
        if self.blocks.is_empty() {
            return Ok(());
        }
        // Control messages ride in the same write as the blocks (no packet
        // of their own); the blocks go straight from their verified pieces,
        // in one vectored write without a copy.
        let mut heads = std::mem::take(&mut self.buf);
        heads.clear();
        let control = std::mem::take(&mut self.control);
        let data = self.fill(&mut heads)?;
        let len = data.iter().map(|(_, d)| d.len()).sum();
        t.up_limit.take(len).await;
        let mut slices = Vec::with_capacity(1 + 2 * data.len());
        slices.push(IoSlice::new(&control));
        for (k, (p, range)) in data.iter().enumerate() {
            let h = heads.get(k * PIECE_HEADER..(k + 1) * PIECE_HEADER);
            slices.push(IoSlice::new(h.unwrap_or_default()));
            slices.push(IoSlice::new(p.get(range.clone()).unwrap_or_default()));
        }
        let r = self.write_all_vectored(&mut slices).await;
        drop(slices);
        self.buf = heads;
        self.control = control;
        self.control.clear();
        r?;
        t.uploaded.fetch_add(len as u64, Ordering::Relaxed);
        let Some(last) = self.blocks.last() else {
            return Ok(());
        };
        if last.end() >= t.lengths.size(last.piece()) {
            if let Some(s) = &self.slot {
                drain(&self.w, s.since + SLOT_HOLD).await;
            }
            self.slot = None;
        } else if let Some(s) = &mut self.slot {
            s.last = Instant::now();
        }
        Ok(())
    }

    /// Appends the blocks' message headers to `heads` ([`PIECE_HEADER`]
    /// bytes each) and returns each block's bytes, as its verified piece and
    /// the range in it. A piece that is not in memory is read and hashed
    /// here (this worker only).
    #[allow(clippy::type_complexity)]
    fn fill(&mut self, heads: &mut Vec<u8>) -> Result<Vec<(Arc<Vec<u8>>, std::ops::Range<usize>)>> {
        let mut data = Vec::with_capacity(self.blocks.len());
        let mut piece: Option<(PieceIndex, Option<Arc<Vec<u8>>>)> = None;
        for b in &self.blocks {
            if piece.as_ref().is_none_or(|(p, _)| *p != b.piece()) {
                let d = match self.t.cached(b.piece()) {
                    Some(d) => Some(d),
                    None => blocking(|| self.t.verify(b.piece()))?,
                };
                piece = Some((b.piece(), d));
            }
            let range = b.begin() as usize..b.end() as usize;
            let Some(d) = piece
                .as_ref()
                .and_then(|(_, d)| d.as_ref())
                .filter(|d| d.get(range.clone()).is_some())
            else {
                continue;
            };
            out::piece_header(b, heads);
            data.push((d.clone(), range));
        }
        Ok(data)
    }

    /// Writes all of `bytes`. A slot held past [`SLOT_HOLD`] is given up
    /// meanwhile; no progress for [`WRITE_STALL`] fails the connection.
    async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.write_all_vectored(&mut [IoSlice::new(bytes)]).await
    }

    /// [`Writer::write`] of several slices, in as few syscalls as the
    /// socket takes them.
    async fn write_all_vectored(&mut self, mut slices: &mut [IoSlice<'_>]) -> Result<()> {
        IoSlice::advance_slices(&mut slices, 0);
        while !slices.is_empty() {
            let slot_end = self.slot.as_ref().map(|s| s.since + SLOT_HOLD);
            tokio::select! {
                r = self.w.write_vectored(slices) => match r? {
                    0 => bail!("the connection closed"),
                    n => IoSlice::advance_slices(&mut slices, n),
                },
                _ = tokio::time::sleep_until(slot_end.unwrap_or_else(Instant::now)), if slot_end.is_some() => {
                    // The peer takes too long: its slot goes to another.
                    self.unslotted = self.slot.take().map(|s| s.piece);
                }
                _ = tokio::time::sleep(WRITE_STALL) => {
                    return Err(Misbehaved(format!(
                        "nothing could be sent for {} s: the peer does not read",
                        WRITE_STALL.as_secs()
                    )).into());
                }
            }
        }
        Ok(())
    }
}

nix::ioctl_read_bad!(siocoutqnsd, 0x894B, nix::libc::c_int);

/// Waits until the socket has sent all but [`DRAINED`] bytes of what it was
/// given (or until `deadline`): a slot's piece is on the wire before the
/// slot goes to the next one, so the origin sends few pieces at a time.
///
/// The kernel wakes us: for the drain, the socket's unsent low-water mark
/// is lowered so that it turns writable once at most [`DRAINED`] bytes wait
/// (a writer is woken below half the mark). Polling the socket every 2 ms
/// instead cost the seed a wake-up and a syscall per slot that often.
async fn drain(w: &OwnedWriteHalf, deadline: Instant) {
    let s: &tokio::net::TcpStream = w.as_ref();
    let sock = socket2::SockRef::from(s);
    let lowat = sock.tcp_notsent_lowat().ok();
    let _ = sock.set_tcp_notsent_lowat(2 * DRAINED as u32);
    while unsent(w).is_some_and(|n| n > DRAINED) && Instant::now() < deadline {
        // Forget an old readiness, so that the wait below is for a new one.
        let _ = s.try_io(tokio::io::Interest::WRITABLE, || {
            match unsent(w).is_some_and(|n| n > DRAINED) {
                true => Err(std::io::ErrorKind::WouldBlock.into()),
                false => Ok(()),
            }
        });
        // A poll that finds the socket full asks the kernel to wake its
        // writers when space comes (it does not otherwise, unless a write
        // had to wait).
        let wait = match poll_writable(s) {
            // Space came meanwhile: looked at again soon.
            true => Duration::from_millis(1),
            false => DRAIN_POLL,
        };
        tokio::select! {
            _ = s.writable(), if wait == DRAIN_POLL => {}
            _ = tokio::time::sleep(wait) => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
    if let Some(l) = lowat {
        let _ = sock.set_tcp_notsent_lowat(l);
    }
}

/// poll(2) without waiting: the socket takes more bytes now.
fn poll_writable(s: &tokio::net::TcpStream) -> bool {
    use nix::libc;
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd, alive for the call; a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLOUT != 0
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

#[cfg(test)]
mod slot_tests {
    use super::*;

    #[test]
    fn slots_follow_the_rooms() {
        let s = Slots::new();
        assert_eq!(s.all.available_permits(), ORIGIN_SLOTS);
        s.set_rooms(4);
        assert_eq!(s.all.available_permits(), 4 * ORIGIN_SLOTS);
        s.set_rooms(1000);
        assert_eq!(s.all.available_permits(), MAX_ROOMS * ORIGIN_SLOTS);
        // Down to one room while all but 3 are held: the free ones go now,
        // the rest once given back.
        let held = s
            .all
            .clone()
            .try_acquire_many_owned((MAX_ROOMS * ORIGIN_SLOTS - 3) as u32)
            .unwrap();
        s.set_rooms(1);
        assert_eq!(s.all.available_permits(), 0);
        drop(held);
        s.set_rooms(1);
        assert_eq!(s.all.available_permits(), ORIGIN_SLOTS);
        s.set_rooms(0);
        assert_eq!(s.all.available_permits(), ORIGIN_SLOTS);
    }
}
