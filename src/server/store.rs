//! The image store: image directories in the store folder, plus images
//! seeded from raw devices. Rescanned every few seconds, so an image copied
//! in is picked up without a restart, but only once it is whole: manifest and
//! torrent consistent, and the payload file (if any) at its full size.
//!
//! A loaded image stays as it is while its directory is there with the same
//! info hash and its payload file is the one loaded, unchanged (device,
//! inode, size, mtime): a store that cannot be read for a moment re-hashes
//! nothing. A payload replaced by another file is loaded again; one changed
//! in place fails the image, since the seed reads that very file.

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
use crate::swarm::{SwarmConfig, SwarmSession, Torrent, Trust};

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

impl SeedState {
    /// The states' names, as [`SeedState::name`] gives them.
    pub const NAMES: [&str; 4] = ["external", "verifying", "seeding", "failed"];

    pub fn name(&self) -> &'static str {
        match self {
            Self::External => "external",
            Self::Verifying => "verifying",
            Self::Seeding => "seeding",
            Self::Failed(_) => "failed",
        }
    }
}

pub struct StoredImage {
    pub name: String,
    pub image: Image,
    /// Store file or raw device.
    pub source: PathBuf,
    pub torrent: Option<Torrent>,
    pub state: SeedState,
    /// The store payload file as loaded, for images served from one.
    pub payload: Option<FileStamp>,
}

/// A payload file as the store saw it: `dev` and `ino` tell a file
/// replaced by another, `size` and `mtime` one changed in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl FileStamp {
    pub fn of(md: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: md.dev(),
            ino: md.ino(),
            size: md.len(),
            mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
        }
    }

    fn same_file(&self, other: &Self) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
    }
}

/// Where an image's blocks come from, and the stamp of a store file as
/// opened (so that what the scan compares with is what the seed reads).
pub fn open_source(
    image: &Image,
    device: Option<&Path>,
) -> Result<(PathBuf, DeviceStorage, Option<FileStamp>)> {
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
    let stamp = match device {
        Some(_) => None,
        None => Some(FileStamp::of(&dev.file.metadata()?)),
    };
    Ok((path, DeviceStorage::reader(Arc::new(dev.file), map), stamp))
}

/// An image directory of the store.
pub struct Found {
    pub image: Image,
    /// The store payload file, if there is one.
    pub payload: Option<FileStamp>,
}

/// The store folder's image directories, by name, each opened or with the
/// reason it cannot be. Fails when the folder itself cannot be listed: then
/// nothing can be said of any image.
pub fn scan(dir: &Path) -> Result<BTreeMap<String, Result<Found>>> {
    let mut out = BTreeMap::new();
    let rd = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for e in rd {
        let path = e
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
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
        let found = upgrade(&name, &path)
            .and_then(|()| Image::open(&path))
            .map(|image| {
                let payload = image
                    .manifest
                    .payload
                    .stored
                    .then(|| std::fs::metadata(image.store_path()).ok())
                    .flatten()
                    .map(|md| FileStamp::of(&md));
                Found { image, payload }
            });
        out.insert(name, found);
    }
    Ok(out)
}

/// Converts an image directory with a single-file torrent (made before
/// the manifest travelled in the torrent) once, saying so; a directory that
/// cannot be converted is not loaded, and says why.
fn upgrade(name: &str, dir: &Path) -> Result<()> {
    let r = crate::image::upgrade(dir).context("its single-file torrent cannot be converted")?;
    if let Some((old, new)) = r {
        info!(
            "image {name}: its single-file torrent was converted to the self-contained layout \
             (manifest inside; payload pieces unchanged): info hash {old} is now {new}"
        );
    }
    Ok(())
}

/// What the scan makes of a loaded image.
enum Verdict {
    Keep,
    /// Unload it, and load what the store now holds under its name.
    Reload(String),
    /// Its payload changed under the seed: stop serving it.
    Fail(String, FileStamp),
}

