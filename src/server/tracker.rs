//! A BitTorrent HTTP tracker (BEP 3) with compact peer lists (BEP 23).
//!
//! It only tracks the images the server knows, keeps at most
//! [`MAX_PEERS`] peers per image, and forgets a peer that has not announced
//! for three intervals.
//!
//! A host that still downloads is handed every other peer (finished hosts
//! first, up to `numwant`), the server's seed included; the hosts' piece
//! scheduling (`swarm::picker`) keeps the seed from sending a piece twice.
//! Seeds get no peers: the others come to them. A host that learned of
//! nobody is asked back after a second.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddrV4};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;

pub const MAX_PEERS: usize = 4096;
/// The server's seeds announce with peer ids that start with this.
pub use crate::swarm::ORIGIN_PREFIX;
const DEFAULT_NUMWANT: usize = 50;
const MAX_NUMWANT: usize = 200;

pub type InfoHash = [u8; 20];

pub struct Tracker {
    interval: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Tracked info hashes, with their payload length.
    known: HashMap<InfoHash, u64>,
    swarms: HashMap<InfoHash, HashMap<[u8; 20], Peer>>,
}

#[derive(Debug, Clone, Copy)]
struct Peer {
    addr: SocketAddrV4,
    left: u64,
    seen: Instant,
}

/// Seeders and leechers of one swarm, for metrics and the dashboard.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SwarmCounts {
    pub complete: usize,
    pub incomplete: usize,
}

struct Announce {
    info_hash: InfoHash,
    peer_id: [u8; 20],
    port: u16,
    left: u64,
    event: String,
    numwant: usize,
    ip: Option<std::net::Ipv4Addr>,
}

impl Tracker {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Only known images are tracked.
    pub fn allow(&self, h: InfoHash, payload_len: u64) {
        self.lock().known.insert(h, payload_len);
    }

    pub fn forget(&self, h: &InfoHash) {
        let mut g = self.lock();
        g.known.remove(h);
        g.swarms.remove(h);
    }

    pub fn counts(&self, h: &InfoHash) -> SwarmCounts {
        let g = self.lock();
        let mut c = SwarmCounts::default();
        for p in g.swarms.get(h).into_iter().flat_map(|s| s.values()) {
            if p.left == 0 {
                c.complete += 1;
            } else {
                c.incomplete += 1;
            }
        }
        c
    }

    /// Answers a raw announce query string from `remote` with a bencoded body.
    pub fn announce(&self, query: &str, remote: IpAddr) -> Vec<u8> {
        match self.try_announce(query, remote) {
            Ok(body) => body,
            Err(e) => failure(&e.to_string()),
        }
    }

    fn try_announce(&self, query: &str, remote: IpAddr) -> Result<Vec<u8>> {
        let a = parse(query)?;
        let ip = match (a.ip, remote) {
            (Some(ip), _) => ip,
            (None, IpAddr::V4(v4)) => v4,
            (None, IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => v4,
                None => bail!("IPv6 peers are not supported"),
            },
        };
        let now = Instant::now();
        let expiry = self.interval * 3;
        let mut guard = self.lock();
        let g = &mut *guard;
        if !g.known.contains_key(&a.info_hash) {
            bail!(
                "unknown info_hash: this tracker serves only the images of its blockswarm server"
            );
        }
        let swarm = g.swarms.entry(a.info_hash).or_default();
        swarm.retain(|_, p| now.duration_since(p.seen) < expiry);
        if a.event == "stopped" {
            swarm.remove(&a.peer_id);
        } else {
            if !swarm.contains_key(&a.peer_id) && swarm.len() >= MAX_PEERS {
                bail!("swarm is full ({MAX_PEERS} peers)");
            }
            swarm.insert(
                a.peer_id,
                Peer {
                    addr: SocketAddrV4::new(ip, a.port),
                    left: a.left,
                    seen: now,
                },
            );
        }
        // Seeds need nobody: peers come to them.
        let wants_peers = a.left > 0 && a.event != "stopped";
        let mut peers: Vec<(&[u8; 20], &Peer)> = if wants_peers {
            swarm.iter().filter(|(id, _)| **id != a.peer_id).collect()
        } else {
            Vec::new()
        };
        // The server's seeds, finished hosts, then a rotating choice of the others.
        peers.sort_by_key(|(id, p)| (!id.starts_with(ORIGIN_PREFIX), p.left != 0, p.seen));
        peers.truncate(a.numwant);
        let peers: Vec<&Peer> = peers.into_iter().map(|(_, p)| p).collect();
        let interval = if wants_peers && peers.is_empty() {
            Duration::from_secs(1)
        } else {
            self.interval
        };
        let mut compact = Vec::with_capacity(peers.len() * 6);
        for p in &peers {
            compact.extend_from_slice(&p.addr.ip().octets());
            compact.extend_from_slice(&p.addr.port().to_be_bytes());
        }
        let complete = swarm.values().filter(|p| p.left == 0).count();
        #[derive(Serialize)]
        struct Resp {
            complete: usize,
            incomplete: usize,
            interval: u64,
            #[serde(rename = "min interval")]
            min_interval: u64,
            peers: buffers::ByteBufOwned,
        }
        let resp = Resp {
            complete,
            incomplete: swarm.len() - complete,
            interval: interval.as_secs().max(1),
            min_interval: interval.as_secs().max(1),
            peers: compact.into(),
        };
        let mut out = Vec::new();
        bencode::bencode_serialize_to_writer(&resp, &mut out)?;
        Ok(out)
    }
}

fn failure(reason: &str) -> Vec<u8> {
    format!("d14:failure reason{}:{}e", reason.len(), reason).into_bytes()
}

