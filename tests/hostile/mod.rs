//! Helpers for the swarm tests against hostile peers: a captured image
//! served and received in process, and hand-written BEP 3 peers on
//! 127.0.0.x addresses of their own.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use blockswarm::image::Image;
use blockswarm::image::map::PayloadMap;
use blockswarm::storage::DeviceStorage;
use blockswarm::swarm::{Limits, SwarmConfig, SwarmSession, Torrent, Trust};

use crate::common::captured;

pub const HOST_PREFIX: &[u8] = b"-BS0100-";
pub const BLOCK: u32 = 16 << 10;

/// A captured image and its payload.
pub struct Fixture {
    _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub image: Image,
    /// The torrent's bytes: the manifest's pieces, then payload.bin's.
    pub payload: Vec<u8>,
    pub plen: u32,
    /// The torrent's pieces.
    pub pieces: u32,
    /// The first payload piece (after the manifest's).
    pub base: u32,
    /// payload.bin's length.
    pub payload_len: u64,
    pub info_hash: [u8; 20],
}

pub fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let (_disk, _size, dir) = captured(tmp.path(), "bare", 48);
    let image = Image::open(&dir).unwrap();
    let file = std::fs::read(dir.join("payload.bin")).unwrap();
    let plen = image.manifest.payload.piece_length;
    // The torrent's bytes: the manifest's pieces (in memory), then the payload.
    let mut payload = image.prefix.to_vec();
    let base = (payload.len() / plen as usize) as u32;
    let payload_len = file.len() as u64;
    payload.extend_from_slice(&file);
    let pieces = payload.len().div_ceil(plen as usize) as u32;
    let hex = &image.manifest.payload.info_hash;
    let info_hash = (0..20)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    Fixture {
        _tmp: tmp,
        dir,
        image,
        payload,
        plen,
        pieces,
        base,
        payload_len,
        info_hash,
    }
}

impl Fixture {
    pub fn piece(&self, i: u32) -> &[u8] {
        let off = (i * self.plen) as usize;
        &self.payload[off..(off + self.plen as usize).min(self.payload.len())]
    }

    pub fn reader(&self, path: &Path) -> DeviceStorage {
        DeviceStorage::reader(
            Arc::new(std::fs::File::open(path).unwrap()),
            PayloadMap::identity(self.payload_len),
        )
    }

    /// A seed on 127.0.0.1; `origin`: the server's kind, with upload slots.
    pub async fn seed(
        &self,
        origin: bool,
        limits: Limits,
        trust: Trust,
    ) -> (SwarmSession, Torrent) {
        self.seed_from(&self.dir.join("payload.bin"), origin, limits, trust)
            .await
    }

    pub async fn seed_from(
        &self,
        path: &Path,
        origin: bool,
        limits: Limits,
        trust: Trust,
    ) -> (SwarmSession, Torrent) {
        let s = SwarmSession::start(Some("127.0.0.1:0".parse().unwrap()), limits, origin)
            .await
            .unwrap();
        let cfg = SwarmConfig {
            disable_trackers: true,
            trust: Arc::new(trust),
            ..Default::default()
        };
        let t = s.add(&self.image, &self.reader(path), &cfg).await.unwrap();
        t.wait_initialized().await.unwrap();
        (s, t)
    }

    /// A receiver on 127.0.0.1 writing to a fresh file in `dir`.
    pub async fn receiver(&self, cfg: SwarmConfig) -> (SwarmSession, Torrent, DeviceStorage) {
        let path = self
            .dir
            .join(format!("target-{}", SERIAL.fetch_add(1, Ordering::Relaxed)));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        f.set_len(self.payload_len).unwrap();
        let st = DeviceStorage::writer(Arc::new(f), PayloadMap::identity(self.payload_len), true);
        let s = SwarmSession::start(
            Some("127.0.0.1:0".parse().unwrap()),
            Limits::default(),
            false,
        )
        .await
        .unwrap();
        let cfg = SwarmConfig {
            disable_trackers: cfg.trackers.is_empty(),
            ..cfg
        };
        let t = s.add(&self.image, &st, &cfg).await.unwrap();
        (s, t, st)
    }

    /// Every piece the storage holds is the payload's.
    pub fn assert_holds_payload(&self, st: &DeviceStorage) {
        let mut buf = vec![0u8; self.payload_len as usize];
        st.read(0, &mut buf).unwrap();
        for i in self.base..self.pieces {
            let off = ((i - self.base) * self.plen) as usize;
            assert!(
                buf[off..off + self.piece(i).len()] == *self.piece(i),
                "piece {i} differs from the payload"
            );
        }
    }
}

/// Makes names and peer ids unique.
pub static SERIAL: AtomicUsize = AtomicUsize::new(0);

pub fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

pub fn peer_id(prefix: &[u8]) -> [u8; 20] {
    let mut id = *b"00000000000000000000";
    id[..prefix.len()].copy_from_slice(prefix);
    id[19] = b'0' + (SERIAL.fetch_add(1, Ordering::Relaxed) % 10) as u8;
    id
}

