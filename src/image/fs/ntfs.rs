//! ntfs used blocks. (placeholder until the parser lands)

use anyhow::{Result, bail};

use crate::image::extent::{DevSlice, Extent};

/// Whether `dev` starts with a ntfs signature.
pub fn probe(_dev: &DevSlice) -> Result<bool> {
    Ok(false)
}

/// Used extents, relative to the start of `dev`.
pub fn used_extents(_dev: &DevSlice) -> Result<Vec<Extent>> {
    bail!("ntfs: parser not implemented")
}
