//! Wake-on-LAN magic packets: at once ([`wake`]), or paced for a room
//! ([`wake_staggered`]) so that 300 PCs do not power on in the same second
//! (breakers) nor flood the switches (storm control counts broadcasts).

use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, sleep_until};

use super::config::mac_bytes;

/// The discard port, where Wake-on-LAN is usually sent.
pub const WOL_PORT: u16 = 9;

/// Six 0xFF bytes, then the MAC sixteen times.
pub fn magic_packet(mac: [u8; 6]) -> [u8; 102] {
    let mut p = [0xFFu8; 102];
    for i in 0..16 {
        p[6 + i * 6..12 + i * 6].copy_from_slice(&mac);
    }
    p
}

/// Sends one packet per MAC to `to`, at once; returns how many were sent.
pub fn wake(macs: &[&str], to: SocketAddr) -> Result<usize> {
    let sock = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
        .context("opening a UDP socket")?;
    sock.set_broadcast(true)?;
    for mac in macs {
        sock.send_to(&magic_packet(mac_bytes(mac)?), to)
            .with_context(|| format!("sending to {to}"))?;
    }
    Ok(macs.len())
}

/// The directed broadcast address of an IPv4 subnet: "10.0.12.0/24" →
/// 10.0.12.255. A host's address with its prefix ("10.0.12.7/24") gives the
/// same.
pub fn directed_broadcast(cidr: &str) -> Result<Ipv4Addr> {
    let (addr, prefix) = cidr
        .split_once('/')
        .with_context(|| format!("{cidr:?} is not a subnet such as 10.0.12.0/24"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .with_context(|| format!("{cidr:?}: {addr:?} is not an IPv4 address"))?;
    let prefix: u32 = match prefix.parse() {
        Ok(p) if p <= 32 => p,
        _ => bail!("{cidr:?}: the prefix length must be 0-32, not {prefix:?}"),
    };
    if prefix > 30 {
        bail!("{cidr:?}: a /{prefix} has no broadcast address");
    }
    let host_bits = u32::MAX.checked_shr(prefix).unwrap_or(0);
    Ok(Ipv4Addr::from(u32::from(addr) | host_bits))
}

/// One PC to wake, and where its packet goes: the directed broadcast of its
/// subnet, port [`WOL_PORT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub mac: [u8; 6],
    pub to: SocketAddr,
}

/// How fast and how often to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pace {
    /// Packets a second, over all destinations and repeats.
    pub rate: u32,
    /// Packets per PC: Wake-on-LAN is lossy and unacknowledged.
    pub repeat: u32,
    /// Least time between two packets to one PC.
    pub gap: Duration,
}

impl Default for Pace {
    fn default() -> Pace {
        Pace {
            rate: 20,
            repeat: 3,
            gap: Duration::from_secs(1),
        }
    }
}

impl Pace {
    pub fn check(&self) -> Result<()> {
        if !(1..=10_000).contains(&self.rate) {
            bail!("the Wake-on-LAN rate must be 1-10000 packets a second");
        }
        if !(1..=10).contains(&self.repeat) {
            bail!("Wake-on-LAN packets must be sent 1-10 times");
        }
        if self.gap > Duration::from_secs(60) {
            bail!("the gap between Wake-on-LAN repeats must be at most 60 s");
        }
        Ok(())
    }
}

