//! A BitTorrent HTTP tracker (BEP 3) with compact peer lists (BEP 23).
//!
//! It only tracks the images the server knows, and trusts only what the
//! server knows, never what a peer claims:
//! - the origin is the server's own seed, listed at the address the caller
//!   gives for it (as the announcing host reaches the server), never found
//!   by a peer id;
//! - a peer's address is the connection's source address (`ip=` is
//!   ignored);
//! - hosts are the announces carrying a token the server issued (the room's
//!   agents), one entry per token; everyone else is a guest (stock clients
//!   such as aria2c). Guests are capped per source address and per swarm,
//!   the oldest evicted; hosts are never refused, since the tokens bound
//!   them.
//!
//! A peer that wants pieces gets the origin, then the hosts of its room
//! (finished ones first), then the guests of its room, up to `numwant`; the
//! hosts' piece scheduling (`swarm::picker`) keeps the origin from sending a
//! piece twice to a room. Seeds get no peers: the others come to them.
//! Hosts also get [`HOSTS_KEY`]: every host of their room, the peers the
//! server vouches for (the picker weighs their claims on the origin's
//! pieces, so the list is per room). A host that learned of nobody is asked
//! back after a second. Peers silent for three intervals are forgotten.
//!
//! Rooms ([`room`]): a host's group, else its subnet; a guest, and whoever
//! lists or is listed to one, goes by subnets. With locality off, or
//! every peer in one room, each peer learns of every other, as before
//! rooms: the swarm is blind to topology.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;

// Hosts per swarm: past it, the one silent longest is evicted.
use super::MAX_HOSTS;

pub mod room;
use room::{Locality, Room};

/// Guests per swarm, and per source address.
pub const MAX_GUESTS: usize = 256;
pub const MAX_GUESTS_PER_IP: usize = 4;
/// The extra key of a host's answer: a compact (BEP 23) list of the hosts.
pub const HOSTS_KEY: &str = "blockswarm hosts";
const DEFAULT_NUMWANT: usize = 50;
const MAX_NUMWANT: usize = 200;
/// Forgetting silent peers scans the swarm: at most this often.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

pub type InfoHash = [u8; 20];

pub struct Tracker {
    interval: Duration,
    locality: Locality,
    inner: Mutex<HashMap<InfoHash, Swarm>>,
}

/// One tracked image.
struct Swarm {
    /// Whether the server's seed serves it (then the origin is listed).
    seeded: bool,
    /// The origin when it is not the server's seed: the master PC of an
    /// image captured with `store = false`.
    origin: Option<SocketAddrV4>,
    /// By host id (the MAC its token names).
    hosts: HashMap<String, Peer>,
    /// By peer id.
    guests: HashMap<[u8; 20], Peer>,
    pruned: Instant,
}

#[derive(Debug, Clone)]
struct Peer {
    addr: SocketAddrV4,
    peer_id: [u8; 20],
    left: u64,
    seen: Instant,
    room: Room,
}

/// The host an announce's token was issued to, as the server knows it.
#[derive(Debug, Clone, Default)]
pub struct Vouched {
    /// The host's id (the MAC its token names).
    pub host: String,
    /// Its group: its room when locality is on.
    pub group: Option<String>,
}

/// Seeders and leechers of one swarm, for metrics and the dashboard.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SwarmCounts {
    pub complete: usize,
    pub incomplete: usize,
}

/// Who is announcing, as the server sees it.
struct Caller {
    /// The connection's source address.
    remote: IpAddr,
    /// The server's seed as this caller reaches it.
    origin: Option<SocketAddrV4>,
    /// The host the announce's token names, if the server issued it.
    host: Option<String>,
    group: Option<String>,
}

struct Announce {
    info_hash: InfoHash,
    peer_id: [u8; 20],
    port: u16,
    left: u64,
    event: String,
    numwant: usize,
    token: Option<String>,
}

