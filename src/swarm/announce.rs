//! Announcing to HTTP trackers (BEP 3, compact peer lists of BEP 23).
//!
//! Our server's tracker also names the hosts of the deployment under the
//! key `blockswarm hosts` (a compact IPv4 list like `peers`): the torrent
//! vouches for them (see [`super::trust`]). Other trackers leave it out.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::torrent::{MAX_PEERS, Shared};
use super::until_true;

/// The largest tracker answer read.
const MAX_BODY: usize = 1 << 20;

/// What a tracker answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackerResponse {
    /// When to announce again.
    pub interval: Duration,
    pub peers: Vec<SocketAddr>,
    /// The addresses the server vouches for (`blockswarm hosts`).
    pub hosts: Vec<IpAddr>,
}

#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "failure reason")]
    failure: Option<buffers::ByteBufOwned>,
    interval: Option<u64>,
    peers: Option<buffers::ByteBufOwned>,
    #[serde(rename = "blockswarm hosts")]
    hosts: Option<buffers::ByteBufOwned>,
}

/// Parses a tracker's bencoded answer. Pure: no I/O, no panic on any input.
pub fn parse_response(body: &[u8]) -> Result<TrackerResponse> {
    let r: Raw = crate::util::guard("the tracker response", || bencode::from_bytes(body))?
        .map_err(|e| anyhow::anyhow!("not a tracker response: {e}"))?;
    if let Some(f) = r.failure {
        bail!("refused: {}", String::from_utf8_lossy(f.as_ref()));
    }
    let peers = compact(r.peers.as_ref().map_or(&[][..], |p| p.as_ref()), "peers")?
        .into_iter()
        .filter(|a| !a.ip().is_unspecified() && a.port() != 0)
        .map(SocketAddr::V4)
        .collect();
    let hosts = compact(r.hosts.as_ref().map_or(&[][..], |p| p.as_ref()), "hosts")?
        .into_iter()
        .map(|a| IpAddr::V4(*a.ip()))
        .filter(|ip| !ip.is_unspecified())
        .collect();
    Ok(TrackerResponse {
        interval: Duration::from_secs(r.interval.unwrap_or(30).clamp(1, 1800)),
        peers,
        hosts,
    })
}

/// A compact IPv4 list: 6 bytes per peer, address then port.
fn compact(b: &[u8], what: &str) -> Result<Vec<SocketAddrV4>> {
    if !b.len().is_multiple_of(6) {
        bail!("the {what} list is not a compact list of IPv4 peers");
    }
    Ok(b.chunks_exact(6)
        .map(|c| {
            let ip = Ipv4Addr::new(c[0], c[1], c[2], c[3]);
            SocketAddrV4::new(ip, u16::from_be_bytes([c[4], c[5]]))
        })
        .collect())
}

/// Whether this engine speaks to `url`; says once why not.
pub(super) fn supported(url: &str) -> bool {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("http" | "https") => true,
        Some("udp") => {
            warn!("tracker {url}: UDP trackers (BEP 15) are not supported; skipped");
            false
        }
        _ => {
            warn!("tracker {url}: only http:// and https:// trackers are supported; skipped");
            false
        }
    }
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
    peers: mpsc::Sender<SocketAddr>,
) {
    let mut event = Some("started");
    let mut done = t.done.subscribe();
    let mut stopped = t.stopped.subscribe();
    let mut failures = 0u32;
    loop {
        let was_done = *done.borrow_and_update();
        let wait = match announce(&url, &t, port, &http, event).await {
            Ok(r) => {
                failures = 0;
                event = None;
                debug!(tracker = %url, peers = r.peers.len(), hosts = r.hosts.len(), "announced");
                if t.trust.extend(r.hosts.iter().copied()) {
                    info!("tracker {url}: {} hosts vouched for", t.trust.ips().len());
                    t.recount_hosts();
                }
                for a in r.peers.into_iter().take(MAX_PEERS) {
                    // Full: the dialer is behind, and the next answer names them again.
                    let _ = peers.try_send(a);
                }
                r.interval
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
) -> Result<TrackerResponse> {
    let left = t.lengths.total().saturating_sub(t.done_bytes());
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
    let mut resp = http
        .get(format!("{url}{sep}{q}"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .context("no answer")?
        .error_for_status()?;
    let mut body = Vec::new();
    while let Some(c) = resp.chunk().await? {
        if body.len() + c.len() > MAX_BODY {
            bail!("an answer of more than {MAX_BODY} bytes");
        }
        body.extend_from_slice(&c);
    }
    parse_response(&body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_integer_past_64_bits_is_an_error() {
        // Found by the fuzzer: librqbit's bencode parser panics on it with
        // overflow checks on.
        let e = parse_response(
            b"d8:completei1e10:incompletei0e8:intervali99999999999999999999999e5:peers0:e",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tracker response"), "{e}");
    }

    #[test]
    fn answers_give_peers_and_vouched_hosts() {
        let mut b = b"d8:intervali7e5:peers12:".to_vec();
        b.extend_from_slice(&[10, 0, 0, 1, 0x1A, 0xE1, 10, 0, 0, 2, 0, 80]);
        b.extend_from_slice(b"16:blockswarm hosts6:");
        b.extend_from_slice(&[10, 0, 0, 9, 0, 0]);
        b.push(b'e');
        let r = parse_response(&b).unwrap();
        assert_eq!(r.interval, Duration::from_secs(7));
        assert_eq!(
            r.peers,
            vec![
                "10.0.0.1:6881".parse().unwrap(),
                "10.0.0.2:80".parse().unwrap()
            ]
        );
        assert_eq!(r.hosts, vec!["10.0.0.9".parse::<IpAddr>().unwrap()]);
        // A stock tracker names no hosts.
        let r = parse_response(b"d8:intervali30e5:peers0:e").unwrap();
        assert!(r.peers.is_empty() && r.hosts.is_empty());
    }

    #[test]
    fn bad_answers_say_what_is_wrong() {
        for (body, why) in [
            (&b"d14:failure reason4:nopee"[..], "refused: nope"),
            (b"d5:peers5:abcdee", "peers list is not a compact list"),
            (
                b"d16:blockswarm hosts1:xe",
                "hosts list is not a compact list",
            ),
            (b"garbage", "not a tracker response"),
            (b"", "not a tracker response"),
        ] {
            let e = format!("{:#}", parse_response(body).unwrap_err());
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn only_http_trackers_are_spoken_to() {
        assert!(supported("http://10.0.0.1:8080/announce"));
        assert!(supported("HTTPS://tracker/announce"));
        assert!(!supported("udp://tracker.example:1337/announce"));
        assert!(!supported("wss://tracker/announce"));
    }
}
