//! Pulling an image into the store through the swarm, the one way it is
//! done: a captured image from its master (the manifest came with the
//! upload), or an image given only as its torrent (dropped into the store
//! as `NAME.torrent`, or `blockswarm admin images add`) from any server or
//! stock client that holds it. The manifest travels in the torrent's first
//! pieces (see [`crate::image::torrent`]); it is checked like an uploaded
//! one as soon as those pieces are in. Every piece is hashed before it is
//! written; the image is written under a hidden `.capture-NAME.partial`
//! directory, renamed into place only once whole.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tracing::info;

use crate::image::map::PayloadMap;
use crate::image::torrent::{self, Layout};
use crate::image::{Image, manifest};
use crate::storage::DeviceStorage;
use crate::swarm::{Limits, Swarm, SwarmConfig, SwarmSession};

/// A pull that gets no new byte for this long fails.
pub const STALL: Duration = Duration::from_secs(120);
/// Prefix of the store's hidden work directories.
pub const PARTIAL: &str = ".capture-";

/// What to pull.
pub struct Pull<'a> {
    /// The image's torrent.
    pub torrent: &'a [u8],
    /// The image, when its manifest is known already (a capture's upload).
    pub known: Option<&'a Image>,
    /// Where peers come from (explicit ones, the torrent's trackers).
    pub swarm: SwarmConfig,
    /// Replace a stored image of the same name.
    pub replace: bool,
}

/// The torrent's name as an image name, checked.
pub fn image_name(l: &Layout) -> Result<String> {
    super::capture::check_name(&l.name).context("the torrent's name")?;
    Ok(l.name.clone())
}

/// Pulls the image into `store`. `keep_going` is asked once a second and
/// ends the pull with its error. Returns the stored image.
pub async fn pull(store: &Path, p: Pull<'_>, keep_going: impl Fn() -> Result<()>) -> Result<Image> {
    let l = torrent::layout(p.torrent)?;
    let name = image_name(&l)?;
    if let Some(img) = p.known
        && (img.manifest.name != name || img.torrent != p.torrent)
    {
        bail!("the torrent is not the image's {:?}", img.manifest.name);
    }
    check_space(store, l.payload_len)?;
    let tmp = store.join(format!("{PARTIAL}{name}.partial"));
    let r = pull_into(&tmp, &l, &p, &keep_going).await;
    let r = r.and_then(|()| place(store, &tmp, &name, p.replace));
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    r?;
    Image::open(&store.join(&name))
}

fn check_space(store: &Path, need: u64) -> Result<()> {
    let free = nix::sys::statvfs::statvfs(store)
        .map(|v| v.blocks_available().saturating_mul(v.fragment_size()))
        .with_context(|| format!("the store {}", store.display()))?;
    if free < need {
        bail!(
            "the store has {} free, the image needs {}",
            crate::util::human_bytes(free),
            crate::util::human_bytes(need)
        );
    }
    Ok(())
}

/// The manifest the torrent carries, from its prefix, checked like an
/// uploaded one and against the torrent (the rebuilt prefix must hash as
/// the torrent says, which also proves the bytes parsed are the ones sent).
pub fn manifest_from_prefix(l: &Layout, torrent_bytes: &[u8], prefix: &[u8]) -> Result<Image> {
    let json = prefix
        .get(..l.manifest_len as usize)
        .context("the manifest's pieces are missing")?;
    let mut m = manifest::Manifest::parse(json).context("the torrent's manifest")?;
    if !m.payload.info_hash.is_empty() || m.payload.stored {
        bail!("the torrent's manifest names an info hash or a store: not as a torrent carries it");
    }
    m.payload.info_hash = torrent::hex(&l.info_hash);
    torrent::check_payload(l, &m)?;
    Image::from_bytes(
        "the torrent",
        &serde_json::to_vec(&m)?,
        torrent_bytes.to_vec(),
    )
}