impl Tracker {
    pub fn new(interval: Duration, locality: Locality) -> Self {
        Self {
            interval,
            locality,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<InfoHash, Swarm>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The images to track, and whether the server's seed serves each.
    /// Swarms of images no longer listed are dropped.
    pub fn set_images(&self, images: impl IntoIterator<Item = (InfoHash, bool)>) {
        let mut g = self.lock();
        let mut keep = HashSet::new();
        for (h, seeded) in images {
            keep.insert(h);
            g.entry(h)
                .or_insert_with(|| Swarm {
                    seeded,
                    origin: None,
                    hosts: HashMap::new(),
                    guests: HashMap::new(),
                    pruned: Instant::now(),
                })
                .seeded = seeded;
        }
        g.retain(|h, _| keep.contains(h));
    }

    /// Lists `origin` as the origin of tracked image `h`, which the
    /// server's seed does not serve.
    pub fn set_origin(&self, h: &InfoHash, origin: SocketAddrV4) {
        if let Some(s) = self.lock().get_mut(h) {
            s.origin = Some(origin);
        }
    }

    pub fn counts(&self, h: &InfoHash) -> SwarmCounts {
        let g = self.lock();
        let mut c = SwarmCounts::default();
        for p in g.get(h).into_iter().flat_map(|s| s.peers()) {
            if p.left == 0 {
                c.complete += 1;
            } else {
                c.incomplete += 1;
            }
        }
        c
    }

    /// The rooms the server's seed feeds: those of the hosts heard from
    /// lately in the swarms it serves (one with locality off).
    pub fn rooms(&self) -> usize {
        let expiry = self.interval * 3;
        let now = Instant::now();
        let g = self.lock();
        let rooms: HashSet<&Room> = g
            .values()
            .filter(|s| s.seeded)
            .flat_map(|s| s.hosts.values())
            .filter(|p| now.duration_since(p.seen) < expiry)
            .map(|p| &p.room)
            .collect();
        rooms.len()
    }

    /// The addresses of the hosts (token holders) in any swarm: the peers
    /// the server vouches for.
    pub fn host_ips(&self) -> HashSet<Ipv4Addr> {
        let expiry = self.interval * 3;
        let now = Instant::now();
        self.lock()
            .values()
            .flat_map(|s| s.hosts.values())
            .filter(|p| now.duration_since(p.seen) < expiry)
            .map(|p| *p.addr.ip())
            .collect()
    }

    /// Answers a raw announce query string with a bencoded body. `vouch`
    /// names the host a token was issued to, if it was, and its group.
    pub fn announce(
        &self,
        query: &str,
        remote: IpAddr,
        origin: Option<SocketAddrV4>,
        vouch: impl FnOnce(&str) -> Option<Vouched>,
    ) -> Vec<u8> {
        let parsed = parse(query);
        let vouched = match &parsed {
            Ok(a) => a.token.as_deref().and_then(vouch),
            Err(_) => None,
        };
        let (host, group) = match vouched {
            Some(v) => (Some(v.host), v.group),
            None => (None, None),
        };
        let caller = Caller {
            remote,
            origin,
            host,
            group,
        };
        match parsed.and_then(|a| self.try_announce(a, &caller)) {
            Ok(body) => body,
            Err(e) => failure(&e.to_string()),
        }
    }

    fn try_announce(&self, a: Announce, from: &Caller) -> Result<Vec<u8>> {
        let ip = match from.remote {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4,
                None => bail!("IPv6 peers are not supported"),
            },
        };
        let now = Instant::now();
        let mut g = self.lock();
        let Some(swarm) = g.get_mut(&a.info_hash) else {
            bail!(
                "unknown info_hash: this tracker serves only the images of its blockswarm server"
            );
        };
        swarm.prune(now, self.interval * 3);
        let me = Peer {
            addr: SocketAddrV4::new(ip, a.port),
            peer_id: a.peer_id,
            left: a.left,
            seen: now,
            room: self.locality.room(ip, from.group.as_deref()),
        };
        let stopped = a.event == "stopped";
        match (&from.host, stopped) {
            (Some(h), true) => {
                swarm.hosts.remove(h);
            }
            (Some(h), false) => swarm.add_host(h, me.clone()),
            (None, true) => {
                if swarm
                    .guests
                    .get(&a.peer_id)
                    .is_some_and(|p| p.addr.ip() == &ip)
                {
                    swarm.guests.remove(&a.peer_id);
                }
            }
            (None, false) => swarm.add_guest(me.clone()),
        }
        // Seeds need nobody: peers come to them.
        let wants_peers = a.left > 0 && !stopped;
        let mut listed: Vec<SocketAddrV4> = Vec::new();
        if wants_peers {
            let origin = swarm.origin.or(from.origin.filter(|_| swarm.seeded));
            let mut hosts: Vec<&Peer> = swarm
                .hosts
                .iter()
                .filter(|(id, p)| {
                    Some(*id) != from.host.as_ref()
                        && match from.host {
                            Some(_) => p.room == me.room,
                            None => self.same_subnet(p, ip),
                        }
                })
                .map(|(_, p)| p)
                .collect();
            let mut guests: Vec<&Peer> = swarm
                .guests
                .values()
                .filter(|p| p.peer_id != me.peer_id && self.same_subnet(p, ip))
                .collect();
            // Finished peers first, then the one that announced longest ago:
            // each announce moves a peer back, so the choice rotates.
            let order = |p: &&Peer| (p.left != 0, p.seen);
            first_sorted(&mut hosts, a.numwant, order);
            first_sorted(&mut guests, a.numwant, order);
            let mut seen = HashSet::from([me.addr]);
            listed = origin
                .into_iter()
                .chain(hosts.iter().chain(&guests).map(|p| p.addr))
                .filter(|addr| seen.insert(*addr))
                .take(a.numwant)
                .collect();
        }
        let interval = if wants_peers && listed.is_empty() {
            Duration::from_secs(1)
        } else {
            self.interval
        };
        let vouched = from.host.as_ref().map(|h| {
            compact(
                swarm
                    .hosts
                    .iter()
                    .filter(|(id, p)| *id != h && p.room == me.room)
                    .map(|(_, p)| p.addr),
            )
        });
        let complete = swarm.peers().filter(|p| p.left == 0).count();
        // Keys in sorted order, as bencoding requires.
        #[derive(Serialize)]
        struct Resp {
            #[serde(rename = "blockswarm hosts", skip_serializing_if = "Option::is_none")]
            hosts: Option<buffers::ByteBufOwned>,
            complete: usize,
            incomplete: usize,
            interval: u64,
            #[serde(rename = "min interval")]
            min_interval: u64,
            peers: buffers::ByteBufOwned,
        }
        let resp = Resp {
            hosts: vouched.map(Into::into),
            complete,
            incomplete: swarm.hosts.len() + swarm.guests.len() - complete,
            interval: interval.as_secs().max(1),
            min_interval: interval.as_secs().max(1),
            peers: compact(listed).into(),
        };
        let mut out = Vec::new();
        bencode::bencode_serialize_to_writer(&resp, &mut out)?;
        Ok(out)
    }
}

impl Tracker {
    /// Guests (stock clients) have no group: whoever lists or is listed to
    /// one goes by subnets.
    fn same_subnet(&self, p: &Peer, ip: Ipv4Addr) -> bool {
        self.locality.room(*p.addr.ip(), None) == self.locality.room(ip, None)
    }
}

impl Swarm {
    fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.hosts.values().chain(self.guests.values())
    }