/// A TCP connection from 127.0.0.`from`, with a small receive buffer if
/// given (a peer that reads little).
pub fn dial_from(from: u8, to: SocketAddr, rcvbuf: Option<usize>) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if let Some(n) = rcvbuf {
        s.set_recv_buffer_size(n).unwrap();
    }
    s.bind(&SocketAddr::new(ip(from), 0).into()).unwrap();
    s.connect_timeout(&to.into(), Duration::from_secs(5))
        .unwrap();
    s.into()
}

pub fn listen_on(last: u8) -> TcpListener {
    TcpListener::bind(SocketAddr::new(ip(last), 0)).unwrap()
}

pub fn our_handshake(info_hash: [u8; 20], id: &[u8; 20]) -> Vec<u8> {
    let mut h = vec![19u8];
    h.extend_from_slice(b"BitTorrent protocol");
    h.extend_from_slice(&[0; 8]);
    h.extend_from_slice(&info_hash);
    h.extend_from_slice(id);
    h
}

/// Trades handshakes; returns the other side's.
pub fn handshake(
    s: &mut TcpStream,
    info_hash: [u8; 20],
    id: &[u8; 20],
) -> std::io::Result<[u8; 68]> {
    s.write_all(&our_handshake(info_hash, id))?;
    let mut theirs = [0u8; 68];
    s.read_exact(&mut theirs)?;
    Ok(theirs)
}

pub fn msg(id: u8, body: &[u8]) -> Vec<u8> {
    let mut m = (body.len() as u32 + 1).to_be_bytes().to_vec();
    m.push(id);
    m.extend_from_slice(body);
    m
}

pub fn u32s(xs: &[u32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_be_bytes()).collect()
}

/// Requests for every block of piece `i`.
pub fn requests(fx: &Fixture, i: u32) -> Vec<u8> {
    let len = fx.piece(i).len() as u32;
    (0..len)
        .step_by(BLOCK as usize)
        .flat_map(|b| msg(6, &u32s(&[i, b, BLOCK.min(len - b)])))
        .collect()
}

pub fn bitfield_all(pieces: u32) -> Vec<u8> {
    let n = pieces.div_ceil(8) as usize;
    let mut f = vec![0xFFu8; n];
    if !pieces.is_multiple_of(8) {
        f[n - 1] = 0xFF << (8 - pieces % 8);
    }
    msg(5, &f)
}

/// The next message (id and body; empty for a keep-alive).
pub fn read_msg(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut l = [0u8; 4];
    s.read_exact(&mut l)?;
    let mut m = vec![0u8; u32::from_be_bytes(l) as usize];
    s.read_exact(&mut m)?;
    Ok(m)
}

/// Reads (and drops) whatever comes until the other side closes; false if
/// it is still open after `within`.
pub fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let end = Instant::now() + within;
    let mut buf = [0u8; 65536];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

/// Polls `f` every 100 ms until it holds; false after `within`.
pub async fn eventually(within: Duration, f: impl Fn() -> bool) -> bool {
    let end = Instant::now() + within;
    while !f() {
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

pub async fn complete_within(t: &Torrent, secs: u64, what: &str) {
    match tokio::time::timeout(Duration::from_secs(secs), t.wait_completed()).await {
        Ok(r) => r.unwrap(),
        Err(_) => panic!(
            "{what}: not complete after {secs} s ({} of {} bytes)",
            t.progress().done_bytes,
            t.progress().total_bytes
        ),
    }
}

/// A BEP 3 peer listening on 127.0.0.`last` that runs `serve` for each
/// connection, after the handshake (with `id`); counts its connections.
pub fn fake_peer(
    fx: &Fixture,
    last: u8,
    id: [u8; 20],
    serve: impl Fn(TcpStream) -> std::io::Result<()> + Send + Sync + 'static,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = listen_on(last);
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let (count, info_hash, serve) = (conns.clone(), fx.info_hash, Arc::new(serve));
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            let serve = serve.clone();
            std::thread::spawn(move || {
                if handshake(&mut s, info_hash, &id).is_ok() {
                    let _ = serve(s);
                }
            });
        }
    });
    (addr, conns)
}

/// Serves every piece as asked, from `payload`.
pub fn serve_honestly(
    mut s: TcpStream,
    payload: Arc<Vec<u8>>,
    plen: u32,
    pieces: u32,
) -> std::io::Result<()> {
    let mut out = bitfield_all(pieces);
    out.extend_from_slice(&msg(1, &[]));
    s.write_all(&out)?;
    loop {
        let m = read_msg(&mut s)?;
        if m.first() == Some(&6) && m.len() == 13 {
            let q: Vec<u32> = m[1..]
                .chunks(4)
                .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
                .collect();
            let off = (q[0] * plen + q[1]) as usize;
            let mut body = u32s(&q[..2]);
            body.extend_from_slice(&payload[off..off + q[2] as usize]);
            s.write_all(&msg(7, &body))?;
        }
    }
}

pub fn raise_fd_limit() {
    let mut r = nix::libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit fill and read one rlimit struct.
    unsafe {
        nix::libc::getrlimit(nix::libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max.min(16384);
        nix::libc::setrlimit(nix::libc::RLIMIT_NOFILE, &r);
    }
}
