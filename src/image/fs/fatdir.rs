//! Reading FAT directories in-process, to find files on an ESP without
//! mounting it (the deploy system has no vfat driver to trust, and a
//! hostile image must not reach the kernel's FAT code): long names, 8.3
//! names, cluster chains, each bounded.

use anyhow::{Result, bail, ensure};

use super::fat::{FatType, Layout, boot_sector, le16, le32, parse_bpb};
use crate::image::extent::DevSlice;

/// Largest directory read: 65536 entries of 32 bytes, the FAT limit.
const MAX_DIR: u64 = 65536 * 32;

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The long name where there is a valid one, else the 8.3 name in the
    /// case its Windows NT flags give (as Linux and Windows show it).
    pub name: String,
    /// The 8.3 name, as stored (upper case).
    pub short: String,
    pub is_dir: bool,
    pub size: u32,
    first_cluster: u32,
}

impl DirEntry {
    /// Whether `name` names this entry, as FAT compares: case-insensitively
    /// (ASCII), by its long or its short name.
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name) || self.short.eq_ignore_ascii_case(name)
    }
}

/// The entries of the directory at `path` ("\EFI\BOOT" or "/EFI/BOOT"; ""
/// is the root), or None if there is no such directory.
pub fn read_dir(dev: &DevSlice, path: &str) -> Result<Option<Vec<DirEntry>>> {
    let fs = Fs::open(dev)?;
    let mut entries = fs.root()?;
    for part in components(path) {
        let Some(d) = entries.iter().find(|e| e.is(part)) else {
            return Ok(None);
        };
        if !d.is_dir {
            return Ok(None);
        }
        entries = fs.dir(d.first_cluster)?;
    }
    Ok(Some(entries))
}

/// The file or directory at `path`, if there is one.
pub fn find(dev: &DevSlice, path: &str) -> Result<Option<DirEntry>> {
    let parts: Vec<&str> = components(path).collect();
    let Some((last, parent)) = parts.split_last() else {
        return Ok(None);
    };
    let parent = parent.join("/");
    Ok(read_dir(dev, &parent)?.and_then(|es| es.into_iter().find(|e| e.is(last))))
}

fn components(path: &str) -> impl Iterator<Item = &str> {
    path.split(['/', '\\']).filter(|p| !p.is_empty())
}

struct Fs<'d, 'f> {
    dev: &'d DevSlice<'f>,
    l: Layout,
}

impl Fs<'_, '_> {
    fn open<'d, 'f>(dev: &'d DevSlice<'f>) -> Result<Fs<'d, 'f>> {
        let l = parse_bpb(&boot_sector(dev)?)?;
        Ok(Fs { dev, l })
    }

    fn root(&self) -> Result<Vec<DirEntry>> {
        if self.l.ty == FatType::Fat32 {
            return self.dir(self.l.root_cluster);
        }
        let len = self.l.root_len.min(MAX_DIR) as usize;
        let bytes = self
            .dev
            .read_vec(self.l.data_start - self.l.root_len, len)?;
        Ok(parse_entries(&bytes, self.l.ty))
    }

    /// The directory whose first cluster is `first`, read along its chain.
    fn dir(&self, first: u32) -> Result<Vec<DirEntry>> {
        let mut bytes = Vec::new();
        let mut c = first;
        loop {
            ensure!(
                (2..self.l.clusters + 2).contains(&u64::from(c)),
                "directory cluster {c} is outside the file system (2..{})",
                self.l.clusters + 2
            );
            ensure!(
                (bytes.len() as u64) < MAX_DIR,
                "a directory is longer than {MAX_DIR} bytes (a loop in the FAT?)"
            );
            let at = self.l.data_start + u64::from(c - 2) * self.l.cluster_size;
            bytes.extend(self.dev.read_vec(at, self.l.cluster_size as usize)?);
            let next = self.next(c)?;
            if next >= self.l.ty.end_of_chain() {
                break;
            }
            c = next;
        }
        Ok(parse_entries(&bytes, self.l.ty))
    }

    /// The FAT entry of cluster `c` (checked in range by the caller).
    fn next(&self, c: u32) -> Result<u32> {
        let c = u64::from(c);
        let off = c * self.l.ty.bits() / 8;
        let width = if self.l.ty == FatType::Fat32 { 4 } else { 2 };
        if off + width > self.l.fat_len {
            bail!("cluster {c} has no FAT entry");
        }
        let b = self.dev.read_vec(self.l.fat_start + off, width as usize)?;
        Ok(match self.l.ty {
            FatType::Fat12 => {
                let w = le16(&b, 0) as u32;
                if c % 2 == 1 { w >> 4 } else { w & 0xFFF }
            }
            FatType::Fat16 => le16(&b, 0) as u32,
            FatType::Fat32 => le32(&b, 0) as u32 & 0x0FFF_FFFF,
        })
    }
}

