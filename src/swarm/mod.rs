//! The swarm engine shared by the server's seeds and the agents: BitTorrent
//! (BEP 3) over TCP, on librqbit's wire-protocol and metainfo crates, with
//! its own piece scheduling (see [`picker`]).
//!
//! - [`session`]: a [`SwarmSession`] owns one listening port and any number
//!   of torrents; it accepts peers and dials the ones it learns of.
//! - [`torrent`]: one torrent's shared state (picker, peers, bans, verified
//!   pieces) and the [`Torrent`] handle. Each torrent reads and writes its
//!   payload through a [`DeviceStorage`] and announces to its trackers
//!   ([`announce`]).
//! - [`peer`]: one connection (reader, driver), its [`writer`] and its
//!   bounded [`outbox`]; [`wire`]: messages decoded into checked types.
//! - [`trust`]: which peers the server vouches for. Nothing a peer says
//!   about itself makes it a host or the origin: the origin is the address
//!   the caller names ([`SwarmConfig::origin`]), hosts are the addresses the
//!   server vouches for ([`SwarmConfig::trust`]).
//!
//! Every socket and queue has a bound and a deadline, and every piece is
//! hashed before it is written or served. The engine knows nothing of the
//! server or the agent.

mod announce;
mod limit;
mod outbox;
mod peer;
pub mod picker;
mod session;
mod torrent;
mod trust;
mod verified;
pub mod wire;
mod writer;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Result;
use tokio::sync::watch;

use crate::image::Image;
pub use crate::protocol::Progress;
use crate::storage::DeviceStorage;
#[doc(hidden)]
pub use announce::{TrackerResponse, parse_response as parse_tracker_response};
pub use session::SwarmSession;
pub use torrent::Torrent;
pub use trust::Trust;

pub type PeerId = [u8; 20];

/// Block requests kept outstanding per peer (32 measured slower).
pub(crate) const REQUEST_WINDOW: usize = 16;
/// Peer id prefix of the agents: our client id, never proof of anything.
pub(crate) const HOST_PREFIX: &[u8] = b"-BS0100-";
/// Peer id prefix of the server's seeds (its tracker lists them first).
pub const ORIGIN_PREFIX: &[u8] = b"-BS0ORIGIN-";

/// How a torrent finds peers and orders its pieces.
#[derive(Debug, Clone, Default)]
pub struct SwarmConfig {
    /// Where to accept peers; `None` picks a free port on all addresses.
    pub listen: Option<SocketAddr>,
    /// Peers to connect to at once, besides the tracker's; dialled again
    /// with backoff while the torrent is not complete.
    pub peers: Vec<SocketAddr>,
    /// Replaces the torrent's trackers when not empty. Only http(s)
    /// trackers are spoken to.
    pub trackers: Vec<String>,
    pub disable_trackers: bool,
    /// Where, as a fraction of the payload, this host starts taking pieces
    /// from the server's seed (assigned by the server, spread over the room).
    pub start_fraction: f64,
    /// The server's seed as this host dials it: only a connection we make
    /// to exactly this address is the origin.
    pub origin: Option<SocketAddr>,
    /// The addresses the server vouches for (the deployment's hosts). The
    /// tracker's answers add to it (see [`Trust`]).
    pub trust: Arc<Trust>,
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

/// Returns once the flag is set (or its sender is gone).
async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// A session carrying a single torrent: a seed, or an agent.
pub struct Swarm {
    pub session: SwarmSession,
    pub torrent: Torrent,
}

impl Swarm {
    pub async fn join(image: &Image, storage: &DeviceStorage, cfg: &SwarmConfig) -> Result<Self> {
        Self::join_limited(image, storage, cfg, Limits::default()).await
    }

    /// As [`Swarm::join`], with the session's rate caps.
    pub async fn join_limited(
        image: &Image,
        storage: &DeviceStorage,
        cfg: &SwarmConfig,
        limits: Limits,
    ) -> Result<Self> {
        let session = SwarmSession::start(cfg.listen, limits, false).await?;
        let torrent = session.add(image, storage, cfg).await?;
        Ok(Self { session, torrent })
    }

    pub async fn stop(self) {
        self.torrent.stop().await;
        self.session.stop().await;
    }
}
