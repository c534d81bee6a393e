//! The deploy agent: fetch the job, pick the disk, join the swarm, verify,
//! write the boot area last, seed, then reboot (or as the job says).
//!
//! States, reported to the server about once a second:
//! WaitingForJob → SelectingDisk → Checking → Downloading → (Verifying) →
//! Finishing → Seeding → Done; any error → Failed (reported, then returned).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tracing::{info, warn};

pub mod capture;
pub mod choose;
pub mod client;
pub mod disks;
pub mod fit;
pub mod receive;
pub mod safety;
pub mod shiplog;
pub mod target;
pub mod verify;

use crate::protocol::{
    AgentState, JobResponse, PostAction, SeedPolicy, StatusAck, StatusReport, Verify,
};
use crate::swarm::{SwarmConfig, SwarmSession, Torrent};
use crate::util::human_bytes;
use client::{Client, Reachability};
use target::{Start, Target};

/// The target disk failed (an I/O error, or it did not keep what was
/// written): trying again on this PC will not help. `blockswarm agent` exits
/// with [`DiskFailed::EXIT_CODE`] for it, and /init does not retry.
#[derive(Debug, thiserror::Error)]
#[error("the target disk failed: {0}")]
pub struct DiskFailed(pub String);

impl DiskFailed {
    pub const EXIT_CODE: u8 = 3;
}

pub struct AgentOptions {
    pub server: String,
    /// Default: BOOTIF from the kernel command line, else the first NIC.
    pub mac: Option<String>,
    /// Write here instead of the disk the selector picks (tests, demos).
    pub target: Option<PathBuf>,
    /// BitTorrent listen address (default: a free port).
    pub listen: Option<SocketAddr>,
    /// Rate caps, bytes per second (default: none).
    pub limits: crate::swarm::Limits,
}

/// Progress shared with the status reporter.
struct Reporter {
    client: Client,
    base: StatusReport,
    started: Instant,
    reach: Reachability,
}

impl Reporter {
    async fn send(
        &mut self,
        state: AgentState,
        torrent: Option<&Torrent>,
        error: Option<String>,
    ) -> Option<StatusAck> {
        let mut r = self.base.clone();
        r.state = state;
        r.error = error;
        r.elapsed_s = self.started.elapsed().as_secs_f64();
        if let Some(t) = torrent {
            r.progress = t.progress();
        }
        self.base = StatusReport {
            error: None,
            ..r.clone()
        };
        r.log = shiplog::take();
        let res = self.client.report(&r).await;
        if res.is_err() {
            shiplog::put_back(std::mem::take(&mut r.log));
        }
        self.reach.update(&res);
        res.ok()
    }
}

pub async fn run(opts: AgentOptions) -> Result<()> {
    let client = Client::new(&opts.server)?;
    let mac = match &opts.mac {
        Some(m) => crate::server::config::normalize_mac(m)?,
        None => local_mac()?,
    };
    info!("agent for {mac}, server {}", opts.server);
    let mut rep = Reporter {
        client: client.clone(),
        base: StatusReport {
            mac: mac.clone(),
            state: AgentState::WaitingForJob,
            deployment: None,
            image: None,
            target: None,
            progress: Default::default(),
            error: None,
            elapsed_s: 0.0,
            token: String::new(),
            disk: None,
            log: Vec::new(),
        },
        started: Instant::now(),
        reach: Reachability::default(),
    };
    let job = client.wait_for_job(&mac, |_| {}).await;
    rep.base.deployment = Some(job.deployment);
    rep.base.image = Some(job.job.image.clone());
    rep.base.token = job.token.clone();
    let result = match &job.capture {
        Some(ticket) => capture::run(&client, &mut rep, &job, ticket, &opts).await,
        None => deploy(&client, &mut rep, &job, &opts).await,
    };
    match result {
        Ok(post) => {
            rep.send(AgentState::Done, None, None).await;
            post_action(post)
        }
        Err(e) => {
            let msg = format!("{e:#}");
            rep.send(AgentState::Failed, None, Some(msg)).await;
            Err(e)
        }
    }
}

