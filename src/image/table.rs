//! Partition tables: reading GPT and MBR (with logical partitions), and
//! fitting a GPT to a target disk of another size.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::extent::DevSlice;
use super::fs;
use crate::util::guard;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    Gpt,
    Mbr,
    /// A bare file system (or unknown data) spanning the whole disk.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// 1-based: GPT entry index, or MBR slot (1-4 primary, 5+ logical).
    pub number: u32,
    /// Byte offset on the disk.
    pub start: u64,
    /// Bytes.
    pub size: u64,
    /// GPT type GUID, or MBR system id as `0xNN`.
    pub type_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Byte offset of the EBR that describes a logical partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ebr: Option<u64>,
}

impl Partition {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionTable {
    pub kind: TableKind,
    pub sector_size: u64,
    /// Sorted by start; extended-partition containers are not listed.
    pub partitions: Vec<Partition>,
}

impl PartitionTable {
    /// The smallest disk this table fits on.
    pub fn min_disk_size(&self, source_size: u64) -> u64 {
        let end = self
            .partitions
            .iter()
            .map(Partition::end)
            .max()
            .unwrap_or(0);
        match self.kind {
            // Room for the backup entry array (16 KiB) and header.
            TableKind::Gpt => end + (16384u64.div_ceil(self.sector_size) + 1) * self.sector_size,
            TableKind::Mbr => end.max(self.sector_size),
            TableKind::None => source_size,
        }
    }

