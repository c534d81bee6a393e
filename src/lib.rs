//! blockswarm: re-image rooms of PCs over a BitTorrent swarm of used blocks.

pub mod admin;
pub mod agent;
pub mod blockdev;
pub mod image;
pub mod protocol;
pub mod server;
pub mod storage;
pub mod swarm;
pub mod util;
