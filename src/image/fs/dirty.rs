//! Whether a file system is safe to capture as it lies on disk: one whose
//! journal still needs replaying, or a Windows volume left hibernated (or in
//! fast startup) or marked dirty, holds blocks that do not describe what the
//! running system had, and an image of it would boot into a repair or lose
//! data. Such masters are refused, with the reason.

use std::panic::{AssertUnwindSafe, catch_unwind};

use ::ntfs::indexes::NtfsFileNameIndex;
use ::ntfs::structured_values::NtfsVolumeFlags;
use ::ntfs::{Ntfs, NtfsReadSeek};
use anyhow::{Context, Result, anyhow};

use super::{FsKind, ext, ntfs};
use crate::image::extent::DevSlice;

/// Why the file system in `dev` must not be captured now, if it must not.
/// File systems we do not parse are not judged.
pub fn why_dirty(dev: &DevSlice) -> Result<Option<String>> {
    match super::detect(dev)? {
        FsKind::Ext4 => ext_dirty(dev),
        FsKind::Ntfs => catch_unwind(AssertUnwindSafe(|| ntfs_dirty(dev)))
            .map_err(|_| anyhow!("NTFS parser panicked on a corrupt $Volume or root directory"))?,
        _ => Ok(None),
    }
}

fn ext_dirty(dev: &DevSlice) -> Result<Option<String>> {
    let incompat = ext::incompat_features(dev)?;
    Ok((incompat & ext::INCOMPAT_RECOVER != 0).then(|| {
        "its ext journal needs recovery (needs_recovery is set: the system was not shut down \
         cleanly); boot the master and shut it down cleanly, or run e2fsck on it"
            .to_string()
    }))
}

/// Headers of a hibernation file that holds a hibernated system (Windows'
/// "hibr", "wake" and their variants; fast startup writes "HIBR" too). A
/// zeroed header means it holds nothing.
const HIBERNATED: [&[u8; 4]; 6] = [b"hibr", b"HIBR", b"wake", b"WAKE", b"RSTR", b"rstr"];

fn ntfs_dirty(dev: &DevSlice) -> Result<Option<String>> {
    ntfs::check_bpb(dev)?;
    let mut r = dev.reader();
    let mut fs = Ntfs::new(&mut r).context("opening the NTFS volume")?;
    let flags = fs
        .volume_info(&mut r)
        .context("reading $Volume's record in the MFT")?
        .flags();
    if flags.contains(NtfsVolumeFlags::IS_DIRTY) {
        return Ok(Some(
            "its NTFS volume is marked dirty (Windows was not shut down cleanly, or chkdsk is \
             due); boot Windows and shut it down fully, or run chkdsk"
                .into(),
        ));
    }
    fs.read_upcase_table(&mut r)
        .context("reading the NTFS $UpCase table")?;
    let root = fs
        .root_directory(&mut r)
        .context("reading the root directory")?;
    let index = root
        .directory_index(&mut r)
        .context("reading the root directory's index")?;
    let mut finder = index.finder();
    let Some(entry) = NtfsFileNameIndex::find(&mut finder, &fs, &mut r, "hiberfil.sys") else {
        return Ok(None);
    };
    let file = entry
        .context("looking up hiberfil.sys")?
        .to_file(&fs, &mut r)
        .context("reading hiberfil.sys's record")?;
    let Some(data) = file.data(&mut r, "") else {
        return Ok(None);
    };
    let attr = data.context("hiberfil.sys's $DATA")?;
    let attr = attr.to_attribute().context("hiberfil.sys's $DATA")?;
    let mut value = attr.value(&mut r).context("hiberfil.sys's $DATA")?;
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < head.len() {
        let n = value
            .read(&mut r, &mut head[got..])
            .context("reading hiberfil.sys")?;
        if n == 0 {
            return Ok(None);
        }
        got += n;
    }
    Ok(HIBERNATED.iter().any(|h| **h == head).then(|| {
        format!(
            "Windows is hibernated or in fast startup (hiberfil.sys starts with {:?}); \
             shut it down fully (shutdown /s /t 0, or turn fast startup off) and capture again",
            String::from_utf8_lossy(&head)
        )
    }))
}