    /// End of the area before the first partition (MBR, GPT, BIOS boot gap).
    pub fn boot_area_end(&self) -> u64 {
        match self.kind {
            TableKind::None => 0,
            _ => self.partitions.first().map(|p| p.start).unwrap_or(1 << 20),
        }
    }
}

/// Reads the partition table of a whole disk (or image file) of `size` bytes.
pub fn read(file: &File, size: u64, sector_size: u64) -> Result<PartitionTable> {
    let disk = DevSlice::new(file, 0, size);
    if size < 2 * sector_size {
        bail!("disk of {size} bytes is too small to hold anything");
    }
    let lba1 = disk.read_vec(sector_size, 8)?;
    let table = if &lba1[..] == b"EFI PART" {
        read_gpt(&disk, sector_size)?
    } else if fs::detect(&disk)? != fs::FsKind::Unknown {
        PartitionTable {
            kind: TableKind::None,
            sector_size,
            partitions: Vec::new(),
        }
    } else if disk.read_vec(510, 2)? == [0x55, 0xAA] {
        read_mbr(&disk, sector_size)?
    } else {
        PartitionTable {
            kind: TableKind::None,
            sector_size,
            partitions: Vec::new(),
        }
    };
    check_layout(&table, size)?;
    Ok(table)
}

/// Most GPT partition entries we read (sgdisk makes 128). gptman allocates
/// and reads as many as a header claims: 2^32 of them, for a hostile one.
const MAX_GPT_ENTRIES: u32 = 8192;

/// Refuses a GPT header (`h`, read at byte `at`) whose entry array gptman
/// cannot read sanely; anything but a GPT header passes.
fn check_gpt_header(h: &[u8], at: u64) -> Result<()> {
    if h.len() < 92 || &h[..8] != b"EFI PART" {
        return Ok(());
    }
    let le32 = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let (n, size) = (le32(80), le32(84));
    if size != 128 || n > MAX_GPT_ENTRIES {
        bail!(
            "the GPT header at byte {at} describes {n} partition entries of {size} bytes \
             (this reader takes up to {MAX_GPT_ENTRIES} of 128 bytes)"
        );
    }
    Ok(())
}

fn read_gpt(disk: &DevSlice, ss: u64) -> Result<PartitionTable> {
    // gptman reads the primary header, else the backup at the last LBA.
    let backup = (disk.len() / ss - 1) * ss;
    for at in [ss, backup] {
        check_gpt_header(&disk.read_vec(at, 92.min(ss as usize))?, at)?;
    }
    let mut r = disk.reader();
    let gpt = guard("GPT", || gptman::GPT::read_from(&mut r, ss))?.context("reading the GPT")?;
    let mut partitions = Vec::new();
    for (i, p) in gpt.iter() {
        if !p.is_used() {
            continue;
        }
        if p.ending_lba < p.starting_lba {
            bail!(
                "GPT partition {i} ends (LBA {}) before it starts (LBA {})",
                p.ending_lba,
                p.starting_lba
            );
        }
        let start = p.starting_lba.checked_mul(ss);
        let size = (p.ending_lba - p.starting_lba + 1).checked_mul(ss);
        let (Some(start), Some(size)) = (start, size) else {
            bail!("GPT partition {i}: LBA range overflows");
        };
        partitions.push(Partition {
            number: i,
            start,
            size,
            type_id: guid_string(&p.partition_type_guid),
            name: p.partition_name.as_str().to_string(),
            ebr: None,
        });
    }
    partitions.sort_by_key(|p| p.start);
    Ok(PartitionTable {
        kind: TableKind::Gpt,
        sector_size: ss,
        partitions,
    })
}

fn read_mbr(disk: &DevSlice, ss: u64) -> Result<PartitionTable> {
    let mut r = disk.reader();
    let mbr =
        guard("MBR", || mbrman::MBR::read_from(&mut r, ss as u32))?.context("reading the MBR")?;
    let mut partitions = Vec::new();
    let entry = |number: u32, e: &mbrman::MBRPartitionEntry, ebr: Option<u64>| Partition {
        number,
        start: u64::from(e.starting_lba) * ss,
        size: u64::from(e.sectors) * ss,
        type_id: format!("{:#04x}", e.sys),
        name: String::new(),
        ebr,
    };
    for (i, e) in mbr.header.iter() {
        if e.is_used() && !e.is_extended() {
            partitions.push(entry(i as u32, e, None));
        }
    }
    for (i, l) in mbr.logical_partitions.iter().enumerate() {
        if l.partition.is_used() {
            let ebr = u64::from(l.absolute_ebr_lba) * ss;
            partitions.push(entry(5 + i as u32, &l.partition, Some(ebr)));
        }
    }
    partitions.sort_by_key(|p| p.start);
    Ok(PartitionTable {
        kind: TableKind::Mbr,
        sector_size: ss,
        partitions,
    })
}

/// Partitions must lie on the disk and not overlap.
fn check_layout(t: &PartitionTable, size: u64) -> Result<()> {
    let mut prev: Option<&Partition> = None;
    for p in &t.partitions {
        if p.size == 0 {
            bail!("partition {} is empty", p.number);
        }
        // checked: a GPT entry's start and size can add up past 2^64.
        match p.start.checked_add(p.size) {
            Some(end) if end <= size => {}
            end => bail!(
                "partition {} ends at byte {}, past the end of the {size}-byte disk",
                p.number,
                end.map_or("2^64 or more".into(), |e| e.to_string())
            ),
        }
        if let Some(q) = prev
            && p.start < q.end()
        {
            bail!("partition {} overlaps partition {}", p.number, q.number);
        }
        prev = Some(p);
    }
    Ok(())
}

pub(crate) fn guid_string(g: &[u8; 16]) -> String {
    format!(
        "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        g[3],
        g[2],
        g[1],
        g[0],
        g[5],
        g[4],
        g[7],
        g[6],
        g[8],
        g[9],
        g[10],
        g[11],
        g[12],
        g[13],
        g[14],
        g[15]
    )
}

/// A GPT refitted to a target disk, ready to write: the primary header and
/// entries go into the boot area (`head`, device bytes from 0), the backup
/// entries and header into `backup` at `backup_start`, the sectors after the
/// last usable one. Nothing else of the disk's end is written: the last
/// partition may run up to those sectors.
#[derive(Debug)]
pub struct FittedGpt {
    pub backup_start: u64,
    pub backup: Vec<u8>,
}

impl FittedGpt {
    pub fn end(&self) -> u64 {
        self.backup_start + self.backup.len() as u64
    }
}

/// Rewrites the GPT in `head` for a disk of `disk_size` bytes: backup header
/// at the last LBA, last usable LBA before the backup entries, fresh CRCs.
/// Returns the backup table to write at the end of the disk.
pub fn fit_gpt(head: &mut [u8], disk_size: u64, ss: u64) -> Result<FittedGpt> {
    refit_gpt(head, disk_size, ss, |_| Ok(()))
}

/// [`fit_gpt`], with `edit` applied to the entries once the header is fitted
/// (last usable LBA known) and before the CRCs are computed.
fn refit_gpt(
    head: &mut [u8],
    disk_size: u64,
    ss: u64,
    edit: impl FnOnce(&mut gptman::GPT) -> Result<()>,
) -> Result<FittedGpt> {
    check_gpt_header(head.get(ss as usize..).unwrap_or_default(), ss)?;
    let tail_len = (1u64 << 20).min(disk_size);
    let mut vdisk = VirtualDisk {
        head,
        tail: vec![0; tail_len as usize],
        tail_start: disk_size - tail_len,
        size: disk_size,
        pos: 0,
    };
    let mut gpt = guard("GPT", || gptman::GPT::read_from(&mut vdisk, ss))?
        .context("re-reading the image's GPT")?;
    gpt.header
        .update_from(&mut vdisk, ss)
        .context("fitting the GPT to the target")?;
    edit(&mut gpt)?;
    if let Some((i, _)) = gpt
        .iter()
        .find(|(_, p)| p.is_used() && p.ending_lba > gpt.header.last_usable_lba)
    {
        bail!("partition {i} ends past the last usable LBA of the target disk");
    }
    gpt.write_into(&mut vdisk)
        .context("writing the fitted GPT")?;
    let backup_start = (gpt.header.last_usable_lba + 1) * ss;
    let backup_end = (gpt.header.backup_lba + 1) * ss;
    if backup_start < vdisk.tail_start || backup_end > disk_size {
        bail!("the backup GPT ({backup_start}..{backup_end}) is not within the disk's last MiB");
    }
    let off = (backup_start - vdisk.tail_start) as usize;
    let backup = vdisk.tail[off..off + (backup_end - backup_start) as usize].to_vec();
    fit_protective_mbr(vdisk.head, disk_size / ss);
    Ok(FittedGpt {
        backup_start,
        backup,
    })
}

/// A partition grown to the end of a disk: bytes `start..old_end` became
/// `start..new_end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Growth {
    pub number: u32,
    pub start: u64,
    pub old_end: u64,
    pub new_end: u64,
}

