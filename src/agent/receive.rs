//! `receive`: write an image from the swarm straight onto a target.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use tracing::info;

use super::target::{Start, Target};
use crate::image::Image;
use crate::protocol::Verify;
use crate::swarm::{Swarm, SwarmConfig};
use crate::util::human_bytes;

pub struct ReceiveOptions<'a> {
    pub image: &'a Path,
    pub target: &'a Path,
    pub swarm: SwarmConfig,
}

/// Returns the swarm, still seeding, once the target is complete, checked
/// and bootable. The target goes through the same checks and steps as the
/// agent's ([`Target`]): an interrupted receive resumes.
pub async fn receive(opts: ReceiveOptions<'_>) -> Result<Swarm> {
    let image = Image::open(opts.image)?;
    let mut target = Target::open(opts.target, &image)?;
    let (start, storage) = target.prepare(false)?;
    if start == Start::Resume {
        info!(
            "{}: resuming an interrupted run of this image",
            target.path().display()
        );
    }
    let t0 = Instant::now();
    let swarm = Swarm::join(&image, &storage, &opts.swarm).await?;
    watch_progress(&swarm).await?;
    let target =
        tokio::task::spawn_blocking(move || target.finish(Verify::Pieces).map(|()| target))
            .await??;
    let secs = t0.elapsed().as_secs_f64();
    info!(
        "{} complete: {} in {:.1} s ({}/s)",
        target.path().display(),
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
