//! Fitting the imaged disk to this PC, in order: grow -> identity -> hooks
//! -> UEFI boot entry. They run once the image is written, read back and no
//! longer seeded: they change blocks of the image, which would then fail
//! their hashes in the swarm. Each step changes only the table and the file
//! systems of the target, never the bytes outside them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tracing::warn;

use super::target::Target;
use crate::image::Image;
use crate::protocol::{Grow, JobResponse};

pub mod bootentry;
pub mod grow;
pub mod hooks;
pub mod identity;
pub mod mount;

/// What the post-imaging steps need to know.
pub struct Fit<'a> {
    pub job: &'a JobResponse,
    pub image: &'a Image,
    /// The disk (or, in tests, the disk file) that was imaged.
    pub target: &'a Path,
    /// Where partitions are mounted: `<mnt>/<partition number>`.
    pub mnt: PathBuf,
    pub client: &'a super::client::Client,
}

/// Runs the post-imaging steps the job asks for, in order. `target` is
/// held (the disk stays ours) until the last step is done.
pub async fn run(f: &Fit<'_>, target: Target) -> Result<()> {
    let policy = f.job.job.grow;
    let held = if policy == Grow::None {
        target
    } else {
        tokio::task::spawn_blocking(move || grow::run(&target, policy).map(|()| target)).await??
    };
    // The table as it is on the disk now: grown partitions are mounted whole.
    let dev = held.dev();
    let table = crate::image::table::read(&dev.file, dev.size, dev.sector_size).ok();
    let wants_identity = f.job.host.is_some();
    let wants_hooks = !f.job.job.hooks.is_empty();
    if wants_identity || wants_hooks {
        // The scripts are fetched before anything is mounted: a missing hook
        // fails the task without touching the disk.
        let scripts = hooks::fetch(f.client, &f.job.job.hooks).await?;
        let target = f.target.to_owned();
        let image = f.image.manifest.clone();
        let mnt = f.mnt.clone();
        let job = f.job.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let mounts = mount::Mounts::all(&target, &image, table.as_ref(), &mnt)?;
            if let Some(name) = &job.host {
                identity::write(&mounts, name)?;
            }
            hooks::run(&scripts, &mounts, &job)?;
            mounts.finish()
        })
        .await??;
    }
    let (job, table, disk) = (
        f.job.job.clone(),
        f.image.manifest.disk.table.clone(),
        f.target.to_owned(),
    );
    tokio::task::spawn_blocking(move || {
        // Not a failure: the disk still boots through the firmware's
        // fallback path (\EFI\BOOT\BOOTX64.EFI) or its own entry for it.
        if let Err(e) = bootentry::run(&job, &table, &disk) {
            warn!("no UEFI boot entry for the deployed disk: {e:#}");
        }
    })
    .await?;
    Ok(())
}

/// Runs a system tool to completion within `limit`, killing it past that;
/// its output (both streams, bounded) is returned, or the error names the
/// tool, its exit and what it said.
pub fn tool(cmd: &mut Command, limit: Duration) -> Result<String> {
    let what = format!("{:?}", cmd.get_program());
    let (out, status) = run_bounded(cmd, limit).with_context(|| format!("running {what}"))?;
    match status {
        Some(s) if s.success() => Ok(out),
        Some(s) => bail!("{what} failed ({s}): {}", out.trim()),
        None => bail!("{what} did not finish within {} s: killed", limit.as_secs()),
    }
}

/// Spawns `cmd` with its output in a temporary file (so a chatty tool
/// never blocks on a pipe), waits up to `limit`, kills it past that.
/// `None` status: it was killed.
pub fn run_bounded(
    cmd: &mut Command,
    limit: Duration,
) -> Result<(String, Option<std::process::ExitStatus>)> {
    use std::io::{Read, Seek};
    let mut log = tempfile::tempfile()?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?)
        .spawn()?;
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    log.rewind()?;
    let mut out = Vec::new();
    log.take(64 * 1024).read_to_end(&mut out)?;
    Ok((String::from_utf8_lossy(&out).into_owned(), status))
}
