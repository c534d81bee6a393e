//! NTFS used blocks: the clusters set in $Bitmap (MFT record 6), plus the
//! backup boot sector, which sits just past the last cluster.

use std::panic::{AssertUnwindSafe, catch_unwind};

use ::ntfs::{Ntfs, NtfsReadSeek};
use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::image::extent::{DevSlice, Extent, ExtentSet};

/// MFT record number of $Bitmap.
const BITMAP_RECORD: u64 = 6;
/// Bytes of $Bitmap read at once (a multiple of 8).
const CHUNK: usize = 1 << 20;

/// The boot sector fields we rely on.
#[derive(Debug)]
struct Bpb {
    sector_size: u64,
    cluster_size: u64,
    total_sectors: u64,
    clusters: u64,
}

fn parse_bpb(bs: &[u8; 512]) -> Result<Bpb> {
    ensure!(&bs[3..11] == b"NTFS    ", "no \"NTFS    \" OEM id");
    ensure!(bs[510..512] == [0x55, 0xAA], "no 0x55AA boot signature");
    let sector_size = u64::from(u16::from_le_bytes([bs[11], bs[12]]));
    ensure!(
        sector_size.is_power_of_two() && (256..=4096).contains(&sector_size),
        "bytes per sector {sector_size} is not a power of two in 256..4096"
    );
    // 1..128 sectors as is; above 128 the byte is a negated power of two.
    let spc = match bs[13] {
        n @ 1..=128 if n.is_power_of_two() => u64::from(n),
        n @ 244..=255 => 1u64 << (256 - u32::from(n)),
        n => bail!("invalid sectors per cluster byte {n:#x}"),
    };
    let cluster_size = spc * sector_size;
    ensure!(
        cluster_size <= 2 << 20,
        "cluster size {cluster_size} exceeds 2 MiB"
    );
    let mut t = [0u8; 8];
    t.copy_from_slice(&bs[0x28..0x30]);
    let total_sectors = u64::from_le_bytes(t);
    ensure!(total_sectors > 0, "total sector count is 0");
    t.copy_from_slice(&bs[0x30..0x38]);
    let mft_lcn = u64::from_le_bytes(t);
    // MFT record size: clusters if positive, else 2^-n bytes.
    let rec = match bs[0x40] as i8 {
        n @ 1..=4 => u64::from(n as u8) * cluster_size,
        n @ -12..=-10 => 1 << n.unsigned_abs(),
        n => bail!("invalid MFT record size byte {n:#x}"),
    };
    ensure!(
        (1024..=4096).contains(&rec),
        "MFT record size {rec} is not 1024..4096"
    );
    let clusters = total_sectors / spc;
    ensure!(
        mft_lcn > 0 && mft_lcn < clusters,
        "MFT cluster {mft_lcn} lies outside the volume's {clusters} clusters"
    );
    Ok(Bpb {
        sector_size,
        cluster_size,
        total_sectors,
        clusters,
    })
}

fn boot_sector(dev: &DevSlice) -> Result<[u8; 512]> {
    let mut bs = [0u8; 512];
    dev.read_at(0, &mut bs)
        .context("reading the NTFS boot sector")?;
    Ok(bs)
}

/// Refuses a boot sector the NTFS parser must not be given.
pub fn check_bpb(dev: &DevSlice) -> Result<()> {
    parse_bpb(&boot_sector(dev)?).context("invalid NTFS boot sector")?;
    Ok(())
}

/// Whether `dev` starts with an NTFS boot sector with a sane BPB.
pub fn probe(dev: &DevSlice) -> Result<bool> {
    if dev.len() < 512 {
        return Ok(false);
    }
    Ok(parse_bpb(&boot_sector(dev)?).is_ok())
}

/// Used extents, relative to the start of `dev`.
pub fn used_extents(dev: &DevSlice) -> Result<Vec<Extent>> {
    let bpb = parse_bpb(&boot_sector(dev)?).context("invalid NTFS boot sector")?;
    // clusters * cluster_size <= vol_len, so only vol_len can overflow.
    let vol_len = bpb
        .total_sectors
        .checked_mul(bpb.sector_size)
        .context("NTFS volume size overflows")?;
    let clu_len = bpb.clusters * bpb.cluster_size;
    ensure!(
        clu_len <= dev.len(),
        "NTFS volume has {clu_len} bytes of clusters but its region has only {} (truncated?)",
        dev.len()
    );
    let mut set = ExtentSet::new();
    // The ntfs crate is not ours: turn a panic on hostile input into an error.
    catch_unwind(AssertUnwindSafe(|| bitmap_runs(dev, &bpb, &mut set)))
        .map_err(|_| anyhow!("NTFS parser panicked on a corrupt MFT or $Bitmap"))??;
    set.push(0, bpb.sector_size);
    // Backup boot sector: the sector after the last one the BPB counts.
    match vol_len.checked_add(bpb.sector_size) {
        Some(end) if end <= dev.len() => set.push(vol_len, bpb.sector_size),
        _ => tracing::warn!(
            "NTFS backup boot sector at byte {vol_len} is past the region end {}",
            dev.len()
        ),
    }
    Ok(set.into_vec())
}

