//! FAT12/16/32 used blocks: the reserved area, every FAT copy, the FAT12/16
//! root directory, and each cluster whose FAT entry is neither free nor bad.

use anyhow::{Context, Result, bail, ensure};

use crate::image::extent::{DevSlice, Extent, ExtentSet};

/// Bytes of FAT read at once: a multiple of 3 (FAT12 pairs) and of 4.
const CHUNK: usize = 3 << 19;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FatType {
    Fat12,
    Fat16,
    Fat32,
}

impl FatType {
    pub(super) fn bits(self) -> u64 {
        match self {
            FatType::Fat12 => 12,
            FatType::Fat16 => 16,
            FatType::Fat32 => 32,
        }
    }
    /// Entries at or above this end a cluster chain.
    pub(super) fn end_of_chain(self) -> u32 {
        match self {
            FatType::Fat12 => 0xFF8,
            FatType::Fat16 => 0xFFF8,
            FatType::Fat32 => 0x0FFF_FFF8,
        }
    }
    fn bad(self) -> u32 {
        match self {
            FatType::Fat12 => 0xFF7,
            FatType::Fat16 => 0xFFF7,
            FatType::Fat32 => 0x0FFF_FFF7,
        }
    }
}

/// The geometry the boot sector describes, all in bytes except `clusters`.
#[derive(Debug)]
pub(super) struct Layout {
    pub(super) ty: FatType,
    pub(super) fat_start: u64,
    pub(super) fat_len: u64,
    /// The FAT12/16 root directory: its bytes just before `data_start`.
    pub(super) root_len: u64,
    /// The FAT32 root directory's first cluster.
    pub(super) root_cluster: u32,
    pub(super) data_start: u64,
    pub(super) cluster_size: u64,
    pub(super) clusters: u64,
    fs_len: u64,
}

pub(super) fn le16(b: &[u8], o: usize) -> u64 {
    u16::from_le_bytes([b[o], b[o + 1]]).into()
}

pub(super) fn le32(b: &[u8], o: usize) -> u64 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]).into()
}

/// Validates the BPB and derives the layout.
pub(super) fn parse_bpb(bs: &[u8; 512]) -> Result<Layout> {
    ensure!(bs[510..512] == [0x55, 0xAA], "no 0x55AA boot signature");
    let bps = le16(bs, 11);
    ensure!(
        bps.is_power_of_two() && (512..=4096).contains(&bps),
        "bytes per sector {bps} is not a power of two in 512..4096"
    );
    let spc = u64::from(bs[13]);
    ensure!(
        spc.is_power_of_two(),
        "sectors per cluster {spc} is not a power of two"
    );
    let reserved = le16(bs, 14);
    ensure!(reserved > 0, "reserved sector count is 0");
    let fats = u64::from(bs[16]);
    ensure!((1..=4).contains(&fats), "FAT count {fats} is not 1..4");
    let root_entries = le16(bs, 17);
    let fat_sz16 = le16(bs, 22);
    let fat_sz = if fat_sz16 != 0 {
        fat_sz16
    } else {
        le32(bs, 36)
    };
    ensure!(fat_sz > 0, "FAT size is 0 sectors");
    let total = match le16(bs, 19) {
        0 => le32(bs, 32),
        n => n,
    };
    // All products below are < 2^32 * 4 * 4096, far from overflow.
    let root_sectors = (root_entries * 32).div_ceil(bps);
    let meta = reserved + fats * fat_sz + root_sectors;
    let Some(data_sectors) = total.checked_sub(meta) else {
        bail!("{total} total sectors cannot hold {meta} sectors of reserved area, FATs and root");
    };
    let clusters = data_sectors / spc;
    ensure!(clusters > 0, "no data clusters");
    // FAT32 by the BPB's shape, as Linux and UEFI firmware read it: small
    // FAT32 ESPs (under 65525 clusters) are common. Else by cluster count.
    let ty = if fat_sz16 == 0 && root_entries == 0 {
        FatType::Fat32
    } else if clusters < 4085 {
        FatType::Fat12
    } else {
        FatType::Fat16
    };
    let fat_len = fat_sz * bps;
    let need = (clusters + 2) * ty.bits();
    ensure!(
        fat_len * 8 >= need,
        "FAT of {fat_len} bytes is too small for {clusters} clusters"
    );
    Ok(Layout {
        ty,
        fat_start: reserved * bps,
        fat_len,
        root_len: root_sectors * bps,
        root_cluster: le32(bs, 44) as u32,
        data_start: meta * bps,
        cluster_size: spc * bps,
        clusters,
        fs_len: total * bps,
    })
}

