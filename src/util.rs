//! Small helpers shared by several modules.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes a file so that readers see either the old or the whole new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Resolves on SIGTERM (how systemd stops a service) or SIGINT (Ctrl-C).
/// The handlers are in place when this returns, not when the future is
/// first polled, so a stop during start-up is not lost. Needs a runtime.
pub fn stop_signal() -> Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{name}: stopping");
    })
}

/// Runs a third-party parser, turning a panic on hostile input into an error
/// (librqbit's bencode panics on an integer past 64 bits with overflow
/// checks on; gptman and mbrman on some tables).
pub fn guard<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|_| anyhow::anyhow!("{what} is corrupt (its parser gave up)"))
}

/// The process's HTTP client (the agent's API calls, tracker announces).
/// One per process: building a client loads the system's TLS roots, about
/// 5 ms of CPU each time.
/// It goes to the boot server directly, never through a proxy named in the
/// environment. The timeout bounds each request; callers may set a shorter
/// one.
pub fn http_client() -> Result<reqwest::Client> {
    static CLIENT: std::sync::OnceLock<Result<reqwest::Client, String>> =
        std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            reqwest::Client::builder()
                .no_proxy()
                .user_agent(concat!("blockswarm/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(std::time::Duration::from_secs(5))
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(|e| anyhow::anyhow!("building the HTTP client: {e}"))
}

/// "1.5 GiB".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Parses 40 hex digits.
pub fn parse_hex20(s: &str) -> Option<[u8; 20]> {
    if s.len() != 40 {
        return None;
    }
    let mut out = [0u8; 20];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A point where fault tests (scripts/faults, tests/reimage.rs) cut the
/// power: when `BLOCKSWARM_FAULT_PAUSE` names it, the process says so and
/// stops there for good, until the test kills it (or the machine under it).
/// Every write before the point has been flushed.
pub fn fault_point(name: &str) {
    if std::env::var_os("BLOCKSWARM_FAULT_PAUSE").is_some_and(|v| v == name) {
        eprintln!("fault point {name}: pausing here (BLOCKSWARM_FAULT_PAUSE)");
        loop {
            std::thread::park();
        }
    }
}

/// The innermost cause of an error: what a person can act on ("connection
/// refused"), not the chain of layers above it.
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e;
    while let Some(src) = s.source() {
        s = src;
    }
    s.to_string()
}
