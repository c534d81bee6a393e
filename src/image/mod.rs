//! Images: partition tables, used-block maps, the manifest and the torrent.

pub mod extent;
pub mod fs;
