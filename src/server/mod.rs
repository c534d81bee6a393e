//! The boot server: image store and seeding, HTTP API, tracker, dashboard.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tracing::info;

pub mod admin_token;
pub mod api;
pub mod boot;
pub mod capture;
pub mod check;
pub mod config;
pub mod dashboard;
pub mod db;
pub mod grub;
pub mod http;
pub mod metrics;
pub mod pull;
pub mod rooms;
pub mod schedule;
pub mod seed;
pub mod state;
pub mod store;
pub mod tftp;
pub mod token;
pub mod tracker;
pub mod wol;

use config::ServerConfig;
use state::ServerState;

/// Hosts the server keeps track of at most: in the deployment, in the
/// hosts' reports, in each swarm. Far above a room; each host needs a token,
/// so a job, but with a default job any MAC has one.
pub const MAX_HOSTS: usize = 2048;

/// How often the store folder is rescanned.
const SCAN_INTERVAL: Duration = Duration::from_secs(2);

pub struct ServeOptions {
    pub config: ServerConfig,
    /// Start a deployment at once, expecting this many hosts (0: any).
    pub deploy: Option<usize>,
}

/// Runs the server until `shutdown` resolves.
pub async fn serve(
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let mut cfg = opts.config;
    std::fs::create_dir_all(&cfg.images)
        .with_context(|| format!("creating the image store {}", cfg.images.display()))?;
    // The server's own secrets live here: its user's alone.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&cfg.state_dir)
        .with_context(|| format!("creating the state directory {}", cfg.state_dir.display()))?;
    pull::clean_store(&cfg.images);
    // Resolved once: the admin API reads `config.admin_token` alone.
    let admin = admin_token::resolve(&cfg)?;
    info!("{}", admin.origin);
    cfg.admin_token = Some(admin.token);
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let seeds = crate::swarm::SwarmSession::start(
        Some(cfg.seed_listen),
        crate::swarm::Limits {
            upload: cfg.seed_upload_limit.map(|s| s.0),
            download: None,
        },
        true,
    )
    .await?;
    let counters = Arc::new(metrics::Counters::default());
    let rooms = rooms::Rooms::open(&cfg)?;
    let state = Arc::new(ServerState::new(cfg, rooms, seeds, counters.clone()));
    info!(
        "serving {} on http://{} (dashboard at {}/), tracker {}, seeds on {}",
        state.config.images.display(),
        state.config.listen,
        state.config.public_url(),
        state.config.announce_url(),
        state.seeds.listen_addr()
    );
    if let Some(n) = opts.deploy {
        state.start_open((n > 0).then_some(n)).await?;
    }
    let scanner = tokio::spawn(scan_loop(state.clone()));
    let scheduler = tokio::spawn(schedule_loop(state.clone()));
    // TFTP for the Secure Boot chain's GRUB, on the HTTP port's number.
    let tftp = match tokio::net::UdpSocket::bind(state.config.listen).await {
        Ok(sock) => Some(tokio::spawn(tftp::serve(
            sock,
            grub::tftp_files(state.clone()),
            tftp::Limits {
                transfers: state.config.max_connections,
                ..Default::default()
            },
        ))),
        Err(e) => {
            tracing::warn!(
                "no TFTP on udp {} ({e}): GRUB (the Secure Boot chain) cannot ask this server",
                state.config.listen
            );
            None
        }
    };
    let limits = http::Limits {
        total: state.config.max_connections,
        per_ip: state.config.max_connections_per_ip,
    };
    http::serve(
        listener,
        api::router(state.clone()),
        limits,
        counters,
        shutdown,
    )
    .await;
    scanner.abort();
    scheduler.abort();
    tftp.inspect(|t| t.abort());
    state.seeds.stop().await;
    info!("stopped");
    Ok(())
}

/// Starts scheduled deployments. Every second: a wake-up at 02:00 should
/// not wait, and a wall clock that jumps is seen at once.
async fn schedule_loop(state: Arc<ServerState>) {
    loop {
        state.run_schedules().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Keeps the images in line with the store, the tracker with the images,
/// and forgets hosts long gone.
async fn scan_loop(state: Arc<ServerState>) {
    let mut log = BTreeMap::new();
    let mut dropped = std::collections::BTreeSet::new();
    loop {
        state.pull_dropped(&mut dropped).await;
        store::sync(
            &state.config,
            &state.seeds,
            &state.trust,
            &state.images,
            &mut log,
        )
        .await;
        store::update_states(&state.seeds, &state.images).await;
        let tracked: Vec<_> = state
            .images
            .read()
            .await
            .values()
            .filter_map(|s| {
                let h = crate::util::parse_hex20(&s.image.manifest.payload.info_hash)?;
                Some((h, s.state == store::SeedState::Seeding))
            })
            .collect();
        // Images served from their master while its capture task runs.
        state
            .captures
            .retain_origins(|d, mac| state.rooms.running_job(d, mac).ok().flatten().is_some());
        let origins = state.captures.origins();
        let mut tracked = tracked;
        tracked.extend(origins.iter().filter_map(|o| {
            Some((
                crate::util::parse_hex20(&o.image.manifest.payload.info_hash)?,
                false,
            ))
        }));
        state.tracker.set_images(tracked);
        for o in &origins {
            if let Some(h) = crate::util::parse_hex20(&o.image.manifest.payload.info_hash) {
                state.tracker.set_origin(&h, o.origin);
            }
        }
        // The seeds vouch for the hosts the tracker heard from lately (each
        // is added at once when it announces; this drops the silent ones).
        state
            .trust
            .replace(state.tracker.host_ips().into_iter().map(IpAddr::V4));
        // Upload slots for each room the seed feeds, each behind its uplink.
        state.seeds.set_origin_rooms(state.tracker.rooms());
        state.save_progress();
        state.prune_hosts();
        tokio::time::sleep(SCAN_INTERVAL).await;
    }
}
