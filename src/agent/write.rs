//! Writing an image to a target: wipe first, partition table last.

use std::os::unix::fs::FileExt;

use anyhow::{Context, Result, bail};
use tracing::info;

use crate::blockdev::Dev;
use crate::image::Image;
use crate::image::table::{self, TableKind};
use crate::storage::HEAD_LEN;
use crate::util::human_bytes;

/// Refuses a target that cannot hold the image, or that is the image itself.
pub fn check_target(dev: &Dev, image: &Image) -> Result<()> {
    let m = &image.manifest;
    if dev.same_as(&image.store_path()) || dev.same_as(std::path::Path::new(&m.source)) {
        bail!(
            "{} is the image's own source: refusing to write to it",
            dev.path.display()
        );
    }
    if dev.same_as(&image.dir.join(crate::image::manifest::MANIFEST_FILE)) {
        bail!("{} is the image's manifest", dev.path.display());
    }
    if dev.size < m.disk.min_target_size {
        bail!(
            "{} is too small: {} ({} bytes), the image needs at least {} ({} bytes)",
            dev.path.display(),
            human_bytes(dev.size),
            dev.size,
            human_bytes(m.disk.min_target_size),
            m.disk.min_target_size
        );
    }
    if m.disk.table.kind == TableKind::Gpt && dev.sector_size != m.disk.sector_size {
        bail!(
            "{} has {}-byte sectors, the image's GPT was made for {}-byte sectors",
            dev.path.display(),
            dev.sector_size,
            m.disk.sector_size
        );
    }
    Ok(())
}

/// Zeroes the first and last MiB: old partition tables and file-system
/// signatures go, so a half-written disk never looks bootable or whole.
pub fn wipe_ends(dev: &Dev) -> Result<()> {
    let n = HEAD_LEN.min(dev.size);
    let zeros = vec![0u8; n as usize];
    dev.file
        .write_all_at(&zeros, 0)
        .context("wiping the start of the target")?;
    dev.file
        .write_all_at(&zeros, dev.size - n)
        .context("wiping the end of the target")?;
    dev.file.sync_data().context("flushing the wipe")?;
    Ok(())
}

/// Writes the held head last: first a GPT's backup fitted to this disk, then
/// the boot area with the primary table; then asks the kernel to re-read it.
pub fn finish(dev: &Dev, image: &Image, mut head: Vec<u8>) -> Result<()> {
    let m = &image.manifest;
    dev.file.sync_data().context("flushing the image data")?;
    if m.disk.table.kind == TableKind::Gpt {
        let fitted = table::fit_gpt(&mut head, dev.size, dev.sector_size)?;
        dev.file
            .write_all_at(&fitted.tail, fitted.tail_start)
            .context("writing the backup GPT")?;
        dev.file.sync_data().context("flushing the backup GPT")?;
        info!("GPT fitted to {} ({} bytes)", dev.path.display(), dev.size);
    }
    dev.file
        .write_all_at(&head, 0)
        .context("writing the boot area")?;
    dev.file.sync_all().context("flushing the boot area")?;
    dev.reread_partitions()
}

/// Marks a disk that is being imaged, inside the wiped first MiB (which is
/// written last), so that an interrupted run can resume.
const MARKER: &[u8] = b"BLOCKSWARM-IN-PROGRESS ";
const MARKER_AT: u64 = 512 * 1024;

pub fn write_marker(dev: &Dev, info_hash: &str) -> Result<()> {
    let mut m = MARKER.to_vec();
    m.extend_from_slice(info_hash.as_bytes());
    dev.file
        .write_all_at(&m, MARKER_AT)
        .context("writing the in-progress marker")?;
    dev.file.sync_data()?;
    Ok(())
}

/// Whether the disk holds an interrupted run of this image.
pub fn has_marker(dev: &Dev, info_hash: &str) -> bool {
    let mut buf = vec![0u8; MARKER.len() + info_hash.len()];
    dev.file.read_exact_at(&mut buf, MARKER_AT).is_ok()
        && buf.starts_with(MARKER)
        && &buf[MARKER.len()..] == info_hash.as_bytes()
}

/// The first MiB as it is now (for incremental re-imaging).
pub fn read_head(dev: &Dev) -> Result<Vec<u8>> {
    let mut head = vec![0u8; HEAD_LEN.min(dev.size) as usize];
    dev.file
        .read_exact_at(&mut head, 0)
        .context("reading the start of the target")?;
    Ok(head)
}