/// What [`wake_staggered`] did, per destination in the order first given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WakeReport {
    pub destinations: Vec<DestinationReport>,
    /// Stopped before every packet was sent.
    pub cancelled: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationReport {
    pub to: SocketAddr,
    /// Packets sent (repeats count).
    pub sent: usize,
    pub failures: Vec<SendFailure>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendFailure {
    pub mac: String,
    pub error: String,
}

impl WakeReport {
    pub fn sent(&self) -> usize {
        self.destinations.iter().map(|d| d.sent).sum()
    }

    pub fn failed(&self) -> usize {
        self.destinations.iter().map(|d| d.failures.len()).sum()
    }
}

/// Sends each target's magic packet `pace.repeat` times, one packet every
/// `1/pace.rate` s at most, taking the destinations in turn so that every
/// subnet's PCs wake from the start, and each PC's repeats at least
/// `pace.gap` apart. Stops when `cancel` resolves. Errors are a bad `pace`
/// and a socket that cannot be opened; a failed send is in the report.
pub async fn wake_staggered(
    targets: &[Target],
    pace: Pace,
    cancel: impl Future<Output = ()>,
) -> Result<WakeReport> {
    pace.check()?;
    let (dests, order) = interleave(targets);
    let mut report = WakeReport {
        destinations: dests
            .iter()
            .map(|&to| DestinationReport {
                to,
                sent: 0,
                failures: Vec::new(),
            })
            .collect(),
        cancelled: false,
    };
    // One socket per address family in use.
    let mut v4 = None;
    let mut v6 = None;
    if targets.iter().any(|t| t.to.is_ipv4()) {
        v4 = Some(broadcast_socket("0.0.0.0:0").await?);
    }
    if targets.iter().any(|t| t.to.is_ipv6()) {
        v6 = Some(broadcast_socket("[::]:0").await?);
    }
    let period = Duration::from_secs(1) / pace.rate;
    let mut cancel = std::pin::pin!(cancel);
    let mut next = Instant::now();
    // When each target's last packet went.
    let mut last: Vec<Option<Instant>> = vec![None; targets.len()];
    for _ in 0..pace.repeat {
        for &(d, i) in &order {
            let t = targets[i];
            let at = match last[i] {
                Some(l) => next.max(l + pace.gap),
                None => next,
            };
            let sock = if t.to.is_ipv4() { &v4 } else { &v6 };
            let sock = sock.as_ref().expect("opened for every family in targets");
            let packet = magic_packet(t.mac);
            let sent = tokio::select! {
                biased;
                _ = &mut cancel => None,
                r = async {
                    sleep_until(at).await;
                    sock.send_to(&packet, t.to).await
                } => Some(r),
            };
            let dest = &mut report.destinations[d];
            match sent {
                None => {
                    report.cancelled = true;
                    return Ok(report);
                }
                Some(Ok(_)) => dest.sent += 1,
                Some(Err(e)) => dest.failures.push(SendFailure {
                    mac: mac_text(t.mac),
                    error: e.to_string(),
                }),
            }
            // Paced from when it went, so a late packet never makes a burst.
            let now = Instant::now();
            last[i] = Some(now);
            next = now + period;
        }
    }
    Ok(report)
}

async fn broadcast_socket(bind: &str) -> Result<tokio::net::UdpSocket> {
    let s = tokio::net::UdpSocket::bind(bind)
        .await
        .with_context(|| format!("opening a UDP socket on {bind}"))?;
    s.set_broadcast(true)
        .context("allowing broadcasts on a UDP socket")?;
    Ok(s)
}

/// The destinations in the order first given, and the targets as
/// (destination, target) taken one per destination in turn: A1 B1 C1 A2 C2.
fn interleave(targets: &[Target]) -> (Vec<SocketAddr>, Vec<(usize, usize)>) {
    let mut dests = Vec::new();
    let mut index = HashMap::new();
    let mut queues: Vec<Vec<usize>> = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let d = *index.entry(t.to).or_insert_with(|| {
            dests.push(t.to);
            queues.push(Vec::new());
            dests.len() - 1
        });
        queues[d].push(i);
    }
    let longest = queues.iter().map(Vec::len).max().unwrap_or(0);
    let order = (0..longest)
        .flat_map(|k| {
            queues
                .iter()
                .enumerate()
                .filter_map(move |(d, q)| q.get(k).map(|&i| (d, i)))
        })
        .collect();
    (dests, order)
}

fn mac_text(m: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

#[cfg(test)]
mod tests;