/// Reads $Bitmap through the MFT and adds one extent per run of set bits.
fn bitmap_runs(dev: &DevSlice, bpb: &Bpb, set: &mut ExtentSet) -> Result<()> {
    let mut r = dev.reader();
    let fs = Ntfs::new(&mut r).context("opening the NTFS volume")?;
    let mft = fs.mft_position().value().map_or(0, |v| v.get());
    let file = fs.file(&mut r, BITMAP_RECORD).with_context(|| {
        format!("reading MFT record {BITMAP_RECORD} ($Bitmap) from the MFT at byte {mft}")
    })?;
    let name = match file.name(&mut r, None, None) {
        Some(n) => n
            .context("reading the name of MFT record 6")?
            .name()
            .to_string_lossy(),
        None => String::new(),
    };
    ensure!(
        name == "$Bitmap",
        "MFT record 6 is {name:?}, not $Bitmap: corrupt MFT at byte {mft}"
    );
    let item = file
        .data(&mut r, "")
        .context("$Bitmap (MFT record 6) has no $DATA attribute")?
        .context("reading the $DATA attribute of $Bitmap")?;
    let attr = item
        .to_attribute()
        .context("reading the $DATA attribute of $Bitmap")?;
    let mut value = attr
        .value(&mut r)
        .context("reading the $DATA value of $Bitmap")?;
    let need = bpb.clusters.div_ceil(8);
    ensure!(
        value.len() >= need,
        "$Bitmap holds {} bytes, fewer than the {need} that {} clusters need",
        value.len(),
        bpb.clusters
    );

    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64; // bytes of $Bitmap processed
    while done < need {
        let len = (need - done).min(CHUNK as u64) as usize;
        let b = &mut buf[..len];
        let mut got = 0;
        while got < len {
            let n = value
                .read(&mut r, &mut b[got..])
                .with_context(|| format!("reading $Bitmap at byte {}", done + got as u64))?;
            ensure!(n > 0, "$Bitmap ends early at byte {}", done + got as u64);
            got += n;
        }
        for (i, w) in b.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..w.len()].copy_from_slice(w);
            let base = (done + i as u64 * 8) * 8;
            let mut word = u64::from_le_bytes(word);
            if let Some(left) = bpb.clusters.checked_sub(base).filter(|&l| l < 64) {
                word &= (1u64 << left) - 1; // bits past the last cluster
            }
            push_word(set, word, base, bpb.cluster_size);
        }
        done += len as u64;
    }
    Ok(())
}

/// Adds the set bits of one 64-cluster word at cluster `base`.
fn push_word(set: &mut ExtentSet, word: u64, base: u64, cs: u64) {
    if word == u64::MAX {
        set.push(base * cs, 64 * cs);
        return;
    }
    let mut bit = 0u32;
    while bit < 64 {
        let w = word >> bit;
        if w == 0 {
            break;
        }
        bit += w.trailing_zeros();
        let ones = (word >> bit).trailing_ones();
        set.push((base + u64::from(bit)) * cs, u64::from(ones) * cs);
        bit += ones;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_to_runs() {
        let mut s = ExtentSet::new();
        push_word(&mut s, 0b1011, 0, 1);
        push_word(&mut s, 1 << 63, 64, 1);
        push_word(&mut s, u64::MAX, 128, 1);
        let v = s.into_vec();
        assert_eq!(
            v,
            vec![Extent::new(0, 2), Extent::new(3, 1), Extent::new(127, 65)]
        );
    }

    #[test]
    fn bpb_rules() {
        let mut b = [0u8; 512];
        b[3..11].copy_from_slice(b"NTFS    ");
        b[11..13].copy_from_slice(&512u16.to_le_bytes());
        b[13] = 8;
        b[0x28..0x30].copy_from_slice(&204799u64.to_le_bytes());
        b[0x30..0x38].copy_from_slice(&4u64.to_le_bytes());
        b[0x40] = 0xF6;
        b[510] = 0x55;
        b[511] = 0xAA;
        assert_eq!(parse_bpb(&b).unwrap().clusters, 25599);
        b[13] = 3;
        assert!(parse_bpb(&b).is_err());
        b[13] = 0xF4; // 2^12 sectors of 512 = 2 MiB
        assert_eq!(parse_bpb(&b).unwrap().cluster_size, 2 << 20);
        b[13] = 8;
        b[0x40] = 0x7F;
        assert!(parse_bpb(&b).is_err());
        b[0x40] = 0xF6;
        b[0x30..0x38].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse_bpb(&b).is_err());
    }
}