    fn prune(&mut self, now: Instant, expiry: Duration) {
        if now.duration_since(self.pruned) < PRUNE_EVERY {
            return;
        }
        self.pruned = now;
        self.hosts
            .retain(|_, p| now.duration_since(p.seen) < expiry);
        self.guests
            .retain(|_, p| now.duration_since(p.seen) < expiry);
    }

    fn add_host(&mut self, id: &str, p: Peer) {
        if !self.hosts.contains_key(id)
            && self.hosts.len() >= MAX_HOSTS
            && let Some(old) = oldest(self.hosts.iter())
        {
            self.hosts.remove(&old);
        }
        self.hosts.insert(id.to_string(), p);
    }

    fn add_guest(&mut self, p: Peer) {
        if !self.guests.contains_key(&p.peer_id) {
            let same_ip = self
                .guests
                .iter()
                .filter(|(_, g)| g.addr.ip() == p.addr.ip());
            if same_ip.clone().count() >= MAX_GUESTS_PER_IP
                && let Some(old) = oldest(same_ip)
            {
                self.guests.remove(&old);
            } else if self.guests.len() >= MAX_GUESTS
                && let Some(old) = oldest(self.guests.iter())
            {
                self.guests.remove(&old);
            }
        }
        self.guests.insert(p.peer_id, p);
    }
}

/// The key of the peer silent longest.
fn oldest<'a, K: Clone + 'a>(peers: impl Iterator<Item = (&'a K, &'a Peer)>) -> Option<K> {
    peers.min_by_key(|(_, p)| p.seen).map(|(k, _)| k.clone())
}

/// BEP 23: 4 address bytes and 2 port bytes per peer.
fn compact(addrs: impl IntoIterator<Item = SocketAddrV4>) -> Vec<u8> {
    addrs
        .into_iter()
        .flat_map(|a| {
            let mut b = [0u8; 6];
            b[..4].copy_from_slice(&a.ip().octets());
            b[4..].copy_from_slice(&a.port().to_be_bytes());
            b
        })
        .collect()
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
    let mut token = None;
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
            // An over-long token is no token: the announce is a guest's.
            "token" if v.len() <= super::token::MAX_TOKEN_LEN => token = text().ok(),
            // `ip=` and the rest are ignored: the address is the connection's.
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
        token,
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

/// The first `n` of `v` by `key`, sorted, and nothing else: a partial
/// select, so that an answer costs O(hosts), not a sort of every host.
fn first_sorted<T, K: Ord>(v: &mut Vec<T>, n: usize, key: impl Fn(&T) -> K) {
    if n == 0 {
        v.clear();
        return;
    }
    if v.len() > n {
        v.select_nth_unstable_by_key(n - 1, &key);
        v.truncate(n);
    }
    v.sort_unstable_by_key(key);
}

#[cfg(test)]
mod tests;