/// Where a grown partition ends: on a multiple of this, as partitioning
/// tools align, so that it stays a whole number of any file system's blocks.
pub const GROW_ALIGN: u64 = 1 << 20;

/// Grows partition `number` of the table in `head` (the disk's first bytes,
/// edited in place) to the end of a disk of `disk_size` bytes, rounded down
/// to [`GROW_ALIGN`]. GPT: the entry, both headers and their CRCs; the
/// backup table to write at the disk's end is returned. MBR: the size of a
/// primary entry, capped where 32-bit sector numbers end. `None` when the
/// partition already reaches that end (`head` is then unchanged). Refused
/// unless `number` is the partition that lies last on the disk.
pub fn grow_last(
    head: &mut [u8],
    table: &PartitionTable,
    number: u32,
    disk_size: u64,
) -> Result<Option<(Growth, Option<FittedGpt>)>> {
    let ss = table.sector_size;
    let Some(last) = table.partitions.last() else {
        bail!("the disk has no partitions");
    };
    if last.number != number {
        bail!(
            "partition {number} is not the last on the disk (partition {} lies after it): refusing to grow it",
            last.number
        );
    }
    let align = GROW_ALIGN.max(ss) / ss; // in sectors
    match table.kind {
        TableKind::Gpt => {
            let original = head.to_vec();
            let mut growth = None;
            let fitted = refit_gpt(head, disk_size, ss, |gpt| {
                let last_usable = gpt.header.last_usable_lba;
                if number == 0 || number > gpt.header.number_of_partition_entries {
                    bail!("GPT partition {number} does not exist");
                }
                let p = gpt[number].clone();
                if let Some((i, _)) = gpt
                    .iter()
                    .find(|(i, q)| *i != number && q.is_used() && q.starting_lba >= p.starting_lba)
                {
                    bail!(
                        "partition {number} is not the last on the disk (partition {i} lies after it): refusing to grow it"
                    );
                }
                let new_last = (last_usable + 1) / align * align - 1;
                if new_last > p.ending_lba {
                    growth = Some(Growth {
                        number,
                        start: p.starting_lba * ss,
                        old_end: (p.ending_lba + 1) * ss,
                        new_end: (new_last + 1) * ss,
                    });
                    gpt[number].ending_lba = new_last;
                }
                Ok(())
            })?;
            match growth {
                Some(g) => Ok(Some((g, Some(fitted)))),
                None => {
                    head.copy_from_slice(&original);
                    Ok(None)
                }
            }
        }
        TableKind::Mbr => {
            if last.ebr.is_some() || !(1..=4).contains(&number) {
                bail!(
                    "partition {number} is a logical partition: growing it would need its extended partition grown too, which is not done"
                );
            }
            let e = 446 + 16 * (number as usize - 1);
            let start = u64::from(u32::from_le_bytes(head[e + 8..e + 12].try_into()?));
            let old = u64::from(u32::from_le_bytes(head[e + 12..e + 16].try_into()?));
            // An MBR counts sectors in 32 bits: a partition ends by 2^32 - 1.
            let end = (disk_size / ss).min(u64::from(u32::MAX)) / align * align;
            if end <= start + old {
                return Ok(None);
            }
            let sectors = u32::try_from(end - start)?;
            head[e + 12..e + 16].copy_from_slice(&sectors.to_le_bytes());
            head[e + 5..e + 8].copy_from_slice(&chs(end - 1));
            Ok(Some((
                Growth {
                    number,
                    start: start * ss,
                    old_end: (start + old) * ss,
                    new_end: end * ss,
                },
                None,
            )))
        }
        TableKind::None => bail!("the disk has no partition table"),
    }
}

