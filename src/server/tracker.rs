//! A BitTorrent HTTP tracker (BEP 3) with compact peer lists (BEP 23).
//!
//! It only tracks the images the server knows, keeps at most
//! [`MAX_PEERS`] peers per image, and forgets a peer that has not announced
//! for three intervals.
//!
//! Who learns of whom is the swarm's piece scheduling, and it is decided here:
//! - The server's own seeds (peer ids starting with [`ORIGIN_PREFIX`]) are
//!   handed to a few hosts only, `fanout` of them that are making progress.
//!   A seed that serves every host sends the same pieces again and again;
//!   one that feeds a few sends each piece about once, and the hosts pass it
//!   on. A fed host that stops progressing (gone, or on a slow port) gives
//!   its place to another.
//! - Hosts are handed the other hosts that hold data, and finished hosts.
//!   Two empty hosts never exchange a byte, so they are not introduced.
//! - A host that learned of nobody useful is asked back sooner.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddrV4};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;

pub const MAX_PEERS: usize = 4096;
/// The server's seeds announce with peer ids that start with this.
pub const ORIGIN_PREFIX: &[u8] = b"-BS0ORIGIN-";
const DEFAULT_NUMWANT: usize = 50;
const MAX_NUMWANT: usize = 200;

pub type InfoHash = [u8; 20];

pub struct Tracker {
    interval: Duration,
    fanout: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Tracked info hashes, with their payload length.
    known: HashMap<InfoHash, u64>,
    swarms: HashMap<InfoHash, HashMap<[u8; 20], Peer>>,
    /// Per swarm, the hosts the origin seeds feed, in order of arrival.
    fed: HashMap<InfoHash, Vec<[u8; 20]>>,
}

#[derive(Debug, Clone, Copy)]
struct Peer {
    addr: SocketAddrV4,
    left: u64,
    seen: Instant,
    has_data: bool,
    /// When `left` last went down (or the peer arrived).
    progressed: Instant,
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
    downloaded: u64,
    event: String,
    numwant: usize,
    ip: Option<std::net::Ipv4Addr>,
}

impl Tracker {
    /// `fanout`: how many hosts the server's seeds feed directly.
    pub fn new(interval: Duration, fanout: usize) -> Self {
        Self {
            interval,
            fanout: fanout.max(1),
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
        let Some(&total) = g.known.get(&a.info_hash) else {
            bail!(
                "unknown info_hash: this tracker serves only the images of its blockswarm server"
            );
        };
        let swarm = g.swarms.entry(a.info_hash).or_default();
        swarm.retain(|_, p| now.duration_since(p.seen) < expiry);
        if a.event == "stopped" {
            swarm.remove(&a.peer_id);
        } else {
            if !swarm.contains_key(&a.peer_id) && swarm.len() >= MAX_PEERS {
                bail!("swarm is full ({MAX_PEERS} peers)");
            }
            let has_data = a.left < total
                || a.downloaded > 0
                || swarm.get(&a.peer_id).is_some_and(|p| p.has_data);
            let progressed = match swarm.get(&a.peer_id) {
                Some(p) if p.left <= a.left => p.progressed,
                _ => now,
            };
            swarm.insert(
                a.peer_id,
                Peer {
                    addr: SocketAddrV4::new(ip, a.port),
                    left: a.left,
                    seen: now,
                    has_data,
                    progressed,
                },
            );
        }
        let is_origin = |id: &[u8; 20]| id.starts_with(ORIGIN_PREFIX);
        let me = swarm.get(&a.peer_id).copied();
        let me_has_data = me.is_some_and(|p| p.has_data);
        // Origin seeds and finished hosts need nobody: peers come to them.
        let wants_peers = a.left > 0 && a.event != "stopped";
        let fed = g.fed.entry(a.info_hash).or_default();
        let swarm = g.swarms.get(&a.info_hash).expect("inserted above");
        let stall = (self.interval * 2).max(Duration::from_secs(10));
        fed.retain(|id| {
            swarm
                .get(id)
                .is_some_and(|p| p.left > 0 && now.duration_since(p.progressed) < stall)
        });
        // Once a host has the whole image it seeds the room too: no new host
        // is fed from the origin then, which would only send pieces again.
        let someone_finished = swarm.iter().any(|(id, p)| !is_origin(id) && p.left == 0);
        if wants_peers
            && !someone_finished
            && !is_origin(&a.peer_id)
            && !fed.contains(&a.peer_id)
            && fed.len() < self.fanout
        {
            fed.push(a.peer_id);
        }
        let gets_origin = fed.contains(&a.peer_id);
        tracing::debug!(peer = %String::from_utf8_lossy(&a.peer_id), left = a.left, gets_origin, fed = fed.len(), "announce");
        let mut peers: Vec<&Peer> = if !wants_peers {
            Vec::new()
        } else {
            swarm
                .iter()
                .filter(|(id, p)| {
                    **id != a.peer_id
                        && if is_origin(id) {
                            gets_origin
                        } else {
                            p.left == 0 || (p.has_data && (me_has_data || !gets_origin))
                        }
                })
                .map(|(_, p)| p)
                .collect()
        };
        // Finished hosts first, then a rotating choice of the others.
        peers.sort_by_key(|p| (p.left != 0, p.seen));
        peers.truncate(a.numwant);
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
    let (mut port, mut left, mut downloaded) = (None, None, 0u64);
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
            "downloaded" => downloaded = num("downloaded")?,
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
        downloaded,
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
    fn the_origin_feeds_a_few_and_hosts_meet_once_they_hold_data() {
        let t = Tracker::new(Duration::from_secs(10), 2);
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
        assert_eq!(peers(&t.announce(&q(&h, 2, 7000, 100, 0), ip)), vec![6881]); // fed
        assert_eq!(peers(&t.announce(&q(&h, 3, 7001, 100, 0), ip)), vec![6881]); // fed
        // A third empty host waits for a host with data…
        assert!(peers(&t.announce(&q(&h, 4, 7002, 100, 0), ip)).is_empty());
        t.announce(&q(&h, 2, 7000, 50, 50), ip); // host 2 now has data
        // …and gets it.
        assert_eq!(peers(&t.announce(&q(&h, 4, 7002, 100, 0), ip)), vec![7000]);
        // A fed host that is still empty keeps to the seed.
        assert_eq!(peers(&t.announce(&q(&h, 3, 7001, 100, 0), ip)), vec![6881]);
        // Once it holds data it meets the others with data.
        assert_eq!(
            peers(&t.announce(&q(&h, 3, 7001, 90, 10), ip)),
            vec![6881, 7000]
        );
        // A host resuming with data on disk counts as holding data.
        assert_eq!(peers(&t.announce(&q(&h, 5, 7003, 60, 0), ip)).len(), 2);
        assert_eq!(t.counts(&h).complete, 1);
        assert_eq!(t.counts(&h).incomplete, 4);
    }

    #[test]
    fn garbage_gets_a_failure_reason() {
        let t = Tracker::new(Duration::from_secs(10), 2);
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
