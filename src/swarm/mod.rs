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
}

/// A BitTorrent session: one listening port, any number of torrents.
pub struct SwarmSession {
    session: Arc<Session>,
    listen: SocketAddr,
}

impl SwarmSession {
    /// `upload_limit`: bytes per second for all uploads of the session.
    pub async fn start(listen: Option<SocketAddr>, upload_limit: Option<u64>) -> Result<Self> {
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
                    upload_bps: upload_limit
                        .and_then(|l| std::num::NonZeroU32::new(l.min(u64::from(u32::MAX)) as u32)),
                    download_bps: None,
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

/// Progress as the API and the console show it.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub uploaded_bytes: u64,
    pub down_bps: f64,
    pub up_bps: f64,
    pub peers: usize,
    pub finished: bool,
}

impl Torrent {
    pub async fn wait_initialized(&self) -> Result<()> {
        self.handle.wait_until_initialized().await
    }

    pub async fn wait_completed(&self) -> Result<()> {
        self.handle.wait_until_completed().await
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
        let session = SwarmSession::start(cfg.listen, None).await?;
        let torrent = session.add(image, storage, cfg).await?;
        Ok(Self { session, torrent })
    }

    pub async fn stop(self) {
        self.session.stop().await;
    }
}