pub(super) fn boot_sector(dev: &DevSlice) -> Result<[u8; 512]> {
    let mut bs = [0u8; 512];
    dev.read_at(0, &mut bs)
        .context("reading the FAT boot sector")?;
    Ok(bs)
}

/// Whether `dev` holds a FAT file system: a boot sector that names itself
/// FAT (then a bad BPB is an error, not "unknown"), or a consistent BPB.
pub fn probe(dev: &DevSlice) -> Result<bool> {
    if dev.len() < 512 {
        return Ok(false);
    }
    let bs = boot_sector(dev)?;
    let named =
        bs[510..512] == [0x55, 0xAA] && (bs[0x36..0x39] == *b"FAT" || bs[0x52..0x57] == *b"FAT32");
    Ok(named || parse_bpb(&bs).is_ok())
}

/// Used extents, relative to the start of `dev`.
pub fn used_extents(dev: &DevSlice) -> Result<Vec<Extent>> {
    let l = parse_bpb(&boot_sector(dev)?).context("invalid FAT boot sector")?;
    ensure!(
        l.fs_len <= dev.len(),
        "FAT file system is {} bytes but its region has only {} (truncated?)",
        l.fs_len,
        dev.len()
    );
    let mut set = ExtentSet::new();
    // Boot sector, FSInfo, backup boot sector, FAT copies and root directory.
    set.push(0, l.data_start);

    let total = l.clusters + 2; // entries 0 and 1 are reserved
    let per_chunk = CHUNK as u64 * 8 / l.ty.bits();
    let mut buf = vec![0u8; CHUNK.min((total * l.ty.bits()).div_ceil(8) as usize)];
    let mut run: Option<(u64, u64)> = None; // (first cluster, count)
    let mut first = 0u64;
    while first < total {
        let n = per_chunk.min(total - first);
        let off = first * l.ty.bits() / 8;
        let len = (n * l.ty.bits()).div_ceil(8) as usize;
        let b = &mut buf[..len];
        dev.read_at(l.fat_start + off, b).with_context(|| {
            format!(
                "reading the FAT ({} bytes at {}) at byte {off}",
                l.fat_len, l.fat_start
            )
        })?;
        for j in 0..n as usize {
            let c = first + j as u64;
            if c < 2 {
                continue;
            }
            let v = match l.ty {
                FatType::Fat12 => {
                    let o = j * 3 / 2;
                    let w = u32::from(u16::from_le_bytes([b[o], b[o + 1]]));
                    if j % 2 == 1 { w >> 4 } else { w & 0xFFF }
                }
                FatType::Fat16 => u32::from(u16::from_le_bytes([b[2 * j], b[2 * j + 1]])),
                FatType::Fat32 => {
                    let o = 4 * j;
                    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) & 0x0FFF_FFFF
                }
            };
            if v != 0 && v != l.ty.bad() {
                match &mut run {
                    Some((s, k)) if *s + *k == c => *k += 1,
                    _ => {
                        flush(&mut set, &l, run);
                        run = Some((c, 1));
                    }
                }
            }
        }
        first += n;
    }
    flush(&mut set, &l, run);
    Ok(set.into_vec())
}

/// Adds a run of clusters as bytes; cluster n is at data_start + (n-2)*size.
fn flush(set: &mut ExtentSet, l: &Layout, run: Option<(u64, u64)>) {
    if let Some((c, k)) = run {
        // In range: c + k <= clusters + 2 and the data area fits in fs_len.
        set.push(l.data_start + (c - 2) * l.cluster_size, k * l.cluster_size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fat16_bs() -> [u8; 512] {
        let mut b = [0u8; 512];
        b[11..13].copy_from_slice(&512u16.to_le_bytes());
        b[13] = 4;
        b[14] = 1;
        b[16] = 2;
        b[17..19].copy_from_slice(&512u16.to_le_bytes());
        b[19..21].copy_from_slice(&40000u16.to_le_bytes());
        b[22..24].copy_from_slice(&40u16.to_le_bytes());
        b[510] = 0x55;
        b[511] = 0xAA;
        b
    }

    #[test]
    fn bpb_rules() {
        let l = parse_bpb(&fat16_bs()).unwrap();
        assert_eq!(l.ty, FatType::Fat16);
        assert_eq!(l.data_start, (1 + 80 + 32) * 512);
        for (at, v) in [(13, 0u8), (13, 3), (16, 0), (16, 5), (12, 3), (510, 0)] {
            let mut b = fat16_bs();
            b[at] = v;
            assert!(parse_bpb(&b).is_err(), "byte {at} = {v}");
        }
        let mut b = fat16_bs();
        b[19..21].copy_from_slice(&100u16.to_le_bytes());
        assert!(parse_bpb(&b).is_err(), "total smaller than metadata");
    }
}
