//! Which disk this host writes: the job's selector the first time, and the
//! same disk on every retry of the deployment, or none.
//!
//! A retry (the agent restarted by /init, or the PC rebooted) must not pick
//! another disk because the first one failed or vanished: the default
//! selector would then take the next largest disk. The disk chosen is
//! recorded in three places, each enough to hold a retry to it: with the
//! server (reported before the first write, returned in the job), in this
//! boot's /run (an agent restarted without a reboot), and in the marker in
//! the disk's first sector (which the selector must then find on the disk
//! it picks).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tracing::info;

use super::disks::{self, Disk};
use super::target::Marker;
use crate::image::Image;
use crate::protocol::{DiskIdentity, JobResponse};

/// This boot's record of the disk chosen (tmpfs: gone at the next boot).
const RECORD: &str = "/run/blockswarm/target.json";

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    deployment: u64,
    info_hash: String,
    disk: DiskIdentity,
}

/// The disk to write for `job`.
pub fn disk(job: &JobResponse, image: &Image) -> Result<PathBuf> {
    let all = disks::discover()?;
    let info_hash = &image.manifest.payload.info_hash;
    let recorded = job.disk.clone().or_else(|| {
        read_record()
            .filter(|r| r.deployment == job.deployment && &r.info_hash == info_hash)
            .map(|r| r.disk)
    });
    let d: &Disk = match &recorded {
        Some(id) => {
            let d = disks::find(&all, id)?;
            info!("target disk: {d} (the disk this host was writing)");
            d
        }
        None => {
            let d = disks::select(&all, &job.job.target)?;
            info!("target disk: {d}");
            d
        }
    };
    // Another disk holding an interrupted run of this image is the one this
    // host was writing, whatever the selector says now.
    for other in all.iter().filter(|o| o.devnode != d.devnode) {
        if Marker::read(&other.devnode).is_some_and(|m| &m.info_hash == info_hash) {
            bail!(
                "{other} holds an interrupted run of this image, but the job now selects {}: refusing to write either; clear the marker (wipe its first sector) or name the disk in the job",
                d.devnode.display()
            );
        }
    }
    Ok(d.devnode.clone())
}

/// Holds a target opened by path (`--target`) to the disk the server
/// recorded, if any.
pub fn check_recorded(job: &JobResponse, id: &DiskIdentity, path: &Path) -> Result<()> {
    match &job.disk {
        Some(was) if !was.same_disk(id) => bail!(
            "this host was writing another disk in deployment {} ({was}); {} is {id}: refusing",
            job.deployment,
            path.display()
        ),
        _ => Ok(()),
    }
}

/// Records the chosen disk for retries within this boot.
pub fn record(job: &JobResponse, image: &Image, id: &DiskIdentity) -> Result<()> {
    let r = Record {
        deployment: job.deployment,
        info_hash: image.manifest.payload.info_hash.clone(),
        disk: id.clone(),
    };
    let path = Path::new(RECORD);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::util::write_atomic(path, &serde_json::to_vec(&r)?)
}

fn read_record() -> Option<Record> {
    let b = std::fs::read(RECORD).ok()?;
    serde_json::from_slice(&b).ok()
}
