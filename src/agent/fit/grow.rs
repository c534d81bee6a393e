//! `grow = "last"`: the last partition and its file system run to the end
//! of a disk larger than the image's.
//!
//! Order on the disk: every check first (the table, the kind of file
//! system, a clean fsck), then the in-progress marker into sector 0, the
//! table (backup GPT, then the primary's entries and header), the file
//! system's resize and read-only check, and sector 0 last. A power cut in
//! between leaves a disk that boots nothing and holds an interrupted run of
//! this image: the next run re-checks every piece, rewrites what differs
//! and the table, and grows again.

use anyhow::{Context, Result, bail};
use tracing::{info, warn};

use crate::agent::target::Target;
use crate::blockdev::Loop;
use crate::image::extent::DevSlice;
use crate::image::fs::FsKind;
use crate::image::grow as fsgrow;
use crate::image::table::{self, FittedGpt, GROW_ALIGN, Growth};
use crate::protocol::Grow;
use crate::storage::HEAD_LEN;
use crate::util::{fault_point, human_bytes};

pub fn run(target: &Target, policy: Grow) -> Result<()> {
    match policy {
        Grow::None => Ok(()),
        Grow::Last => grow_last(target).context("grow = \"last\""),
    }
}

fn grow_last(target: &Target) -> Result<()> {
    let dev = target.dev();
    let (path, ss) = (dev.path.display(), dev.sector_size);
    let table = table::read(&dev.file, dev.size, ss).context("reading the table as written")?;
    let Some(last) = table.partitions.last().cloned() else {
        bail!("{path} has no partition table to grow (the image is a bare file system)");
    };
    let kind = target
        .image()
        .manifest
        .regions
        .iter()
        .find(|r| r.partition == Some(last.number) && r.start == last.start)
        .and_then(|r| r.fs.clone())
        .unwrap_or(FsKind::Unknown);
    fsgrow::check_supported(&kind, last.number)?;
    let old_head = target.read_uncached(0, HEAD_LEN.min(dev.size) as usize)?;
    let mut head = old_head.clone();
    let Some((g, backup)) = table::grow_last(&mut head, &table, last.number, dev.size)? else {
        info!(
            "grow: partition {} ({kind}, {}) already reaches the end of {path} (to {}): nothing to grow",
            last.number,
            human_bytes(last.size),
            human_bytes(GROW_ALIGN)
        );
        return Ok(());
    };
    let (old_len, new_len) = (g.old_end - g.start, g.new_end - g.start);
    fsgrow::check_new_size(&kind, g.number, new_len)?;
    let fs_before = fsgrow::fs_size(&kind, &DevSlice::new(&dev.file, g.start, old_len))?;
    {
        let lp = Loop::attach(&dev.file, g.start, old_len)?;
        fsgrow::check_before(&kind, &lp.path)?;
    }

    target.hold()?;
    // Until sector 0 is written, the disk boots nothing: say so on failure.
    let first = ss as usize;
    let fs_after = write_and_resize(target, &head, &old_head, backup.as_ref(), &g, &kind, fs_before)
        .context(
            "the disk shows no table until this is done (the in-progress marker is in its first sector): \
             re-image this PC, which resumes and grows again",
        )?;
    target.release(&head[..first])?;

    // Read back: what the disk's table says now.
    if let Some(b) = &backup
        && target.read_uncached(b.backup_start, b.backup.len())? != b.backup
    {
        bail!("read-back: the backup GPT of {path} is not what was written");
    }
    let now = table::read(&dev.file, dev.size, ss).context("re-reading the grown table")?;
    if now.partitions.last().map(|p| (p.number, p.start, p.end()))
        != Some((g.number, g.start, g.new_end))
    {
        bail!(
            "read-back: the table of {path} does not show partition {} grown",
            g.number
        );
    }
    if let Err(e) = dev.reread_partitions() {
        warn!("{e:#}");
    }
    info!(
        "grew partition {} ({kind}) of {path} from {} to {} ({} to {} bytes), its file system from {} to {}; checked clean",
        g.number,
        human_bytes(old_len),
        human_bytes(new_len),
        old_len,
        new_len,
        human_bytes(fs_before),
        human_bytes(fs_after)
    );
    Ok(())
}

/// The writes between [`Target::hold`] and [`Target::release`]: the table
/// (sector 0 excepted), then the file system's resize and check. Returns
/// the file system's new size.
fn write_and_resize(
    target: &Target,
    head: &[u8],
    old_head: &[u8],
    backup: Option<&FittedGpt>,
    g: &Growth,
    kind: &FsKind,
    fs_before: u64,
) -> Result<u64> {
    let dev = target.dev();
    let new_len = g.new_end - g.start;
    if let Some(b) = backup {
        target.write_at(&b.backup, b.backup_start, "the backup GPT")?;
    }
    // The primary's changed bytes: sector 0 (the marker now) comes last.
    let first = dev.sector_size as usize;
    let changed: Vec<usize> = (first..head.len())
        .filter(|&i| head[i] != old_head[i])
        .collect();
    if let (Some(&lo), Some(&hi)) = (changed.first(), changed.last()) {
        target.write_at(&head[lo..=hi], lo as u64, "the grown table")?;
    }
    fault_point("grow:table");
    {
        let lp = Loop::attach(&dev.file, g.start, new_len)?;
        fsgrow::resize(kind, &lp.path)
            .with_context(|| format!("growing partition {}'s file system", g.number))?;
        fault_point("grow:resized");
        fsgrow::check_after(kind, &lp.path)?;
    }
    dev.file
        .sync_data()
        .context("flushing the grown file system")?;
    let fs_after = fsgrow::fs_size(kind, &DevSlice::new(&dev.file, g.start, new_len))?;
    if fs_after <= fs_before || fs_after > new_len {
        bail!(
            "partition {}'s file system is {fs_after} bytes after the resize (it was {fs_before}, the partition is {new_len})",
            g.number
        );
    }
    Ok(fs_after)
}