/// Long-name pieces gathered before the 8.3 entry they belong to.
#[derive(Default)]
struct Lfn {
    parts: Vec<Option<[u16; 13]>>,
    checksum: u8,
}

fn parse_entries(bytes: &[u8], ty: FatType) -> Vec<DirEntry> {
    let mut out = Vec::new();
    let mut lfn = Lfn::default();
    for e in bytes.chunks_exact(32) {
        match e[0] {
            0 => break,
            0xE5 => {
                lfn = Lfn::default();
                continue;
            }
            _ => {}
        }
        let attr = e[11];
        if attr & 0x3F == 0x0F {
            add_lfn(&mut lfn, e);
            continue;
        }
        let long = std::mem::take(&mut lfn);
        if attr & 0x08 != 0 {
            continue; // the volume label
        }
        let short = short_name(e);
        if short == "." || short == ".." {
            continue;
        }
        let name = long_name(&long, checksum(&e[..11])).unwrap_or_else(|| nt_case(&short, e[12]));
        let hi = if ty == FatType::Fat32 {
            le16(e, 20) as u32
        } else {
            0
        };
        out.push(DirEntry {
            name,
            short,
            is_dir: attr & 0x10 != 0,
            size: le32(e, 28) as u32,
            first_cluster: hi << 16 | le16(e, 26) as u32,
        });
    }
    out
}

fn add_lfn(lfn: &mut Lfn, e: &[u8]) {
    let ord = usize::from(e[0] & 0x1F);
    if e[0] & 0x40 != 0 {
        // The last piece comes first and says how many there are.
        *lfn = Lfn {
            parts: vec![None; ord],
            checksum: e[13],
        };
    }
    if ord == 0 || ord > lfn.parts.len() || e[13] != lfn.checksum {
        *lfn = Lfn::default();
        return;
    }
    let mut chars = [0u16; 13];
    let spans = [(1, 5), (14, 6), (28, 2)];
    let mut k = 0;
    for (at, n) in spans {
        for i in 0..n {
            chars[k] = le16(e, at + 2 * i) as u16;
            k += 1;
        }
    }
    lfn.parts[ord - 1] = Some(chars);
}

fn long_name(lfn: &Lfn, sum: u8) -> Option<String> {
    if lfn.parts.is_empty() || lfn.checksum != sum {
        return None;
    }
    let mut units = Vec::with_capacity(13 * lfn.parts.len());
    for p in &lfn.parts {
        units.extend_from_slice(p.as_ref()?);
    }
    let end = units.iter().position(|&u| u == 0).unwrap_or(units.len());
    String::from_utf16(&units[..end]).ok()
}

fn short_name(e: &[u8]) -> String {
    let text = |b: &[u8]| -> String {
        let s: String = b.iter().map(|&c| char::from(c)).collect();
        s.trim_end_matches(' ').to_string()
    };
    let mut base = e[..8].to_vec();
    if base[0] == 0x05 {
        base[0] = 0xE5; // 0xE5 as a first byte, escaped
    }
    let (base, ext) = (text(&base), text(&e[8..11]));
    if ext.is_empty() {
        base
    } else {
        format!("{base}.{ext}")
    }
}

/// `short` with its base (flag 0x08) and extension (0x10) in lower case,
/// as mtools and Windows store names like "grubx64.efi" without a long name.
fn nt_case(short: &str, flags: u8) -> String {
    let (base, ext) = short.split_once('.').unwrap_or((short, ""));
    let case = |s: &str, lower: bool| {
        if lower {
            s.to_ascii_lowercase()
        } else {
            s.to_string()
        }
    };
    let base = case(base, flags & 0x08 != 0);
    if ext.is_empty() {
        base
    } else {
        format!("{base}.{}", case(ext, flags & 0x10 != 0))
    }
}

/// The 8.3 name's checksum that its long-name pieces carry.
fn checksum(name: &[u8]) -> u8 {
    name.iter()
        .fold(0u8, |s, &b| s.rotate_right(1).wrapping_add(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_and_checksum() {
        let mut e = [b' '; 32];
        e[..7].copy_from_slice(b"BOOTX64");
        e[8..11].copy_from_slice(b"EFI");
        assert_eq!(short_name(&e), "BOOTX64.EFI");
        // The checksum of "BOOTX64 EFI", by the FAT specification's loop.
        let mut sum = 0u8;
        for &b in &e[..11] {
            sum = (if sum & 1 != 0 { 0x80u8 } else { 0 })
                .wrapping_add(sum >> 1)
                .wrapping_add(b);
        }
        assert_eq!(checksum(&e[..11]), sum);
    }
}
