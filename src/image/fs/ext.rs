//! ext2/ext3/ext4 used blocks, from the block bitmap of each block group.
//!
//! The result matches what libext2fs (and so partclone) reports: the set bits
//! of every group's block bitmap. A BLOCK_UNINIT group (trusted only with group
//! descriptor checksums) has no bitmap on disk; its used blocks are its
//! superblock backup and descriptor blocks plus its own bitmaps and inode table,
//! wherever flex_bg put them. Block 0 (the boot area) always counts as used.
//!
//! Everything read from disk is checked before use: a corrupt file system gives
//! an error naming the bad field, never a panic or a read outside the region.

use anyhow::{Context, Result, bail, ensure};

use crate::image::extent::{DevSlice, Extent, ExtentSet};

const SB_OFF: u64 = 1024;
const SB_LEN: usize = 1024;
const MAGIC: u16 = 0xEF53;

const COMPAT_SPARSE_SUPER2: u32 = 0x200;
/// The journal holds transactions not yet replayed.
pub const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_64BIT: u32 = 0x80;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_GDT_CSUM: u32 = 0x10;
const RO_COMPAT_BIGALLOC: u32 = 0x200;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
const BG_BLOCK_UNINIT: u16 = 0x2;

/// Most bytes read at once, for descriptors or bitmaps (also bounds memory).
const READ_CAP: u64 = 1 << 20;

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Whether `dev` holds an ext2/3/4 superblock.
pub fn probe(dev: &DevSlice) -> Result<bool> {
    if dev.len() < SB_OFF + SB_LEN as u64 {
        return Ok(false);
    }
    let sb = dev
        .read_vec(SB_OFF, SB_LEN)
        .context("ext: reading the superblock")?;
    // Revision 0 or 1 (dynamic): anything else is not a real superblock.
    Ok(le16(&sb, 0x38) == MAGIC && le32(&sb, 0x4C) <= 1)
}

/// The superblock's incompatible feature flags.
pub fn incompat_features(dev: &DevSlice) -> Result<u32> {
    let sb = dev
        .read_vec(SB_OFF, SB_LEN)
        .context("ext: reading the superblock")?;
    Ok(le32(&sb, 0x60))
}

/// Used extents, relative to the start of `dev`: sorted and merged.
pub fn used_extents(dev: &DevSlice) -> Result<Vec<Extent>> {
    let sb = dev
        .read_vec(SB_OFF, SB_LEN)
        .context("ext: reading the superblock")?;
    let fs = Layout::parse(&sb, dev.len())?;
    let bs = fs.bs;
    if fs.journal_dev {
        // An external journal has no groups: all of it is in use.
        return Ok(vec![Extent::new(0, fs.blocks * bs)]);
    }
    let mut used = ExtentSet::new();
    used.push(0, (fs.first_data + 1) * bs);
    // Metadata of BLOCK_UNINIT groups: group-local blocks, block bitmaps,
    // inode bitmaps, inode tables. Separate sets keep each one ascending.
    let mut uninit: [ExtentSet; 4] = Default::default();
    let per_read = (READ_CAP / bs).max(1);
    let (mut dbuf, mut bbuf) = (Vec::new(), Vec::new());

    let mut b0 = 0;
    while b0 < fs.desc_blocks {
        let b1 = (b0 + per_read).min(fs.desc_blocks);
        let locs = (b0..b1)
            .map(|b| Ok((b, fs.desc_block_loc(b)?)))
            .collect::<Result<Vec<_>>>()?;
        read_blocks(dev, bs, &locs, &mut dbuf, "group descriptor block")?;
        let g0 = b0 * fs.desc_per_block;
        let g1 = (b1 * fs.desc_per_block).min(fs.groups);
        let descs = (g0..g1)
            .zip(dbuf.chunks_exact(fs.desc_size))
            .map(|(g, raw)| fs.desc(g, raw))
            .collect::<Result<Vec<_>>>()?;

        for (c, chunk) in descs.chunks(per_read as usize).enumerate() {
            let gc = g0 + c as u64 * per_read;
            let need: Vec<(u64, u64)> = (gc..)
                .zip(chunk)
                .filter(|(_, d)| !d.skip_bitmap)
                .map(|(g, d)| (g, d.bb))
                .collect();
            read_blocks(dev, bs, &need, &mut bbuf, "the block bitmap of group")?;
            let mut maps = bbuf.chunks_exact(bs as usize);
            for (g, d) in (gc..).zip(chunk) {
                if d.uninit {
                    fs.mark_uninit(g, d, &mut uninit);
                }
                if !d.skip_bitmap
                    && let Some(map) = maps.next()
                {
                    let first = fs.group_first(g);
                    let n = fs.bpg.min(fs.blocks - first);
                    bit_runs(map, n, |s, len| used.push((first + s) * bs, len * bs));
                }
            }
        }
        b0 = b1;
    }
    for e in uninit.into_iter().flat_map(ExtentSet::into_vec) {
        used.push(e.start, e.len);
    }
    Ok(used.into_vec())
}

