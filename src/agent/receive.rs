//! `receive`: write an image from the swarm straight onto a target.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tracing::info;

use super::write;
use crate::blockdev;
use crate::image::Image;
use crate::storage::DeviceStorage;
use crate::swarm::{Swarm, SwarmConfig};
use crate::util::human_bytes;

pub struct ReceiveOptions<'a> {
    pub image: &'a Path,
    pub target: &'a Path,
    pub swarm: SwarmConfig,
}

/// Returns the swarm, still seeding, once the target is complete.
pub async fn receive(opts: ReceiveOptions<'_>) -> Result<Swarm> {
    let image = Image::open(opts.image)?;
    let dev = blockdev::open_target(opts.target)?;
    write::check_target(&dev, &image)?;
    let map = image.manifest.payload_map()?;
    if map.device_end() > dev.size {
        bail!(
            "the image's blocks reach byte {}, past the end of {}",
            map.device_end(),
            dev.path.display()
        );
    }
    write::wipe_ends(&dev)?;
    let storage = DeviceStorage::writer(Arc::new(dev.file.try_clone()?), map, true);
    let t0 = Instant::now();
    let swarm = Swarm::join(&image, &storage, &opts.swarm).await?;
    watch_progress(&swarm).await?;
    let head = storage.take_head().unwrap_or_default();
    write::finish(&dev, &image, head)?;
    let secs = t0.elapsed().as_secs_f64();
    info!(
        "{} complete: {} in {:.1} s ({}/s)",
        dev.path.display(),
        human_bytes(image.manifest.payload.size),
        secs,
        human_bytes((image.manifest.payload.size as f64 / secs) as u64)
    );
    Ok(swarm)
}

/// Waits for the download, logging progress once a second.
async fn watch_progress(swarm: &Swarm) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let done = swarm.torrent.wait_completed();
    tokio::pin!(done);
    loop {
        tokio::select! {
            r = &mut done => return r,
            _ = tick.tick() => {
                swarm.torrent.check_error()?;
                let p = swarm.torrent.progress();
                info!(
                    "{} of {} ({:.0}%), {}/s down, {}/s up, {} peers",
                    human_bytes(p.done_bytes), human_bytes(p.total_bytes),
                    100.0 * p.done_bytes as f64 / p.total_bytes.max(1) as f64,
                    human_bytes(p.down_bps as u64), human_bytes(p.up_bps as u64), p.peers
                );
            }
        }
    }
}
