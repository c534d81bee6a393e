//! The target disk's whole life, owned by one type: refuse unless certain,
//! say which disk it is, wipe first, hold the boot area, write the partition
//! table last, and read back what the last writes left on the disk.
//!
//! The order on the disk, and why:
//! 1. [`Target::open`] writes nothing. It refuses the boot medium, disks
//!    with active swap, mounted or busy disks, the image's own source, and
//!    disks too small or of another sector size.
//! 2. [`Target::prepare`] zeroes the first MiB, with the in-progress marker
//!    in sector 0, and every byte of the last MiB that the image does not
//!    carry: old tables and signatures go, and with no boot signature in
//!    sector 0 neither firmware nor the kernel sees a partition table or
//!    boots the disk. An interrupted run of the same image on the same disk
//!    resumes instead, keeping what it wrote.
//! 3. The swarm writes the payload; bytes in the first MiB are held in
//!    memory ([`DeviceStorage`]).
//! 4. [`Target::finish`] writes the backup GPT (sectors no partition uses),
//!    then the first MiB but its first sector, then the first sector, each
//!    flushed before the next: a power cut leaves either the marker (the
//!    next boot resumes) or the whole boot area. Then it reads all of that
//!    back, and re-hashes from the disk the pieces that share the first and
//!    the last MiB with those writes (every piece with `verify = "readback"`).
//! 5. Steps after imaging that change the disk (`agent::fit`, grow) put the
//!    marker back first ([`Target::hold`]) and sector 0 last
//!    ([`Target::release`]): a power cut between leaves a run to resume.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{disks, safety, verify};
use crate::blockdev::{self, Dev};
use crate::image::Image;
use crate::image::map::PayloadMap;
use crate::image::table::{self, FittedGpt, TableKind};
use crate::protocol::{DiskIdentity, Verify};
use crate::storage::{DeviceStorage, HEAD_LEN};

/// Sector 0 of a disk being imaged starts with this.
const MARKER_MAGIC: &[u8] = b"BLOCKSWARM-IN-PROGRESS 2\n";
/// The marker fits in the smallest sector, short of the MBR's signature
/// bytes (510..512), which stay zero: the disk has no table while it holds it.
const MARKER_MAX: usize = 510;

/// What sector 0 says while a disk is being imaged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    pub info_hash: String,
    pub disk: DiskIdentity,
}

impl Marker {
    fn encode(&self) -> Result<Vec<u8>> {
        let mut b = MARKER_MAGIC.to_vec();
        serde_json::to_writer(&mut b, self)?;
        b.push(0);
        if b.len() > MARKER_MAX {
            bail!(
                "the in-progress marker is {} bytes, over {MARKER_MAX}",
                b.len()
            );
        }
        Ok(b)
    }

    /// The marker in a disk's first sector, if it holds one.
    fn decode(sector: &[u8]) -> Option<Self> {
        let rest = sector.get(..MARKER_MAX)?.strip_prefix(MARKER_MAGIC)?;
        let json = &rest[..rest.iter().position(|&b| b == 0)?];
        serde_json::from_slice(json).ok()
    }

    /// The marker of the disk or file at `path`, read without opening it for
    /// writing (to see which disk an interrupted run was on).
    pub fn read(path: &Path) -> Option<Self> {
        let f = std::fs::File::open(path).ok()?;
        let mut sector = [0u8; 512];
        f.read_exact_at(&mut sector, 0).ok()?;
        Self::decode(&sector)
    }
}

/// How [`Target::prepare`] found the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Nothing of the image is assumed to be there.
    Fresh,
    /// An interrupted run of this image: what is there is checked and kept.
    Resume,
    /// An incremental job: what already matches the image is kept.
    Incremental,
}

/// A disk (or image file) being imaged.
pub struct Target {
    dev: Dev,
    image: Image,
    map: PayloadMap,
    identity: DiskIdentity,
    storage: Option<DeviceStorage>,
}

