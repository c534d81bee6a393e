//! The image store: image directories in the store folder, plus images
//! seeded from raw devices. Rescanned every few seconds, so an image copied
//! in is picked up without a restart, but only once it is whole: manifest and
//! torrent consistent, and the payload file (if any) at its full size.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tracing::{info, warn};

use super::config::ServerConfig;
use crate::blockdev;
use crate::image::Image;
use crate::image::map::PayloadMap;
use crate::storage::DeviceStorage;
use crate::swarm::{SwarmConfig, SwarmSession, Torrent};

/// How a stored image is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum SeedState {
    /// Served to agents, seeded by other clients (`seed = false`).
    External,
    Verifying,
    Seeding,
    Failed(String),
}

pub struct StoredImage {
    pub name: String,
    pub image: Image,
    /// Store file or raw device.
    pub source: PathBuf,
    pub torrent: Option<Torrent>,
    pub state: SeedState,
}

/// Where an image's blocks come from.
pub fn open_source(image: &Image, device: Option<&Path>) -> Result<(PathBuf, DeviceStorage)> {
    let m = &image.manifest;
    let (path, map) = match device {
        Some(dev) => (dev.to_owned(), m.payload_map()?),
        None if m.payload.stored => (image.store_path(), PayloadMap::identity(m.payload.size)),
        None => bail!(
            "{} has no store file and no device to seed from",
            image.dir.display()
        ),
    };
    let dev = blockdev::open_source(&path)?;
    let want = if device.is_some() {
        m.disk.size
    } else {
        m.payload.size
    };
    if dev.size != want {
        bail!("{} is {} bytes, expected {want}", path.display(), dev.size);
    }
    Ok((path, DeviceStorage::reader(Arc::new(dev.file), map)))
}

/// Image directories that are complete and consistent, by name.
pub fn scan(dir: &Path) -> BTreeMap<String, Result<Image>> {
    let mut out = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let path = e.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
        else {
            continue;
        };
        if !path.is_dir() || name.starts_with('.') {
            continue;
        }
        let img = Image::open(&path).and_then(|img| {
            if img.manifest.payload.stored {
                let len = std::fs::metadata(img.store_path())
                    .map(|m| m.len())
                    .unwrap_or(0);
                if len != img.manifest.payload.size {
                    bail!(
                        "payload file is {len} of {} bytes (still copying?)",
                        img.manifest.payload.size
                    );
                }
            }
            Ok(img)
        });
        out.insert(name, img);
    }
    out
}

/// Brings the seeded set in line with the store: adds new or changed images,
/// drops vanished ones. Returns what changed, for the tracker.
pub async fn sync(
    cfg: &ServerConfig,
    session: &SwarmSession,
    images: &tokio::sync::RwLock<BTreeMap<String, StoredImage>>,
    failures: &mut BTreeMap<String, String>,
) -> Vec<(String, Option<[u8; 20]>)> {
    let mut found: BTreeMap<String, (Result<Image>, Option<PathBuf>)> = scan(&cfg.images)
        .into_iter()
        .map(|(k, v)| (k, (v, None)))
        .collect();
    for d in &cfg.device_images {
        let name = d
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        found.insert(name, (Image::open(&d.dir), Some(d.from.clone())));
    }
    let mut changes = Vec::new();
    let current: Vec<(String, String)> = images
        .read()
        .await
        .iter()
        .map(|(k, v)| (k.clone(), v.image.manifest.payload.info_hash.clone()))
        .collect();
    for (name, hash) in &current {
        let keep = matches!(found.get(name), Some((Ok(img), _)) if &img.manifest.payload.info_hash == hash);
        if !keep && let Some(old) = images.write().await.remove(name) {
            info!("image {name}: removed from the store");
            if let Some(t) = &old.torrent {
                let _ = session.remove(t).await;
            }
            changes.push((name.clone(), None));
        }
    }
    for (name, (img, device)) in found {
        if images.read().await.contains_key(&name) {
            continue;
        }
        let img = match img {
            Ok(i) => i,
            Err(e) => {
                let msg = format!("{e:#}");
                if failures.get(&name) != Some(&msg) {
                    warn!("image {name}: not loaded: {msg}");
                    failures.insert(name, msg);
                }
                continue;
            }
        };
        failures.remove(&name);
        let hash = crate::util::parse_hex20(&img.manifest.payload.info_hash);
        let added = if cfg.seed {
            add(cfg, session, &img, device.as_deref()).await
        } else {
            Err(anyhow::anyhow!("seeding is off"))
        };
        let (source, torrent, state) = match added {
            Err(_) if !cfg.seed => (
                device.clone().unwrap_or_else(|| img.store_path()),
                None,
                SeedState::External,
            ),
            Ok((src, t)) => (src, Some(t), SeedState::Verifying),
            Err(e) => (
                device.clone().unwrap_or_else(|| img.store_path()),
                None,
                SeedState::Failed(format!("{e:#}")),
            ),
        };
        if let SeedState::Failed(e) = &state {
            warn!("image {name}: cannot seed: {e}");
        } else if state == SeedState::External {
            info!("image {name}: loaded; seeding is left to other clients");
        } else {
            info!(
                "image {name}: loaded from {}, verifying its source",
                source.display()
            );
        }
        images.write().await.insert(
            name.clone(),
            StoredImage {
                name: name.clone(),
                image: img,
                source,
                torrent,
                state,
            },
        );
        changes.push((name, hash));
    }
    changes
}

async fn add(
    cfg: &ServerConfig,
    session: &SwarmSession,
    img: &Image,
    device: Option<&Path>,
) -> Result<(PathBuf, Torrent)> {
    let (src, storage) = open_source(img, device)?;
    // The built-in tracker lists the server's seed itself, from what the
    // server knows; an external one must hear of it.
    let swarm_cfg = SwarmConfig {
        trackers: vec![cfg.announce_url()],
        disable_trackers: cfg.tracker == "builtin",
        ..Default::default()
    };
    let t = session
        .add(img, &storage, &swarm_cfg)
        .await
        .context("adding the torrent")?;
    Ok((src, t))
}

/// Moves images from Verifying to Seeding once their check is over, or to
/// Failed (and stops them) when the source no longer matches the image.
pub async fn update_states(
    session: &SwarmSession,
    images: &tokio::sync::RwLock<BTreeMap<String, StoredImage>>,
) {
    let mut g = images.write().await;
    for (name, s) in g.iter_mut() {
        if s.state != SeedState::Verifying {
            continue;
        }
        let Some(t) = &s.torrent else { continue };
        let failed = match t.check_error() {
            Err(e) => Some(format!("{e:#}")),
            Ok(()) if !t.is_live() => continue,
            Ok(()) => {
                let p = t.progress();
                (!p.finished).then(|| {
                    format!(
                        "{} does not match the image: {} of {} bytes fail their hash (changed since capture?)",
                        s.source.display(),
                        p.total_bytes - p.done_bytes,
                        p.total_bytes
                    )
                })
            }
        };
        match failed {
            None => {
                info!("image {name}: source verified, seeding");
                s.state = SeedState::Seeding;
            }
            Some(e) => {
                warn!("image {name}: {e}");
                let _ = session.remove(t).await;
                s.torrent = None;
                s.state = SeedState::Failed(e);
            }
        }
    }
}