/// Reads the blocks of `(id, block)` entries into `buf`, one per entry, with
/// one read per run of consecutive blocks; `what` and `id` name them in errors.
fn read_blocks(
    dev: &DevSlice,
    bs: u64,
    locs: &[(u64, u64)],
    buf: &mut Vec<u8>,
    what: &str,
) -> Result<()> {
    let bsz = bs as usize;
    buf.resize(locs.len() * bsz, 0);
    let mut i = 0;
    while i < locs.len() {
        let (id, at) = locs[i];
        let mut j = i + 1;
        while j < locs.len() && locs[j].1 == locs[j - 1].1 + 1 {
            j += 1;
        }
        dev.read_at(at * bs, &mut buf[i * bsz..j * bsz])
            .with_context(|| format!("ext: reading {what} {id} at block {at}"))?;
        i = j;
    }
    Ok(())
}

/// Calls `f(first, count)` for each run of set bits among the first `nbits`
/// bits of `map` (bit 0 is the low bit of byte 0).
fn bit_runs(map: &[u8], nbits: u64, mut f: impl FnMut(u64, u64)) {
    let nbits = nbits.min(map.len() as u64 * 8);
    let mut start = None;
    for (k, chunk) in map.chunks(8).enumerate() {
        let base = k as u64 * 64;
        if base >= nbits {
            break;
        }
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        let mut word = u64::from_le_bytes(w);
        if nbits - base < 64 {
            word &= (1u64 << (nbits - base)) - 1;
        }
        let mut b = 0u32;
        while b < 64 {
            let rest = word >> b;
            match start {
                None if rest == 0 => break,
                None => {
                    b += rest.trailing_zeros();
                    start = Some(base + u64::from(b));
                }
                Some(s) => {
                    let ones = rest.trailing_ones();
                    if b + ones == 64 {
                        break;
                    }
                    b += ones;
                    f(s, base + u64::from(b) - s);
                    start = None;
                }
            }
        }
    }
    if let Some(s) = start {
        f(s, nbits - s);
    }
}

/// One group descriptor: where its metadata lives.
struct Desc {
    bb: u64,
    ib: u64,
    it: u64,
    uninit: bool,
    /// BLOCK_UNINIT and checksummed: the on-disk bitmap is not used.
    skip_bitmap: bool,
}

/// The geometry of a file system, validated.
#[derive(Default)]
struct Layout {
    bs: u64,
    blocks: u64,
    first_data: u64,
    bpg: u64,
    groups: u64,
    desc_size: usize,
    desc_per_block: u64,
    desc_blocks: u64,
    /// Inode table blocks per group.
    itb: u64,
    meta_bg: bool,
    first_meta_bg: u64,
    reserved_gdt: u64,
    sparse_super: bool,
    backup_bgs: Option<[u64; 2]>,
    csum: bool,
    journal_dev: bool,
}