async fn deploy(
    client: &Client,
    rep: &mut Reporter,
    job: &JobResponse,
    opts: &AgentOptions,
) -> Result<PostAction> {
    let j = &job.job;
    let image = client.fetch_image(job).await?;
    let m = &image.manifest;
    rep.send(AgentState::SelectingDisk, None, None).await;
    let path = match &opts.target {
        Some(t) => t.clone(),
        None => choose::disk(job, &image)?,
    };
    let mut target = Target::open(&path, &image)?;
    choose::check_recorded(job, target.identity(), &path)?;
    if opts.target.is_none() {
        choose::record(job, &image, target.identity())?;
    }
    // The server hears which disk this is before anything is written to it.
    rep.base.target = Some(path.display().to_string());
    rep.base.disk = Some(target.identity().clone());
    rep.send(AgentState::Checking, None, None).await;

    let (start, storage) = target.prepare(j.incremental)?;
    info!(
        "{}: {} of {} to write{}",
        path.display(),
        human_bytes(m.payload.size),
        human_bytes(m.disk.size),
        match start {
            Start::Resume => " (resuming: checking what is there)",
            Start::Incremental => " (incremental: checking what is there)",
            Start::Fresh => "",
        }
    );

    let session = SwarmSession::start(opts.listen, opts.limits, false).await?;
    let cfg = SwarmConfig {
        trackers: job.trackers.iter().map(|t| client.url(t)).collect(),
        start_fraction: job.start_fraction,
        origin: job.origin,
        ..Default::default()
    };
    let torrent = session.add(&image, &storage, &cfg).await?;
    let t0 = Instant::now();
    let result = download(rep, &torrent).await;
    if let Err(e) = result {
        session.stop().await;
        return Err(match storage.io_error() {
            Some(io) => DiskFailed(io).into(),
            None => e,
        });
    }
    let p = torrent.progress();
    info!(
        "downloaded {} in {:.1} s: {} bytes fetched, {} bytes already on disk",
        human_bytes(p.total_bytes),
        t0.elapsed().as_secs_f64(),
        storage.written(),
        p.total_bytes.saturating_sub(storage.written())
    );
    rep.send(AgentState::Finishing, Some(&torrent), None).await;
    if j.verify == Verify::Readback {
        rep.send(AgentState::Verifying, Some(&torrent), None).await;
    }
    let verify = j.verify;
    let target = tokio::task::spawn_blocking(move || target.finish(verify).map(|()| target))
        .await?
        .map_err(|e| DiskFailed(format!("{e:#}")))?;
    info!("{} is imaged, read back and bootable", path.display());
    seed_after(rep, &torrent, j.keep_seeding, j.seed_cap_minutes).await;
    session.stop().await;

    // Fitting changes blocks of the image: only once nobody fetches them
    // from this disk any more. Hooks may run for minutes: the server keeps
    // hearing from this host, and gets their output as it comes.
    let fit = fit::Fit {
        job,
        image: &image,
        target: &path,
        mnt: mount_root(opts),
        client,
    };
    let fitting = fit::run(&fit, target);
    tokio::pin!(fitting);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            r = &mut fitting => break r?,
            _ = tick.tick() => {
                rep.send(AgentState::Fitting, None, None).await;
            }
        }
    }
    Ok(j.on_done)
}

async fn download(rep: &mut Reporter, torrent: &Torrent) -> Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let done = torrent.wait_completed();
    tokio::pin!(done);
    loop {
        tokio::select! {
            r = &mut done => return r,
            _ = tick.tick() => {
                torrent.check_error()?;
                let state = if torrent.is_live() { AgentState::Downloading } else { AgentState::Checking };
                let Some(ack) = rep.send(state, Some(torrent), None).await else { continue };
                if ack.stopped {
                    anyhow::bail!("the deployment was stopped by the admin");
                }
                if let Some(why) = ack.image_failed {
                    anyhow::bail!("{why}");
                }
            }
        }
    }
}

/// Where the target's partitions are mounted: one place on a PC; per
/// process when writing a disk file (tests run several agents at once).
fn mount_root(opts: &AgentOptions) -> PathBuf {
    let base = PathBuf::from("/run/blockswarm");
    match &opts.target {
        None => base.join("mnt"),
        Some(_) => base.join(format!("mnt-{}", std::process::id())),
    }
}

/// Keeps uploading to the room as the job says.
async fn seed_after(rep: &mut Reporter, torrent: &Torrent, policy: SeedPolicy, cap_minutes: u64) {
    let limit = match policy {
        SeedPolicy::Off => return,
        SeedPolicy::Minutes(n) => Duration::from_secs(n * 60),
        SeedPolicy::Deployment => Duration::from_secs(cap_minutes * 60),
    };
    info!("seeding ({policy}, at most {} min)", limit.as_secs() / 60);
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        let ack = rep.send(AgentState::Seeding, Some(torrent), None).await;
        if let Some(why) = ack.as_ref().and_then(|a| a.image_failed.as_ref()) {
            warn!("{why}; stopping the seed");
            return;
        }
        if policy == SeedPolicy::Deployment && ack.is_some_and(|a| a.deployment_done || a.stopped) {
            info!("the deployment is done; stopping the seed");
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn post_action(a: PostAction) -> Result<()> {
    use nix::sys::reboot::{RebootMode, reboot};
    match a {
        PostAction::Nothing => Ok(()),
        PostAction::Shell => {
            std::process::Command::new("/bin/sh")
                .status()
                .context("starting a shell")?;
            Ok(())
        }
        PostAction::Reboot | PostAction::Poweroff => {
            nix::unistd::sync();
            let mode = if a == PostAction::Reboot {
                RebootMode::RB_AUTOBOOT
            } else {
                RebootMode::RB_POWER_OFF
            };
            info!("{a:?} now");
            // The init's tee carries our stderr to the consoles: give it a
            // moment, or the last lines (this one) are lost with the reset
            // and the screen shows the PC stopping mid-task.
            std::thread::sleep(std::time::Duration::from_secs(1));
            reboot(mode).context("rebooting")?;
            Ok(())
        }
    }
}

/// BOOTIF=01-52-54-00-12-34-56 from iPXE, else the first NIC that is up.
fn local_mac() -> Result<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if let Some(b) = cmdline
        .split_whitespace()
        .find_map(|a| a.strip_prefix("BOOTIF="))
    {
        let b = b.strip_prefix("01-").unwrap_or(b);
        return crate::server::config::normalize_mac(b);
    }
    let mut names: Vec<_> = std::fs::read_dir("/sys/class/net")?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    names.sort();
    for n in names {
        let dir = PathBuf::from("/sys/class/net").join(&n);
        let up = std::fs::read_to_string(dir.join("operstate"))
            .unwrap_or_default()
            .trim()
            == "up";
        let mac = std::fs::read_to_string(dir.join("address")).unwrap_or_default();
        if n != "lo" && up && mac.trim() != "00:00:00:00:00:00" {
            return crate::server::config::normalize_mac(mac.trim());
        }
    }
    warn!("no network interface is up");
    anyhow::bail!("cannot tell this machine's MAC address: pass --mac")
}