async fn pull_into(
    tmp: &Path,
    l: &Layout,
    p: &Pull<'_>,
    keep_going: &impl Fn() -> Result<()>,
) -> Result<()> {
    let _ = std::fs::remove_dir_all(tmp);
    std::fs::create_dir_all(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let path = tmp.join(&l.payload_file);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.set_len(l.payload_len)?;
    let file = Arc::new(file);
    let storage = DeviceStorage::writer(file.clone(), PayloadMap::identity(l.payload_len), true);
    let storage = match p.known {
        Some(img) => storage.with_prefix(img.prefix.to_vec(), true),
        None => storage.with_prefix(vec![0; l.prefix_len as usize], false),
    };
    let session = SwarmSession::start(p.swarm.listen, Limits::default(), false).await?;
    let t = session.add_torrent(p.torrent, &storage, &p.swarm).await;
    let swarm = match t {
        Ok(torrent) => Swarm { session, torrent },
        Err(e) => {
            session.stop().await;
            return Err(e);
        }
    };
    let r = wait(&swarm, l, p, &storage, keep_going).await;
    swarm.stop().await;
    let image = r?;
    // The held head (the payload's first MiB), then every byte to disk.
    let head = storage.take_head().unwrap_or_default();
    file.write_all_at(&head, 0)?;
    storage.flush()?;
    file.sync_all()?;
    let mut m = image.manifest.clone();
    m.payload.stored = true;
    crate::util::write_atomic(&tmp.join(manifest::TORRENT_FILE), p.torrent)?;
    // The manifest last: its presence marks a complete image.
    m.save(&tmp.join(manifest::MANIFEST_FILE))?;
    Ok(())
}

/// Waits for every piece; checks the manifest as soon as its pieces are in
/// (a torrent whose manifest is bad is given up before its payload).
async fn wait(
    swarm: &Swarm,
    l: &Layout,
    p: &Pull<'_>,
    storage: &DeviceStorage,
    keep_going: &impl Fn() -> Result<()>,
) -> Result<Image> {
    let mut image = p.known.cloned();
    let manifest_pieces = l.prefix_pieces() as usize;
    let check = |image: &mut Option<Image>| -> Result<()> {
        if image.is_none() && swarm.torrent.has_first(manifest_pieces) {
            let prefix = storage.prefix().unwrap_or_default();
            let img = manifest_from_prefix(l, p.torrent, &prefix)?;
            info!(
                "image {}: its manifest came through the swarm and checks ({} payload bytes)",
                l.name, l.payload_len
            );
            *image = Some(img);
        }
        Ok(())
    };
    let done = swarm.torrent.wait_completed();
    tokio::pin!(done);
    let (mut last, mut moved) = (0, Instant::now());
    loop {
        tokio::select! {
            r = &mut done => {
                r?;
                check(&mut image)?;
                return image.context("the torrent completed without its manifest (a bug)");
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                swarm.torrent.check_error()?;
                keep_going()?;
                check(&mut image)?;
                let got = swarm.torrent.progress().done_bytes;
                if got > last {
                    (last, moved) = (got, Instant::now());
                } else if moved.elapsed() > STALL {
                    bail!("no piece came from any peer for {} s", STALL.as_secs());
                }
            }
        }
    }
}

/// Removes what pulls cut short by a server restart left in the store
/// (hidden directories, never loaded as images).
pub fn clean_store(store: &Path) {
    let Ok(rd) = std::fs::read_dir(store) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(PARTIAL) && e.path().is_dir() {
            info!("removing {name}: an interrupted pull");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Renames the pulled directory into the store under `name`; a stored
/// image of that name is replaced only when the admin said so.
fn place(store: &Path, tmp: &Path, name: &str, replace: bool) -> Result<()> {
    let dest = store.join(name);
    if dest.exists() {
        if !replace {
            bail!("image {name:?} appeared in the store meanwhile: not replaced");
        }
        let old = store.join(format!("{PARTIAL}{name}.old"));
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(&dest, &old).with_context(|| format!("moving {} aside", dest.display()))?;
        std::fs::rename(tmp, &dest)?;
        let _ = std::fs::remove_dir_all(&old);
        return Ok(());
    }
    std::fs::rename(tmp, &dest).with_context(|| format!("renaming into {}", dest.display()))
}

/// Images being pulled from their torrent alone, and the last failures (a
/// dropped torrent is tried again after [`RETRY`]).
#[derive(Default)]
pub struct Pulls {
    running: std::sync::Mutex<std::collections::BTreeMap<String, Phase>>,
}

enum Phase {
    Pulling,
    Failed(Instant),
}

/// A failed pull of a dropped torrent is tried again after this.
pub const RETRY: Duration = Duration::from_secs(30);
/// Largest torrent taken: the manifest (at most [`torrent::MAX_MANIFEST`])
/// is not in it, only the piece hashes (20 bytes per piece).
pub const MAX_TORRENT: usize = 4 << 20;

impl Pulls {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, Phase>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl super::state::ServerState {
    /// Starts pulling an image given only as its torrent, from `peers` and
    /// the peers its trackers name. `dropped`: the torrent file in the
    /// store, removed once the image is stored. Returns the image's name.
    pub async fn start_pull(
        self: &Arc<Self>,
        torrent: Vec<u8>,
        peers: Vec<std::net::SocketAddr>,
        dropped: Option<std::path::PathBuf>,
    ) -> Result<String> {
        if torrent.len() > MAX_TORRENT {
            bail!(
                "the torrent is {} bytes (at most {MAX_TORRENT})",
                torrent.len()
            );
        }
        let l = torrent::layout(&torrent)?;
        let name = image_name(&l)?;
        if self.images.read().await.contains_key(&name)
            || self.config.images.join(&name).exists()
            || self.captures.origin(&name).is_some()
        {
            bail!("image {name:?} exists already: remove it first to pull it again");
        }
        {
            let mut g = self.pulls.lock();
            if matches!(g.get(&name), Some(Phase::Pulling)) {
                bail!("image {name:?} is being pulled already");
            }
            g.insert(name.clone(), Phase::Pulling);
        }
        info!(
            "image {name}: pulling {} from its torrent (info hash {}, peers: {}{})",
            crate::util::human_bytes(l.payload_len),
            torrent::hex(&l.info_hash),
            if l.trackers.is_empty() {
                "no tracker".to_string()
            } else {
                format!("tracker {}", l.trackers.join(", "))
            },
            peers.iter().map(|p| format!(", {p}")).collect::<String>()
        );
        let state = self.clone();
        let n = name.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let p = Pull {
                torrent: &torrent,
                known: None,
                swarm: SwarmConfig {
                    peers,
                    ..Default::default()
                },
                replace: false,
            };
            let r = pull(&state.config.images, p, || Ok(())).await;
            match r {
                Ok(img) => {
                    info!(
                        "image {n}: pulled from its torrent and stored in {:.1} s ({} payload bytes)",
                        t0.elapsed().as_secs_f64(),
                        img.manifest.payload.size
                    );
                    if let Some(f) = dropped {
                        let _ = std::fs::remove_file(f);
                    }
                    state.pulls.lock().remove(&n);
                }
                Err(e) => {
                    tracing::warn!("image {n}: pulling it from its torrent failed: {e:#}");
                    state.pulls.lock().insert(n, Phase::Failed(Instant::now()));
                }
            }
        });
        Ok(name)
    }

    /// Starts pulling a torrent dropped into the store as `stem.torrent`;
    /// one whose image is stored already is removed.
    async fn pull_file(self: &Arc<Self>, path: &Path, stem: &str) -> Result<()> {
        let b = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        if b.len() > MAX_TORRENT {
            bail!("{} bytes is too large for a torrent", b.len());
        }
        let l = torrent::layout(&b)?;
        if l.name != stem {
            bail!(
                "the torrent names image {:?}: rename the file to {}.torrent",
                l.name,
                l.name
            );
        }
        let stored = self
            .images
            .read()
            .await
            .get(stem)
            .map(|s| s.image.manifest.payload.info_hash.clone());
        if stored == Some(torrent::hex(&l.info_hash)) {
            info!(
                "{}: image {stem} is stored already; removing the torrent",
                path.display()
            );
            let _ = std::fs::remove_file(path);
            return Ok(());
        }
        self.start_pull(b, Vec::new(), Some(path.to_owned()))
            .await?;
        Ok(())
    }

    /// Starts pulls for the torrents dropped into the store (`NAME.torrent`
    /// beside the image directories), each again [`RETRY`] after a failure.
    pub async fn pull_dropped(self: &Arc<Self>, log: &mut std::collections::BTreeSet<String>) {
        let Ok(rd) = std::fs::read_dir(&self.config.images) else {
            return;
        };
        for e in rd.flatten() {
            let path = e.path();
            let file = e.file_name().to_string_lossy().into_owned();
            if file.starts_with('.') || !file.ends_with(".torrent") || !path.is_file() {
                continue;
            }
            let stem = file.trim_end_matches(".torrent").to_string();
            match self.pulls.lock().get(&stem) {
                Some(Phase::Pulling) => continue,
                Some(Phase::Failed(at)) if at.elapsed() < RETRY => continue,
                _ => {}
            }
            let r = self.pull_file(&path, &stem).await;
            match r {
                Ok(()) => {}
                Err(e) => {
                    let msg = format!("{file}: not pulled: {e:#}");
                    if log.insert(msg.clone()) {
                        tracing::warn!("{msg}");
                    }
                    self.pulls
                        .lock()
                        .insert(stem, Phase::Failed(Instant::now()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample image's torrent and its prefix (manifest and pad).
    fn sample() -> (Vec<u8>, Vec<u8>) {
        let mut m = crate::image::manifest::tests::sample();
        m.name = "lab".into();
        let pieces = vec![7u8; 20];
        let built = torrent::build(&m, pieces, &[]).unwrap();
        (built.bytes, torrent::prefix(&m).unwrap())
    }

    #[test]
    fn the_manifest_from_the_torrents_pieces_is_checked_and_named_by_its_hash() {
        let (t, prefix) = sample();
        let l = torrent::layout(&t).unwrap();
        let img = manifest_from_prefix(&l, &t, &prefix).unwrap();
        assert_eq!(img.manifest.payload.info_hash, torrent::hex(&l.info_hash));
        assert_eq!(img.manifest.name, "lab");
        assert!(!img.manifest.payload.stored);
        assert_eq!(&img.prefix[..], &prefix[..]);
    }

    #[test]
    fn a_tampered_manifest_piece_is_refused() {
        let (t, prefix) = sample();
        let l = torrent::layout(&t).unwrap();
        // Valid JSON still, but not the manifest the piece hash describes.
        let json = String::from_utf8(prefix[..l.manifest_len as usize].to_vec()).unwrap();
        let evil = json.replace("/dev/null", "/dev/nul1");
        assert_ne!(evil, json);
        let mut bad = evil.into_bytes();
        bad.resize(prefix.len(), 0);
        let e = format!("{:#}", manifest_from_prefix(&l, &t, &bad).unwrap_err());
        assert!(
            e.contains("differs from the one the torrent's piece hashes describe"),
            "{e}"
        );
        // Bytes that are no manifest at all.
        let e = format!(
            "{:#}",
            manifest_from_prefix(&l, &t, &vec![0u8; prefix.len()]).unwrap_err()
        );
        assert!(e.contains("not a valid manifest"), "{e}");
    }
}