fn parse(query: &str) -> Result<Announce> {
    let mut info_hash = None;
    let mut peer_id = None;
    let (mut port, mut left) = (None, None);
    let mut event = String::new();
    let mut numwant = DEFAULT_NUMWANT;
    let mut ip = None;
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let v = percent_decode(v)?;
        let text = || String::from_utf8(v.clone()).map_err(|_| anyhow::anyhow!("{k}: not text"));
        let num = |what: &str| -> Result<u64> {
            text()?
                .parse()
                .map_err(|_| anyhow::anyhow!("{what}: not a number"))
        };
        match k {
            "info_hash" => {
                info_hash = Some(
                    <[u8; 20]>::try_from(v.as_slice())
                        .map_err(|_| anyhow::anyhow!("info_hash: must be 20 bytes"))?,
                )
            }
            "peer_id" => {
                peer_id = Some(
                    <[u8; 20]>::try_from(v.as_slice())
                        .map_err(|_| anyhow::anyhow!("peer_id: must be 20 bytes"))?,
                )
            }
            "port" => {
                port = Some(
                    u16::try_from(num("port")?)
                        .ok()
                        .filter(|&p| p != 0)
                        .ok_or_else(|| anyhow::anyhow!("port: out of range"))?,
                )
            }
            "left" => left = Some(num("left")?),
            "event" => event = text()?,
            "numwant" => numwant = (num("numwant")? as usize).min(MAX_NUMWANT),
            "ip" => ip = text()?.parse().ok(),
            _ => {}
        }
    }
    Ok(Announce {
        info_hash: info_hash.ok_or_else(|| anyhow::anyhow!("missing info_hash"))?,
        peer_id: peer_id.ok_or_else(|| anyhow::anyhow!("missing peer_id"))?,
        port: port.ok_or_else(|| anyhow::anyhow!("missing port"))?,
        left: left.ok_or_else(|| anyhow::anyhow!("missing left"))?,
        event,
        numwant,
        ip,
    })
}

fn percent_decode(s: &str) -> Result<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                out.push(hex.ok_or_else(|| anyhow::anyhow!("bad percent escape"))?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(h: &InfoHash, id: u8, port: u16, left: u64, downloaded: u64) -> String {
        let enc = |b: &[u8]| b.iter().map(|x| format!("%{x:02X}")).collect::<String>();
        format!(
            "info_hash={}&peer_id={}&port={port}&uploaded=0&downloaded={downloaded}&left={left}&compact=1",
            enc(h),
            enc(&[id; 20])
        )
    }

    fn peers(body: &[u8]) -> Vec<u16> {
        let pos = body.windows(6).position(|w| w == b"peers:").map(|p| p + 6);
        let Some(pos) = pos.or_else(|| {
            // "5:peers" then "<len>:" bytes
            let p = body.windows(7).position(|w| w == b"5:peers")? + 7;
            let colon = body[p..].iter().position(|&c| c == b':')? + p;
            Some(colon + 1)
        }) else {
            return vec![];
        };
        let start = body[..pos].iter().rposition(|&c| c == b's').unwrap() + 1;
        let len: usize = std::str::from_utf8(&body[start..pos - 1])
            .unwrap()
            .parse()
            .unwrap();
        body[pos..pos + len]
            .chunks(6)
            .map(|c| u16::from_be_bytes([c[4], c[5]]))
            .collect()
    }

    #[test]
    fn hosts_meet_everyone_and_seeds_get_nobody() {
        let t = Tracker::new(Duration::from_secs(10));
        let h = [1u8; 20];
        t.allow(h, 100);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let origin = q(&h, 0, 6881, 0, 0).replace(
            &"%00".repeat(11),
            &ORIGIN_PREFIX
                .iter()
                .map(|b| format!("%{b:02X}"))
                .collect::<String>(),
        );
        assert!(
            peers(&t.announce(&origin, ip)).is_empty(),
            "seeds need no peers"
        );
        assert_eq!(peers(&t.announce(&q(&h, 2, 7000, 100, 0), ip)), vec![6881]);
        let mut got = peers(&t.announce(&q(&h, 3, 7001, 100, 0), ip));
        got.sort();
        assert_eq!(got, vec![6881, 7000]);
        // The server's seed first, then finished hosts.
        t.announce(&q(&h, 2, 7000, 0, 100), ip);
        assert_eq!(
            peers(&t.announce(&q(&h, 4, 7002, 100, 0), ip))[..2],
            [6881, 7000]
        );
        // numwant caps the list.
        let few = q(&h, 5, 7003, 100, 0) + "&numwant=2";
        assert_eq!(peers(&t.announce(&few, ip)).len(), 2);
        // A stopped host is forgotten.
        t.announce(&(q(&h, 3, 7001, 100, 0) + "&event=stopped"), ip);
        assert_eq!(t.counts(&h).complete, 2);
        assert_eq!(t.counts(&h).incomplete, 2);
    }

    #[test]
    fn garbage_gets_a_failure_reason() {
        let t = Tracker::new(Duration::from_secs(10));
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for (query, why) in [
            ("", "missing info_hash"),
            ("info_hash=abc", "20 bytes"),
            ("info_hash=%ZZ", "percent"),
            (&q(&[9; 20], 1, 1, 0, 0), "unknown info_hash"),
            (
                &q(&[9; 20], 1, 1, 0, 0).replace("port=1", "port=99999"),
                "port",
            ),
            (
                &q(&[9; 20], 1, 1, 0, 0).replace("left=0", "left=-4"),
                "left",
            ),
        ] {
            let body = String::from_utf8_lossy(&t.announce(query, ip)).into_owned();
            assert!(
                body.starts_with("d14:failure reason") && body.contains(why),
                "{query}: {body}"
            );
        }
    }
}
