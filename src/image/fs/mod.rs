//! Used-block maps, one file system per file.
//!
//! Each parser takes the file system's region of the device and returns the
//! byte extents, relative to the start of that region, that hold data or
//! metadata. Everything else is free space and is never transferred.

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::extent::{DevSlice, Extent};

pub mod dirty;
pub mod ext;
pub mod fat;
pub mod fatdir;
pub mod ntfs;
pub mod partclone;
pub mod swap;

/// What a region holds, as far as imaging is concerned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    Ext4,
    Fat,
    Ntfs,
    Swap,
    /// Recognized by blkid, mapped by partclone (or copied whole).
    Other(String),
    /// No file system signature: copied whole.
    Unknown,
}

impl std::fmt::Display for FsKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FsKind::Ext4 => f.write_str("ext"),
            FsKind::Fat => f.write_str("fat"),
            FsKind::Ntfs => f.write_str("ntfs"),
            FsKind::Swap => f.write_str("swap"),
            FsKind::Other(s) => f.write_str(s),
            FsKind::Unknown => f.write_str("unknown"),
        }
    }
}

/// The used extents of one file system, and how they were found.
#[derive(Debug, Clone)]
pub struct UsedMap {
    pub kind: FsKind,
    /// Sorted, merged, relative to the region start.
    pub extents: Vec<Extent>,
    /// Set when the map is not exact (e.g. the whole region was taken).
    pub warning: Option<String>,
}

/// Recognizes the file systems we parse natively by their signatures.
pub fn detect(dev: &DevSlice) -> Result<FsKind> {
    if ext::probe(dev)? {
        return Ok(FsKind::Ext4);
    }
    if ntfs::probe(dev)? {
        return Ok(FsKind::Ntfs);
    }
    if fat::probe(dev)? {
        return Ok(FsKind::Fat);
    }
    if swap::probe(dev)? {
        return Ok(FsKind::Swap);
    }
    Ok(FsKind::Unknown)
}

/// Finds the used blocks of whatever file system `dev` holds.
///
/// A native parser's error is returned as is: a file system that looks like
/// ext4 but fails to parse is corrupt, and imaging it whole would hide that.
pub fn used_map(dev: &DevSlice) -> Result<UsedMap> {
    let kind = detect(dev)?;
    let extents = match kind {
        FsKind::Ext4 => ext::used_extents(dev)?,
        FsKind::Fat => fat::used_extents(dev)?,
        FsKind::Ntfs => ntfs::used_extents(dev)?,
        FsKind::Swap => swap::used_extents(dev)?,
        FsKind::Other(_) | FsKind::Unknown => return partclone::used_map(dev),
    };
    Ok(UsedMap {
        kind,
        extents,
        warning: None,
    })
}
