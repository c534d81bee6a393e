//! The `blockswarm` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use blockswarm::agent::receive::{ReceiveOptions, receive};
use blockswarm::image::Image;
use blockswarm::image::capture::{CaptureOptions, capture};
use blockswarm::server::seed::seed;
use blockswarm::swarm::SwarmConfig;
use blockswarm::util::stop_signal;

#[derive(Parser)]
#[command(
    name = "blockswarm",
    version,
    about = "Re-image rooms of PCs over a swarm of used file-system blocks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Turn a disk, partition or raw disk image into an image directory.
    Capture {
        /// Block device, partition or raw disk-image file.
        source: PathBuf,
        /// Image directory to create.
        #[arg(long)]
        out: PathBuf,
        /// Also write the payload as a plain file, to seed from the store.
        #[arg(long)]
        store: bool,
        /// Piece length in bytes (a power of two); default scales with size.
        #[arg(long)]
        piece_length: Option<u32>,
        /// Image name (default: the directory's name).
        #[arg(long)]
        name: Option<String>,
        /// Tracker announce URL (repeatable).
        #[arg(long = "tracker")]
        trackers: Vec<String>,
        /// Capture even if the source is mounted read-write.
        #[arg(long)]
        force: bool,
    },
    /// Seed an image from its store file, or from the captured disk.
    Seed {
        image: PathBuf,
        /// Read the blocks from this disk or partition instead of the store file.
        #[arg(long)]
        from: Option<PathBuf>,
        #[arg(long, default_value = "0.0.0.0:6881")]
        listen: SocketAddr,
    },
    /// Write an image straight onto a target disk or file.
    Receive {
        image: PathBuf,
        #[arg(long)]
        target: PathBuf,
        /// A peer to fetch from (repeatable).
        #[arg(long = "peer")]
        peers: Vec<SocketAddr>,
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Keep seeding after completion, until interrupted.
        #[arg(long)]
        keep_seeding: bool,
    },
    /// Show what an image holds.
    Inspect { image: PathBuf },
    /// Check a disk (or image file) against an image, piece by piece.
    Verify {
        image: PathBuf,
        #[arg(long)]
        target: PathBuf,
    },
    /// Run the boot server: image store, seeding, tracker, API, dashboard.
    Serve {
        /// server.toml (see docs/server.example.toml); defaults without it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override `listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Override `images`.
        #[arg(long)]
        images: Option<PathBuf>,
        /// Start a deployment right away, done when N hosts finish (0: all that join).
        #[arg(long, value_name = "N")]
        deploy: Option<usize>,
        /// Check the config and print the paths it resolves to; start nothing.
        #[arg(long)]
        check: bool,
    },
    /// Run the deploy agent (normally from the network-boot initramfs).
    Agent {
        /// The boot server, e.g. http://10.0.0.1:8080
        #[arg(long)]
        server: String,
        /// This machine's MAC (default: BOOTIF, else the first NIC that is up).
        #[arg(long)]
        mac: Option<String>,
        /// Write to this disk or file instead of the one the job selects.
        #[arg(long)]
        target: Option<PathBuf>,
        /// BitTorrent listen address (default: a free port).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Cap on upload, bytes per second ("12M").
        #[arg(long)]
        max_upload: Option<blockswarm::protocol::Size>,
        /// Cap on download, bytes per second.
        #[arg(long)]
        max_download: Option<blockswarm::protocol::Size>,
    },
    /// Talk to a running server's admin API.
    Admin(blockswarm::admin::AdminArgs),
}

/// Exit codes: 0 done; 1 failed; 2 bad command line (clap);
/// 3 the target disk failed (`agent`; /init does not retry it);
/// 4 the server could not be reached (`admin`).
fn main() -> ExitCode {
    init_logging();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.is::<blockswarm::agent::DiskFailed>() {
                ExitCode::from(blockswarm::agent::DiskFailed::EXIT_CODE)
            } else if e.is::<blockswarm::admin::Unreachable>() {
                ExitCode::from(blockswarm::admin::Unreachable::EXIT_CODE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Capture {
            source,
            out,
            store,
            piece_length,
            name,
            trackers,
            force,
        } => {
            let m = capture(&CaptureOptions {
                source,
                out,
                store,
                piece_length,
                name,
                trackers,
                force,
            })?;
            println!("{}", m.payload.info_hash);
            Ok(())
        }
        Cmd::Seed {
            image,
            from,
            listen,
        } => runtime()?.block_on(async {
            let image = Image::open(&image)?;
            let cfg = SwarmConfig {
                listen: Some(listen),
                ..Default::default()
            };
            let swarm = seed(&image, from.as_deref(), &cfg).await?;
            // A source changed since capture stops the seed.
            let r = tokio::select! {
                _ = stop_signal()? => Ok(()),
                e = swarm.torrent.wait_failed() => Err(e),
            };
            swarm.stop().await;
            r
        }),
        Cmd::Receive {
            image,
            target,
            peers,
            listen,
            keep_seeding,
        } => runtime()?.block_on(async {
            let swarm = receive(ReceiveOptions {
                image: &image,
                target: &target,
                swarm: SwarmConfig {
                    listen,
                    peers,
                    ..Default::default()
                },
            })
            .await?;
            if keep_seeding {
                stop_signal()?.await;
            }
            swarm.stop().await;
            Ok(())
        }),
        Cmd::Serve {
            config,
            listen,
            images,
            deploy,
            check,
        } => {
            let mut cfg = match config {
                Some(p) => blockswarm::server::config::ServerConfig::load(&p)?,
                None => Default::default(),
            };
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if let Some(i) = images {
                cfg.images = i;
            }
            if check {
                print!("{}", blockswarm::server::check::report(&cfg)?);
                return Ok(());
            }
            let rt = runtime()?;
            let r = rt.block_on(async {
                let opts = blockswarm::server::ServeOptions {
                    config: cfg,
                    deploy,
                };
                blockswarm::server::serve(opts, stop_signal()?).await
            });
            // Work still on a blocking thread (a store file being hashed)
            // must not hold up the stop.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            r
        }
        Cmd::Agent {
            server,
            mac,
            target,
            listen,
            max_upload,
            max_download,
        } => runtime()?.block_on(blockswarm::agent::run(blockswarm::agent::AgentOptions {
            server,
            mac,
            target,
            listen,
            limits: blockswarm::swarm::Limits {
                upload: max_upload.map(|s| s.0),
                download: max_download.map(|s| s.0),
            },
        })),
        Cmd::Admin(args) => runtime()?.block_on(blockswarm::admin::run(args)),
        Cmd::Verify { image, target } => {
            let image = Image::open(&image)?;
            let dev = blockswarm::blockdev::open_source(&target)?;
            println!("{}", blockswarm::agent::verify::check_disk(&image, &dev)?);
            Ok(())
        }
        Cmd::Inspect { image } => {
            let image = Image::open(&image)?;
            blockswarm::image::describe(&image, &mut std::io::stdout())
        }
    }
}

/// Logs to journald when systemd started us (JOURNAL_STREAM), else stderr.
fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let journald = std::env::var_os("JOURNAL_STREAM").and_then(|_| tracing_journald::layer().ok());
    // What the agent logs also goes to the server with its reports.
    let ship = tracing_subscriber::fmt::layer()
        .with_writer(blockswarm::agent::shiplog::Writer)
        .with_ansi(false)
        .without_time()
        .with_target(false);
    let agent = matches!(std::env::args().nth(1).as_deref(), Some("agent"));
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(agent.then_some(ship));
    match journald {
        Some(j) => registry.with(j).init(),
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .init(),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