impl Target {
    /// Opens `path` to write `image`, after every check. Writes nothing.
    pub fn open(path: &Path, image: &Image) -> Result<Self> {
        safety::check_disk(path)?;
        let dev = blockdev::open_target(path)?;
        let m = &image.manifest;
        if dev.same_as(&image.store_path()) || dev.same_as(Path::new(&m.source)) {
            bail!(
                "{} is the image's own source: refusing to write to it",
                dev.path.display()
            );
        }
        if dev.same_as(&image.dir.join(crate::image::manifest::MANIFEST_FILE)) {
            bail!("{} is the image's manifest", dev.path.display());
        }
        let map = m.payload_map()?;
        let need = m.disk.min_target_size.max(map.device_end());
        if dev.size < need {
            bail!(
                "{}: {}",
                dev.path.display(),
                crate::image::grow::too_small(m, map.device_end(), dev.size)
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
        let identity = disks::identify(&dev);
        Ok(Self {
            dev,
            image: image.clone(),
            map,
            identity,
            storage: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dev.path
    }

    pub fn size(&self) -> u64 {
        self.dev.size
    }

    /// Which disk this is, to record before the first write.
    pub fn identity(&self) -> &DiskIdentity {
        &self.identity
    }

    /// The open disk, for the steps after imaging (`agent::fit`).
    pub fn dev(&self) -> &Dev {
        &self.dev
    }

    pub fn image(&self) -> &Image {
        &self.image
    }

    /// Puts the in-progress marker back into sector 0 before a step after
    /// imaging changes the disk (grow): until [`Target::release`], the disk
    /// shows no table and boots nothing, and a power cut leaves a run of
    /// this image to resume (every piece re-checked, the table written
    /// anew, the step done again), never a half-changed disk that boots.
    pub fn hold(&self) -> Result<()> {
        // The whole sector: no table entry or boot signature stays.
        let mut sector = vec![0u8; self.dev.sector_size as usize];
        let marker = self.marker().encode()?;
        sector[..marker.len()].copy_from_slice(&marker);
        self.write_flushed(&sector, 0, "the in-progress marker")
    }

    /// Ends [`Target::hold`]: writes `sector` (the disk's first sector,
    /// table included) and reads it back.
    pub fn release(&self, sector: &[u8]) -> Result<()> {
        self.write_flushed(sector, 0, "the first sector")?;
        drop_cache(&self.dev.file);
        if self.read(0, sector.len())? != sector {
            bail!(
                "read-back: the first sector of {} is not what was written",
                self.dev.path.display()
            );
        }
        Ok(())
    }

    /// Writes `bytes` at `at` and flushes them (steps after imaging).
    pub fn write_at(&self, bytes: &[u8], at: u64, what: &str) -> Result<()> {
        self.write_flushed(bytes, at, what)
    }

    /// Reads `len` bytes at `at`, from the disk rather than the cache.
    pub fn read_uncached(&self, at: u64, len: usize) -> Result<Vec<u8>> {
        drop_cache(&self.dev.file);
        self.read(at, len)
    }

    fn marker(&self) -> Marker {
        Marker {
            info_hash: self.image.manifest.payload.info_hash.clone(),
            disk: self.identity.clone(),
        }
    }

    /// Whether sector 0 holds an interrupted run of this image on this disk.
    fn interrupted(&self) -> bool {
        let mut sector = [0u8; 512];
        self.dev.file.read_exact_at(&mut sector, 0).is_ok()
            && Marker::decode(&sector).is_some_and(|m| {
                m.info_hash == self.image.manifest.payload.info_hash
                    && m.disk.same_disk(&self.identity)
            })
    }

    /// Readies the disk for the swarm: resumes an interrupted run of this
    /// image, or wipes its ends and marks it. Returns the swarm's storage;
    /// unless the start is fresh, the swarm checks every piece first.
    pub fn prepare(&mut self, incremental: bool) -> Result<(Start, DeviceStorage)> {
        let start = if self.interrupted() {
            Start::Resume
        } else if incremental {
            Start::Incremental
        } else {
            Start::Fresh
        };
        // What the first MiB holds now counts towards the pieces there.
        let old_head = match start {
            Start::Fresh => None,
            _ => Some(self.read(0, HEAD_LEN.min(self.dev.size) as usize)?),
        };
        if start != Start::Resume {
            self.wipe()?;
        }
        let file = Arc::new(self.dev.file.try_clone()?);
        let storage = DeviceStorage::writer(file, self.map.clone(), start == Start::Fresh);
        if let Some(h) = &old_head {
            storage.set_head(h);
        }
        self.storage = Some(storage.clone());
        Ok((start, storage))
    }

    /// Zeroes the first MiB but for the marker in sector 0, and the bytes of
    /// the last MiB the image does not carry (an incremental run keeps the
    /// payload there, and a fresh one rewrites it).
    fn wipe(&self) -> Result<()> {
        let size = self.dev.size;
        let mut head = vec![0u8; HEAD_LEN.min(size) as usize];
        let marker = self.marker().encode()?;
        head[..marker.len()].copy_from_slice(&marker);
        self.dev
            .file
            .write_all_at(&head, 0)
            .context("wiping the start of the target")?;
        let tail_start = size.saturating_sub(HEAD_LEN).max(head.len() as u64);
        let mut pos = tail_start;
        let zeros = vec![0u8; (size - tail_start) as usize];
        let mut gaps = Vec::new();
        for e in self.map.extents() {
            if e.end() <= pos {
                continue;
            }
            if e.start >= size {
                break;
            }
            if e.start > pos {
                gaps.push((pos, e.start));
            }
            pos = pos.max(e.end());
        }
        if pos < size {
            gaps.push((pos, size));
        }
        for (lo, hi) in gaps {
            self.dev
                .file
                .write_all_at(&zeros[..(hi - lo) as usize], lo)
                .context("wiping the end of the target")?;
        }
        self.dev.file.sync_data().context("flushing the wipe")
    }

    /// Writes the boot area and the backup GPT once the swarm has written and
    /// verified every piece, then reads back what these writes left.
    pub fn finish(&self, verify: Verify) -> Result<()> {
        let storage = self
            .storage
            .as_ref()
            .context("the target was not prepared")?;
        let dev = &self.dev;
        let image_head = storage.take_head().unwrap_or_default();
        let mut head = image_head.clone();
        storage.flush()?;
        let backup = match self.image.manifest.disk.table.kind {
            TableKind::Gpt => Some(table::fit_gpt(&mut head, dev.size, dev.sector_size)?),
            _ => None,
        };
        if let Some(b) = &backup {
            if !self.map.payload_ranges(b.backup_start, b.end()).is_empty() {
                bail!(
                    "the backup GPT of {} (bytes {}..{}) would overwrite the image's blocks",
                    dev.path.display(),
                    b.backup_start,
                    b.end()
                );
            }
            self.write_flushed(&b.backup, b.backup_start, "the backup GPT")?;
            crate::util::fault_point("finish:backup-gpt");
        }
        // Sector 0 (the marker until now) goes last: until it is written,
        // the disk shows no table and boots nothing.
        let first = (dev.sector_size as usize).min(head.len());
        self.write_flushed(&head[first..], first as u64, "the boot area")?;
        crate::util::fault_point("finish:boot-area");
        self.write_flushed(&head[..first], 0, "the first sector")?;
        self.read_back(&head, backup.as_ref())?;
        let checked = self.check_pieces(&image_head, verify)?;
        info!(
            "{}: the boot area{} read back as written; {checked} pieces re-hashed from the disk",
            dev.path.display(),
            if backup.is_some() {
                " and the backup GPT"
            } else {
                ""
            }
        );
        if verify == Verify::Readback {
            info!("read-back verification passed: all {checked} pieces");
        }
        if let Err(e) = dev.reread_partitions() {
            warn!("{e:#}");
        }
        Ok(())
    }

    fn write_flushed(&self, bytes: &[u8], at: u64, what: &str) -> Result<()> {
        self.dev
            .file
            .write_all_at(bytes, at)
            .with_context(|| format!("writing {what} at byte {at}"))?;
        self.dev
            .file
            .sync_data()
            .with_context(|| format!("flushing {what}"))
    }

    fn read(&self, at: u64, len: usize) -> Result<Vec<u8>> {
        let mut b = vec![0u8; len];
        self.dev.file.read_exact_at(&mut b, at).with_context(|| {
            format!(
                "reading {len} bytes at byte {at} of {}",
                self.dev.path.display()
            )
        })?;
        Ok(b)
    }

    /// The boot area and the backup GPT, from the disk rather than the cache.
    fn read_back(&self, head: &[u8], backup: Option<&FittedGpt>) -> Result<()> {
        drop_cache(&self.dev.file);
        let mut areas = vec![(0, head)];
        if let Some(b) = backup {
            areas.push((b.backup_start, &b.backup[..]));
        }
        for (at, want) in areas {
            let got = self.read(at, want.len())?;
            if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
                bail!(
                    "read-back after the last write: byte {} of {} is {:#04x}, {:#04x} was written",
                    at + i as u64,
                    self.dev.path.display(),
                    got[i],
                    want[i]
                );
            }
        }
        Ok(())
    }

    /// Re-hashes pieces from the disk: those sharing the first or the last
    /// MiB with the final writes, or all of them. The first MiB is taken as
    /// the image has it (the disk's copy was compared byte for byte, and may
    /// hold a table refitted to this disk).
    fn check_pieces(&self, image_head: &[u8], verify: Verify) -> Result<usize> {
        let m = &self.image.manifest;
        let plen = u64::from(m.payload.piece_length);
        let all: Vec<usize> = (0..m.payload.piece_count as usize).collect();
        let pieces: Vec<usize> = match verify {
            Verify::Readback => all,
            Verify::Pieces => {
                let size = self.dev.size;
                let mut set = BTreeSet::new();
                for (lo, hi) in [(0, HEAD_LEN), (size.saturating_sub(HEAD_LEN), size)] {
                    for (off, len) in self.map.payload_ranges(lo, hi) {
                        set.extend((off / plen) as usize..=((off + len - 1) / plen) as usize);
                    }
                }
                set.into_iter().collect()
            }
        };
        let head_len = image_head.len() as u64;
        let read = |off: u64, buf: &mut [u8]| -> Result<()> {
            for seg in self.map.segments(off, buf.len())? {
                let out = &mut buf[seg.buf_offset..seg.buf_offset + seg.len];
                let mut dev = seg.dev_offset;
                let mut done = 0;
                if dev < head_len {
                    let n = ((head_len - dev) as usize).min(seg.len);
                    out[..n].copy_from_slice(&image_head[dev as usize..dev as usize + n]);
                    dev += n as u64;
                    done = n;
                }
                if done < seg.len {
                    self.dev
                        .file
                        .read_exact_at(&mut out[done..], dev)
                        .with_context(|| format!("reading back byte {dev}"))?;
                }
            }
            Ok(())
        };
        let bad = verify::bad_pieces_among(&self.image, &read, &pieces)?;
        if let Some(first) = bad.first() {
            bail!(
                "read-back after the last write: {} of {} pieces checked differ on disk (first: piece {first})",
                bad.len(),
                pieces.len()
            );
        }
        Ok(pieces.len())
    }
}

/// Drops a file's or disk's cached pages, so that reads come from the disk.
/// Best effort: some file systems keep them.
fn drop_cache(f: &std::fs::File) {
    let _ = f.sync_all();
    let _ = nix::fcntl::posix_fadvise(f, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_fits_its_sector_and_reads_back() {
        let m = Marker {
            info_hash: "ab".repeat(20),
            disk: DiskIdentity {
                size: 1 << 40,
                wwn: Some("w".repeat(DiskIdentity::MAX_FIELD)),
                serial: Some("s".repeat(DiskIdentity::MAX_FIELD)),
                by_path: Some("p".repeat(DiskIdentity::MAX_FIELD)),
            },
        };
        let mut sector = m.encode().unwrap();
        assert!(sector.len() <= MARKER_MAX);
        sector.resize(512, 0);
        assert_eq!(sector[510..], [0, 0], "no boot signature");
        assert_eq!(Marker::decode(&sector), Some(m));
        assert_eq!(Marker::decode(&[0u8; 512]), None);
        // Cut short (a torn write): no marker.
        let mut torn = sector.clone();
        torn[100] = 0;
        assert_eq!(Marker::decode(&torn), None);
    }
}
