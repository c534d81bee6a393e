//! Announcing to HTTP trackers (BEP 3, compact peer lists of BEP 23).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Shared, until_true};

#[derive(Deserialize)]
struct Response {
    #[serde(rename = "failure reason")]
    failure: Option<buffers::ByteBufOwned>,
    interval: Option<u64>,
    peers: Option<buffers::ByteBufOwned>,
}

fn percent_encode(b: &[u8]) -> String {
    b.iter()
        .map(|&c| {
            if c.is_ascii_alphanumeric() || b"-_.~".contains(&c) {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect()
}

/// Announces to `url` until the torrent stops, sending the peers it learns
/// of to `peers`. Announces again at once when the download completes.
pub(super) async fn run(
    url: String,
    t: Arc<Shared>,
    port: u16,
    http: reqwest::Client,
    peers: mpsc::UnboundedSender<SocketAddr>,
) {
    let mut event = Some("started");
    let mut done = t.done.subscribe();
    let mut stopped = t.stopped.subscribe();
    let mut failures = 0u32;
    loop {
        let was_done = *done.borrow_and_update();
        let wait = match announce(&url, &t, port, &http, event).await {
            Ok((interval, addrs)) => {
                failures = 0;
                event = None;
                debug!(tracker = %url, peers = addrs.len(), "announced");
                for a in addrs {
                    let _ = peers.send(a);
                }
                interval
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(10) {
                    warn!("tracker {url}: {e:#}");
                }
                Duration::from_secs(u64::from(failures).clamp(1, 15))
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = until_true(&mut done), if !was_done => {
                event = Some("completed");
            }
            _ = until_true(&mut stopped) => {
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    announce(&url, &t, port, &http, Some("stopped")),
                )
                .await;
                return;
            }
        }
    }
}

async fn announce(
    url: &str,
    t: &Shared,
    port: u16,
    http: &reqwest::Client,
    event: Option<&str>,
) -> Result<(Duration, Vec<SocketAddr>)> {
    let left = t.total.saturating_sub(t.done_bytes());
    let mut q = format!(
        "info_hash={}&peer_id={}&port={port}&uploaded={}&downloaded={}&left={left}&compact=1&numwant=200",
        percent_encode(&t.info_hash),
        percent_encode(&t.peer_id),
        t.uploaded(),
        t.downloaded(),
    );
    if let Some(e) = event {
        q.push_str("&event=");
        q.push_str(e);
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    let body = http
        .get(format!("{url}{sep}{q}"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .context("no answer")?
        .error_for_status()?
        .bytes()
        .await?;
    let r: Response =
        bencode::from_bytes(&body).map_err(|e| anyhow::anyhow!("not a tracker response: {e}"))?;
    if let Some(f) = r.failure {
        bail!("refused: {}", String::from_utf8_lossy(f.as_ref()));
    }
    let peers = r.peers.map(|p| p.as_ref().to_vec()).unwrap_or_default();
    if !peers.len().is_multiple_of(6) {
        bail!("peer list is not a compact list of IPv4 peers");
    }
    let addrs = peers
        .chunks(6)
        .map(|c| {
            let ip = Ipv4Addr::new(c[0], c[1], c[2], c[3]);
            SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be_bytes([c[4], c[5]])))
        })
        .collect();
    let interval = Duration::from_secs(r.interval.unwrap_or(30).clamp(1, 1800));
    Ok((interval, addrs))
}