fn judge(s: &StoredImage, found: Option<&Result<Found>>) -> Verdict {
    let f = match found {
        None => return Verdict::Reload("its directory is gone".into()),
        // There, but unreadable for now: what was loaded still stands.
        Some(Err(_)) => return Verdict::Keep,
        Some(Ok(f)) => f,
    };
    if f.image.manifest.payload.info_hash != s.image.manifest.payload.info_hash {
        return Verdict::Reload("its info hash changed".into());
    }
    let Some(was) = s.payload else {
        return Verdict::Keep;
    };
    match f.payload {
        Some(now) if now == was => Verdict::Keep,
        None => Verdict::Reload("its payload file is gone".into()),
        // A failed image is tried again once its file changes.
        Some(_) if matches!(s.state, SeedState::Failed(_)) => {
            Verdict::Reload("its payload file changed".into())
        }
        Some(now) if !now.same_file(&was) => {
            Verdict::Reload("its payload file was replaced".into())
        }
        Some(now) => Verdict::Fail(
            format!(
                "{} changed in place while being served ({} bytes, modified since it was loaded): \
                 replace it with a whole copy to serve the image again",
                s.source.display(),
                now.size
            ),
            now,
        ),
    }
}

/// Logs a message once, until it changes; `None` clears it.
fn note(log: &mut BTreeMap<String, String>, key: &str, msg: Option<String>) -> bool {
    match msg {
        Some(m) if log.get(key) != Some(&m) => {
            log.insert(key.to_string(), m);
            true
        }
        Some(_) => false,
        None => log.remove(key).is_some(),
    }
}

/// Brings the seeded set in line with the store: loads new images, reloads
/// replaced ones, unloads those whose directory is gone, and fails those
/// whose payload changed in place. An image that cannot be read for a
/// moment, or a store folder that cannot be listed, changes nothing.
pub async fn sync(
    cfg: &ServerConfig,
    session: &SwarmSession,
    trust: &Arc<Trust>,
    images: &tokio::sync::RwLock<BTreeMap<String, StoredImage>>,
    log: &mut BTreeMap<String, String>,
) {
    let mut found = match scan(&cfg.images) {
        Ok(f) => {
            if note(log, "", None) {
                info!("the store {} can be read again", cfg.images.display());
            }
            f
        }
        Err(e) => {
            let msg = format!("{e:#}");
            if note(log, "", Some(msg.clone())) {
                warn!("{msg}: keeping the images loaded until it can be read");
            }
            return;
        }
    };
    let mut devices = BTreeMap::new();
    for d in &cfg.device_images {
        let name = d
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let f = upgrade(&name, &d.dir)
            .and_then(|()| Image::open(&d.dir))
            .map(|image| Found {
                image,
                payload: None,
            });
        found.insert(name.clone(), f);
        devices.insert(name, d.from.clone());
    }
    {
        let mut g = images.write().await;
        let mut gone = Vec::new();
        for (name, s) in g.iter_mut() {
            match judge(s, found.get(name)) {
                Verdict::Keep => {
                    if let Some(Err(e)) = found.get(name) {
                        let msg = format!("{e:#}");
                        if note(log, name, Some(msg.clone())) {
                            warn!("image {name}: cannot be read now ({msg}); still serving it");
                        }
                    } else {
                        note(log, name, None);
                    }
                }
                Verdict::Reload(why) => {
                    info!("image {name}: unloaded: {why}");
                    gone.push(name.clone());
                }
                Verdict::Fail(why, now) => {
                    warn!("image {name}: {why}");
                    stop_seeding(session, s, why).await;
                    s.payload = Some(now);
                }
            }
        }
        for name in gone {
            if let Some(old) = g.remove(&name)
                && let Some(t) = &old.torrent
            {
                let _ = session.remove(t).await;
            }
        }
    }
    for (name, f) in found {
        if images.read().await.contains_key(&name) {
            continue;
        }
        let device = devices.get(&name).map(PathBuf::as_path);
        let f = f.and_then(|f| {
            let (m, got) = (&f.image.manifest.payload, f.payload.map(|p| p.size));
            if device.is_none() && m.stored && got != Some(m.size) {
                bail!(
                    "payload file is {} of {} bytes (still copying?)",
                    got.unwrap_or(0),
                    m.size
                );
            }
            Ok(f)
        });
        let f = match f {
            Ok(f) => f,
            Err(e) => {
                let msg = format!("{e:#}");
                if note(log, &name, Some(msg.clone())) {
                    warn!("image {name}: not loaded: {msg}");
                }
                continue;
            }
        };
        note(log, &name, None);
        let loaded = load(cfg, session, trust, &name, f, device).await;
        images.write().await.insert(name, loaded);
    }
}

