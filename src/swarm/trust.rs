//! The hosts the server vouches for: the PCs of this deployment.
//!
//! Nothing a peer says about itself (its peer id, its messages) makes it a
//! host. Only addresses the server vouches for are: on the server's seed,
//! from the server's own records; on an agent, from its tracker's answers
//! (see [`super::announce`]). A vouched host's claims steer this side's
//! picker, it hears of our claims, and on the origin it may take any of
//! the upload slots; anyone else is a plain BitTorrent peer. With nobody
//! vouched for (point-to-point `seed` and `receive`), every peer is plain.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{RwLock, RwLockReadGuard};

/// A set of vouched-for IP addresses, shared by the connections of the
/// torrents it is given to (see [`super::SwarmConfig::trust`]).
#[derive(Default)]
pub struct Trust {
    ips: RwLock<HashSet<IpAddr>>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.read().iter()).finish()
    }
}

impl Trust {
    pub fn new(ips: impl IntoIterator<Item = IpAddr>) -> Self {
        Self {
            ips: RwLock::new(ips.into_iter().map(canonical).collect()),
        }
    }

    /// Vouches for exactly these (a deployment's hosts changed).
    pub fn replace(&self, ips: impl IntoIterator<Item = IpAddr>) {
        *self.ips.write().unwrap_or_else(|e| e.into_inner()) =
            ips.into_iter().map(canonical).collect();
    }

    /// Vouches for these too; true if any is new.
    pub fn extend(&self, ips: impl IntoIterator<Item = IpAddr>) -> bool {
        let mut g = self.ips.write().unwrap_or_else(|e| e.into_inner());
        let before = g.len();
        g.extend(ips.into_iter().map(canonical));
        g.len() != before
    }

    pub fn vouches(&self, ip: IpAddr) -> bool {
        self.read().contains(&canonical(ip))
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    pub fn ips(&self) -> Vec<IpAddr> {
        self.read().iter().copied().collect()
    }

    /// For many lookups under one lock.
    pub(super) fn read(&self) -> RwLockReadGuard<'_, HashSet<IpAddr>> {
        self.ips.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// An IPv4 peer seen on an IPv6 socket is the IPv4 address.
pub(super) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vouches_for_what_it_was_given_and_nothing_else() {
        let a: IpAddr = "10.0.0.5".parse().unwrap();
        let b: IpAddr = "10.0.0.6".parse().unwrap();
        let t = Trust::default();
        assert!(t.is_empty() && !t.vouches(a));
        assert!(t.extend([a]));
        assert!(!t.extend([a]), "nothing new");
        assert!(t.vouches(a) && !t.vouches(b));
        assert!(t.vouches("::ffff:10.0.0.5".parse().unwrap()));
        t.replace([b]);
        assert!(!t.vouches(a) && t.vouches(b));
    }
}
