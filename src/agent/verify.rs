//! The extra read-back pass: every piece read again from the disk and hashed.

use anyhow::{Result, bail};
use librqbit_core::torrent_metainfo::torrent_from_bytes;

use crate::image::Image;
use crate::image::torrent::hash_payload;
use crate::storage::DeviceStorage;

/// Re-reads the whole payload (the held head from memory, the rest from the
/// disk after dropping it from the page cache) and checks every piece.
pub fn readback(image: &Image, storage: &DeviceStorage, disk: &std::fs::File) -> Result<()> {
    disk.sync_data()?;
    // Best effort: without it the pass may read the page cache.
    let _ = nix::fcntl::posix_fadvise(
        disk,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
    let m = &image.manifest;
    let read = |off: u64, buf: &mut [u8]| storage.read(off, buf);
    let got = hash_payload(&read, m.payload.size, m.payload.piece_length, None, &|_| {})?;
    let t = torrent_from_bytes(&image.torrent).map_err(|e| anyhow::anyhow!("{e}"))?;
    let want = t.info.data.pieces.as_ref();
    let bad: Vec<usize> = (0..m.payload.piece_count as usize)
        .filter(|&i| got[i * 20..i * 20 + 20] != want[i * 20..i * 20 + 20])
        .collect();
    if !bad.is_empty() {
        bail!(
            "read-back: {} of {} pieces differ on disk (first: piece {})",
            bad.len(),
            m.payload.piece_count,
            bad[0]
        );
    }
    Ok(())
}
