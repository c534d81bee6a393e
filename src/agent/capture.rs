//! A capture task: this PC is the master. Its disk, opened read-only, is
//! refused if a file system on it is dirty, else mapped and hashed with the
//! same code as `blockswarm capture`; the manifest and torrent go to the
//! server with the task's capture token, and the payload is seeded straight
//! from the disk (no image file is made) until the server has stored it,
//! or, with `store = false`, until the admin stops the task.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tracing::info;

use super::{AgentOptions, Reporter, client::Client, disks, safety};
use crate::blockdev;
use crate::image::Image;
use crate::image::capture::{MapOptions, map_and_hash};
use crate::image::torrent::hex;
use crate::protocol::{AgentState, CaptureTicket, CaptureUpload, JobResponse, PostAction};
use crate::swarm::SwarmConfig;

pub(super) async fn run(
    client: &Client,
    rep: &mut Reporter,
    job: &JobResponse,
    ticket: &CaptureTicket,
    opts: &AgentOptions,
) -> Result<PostAction> {
    let j = &job.job;
    let spec = j.capture.unwrap_or_default();
    let t0 = Instant::now();
    rep.send(AgentState::SelectingDisk, None, None).await;
    let path = match &opts.target {
        Some(t) => t.clone(),
        None => {
            let all = disks::discover()?;
            let d = disks::select(&all, &j.target)?;
            info!("master disk: {d}");
            d.devnode.clone()
        }
    };
    safety::check_disk(&path)?;
    // Read-only: nothing of the master is ever written.
    let dev = blockdev::open_source(&path)?;
    rep.base.target = Some(path.display().to_string());
    rep.base.disk = Some(disks::identify(&dev));
    rep.send(AgentState::Checking, None, None).await;

    let map_opts = MapOptions {
        name: j.image.clone(),
        // Not a bare path: on the PCs deployed from it, the same device
        // name is their own disk, which the agent must not take for the
        // image's source (`Target::open` refuses to write that).
        source: format!("{} of {} (network capture)", path.display(), rep.base.mac),
        piece_length: None,
        trackers: Vec::new(),
    };
    let (manifest, torrent) =
        tokio::task::spawn_blocking(move || map_and_hash(&dev, &map_opts, None)).await??;
    info!(
        "phase map: {:.1} s ({} used in {} pieces, info hash {})",
        t0.elapsed().as_secs_f64(),
        crate::util::human_bytes(manifest.payload.size),
        manifest.payload.piece_count,
        manifest.payload.info_hash
    );
    let image = Image::new(path.clone(), manifest, torrent)?;
    // Seeding before the upload: the server dials this PC as soon as it
    // has the torrent. The seed checks every piece against the disk first.
    let cfg = SwarmConfig {
        listen: opts.listen,
        disable_trackers: true,
        ..Default::default()
    };
    let swarm = crate::server::seed::seed_limited(&image, Some(&path), &cfg, opts.limits).await?;
    let upload = CaptureUpload {
        mac: rep.base.mac.clone(),
        token: ticket.token.clone(),
        port: swarm.session.listen_addr().port(),
        manifest: serde_json::to_string(&image.manifest)?,
        torrent: hex(&image.torrent),
    };
    let r = async {
        let said = client.upload_capture(&ticket.upload_url, &upload).await?;
        info!(
            "phase announce: {:.1} s: {said}",
            t0.elapsed().as_secs_f64()
        );
        seed_until_stored(rep, &swarm.torrent, spec.store).await
    }
    .await;
    swarm.stop().await;
    r?;
    info!("capture over after {:.1} s", t0.elapsed().as_secs_f64());
    Ok(j.on_done)
}

/// Reports as a seed until the server has the image (or, for an image
/// served from this PC, until the admin stops the task).
async fn seed_until_stored(
    rep: &mut Reporter,
    torrent: &crate::swarm::Torrent,
    store: bool,
) -> Result<()> {
    loop {
        if let Some(ack) = rep.send(AgentState::Seeding, Some(torrent), None).await {
            if let Some(why) = ack.image_failed {
                bail!("{why}");
            }
            if ack.captured {
                info!("the server stored the image; stopping the seed");
                return Ok(());
            }
            if ack.stopped {
                if store {
                    bail!("the capture was stopped by the admin before the server stored it");
                }
                info!("the admin ended this master's task; stopping the seed");
                return Ok(());
            }
        }
        torrent.check_error().context("seeding the master's disk")?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