impl Layout {
    fn parse(sb: &[u8], dev_len: u64) -> Result<Layout> {
        ensure!(le16(sb, 0x38) == MAGIC, "ext: no superblock magic");
        let log = le32(sb, 0x18);
        ensure!(
            log <= 6,
            "ext: block size 2^(10+{log}) is not 1 KiB..64 KiB"
        );
        let bs = 1024u64 << log;
        let (compat, incompat, ro) = (le32(sb, 0x5C), le32(sb, 0x60), le32(sb, 0x64));
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let hi = if is64 { u64::from(le32(sb, 0x150)) } else { 0 };
        let blocks = u64::from(le32(sb, 0x4)) | hi << 32;
        if blocks.checked_mul(bs).is_none_or(|size| size > dev_len) {
            bail!(
                "ext: the file system has {blocks} blocks of {bs} bytes but its region is only \
                 {dev_len} bytes (truncated image?)"
            );
        }
        if incompat & INCOMPAT_JOURNAL_DEV != 0 {
            // All of it is in use, and an image has no empty extents.
            ensure!(blocks > 0, "ext: the external journal device has no blocks");
            let journal_dev = true;
            return Ok(Layout {
                bs,
                blocks,
                journal_dev,
                ..Default::default()
            });
        }
        ensure!(
            incompat & INCOMPAT_RECOVER == 0,
            "ext: the journal needs recovery (not cleanly unmounted): run e2fsck first"
        );
        ensure!(
            ro & RO_COMPAT_BIGALLOC == 0,
            "ext: bigalloc is not supported"
        );

        let first_data = u64::from(le32(sb, 0x14));
        let want = u64::from(bs == 1024);
        ensure!(
            first_data == want,
            "ext: first data block is {first_data}, not {want} as {bs}-byte blocks require"
        );
        ensure!(
            blocks > first_data + 1,
            "ext: block count {blocks} is too small"
        );
        let bpg = u64::from(le32(sb, 0x20));
        ensure!(
            (1..=8 * bs).contains(&bpg),
            "ext: {bpg} blocks per group is not in 1..={}",
            8 * bs
        );
        let ipg = u64::from(le32(sb, 0x28));
        ensure!(
            (1..=8 * bs).contains(&ipg),
            "ext: {ipg} inodes per group is not in 1..={}",
            8 * bs
        );
        let isz = if le32(sb, 0x4C) == 0 {
            128
        } else {
            u64::from(le16(sb, 0x58))
        };
        ensure!(
            isz.is_power_of_two() && (128..=bs).contains(&isz),
            "ext: inode size {isz} is not a power of two in 128..={bs}"
        );
        let desc_size = if is64 { u64::from(le16(sb, 0xFE)) } else { 32 };
        ensure!(
            desc_size.is_power_of_two() && (32..=1024).contains(&desc_size),
            "ext: group descriptor size {desc_size} is not a power of two in 32..=1024"
        );
        let groups = (blocks - first_data).div_ceil(bpg);
        ensure!(groups <= 1 << 32, "ext: {groups} block groups is too many");
        let inodes = u64::from(le32(sb, 0x0));
        ensure!(
            groups * ipg == inodes,
            "ext: {groups} groups of {ipg} inodes do not make the {inodes} inodes counted"
        );
        let desc_per_block = bs / desc_size;
        let desc_blocks = groups.div_ceil(desc_per_block);
        let meta_bg = incompat & INCOMPAT_META_BG != 0;
        let first_meta_bg = if meta_bg {
            u64::from(le32(sb, 0x104))
        } else {
            0
        };
        ensure!(
            first_meta_bg <= desc_blocks,
            "ext: first meta block group {first_meta_bg} is past the {desc_blocks} descriptor blocks"
        );
        // Descriptor blocks that follow the primary superblock.
        let primary = if meta_bg { first_meta_bg } else { desc_blocks };
        ensure!(
            first_data + 1 + primary <= blocks,
            "ext: {primary} group descriptor blocks do not fit in {blocks} blocks"
        );
        let backup_bgs = (compat & COMPAT_SPARSE_SUPER2 != 0)
            .then(|| [le32(sb, 0x24C), le32(sb, 0x250)].map(u64::from));
        Ok(Layout {
            bs,
            blocks,
            first_data,
            bpg,
            groups,
            desc_size: desc_size as usize,
            desc_per_block,
            desc_blocks,
            itb: (ipg * isz).div_ceil(bs),
            meta_bg,
            first_meta_bg,
            reserved_gdt: u64::from(le16(sb, 0xCE)),
            sparse_super: ro & RO_COMPAT_SPARSE_SUPER != 0,
            backup_bgs,
            csum: ro & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM) != 0,
            journal_dev: false,
        })
    }

    /// First block of group `g` (`g < groups`, so no overflow).
    fn group_first(&self, g: u64) -> u64 {
        self.first_data + g * self.bpg
    }

    /// Whether group `g` holds a superblock (primary or backup).
    fn has_super(&self, g: u64) -> bool {
        let power_of = |mut n: u64, b: u64| {
            while n > 1 && n.is_multiple_of(b) {
                n /= b;
            }
            n == 1
        };
        match self.backup_bgs {
            _ if g == 0 => true,
            Some(bk) => bk.contains(&g),
            None if g == 1 || !self.sparse_super => true,
            None => g % 2 == 1 && (power_of(g, 3) || power_of(g, 5) || power_of(g, 7)),
        }
    }

    /// Where descriptor block `b` lives: after the primary superblock, or
    /// with meta_bg at the start of its own meta group.
    fn desc_block_loc(&self, b: u64) -> Result<u64> {
        if !self.meta_bg || b < self.first_meta_bg {
            return Ok(self.first_data + 1 + b);
        }
        let g = b * self.desc_per_block;
        let loc = self.group_first(g) + u64::from(self.has_super(g));
        ensure!(
            loc < self.blocks,
            "ext: descriptor block {b} at block {loc} is past the end of the file system"
        );
        Ok(loc)
    }

    /// Parses and checks the descriptor of group `g`.
    fn desc(&self, g: u64, raw: &[u8]) -> Result<Desc> {
        let addr = |lo: usize| {
            let hi = if self.desc_size >= 64 {
                u64::from(le32(raw, lo + 0x20))
            } else {
                0
            };
            u64::from(le32(raw, lo)) | hi << 32
        };
        let (bb, ib, it) = (addr(0), addr(4), addr(8));
        for (what, at, len) in [
            ("block bitmap", bb, 1),
            ("inode bitmap", ib, 1),
            ("inode table", it, self.itb),
        ] {
            if at <= self.first_data || at.checked_add(len).is_none_or(|end| end > self.blocks) {
                bail!(
                    "ext: block group {g} descriptor: {what} at block {at} is outside the file \
                     system (blocks {}..{})",
                    self.first_data + 1,
                    self.blocks
                );
            }
        }
        let uninit = le16(raw, 0x12) & BG_BLOCK_UNINIT != 0;
        Ok(Desc {
            bb,
            ib,
            it,
            uninit,
            skip_bitmap: uninit && self.csum,
        })
    }

    /// Marks what libext2fs marks for a BLOCK_UNINIT group: its superblock
    /// and descriptor blocks, its bitmaps and its inode table.
    fn mark_uninit(&self, g: u64, d: &Desc, sets: &mut [ExtentSet; 4]) {
        let mut mark = |set: usize, blk: u64, n: u64| {
            let n = n.min(self.blocks.saturating_sub(blk));
            sets[set].push(blk * self.bs, n * self.bs);
        };
        let first = self.group_first(g);
        let has = self.has_super(g);
        if !self.meta_bg || g / self.desc_per_block < self.first_meta_bg {
            let old_desc = if self.meta_bg {
                self.first_meta_bg
            } else {
                self.desc_blocks + self.reserved_gdt
            };
            if has {
                mark(0, first, 1 + old_desc);
            }
        } else {
            if has {
                mark(0, first, 1);
            }
            let r = g % self.desc_per_block;
            if r == 0 || r == 1 || r == self.desc_per_block - 1 {
                mark(0, first + u64::from(has), 1);
            }
        }
        mark(1, d.bb, 1);
        mark(2, d.ib, 1);
        mark(3, d.it, self.itb);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(map: &[u8], nbits: u64) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        bit_runs(map, nbits, |s, n| v.push((s, n)));
        v
    }

    #[test]
    fn bit_runs_edges() {
        let mut m = [0u8; 24];
        m[0] = 0b1000_0110;
        m[7] = 0x80; // bit 63, continuing into the next word
        m[8..16].fill(0xFF);
        m[16] = 0x01;
        m[23] = 0xFF;
        assert_eq!(runs(&m, 192), vec![(1, 2), (7, 1), (63, 66), (184, 8)]);
        // Bits past nbits are ignored, even in the middle of a run.
        assert_eq!(runs(&m, 100), vec![(1, 2), (7, 1), (63, 37)]);
        assert_eq!(runs(&[0xFF; 4], 64), vec![(0, 32)]);
        assert!(runs(&[0; 16], 128).is_empty());
    }

    /// A superblock alone, as a 2 KiB device.
    fn sb_dev(fields: &[(usize, u32)]) -> std::fs::File {
        let mut img = vec![0u8; 2048];
        img[1024 + 0x38..1024 + 0x3A].copy_from_slice(&MAGIC.to_le_bytes());
        for &(off, v) in fields {
            img[1024 + off..1024 + off + 4].copy_from_slice(&v.to_le_bytes());
        }
        let f = tempfile::tempfile().unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &img, 0).unwrap();
        f
    }

    #[test]
    fn empty_journal_device_is_an_error() {
        // Found by fuzzing (fs_ext): a journal device of 0 blocks mapped to
        // one empty extent, which no manifest accepts.
        let f = sb_dev(&[(0x4, 0), (0x60, INCOMPAT_JOURNAL_DEV)]);
        let e = used_extents(&DevSlice::new(&f, 0, 2048)).unwrap_err();
        assert!(e.to_string().contains("no blocks"), "{e}");
        let f = sb_dev(&[(0x4, 2), (0x60, INCOMPAT_JOURNAL_DEV)]);
        let v = used_extents(&DevSlice::new(&f, 0, 2048)).unwrap();
        assert_eq!(v, vec![Extent::new(0, 2048)]);
    }

    #[test]
    fn sparse_super_groups() {
        let fs = Layout {
            sparse_super: true,
            ..Default::default()
        };
        let got: Vec<u64> = (0..100).filter(|&g| fs.has_super(g)).collect();
        assert_eq!(got, vec![0, 1, 3, 5, 7, 9, 25, 27, 49, 81]);
        let fs = Layout {
            backup_bgs: Some([1, 40]),
            ..Default::default()
        };
        let got: Vec<u64> = (0..100).filter(|&g| fs.has_super(g)).collect();
        assert_eq!(got, vec![0, 1, 40]);
    }
}
