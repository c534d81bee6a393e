//! Seeding an image from its store file or straight from a raw device.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tracing::info;

use crate::blockdev;
use crate::image::Image;
use crate::image::map::PayloadMap;
use crate::storage::DeviceStorage;
use crate::swarm::{Limits, Swarm, SwarmConfig};

/// Starts seeding `image`, from `from` (the captured disk) or the store file.
/// Every piece is verified first: a source that changed since capture is
/// refused rather than served.
pub async fn seed(image: &Image, from: Option<&Path>, cfg: &SwarmConfig) -> Result<Swarm> {
    seed_limited(image, from, cfg, Limits::default()).await
}

/// As [`seed`], with the session's rate caps (a master's `--max-upload`).
pub async fn seed_limited(
    image: &Image,
    from: Option<&Path>,
    cfg: &SwarmConfig,
    limits: Limits,
) -> Result<Swarm> {
    let m = &image.manifest;
    let (dev, map) = match from {
        Some(path) => {
            let dev = blockdev::open_source(path)?;
            if dev.size != m.disk.size {
                bail!(
                    "{} is {} bytes but the image was captured from a {}-byte source ({})",
                    path.display(),
                    dev.size,
                    m.disk.size,
                    m.source
                );
            }
            (dev, m.payload_map()?)
        }
        None => {
            let path = image.store_path();
            if !m.payload.stored {
                bail!(
                    "image {} has no store file: seed it from its source disk with --from (captured from {})",
                    image.dir.display(),
                    m.source
                );
            }
            let dev = blockdev::open_source(&path)?;
            if dev.size != m.payload.size {
                bail!(
                    "{} is {} bytes, the payload is {}",
                    path.display(),
                    dev.size,
                    m.payload.size
                );
            }
            (dev, PayloadMap::identity(m.payload.size))
        }
    };
    let storage = DeviceStorage::reader(Arc::new(dev.file), map);
    let swarm = Swarm::join_limited(image, &storage, cfg, limits).await?;
    swarm
        .torrent
        .wait_initialized()
        .await
        .context("verifying the source")?;
    let p = swarm.torrent.progress();
    if p.done_bytes != p.total_bytes {
        let bad = m.payload.size - p.done_bytes;
        swarm.stop().await;
        bail!(
            "{} does not match image {}: {bad} of {} payload bytes fail their hash (changed since capture?)",
            dev.path.display(),
            image.dir.display(),
            m.payload.size
        );
    }
    info!(
        "seeding {} ({}) from {} on {}",
        m.name,
        m.payload.info_hash,
        dev.path.display(),
        cfg.listen
            .map_or("an ephemeral port".into(), |a| a.to_string())
    );
    Ok(swarm)
}
