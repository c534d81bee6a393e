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
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                "info,librqbit=warn,librqbit_core=warn,librqbit_tracker_comms=warn".into()
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
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
            tokio::signal::ctrl_c().await?;
            swarm.stop().await;
            Ok(())
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
                tokio::signal::ctrl_c().await?;
            }
            swarm.stop().await;
            Ok(())
        }),
        Cmd::Inspect { image } => {
            let image = Image::open(&image)?;
            blockswarm::image::describe(&image, &mut std::io::stdout())
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