async fn load(
    cfg: &ServerConfig,
    session: &SwarmSession,
    trust: &Arc<Trust>,
    name: &str,
    f: Found,
    device: Option<&Path>,
) -> StoredImage {
    let img = f.image;
    let default_source = || device.map_or_else(|| img.store_path(), Path::to_path_buf);
    let (source, torrent, state, payload) = if !cfg.seed {
        info!("image {name}: loaded; seeding is left to other clients");
        (default_source(), None, SeedState::External, None)
    } else {
        match add(cfg, session, trust, &img, device).await {
            Ok((src, t, stamp)) => {
                info!(
                    "image {name}: loaded from {}, verifying its source",
                    src.display()
                );
                (src, Some(t), SeedState::Verifying, stamp)
            }
            Err(e) => {
                let e = format!("{e:#}");
                warn!("image {name}: cannot seed: {e}");
                (default_source(), None, SeedState::Failed(e), f.payload)
            }
        }
    };
    StoredImage {
        name: name.to_string(),
        image: img,
        source,
        torrent,
        state,
        payload,
    }
}

async fn add(
    cfg: &ServerConfig,
    session: &SwarmSession,
    trust: &Arc<Trust>,
    img: &Image,
    device: Option<&Path>,
) -> Result<(PathBuf, Torrent, Option<FileStamp>)> {
    let (src, storage, stamp) = open_source(img, device)?;
    // The built-in tracker lists the server's seed itself, from what the
    // server knows; an external one must hear of it.
    let swarm_cfg = SwarmConfig {
        trackers: vec![cfg.announce_url()],
        disable_trackers: cfg.tracker == "builtin",
        trust: trust.clone(),
        ..Default::default()
    };
    let t = session
        .add(img, &storage, &swarm_cfg)
        .await
        .context("adding the torrent")?;
    Ok((src, t, stamp))
}

async fn stop_seeding(session: &SwarmSession, s: &mut StoredImage, why: String) {
    if let Some(t) = s.torrent.take() {
        let _ = session.remove(&t).await;
    }
    s.state = SeedState::Failed(why);
}

/// Moves images from Verifying to Seeding once their check is over, and
/// to Failed (stopping them) when the source does not match the image, or
/// when a seeding torrent fails (a piece of the source no longer matches).
pub async fn update_states(
    session: &SwarmSession,
    images: &tokio::sync::RwLock<BTreeMap<String, StoredImage>>,
) {
    let mut g = images.write().await;
    for (name, s) in g.iter_mut() {
        let Some(t) = &s.torrent else { continue };
        let failed = match (&s.state, t.check_error()) {
            (SeedState::Verifying | SeedState::Seeding, Err(e)) => format!("{e:#}"),
            (SeedState::Verifying, Ok(())) if t.is_live() => {
                let p = t.progress();
                if p.finished {
                    info!("image {name}: source verified, seeding");
                    s.state = SeedState::Seeding;
                    continue;
                }
                format!(
                    "{} does not match the image: {} of {} bytes fail their hash (changed since capture?)",
                    s.source.display(),
                    p.total_bytes - p.done_bytes,
                    p.total_bytes
                )
            }
            _ => continue,
        };
        warn!("image {name}: {failed}");
        stop_seeding(session, s, failed).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_state_is_named() {
        let all = [
            SeedState::External,
            SeedState::Verifying,
            SeedState::Seeding,
            SeedState::Failed("x".into()),
        ];
        let names: Vec<_> = all.iter().map(SeedState::name).collect();
        assert_eq!(names, SeedState::NAMES);
    }
}
