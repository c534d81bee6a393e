//! blockswarm: re-image rooms of PCs over a BitTorrent swarm of used blocks.

pub mod image;