/// An MBR entry's cylinder-head-sector address of `lba` (255 heads, 63
/// sectors a track), or the "past 1024 cylinders" value tools write.
fn chs(lba: u64) -> [u8; 3] {
    let (c, h, s) = (lba / (255 * 63), (lba / 63) % 255, lba % 63 + 1);
    if c > 1023 {
        return [0xFE, 0xFF, 0xFF];
    }
    [h as u8, (s as u8) | (((c >> 8) as u8) << 6), c as u8]
}

/// A protective MBR (one 0xEE entry) covers the whole disk, capped at 2^32-1 sectors.
fn fit_protective_mbr(head: &mut [u8], sectors: u64) {
    if head.len() < 512 || head[510..512] != [0x55, 0xAA] {
        return;
    }
    let types: Vec<u8> = (0..4).map(|i| head[446 + 16 * i + 4]).collect();
    if types[0] != 0xEE || types[1..].iter().any(|&t| t != 0) {
        return; // a hybrid MBR is the admin's, not ours to change
    }
    let n = (sectors - 1).min(u64::from(u32::MAX)) as u32;
    head[446 + 12..446 + 16].copy_from_slice(&n.to_le_bytes());
}

/// A disk of `size` bytes of which only the head and the tail exist in memory.
struct VirtualDisk<'a> {
    head: &'a mut [u8],
    tail: Vec<u8>,
    tail_start: u64,
    size: u64,
    pos: u64,
}

impl VirtualDisk<'_> {
    fn area(&mut self, len: usize) -> io::Result<&mut [u8]> {
        let (pos, end) = (self.pos, self.pos + len as u64);
        if end <= self.head.len() as u64 {
            Ok(&mut self.head[pos as usize..end as usize])
        } else if pos >= self.tail_start && end <= self.size {
            let off = (pos - self.tail_start) as usize;
            Ok(&mut self.tail[off..off + len])
        } else {
            Err(io::Error::other(format!(
                "GPT access at byte {pos} is outside the boot area and the disk's last MiB"
            )))
        }
    }
}

