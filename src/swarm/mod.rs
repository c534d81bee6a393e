//! The one place that talks to librqbit: sessions and torrents for the
//! server's seeds and the agents.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use librqbit::{
    AddTorrent, AddTorrentOptions, ListenerOptions, ManagedTorrent, Session, SessionOptions,
};

use crate::image::Image;
pub use crate::protocol::Progress;
use crate::storage::DeviceStorage;

/// librqbit's "mbps" are MiB per second.
const MIB: f64 = 1048576.0;

/// How a torrent finds peers.
#[derive(Debug, Clone, Default)]
pub struct SwarmConfig {
    /// Where to accept peers; `None` picks a free port on all addresses.
    pub listen: Option<SocketAddr>,
    /// Peers to connect to at once, besides the tracker's.
    pub peers: Vec<SocketAddr>,
    /// Replaces the torrent's trackers when not empty.
    pub trackers: Vec<String>,
    pub disable_trackers: bool,
    /// Chunk requests kept outstanding per peer (librqbit's default: 128).
    /// A short queue keeps a busy seed responsive to every peer.
    pub request_window: Option<usize>,
}

/// Rate caps of a session, bytes per second.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub upload: Option<u64>,
    pub download: Option<u64>,
}

/// A peer id that starts with the tracker's origin prefix.
fn origin_peer_id() -> librqbit_core::Id20 {
    let mut id = [0u8; 20];
    let p = crate::server::tracker::ORIGIN_PREFIX;
    id[..p.len()].copy_from_slice(p);
    let rnd = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos()) as u64;
    for (i, b) in id[p.len()..].iter_mut().enumerate() {
        *b = b'0' + ((rnd >> (i * 4)) & 0xF) as u8 % 10;
    }
    librqbit_core::Id20::new(id)
}

fn nonzero(bps: u64) -> Option<std::num::NonZeroU32> {
    std::num::NonZeroU32::new(bps.min(u64::from(u32::MAX)) as u32)
}

/// A BitTorrent session: one listening port, any number of torrents.
pub struct SwarmSession {
    session: Arc<Session>,
    listen: SocketAddr,
}

impl SwarmSession {
    /// Limits are bytes per second for the whole session. `origin` marks
    /// the server's own seeds in their peer id, for the built-in tracker.
    pub async fn start(listen: Option<SocketAddr>, limits: Limits, origin: bool) -> Result<Self> {
        let listen = match listen {
            Some(a) if a.port() != 0 => a,
            // librqbit does not report the port it picks for port 0.
            other => {
                let ip = other.map_or("0.0.0.0".parse().expect("valid"), |a| a.ip());
                let l = std::net::TcpListener::bind((ip, 0)).context("finding a free port")?;
                l.local_addr()?
            }
        };
        let session = Session::new_with_opts(
            std::env::temp_dir(),
            SessionOptions {
                dht: None,
                peer_id: origin.then(origin_peer_id),
                persistence: None,
                fastresume: false,
                disable_local_service_discovery: true,
                ipv4_only: listen.is_ipv4(),
                listen: Some(ListenerOptions {
                    listen_addr: listen,
                    // librqbit announces no port for loopback addresses.
                    announce_port: Some(listen.port()),
                    ipv4_only: listen.is_ipv4(),
                    ..Default::default()
                }),
                client_name_and_version: Some(
                    concat!("blockswarm ", env!("CARGO_PKG_VERSION")).into(),
                ),
                ratelimits: librqbit::limits::LimitsConfig {
                    upload_bps: limits.upload.and_then(nonzero),
                    download_bps: limits.download.and_then(nonzero),
                },
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("starting the BitTorrent session on {listen}"))?;
        Ok(Self { session, listen })
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    pub async fn add(
        &self,
        image: &Image,
        storage: &DeviceStorage,
        cfg: &SwarmConfig,
    ) -> Result<Torrent> {
        let opts = AddTorrentOptions {
            overwrite: true,
            initial_peers: (!cfg.peers.is_empty()).then(|| cfg.peers.clone()),
            trackers: (!cfg.trackers.is_empty()).then(|| cfg.trackers.clone()),
            disable_trackers: cfg.disable_trackers,
            storage_factory: Some(storage.factory()),
            peer_opts: cfg.request_window.map(|w| librqbit::PeerConnectionOptions {
                max_request_window: Some(w),
                ..Default::default()
            }),
            ..Default::default()
        };
        let handle = self
            .session
            .add_torrent(AddTorrent::from_bytes(image.torrent.clone()), Some(opts))
            .await
            .context("adding the image's torrent")?
            .into_handle()
            .context("the torrent was not added")?;
        Ok(Torrent { handle })
    }

    /// Stops seeding one torrent; its storage is left as it is.
    pub async fn remove(&self, t: &Torrent) -> Result<()> {
        self.session.delete(t.handle.id().into(), false).await
    }

    pub async fn stop(&self) {
        self.session.stop().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One image in a session.
#[derive(Clone)]
pub struct Torrent {
    handle: Arc<ManagedTorrent>,
}

impl Torrent {
    pub async fn wait_initialized(&self) -> Result<()> {
        self.handle.wait_until_initialized().await
    }

    pub async fn wait_completed(&self) -> Result<()> {
        self.handle.wait_until_completed().await
    }

    /// Steers the piece order: librqbit fetches pieces in order, except
    /// that it puts first the pieces in a window ahead of each open stream.
    /// A stream that walks the payload from `start_fraction` (wrapping round)
    /// makes this host fetch from there. It waits for each piece by reading
    /// one byte of it, so nothing is read twice. Ends when all is here.
    pub fn steer(&self, start_fraction: f64) -> tokio::task::JoinHandle<Result<()>> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let handle = self.handle.clone();
        tokio::spawn(async move {
            let (len, plen) = handle.with_metadata(|m| {
                let l = m.lengths();
                (l.total_length(), u64::from(l.default_piece_length()))
            })?;
            let pieces = len.div_ceil(plen);
            let first = ((start_fraction.clamp(0.0, 1.0) * pieces as f64) as u64)
                .min(pieces.saturating_sub(1));
            let mut s = handle.clone().stream(0).await?;
            let mut b = [0u8; 1];
            for i in (first..pieces).chain(0..first) {
                s.seek(std::io::SeekFrom::Start(i * plen)).await?;
                s.read_exact(&mut b).await?;
            }
            Ok(())
        })
    }

    /// Whether the initial check is over and the torrent is up.
    pub fn is_live(&self) -> bool {
        self.handle.live().is_some()
    }

    pub fn progress(&self) -> Progress {
        let s = self.handle.stats();
        let live = s.live.as_ref();
        Progress {
            done_bytes: s.progress_bytes,
            total_bytes: s.total_bytes,
            uploaded_bytes: s.uploaded_bytes,
            down_bps: live.map_or(0.0, |l| l.download_speed.mbps * MIB),
            up_bps: live.map_or(0.0, |l| l.upload_speed.mbps * MIB),
            peers: live.map_or(0, |l| l.snapshot.peer_stats.live as usize),
            finished: s.finished,
        }
    }

    /// Fails if the torrent stopped with an error.
    pub fn check_error(&self) -> Result<()> {
        if let Some(e) = self.handle.stats().error {
            bail!("swarm: {e}");
        }
        Ok(())
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
        self.session.stop().await;
    }
}
