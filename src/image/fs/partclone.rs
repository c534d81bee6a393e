//! File systems we do not parse: partclone's used-block map, or the whole region.

use anyhow::Result;

use super::{FsKind, UsedMap};
use crate::image::extent::{DevSlice, Extent};

/// Placeholder: the whole region.
pub fn used_map(dev: &DevSlice) -> Result<UsedMap> {
    Ok(UsedMap {
        kind: FsKind::Unknown,
        extents: vec![Extent::new(0, dev.len())],
        warning: Some("no file system recognized: copying the whole region".into()),
    })
}