impl Read for VirtualDisk<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len();
        buf.copy_from_slice(self.area(n)?);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for VirtualDisk<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.area(buf.len())?.copy_from_slice(buf);
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for VirtualDisk<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.pos = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        }
        .ok_or_else(|| io::Error::other("seek out of range"))?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1 MiB disk with gptman's GPT of one partition, its primary header
    /// then claiming `entries` entries (CRC made right), and the backup's
    /// signature wiped so that only the primary counts.
    fn gpt_disk(entries: u32) -> (File, u64) {
        gpt_disk_edited(|h, _| h[80..84].copy_from_slice(&entries.to_le_bytes()))
    }

    /// The same disk, its primary header (92 bytes) and entry array (128
    /// entries of 128 bytes at LBA 2) edited by `edit`, CRCs made right.
    fn gpt_disk_edited(edit: impl FnOnce(&mut [u8; 92], &mut [u8])) -> (File, u64) {
        let size = 1u64 << 20;
        let mut f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        let mut gpt = gptman::GPT::new_from(&mut f, 512, [7; 16]).unwrap();
        gpt[1] = gptman::GPTPartitionEntry {
            partition_type_guid: [1; 16],
            unique_partition_guid: [2; 16],
            starting_lba: 64,
            ending_lba: 127,
            attribute_bits: 0,
            partition_name: "p1".into(),
        };
        gpt.write_into(&mut f).unwrap();
        let mut h = [0u8; 92];
        let mut entries = vec![0u8; 128 * 128];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut h, 512).unwrap();
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut entries, 1024).unwrap();
        edit(&mut h, &mut entries);
        h[88..92].copy_from_slice(&crc32(&entries).to_le_bytes());
        h[16..20].fill(0);
        let crc = crc32(&h);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        std::os::unix::fs::FileExt::write_all_at(&f, &h, 512).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &entries, 1024).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0; 8], size - 512).unwrap();
        (f, size)
    }

    fn crc32(b: &[u8]) -> u32 {
        let mut c = !0u32;
        for &x in b {
            c ^= u32::from(x);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0xEDB8_8320
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    #[test]
    fn reads_a_gpt() {
        let (f, size) = gpt_disk(128);
        let t = read(&f, size, 512).unwrap();
        assert_eq!(t.kind, TableKind::Gpt);
        assert_eq!(t.partitions.len(), 1);
        assert_eq!(
            (t.partitions[0].start, t.partitions[0].size),
            (64 * 512, 64 * 512)
        );
    }

    #[test]
    fn a_gpt_of_billions_of_entries_is_an_error() {
        // Found by fuzzing (table): gptman reserved room for as many entries
        // as the header claims, and the process died on a failed allocation
        // of hundreds of GB (an abort no catch_unwind stops).
        for n in [u32::MAX, MAX_GPT_ENTRIES + 1] {
            let (f, size) = gpt_disk(n);
            let e = read(&f, size, 512).unwrap_err().to_string();
            assert!(
                e.contains(&format!("describes {n} partition entries")),
                "{e}"
            );
        }
    }

    #[test]
    fn a_gpt_partition_ending_past_2_to_the_64_is_an_error() {
        // Found by fuzzing (table): start and size, each in range, added up
        // past 2^64: a panic with overflow checks; without them a wrapped
        // end that could pass the check against the disk size.
        let (f, size) = gpt_disk_edited(|_, e| {
            let first = (1u64 << 55) - 1; // byte 2^64 - 512
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&(first + (1 << 54)).to_le_bytes());
        });
        let e = read(&f, size, 512).unwrap_err().to_string();
        assert!(e.contains("partition 1 ends at byte 2^64 or more"), "{e}");
    }

    /// A file of `size` bytes holding `bytes` at 0 and `tail` at `tail_at`.
    fn disk_file(size: u64, bytes: &[u8], tail: Option<(&[u8], u64)>) -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, bytes, 0).unwrap();
        if let Some((t, at)) = tail {
            std::os::unix::fs::FileExt::write_all_at(&f, t, at).unwrap();
        }
        f
    }

    #[test]
    fn grow_last_runs_a_gpt_partition_to_the_aligned_end_with_both_tables_valid() {
        let (f, size) = gpt_disk(128);
        let mut head = vec![0u8; size as usize];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0).unwrap();
        let t = read(&f, size, 512).unwrap();
        let big = 4u64 << 20;
        let (g, backup) = grow_last(&mut head, &t, 1, big).unwrap().unwrap();
        // 8192 sectors, 33 for the backup table: usable up to 8159, aligned down.
        assert_eq!(
            g,
            Growth {
                number: 1,
                start: 64 * 512,
                old_end: 128 * 512,
                new_end: 6144 * 512
            }
        );
        let b = backup.unwrap();
        assert_eq!(b.end(), big);
        let grown = disk_file(big, &head, Some((&b.backup, b.backup_start)));
        let t2 = read(&grown, big, 512).unwrap();
        assert_eq!(
            (t2.partitions[0].start, t2.partitions[0].end()),
            (64 * 512, 6144 * 512)
        );
        // The backup alone says the same (primary header wiped).
        let mut grown = grown;
        std::os::unix::fs::FileExt::write_all_at(&grown, &[0; 8], 512).unwrap();
        let gpt = gptman::GPT::read_from(&mut grown, 512).unwrap();
        assert_eq!(gpt.header.primary_lba, 8191, "read from the backup");
        assert_eq!((gpt[1].starting_lba, gpt[1].ending_lba), (64, 6143));
        // Grown again on the same disk: nothing to do, nothing changed.
        let before = head.clone();
        assert_eq!(
            grow_last(&mut head, &t2, 1, big).unwrap().map(|x| x.0),
            None
        );
        assert_eq!(head, before);
    }

    #[test]
    fn grow_last_refuses_a_partition_that_is_not_last() {
        let (f, size) = gpt_disk_edited(|_, e| {
            // A second entry, before the first on the disk.
            e[128..144].copy_from_slice(&[1; 16]);
            e[144..160].copy_from_slice(&[3; 16]);
            e[160..168].copy_from_slice(&34u64.to_le_bytes());
            e[168..176].copy_from_slice(&63u64.to_le_bytes());
        });
        let mut head = vec![0u8; size as usize];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0).unwrap();
        let t = read(&f, size, 512).unwrap();
        let e = grow_last(&mut head, &t, 2, 4 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("partition 2 is not the last on the disk (partition 1 lies after it)"),
            "{e}"
        );
    }

    #[test]
    fn grow_last_of_an_mbr_partition_stops_where_32_bit_sectors_end() {
        let mut s0 = vec![0u8; 512];
        s0[446 + 4] = 0x83;
        s0[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        s0[446 + 12..446 + 16].copy_from_slice(&2048u32.to_le_bytes());
        s0[510..].copy_from_slice(&[0x55, 0xAA]);
        let f = disk_file(4 << 20, &s0, None);
        let t = read(&f, 4 << 20, 512).unwrap();
        assert_eq!(t.kind, TableKind::Mbr);
        let mut head = s0.clone();
        let (g, backup) = grow_last(&mut head, &t, 1, 3 << 40).unwrap().unwrap();
        assert!(backup.is_none());
        let end = u64::from(u32::MAX) / 2048 * 2048;
        assert_eq!((g.start, g.new_end), (2048 * 512, end * 512));
        assert_eq!(
            head[446 + 12..446 + 16],
            ((end - 2048) as u32).to_le_bytes()
        );
        assert_eq!(head[446 + 5..446 + 8], [0xFE, 0xFF, 0xFF]);
        // A small disk: to its last MiB, CHS worked out.
        let mut head = s0.clone();
        let (g, _) = grow_last(&mut head, &t, 1, 8 << 20).unwrap().unwrap();
        assert_eq!(g.new_end, 8 << 20);
        assert_eq!(chs(16383), [5, 4, 1]);
        assert_eq!(chs(300 * 255 * 63), [0, 1 | (1 << 6), 44]);
    }
}
