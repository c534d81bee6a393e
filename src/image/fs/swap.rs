//! Linux swap used blocks: only the header page. Page contents are scratch
//! data; a hibernation image replaces the magic, so it is never probed here.

use anyhow::{Context, Result, bail};

use crate::image::extent::{DevSlice, Extent};

/// Page sizes mkswap uses across architectures.
const PAGE_SIZES: [u64; 4] = [4096, 8192, 16384, 65536];

/// The page size whose last 10 bytes hold a swap magic, if any.
fn page_size(dev: &DevSlice) -> Result<Option<u64>> {
    for ps in PAGE_SIZES {
        if dev.len() < ps {
            break;
        }
        let mut magic = [0u8; 10];
        dev.read_at(ps - 10, &mut magic)
            .with_context(|| format!("reading the swap magic at byte {}", ps - 10))?;
        if &magic == b"SWAPSPACE2" || &magic == b"SWAP-SPACE" {
            return Ok(Some(ps));
        }
    }
    Ok(None)
}

/// Whether `dev` starts with a swap signature.
pub fn probe(dev: &DevSlice) -> Result<bool> {
    Ok(page_size(dev)?.is_some())
}

/// Used extents, relative to the start of `dev`: the header page.
pub fn used_extents(dev: &DevSlice) -> Result<Vec<Extent>> {
    match page_size(dev)? {
        Some(ps) => Ok(vec![Extent::new(0, ps)]),
        None => bail!("no swap signature (SWAPSPACE2) at the end of a 4/8/16/64 KiB page"),
    }
}
