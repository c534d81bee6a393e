//! Which room a peer is in, as the server sees it (docs/rooms.md).
//!
//! A host's room is its group (the lifecycle groups in the server config
//! or the database); a host in no group, and every guest, is in the room of
//! its address's subnet (`room_prefix`, /24 by default). Nothing a peer
//! says picks its room: the group comes from the host the token names, the
//! subnet from the connection's source address.

use std::net::Ipv4Addr;
use std::sync::Arc;

/// How the tracker tells rooms apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locality {
    /// false: one room for all (a topology-blind swarm, as before rooms).
    pub on: bool,
    /// Prefix length of a subnet room, 0 to 32.
    pub prefix: u8,
}

impl Default for Locality {
    fn default() -> Self {
        Self {
            on: true,
            prefix: 24,
        }
    }
}

/// A room: a group's name (bounded by the config: at most 64 characters),
/// or a subnet's network address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Room {
    Group(Arc<str>),
    Subnet(Ipv4Addr),
    /// Locality is off: everyone is in it.
    All,
}

impl Locality {
    /// The room of a peer at `ip`, in `group` if the server put it in one.
    pub fn room(&self, ip: Ipv4Addr, group: Option<&str>) -> Room {
        if !self.on {
            return Room::All;
        }
        match group {
            Some(g) => Room::Group(g.into()),
            None => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix.min(32)))
                    .unwrap_or(0);
                Room::Subnet(Ipv4Addr::from(u32::from(ip) & mask))
            }
        }
    }
}
