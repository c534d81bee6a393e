//! Growing a file system to fill its grown partition, with its own tools
//! (e2fsprogs, ntfs-3g), run on a device that spans just the partition.
//!
//! Each kind is checked before anything changes (a file system that is not
//! clean is refused, not repaired), resized, then checked read-only.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::extent::DevSlice;
use super::fs::FsKind;
use super::manifest::Manifest;
use super::table::{GROW_ALIGN, TableKind};
use crate::util::human_bytes;

/// The file-system kinds this grows, or why not.
pub fn check_supported(kind: &FsKind, number: u32) -> Result<()> {
    match kind {
        FsKind::Ext4 | FsKind::Ntfs => Ok(()),
        k if is_btrfs(k) || is_xfs(k) => Ok(()),
        k => bail!(
            "partition {number} holds {}: grow = \"last\" grows ext2/3/4, NTFS, btrfs and xfs only (nothing was changed)",
            match k {
                FsKind::Unknown => "no file system this can tell".to_string(),
                k => format!("a {k} file system"),
            }
        ),
    }
}

/// The kernel grows btrfs only to this size or more (its resize ioctl
/// refuses a smaller one with EINVAL).
const BTRFS_MIN: u64 = 256 << 20;

/// Refuses, before anything is written, a size the tools would refuse.
pub fn check_new_size(kind: &FsKind, number: u32, len: u64) -> Result<()> {
    if is_btrfs(kind) && len < BTRFS_MIN {
        bail!(
            "partition {number} holds btrfs, which the kernel resizes only to {} or more, and it would be {} (nothing was changed)",
            human_bytes(BTRFS_MIN),
            human_bytes(len)
        );
    }
    Ok(())
}

fn is_btrfs(kind: &FsKind) -> bool {
    matches!(kind, FsKind::Other(k) if k == "btrfs")
}

fn is_xfs(kind: &FsKind) -> bool {
    matches!(kind, FsKind::Other(k) if k == "xfs")
}

/// Before anything is written: the file system on `dev` must be clean.
/// e2fsck -f -y also records the check that resize2fs asks for; on a disk
/// just written and verified piece by piece it finds nothing to fix, and
/// anything it does fix (exit code 1 or more) fails the step.
pub fn check_before(kind: &FsKind, dev: &Path) -> Result<()> {
    match kind {
        FsKind::Ext4 => run(Command::new("e2fsck").arg("-f").arg("-y").arg(dev), None).context(
            "the ext file system is not clean as imaged (the master's was not): refusing to grow it",
        ),
        // --info is read-only, and refuses a volume scheduled for chkdsk.
        FsKind::Ntfs => run(
            Command::new("ntfsresize")
                .args(["--info", "--no-progress-bar"])
                .arg(dev),
            None,
        )
        .context("the NTFS cannot be resized as imaged: refusing to grow it"),
        k if is_btrfs(k) => run(Command::new("btrfs").args(["check", "--readonly"]).arg(dev), None)
            .context("the btrfs does not check clean as imaged: refusing to grow it"),
        k if is_xfs(k) => run(Command::new("xfs_repair").arg("-n").arg(dev), None)
            .context("the xfs does not check clean as imaged: refusing to grow it"),
        k => check_supported(k, 0),
    }
}

/// Grows the file system on `dev` to the device's size.
pub fn resize(kind: &FsKind, dev: &Path) -> Result<()> {
    match kind {
        FsKind::Ext4 => run(Command::new("resize2fs").arg(dev), None),
        // ntfsresize asks "Are you sure?" and takes the answer from stdin:
        // no --force, which would also skip its refusal of a volume that is
        // scheduled for chkdsk. It schedules one itself (Windows checks the
        // volume at its next boot).
        FsKind::Ntfs => run(
            Command::new("ntfsresize").arg("--no-progress-bar").arg(dev),
            Some(b"y\n"),
        ),
        // btrfs grows only mounted: the kernel's driver does it.
        k if is_btrfs(k) => {
            let m = TempMount::new(dev, "btrfs")?;
            run(
                Command::new("btrfs")
                    .args(["filesystem", "resize", "max"])
                    .arg(m.dir.path()),
                None,
            )?;
            m.unmount()
        }
        // So does xfs.
        k if is_xfs(k) => {
            let m = TempMount::new(dev, "xfs")?;
            run(Command::new("xfs_growfs").arg(m.dir.path()), None)?;
            m.unmount()
        }
        k => check_supported(k, 0),
    }
}

/// After the resize, read-only.
pub fn check_after(kind: &FsKind, dev: &Path) -> Result<()> {
    match kind {
        FsKind::Ext4 => run(Command::new("e2fsck").arg("-f").arg("-n").arg(dev), None),
        // (ntfsresize --info now refuses: the volume is scheduled for chkdsk.)
        FsKind::Ntfs => run(Command::new("ntfsfix").arg("-n").arg(dev), None),
        k if is_btrfs(k) => run(
            Command::new("btrfs").args(["check", "--readonly"]).arg(dev),
            None,
        ),
        k if is_xfs(k) => run(Command::new("xfs_repair").arg("-n").arg(dev), None),
        k => check_supported(k, 0),
    }
    .context("the grown file system does not check clean")
}

/// The size in bytes that the file system on `dev` says it has (NTFS: its
/// sectors and the backup boot sector after them).
pub fn fs_size(kind: &FsKind, dev: &DevSlice) -> Result<u64> {
    match kind {
        FsKind::Ext4 => {
            let sb = dev.read_vec(1024, 1024)?;
            let le32 = |o: usize| u64::from(u32::from_le_bytes(sb[o..o + 4].try_into().unwrap()));
            let log = le32(24);
            if log > 6 {
                bail!("ext superblock: block size 2^{} is out of range", log + 10);
            }
            let is_64bit = le32(0x60) & 0x80 != 0;
            let blocks = le32(4) | if is_64bit { le32(0x150) << 32 } else { 0 };
            Ok(blocks << (10 + log))
        }
        FsKind::Ntfs => {
            let bs = dev.read_vec(0, 512)?;
            let bps = u64::from(u16::from_le_bytes([bs[11], bs[12]]));
            let sectors = u64::from_le_bytes(bs[0x28..0x30].try_into().unwrap());
            sectors
                .checked_add(1)
                .and_then(|s| s.checked_mul(bps))
                .context("NTFS boot sector: size overflows")
        }
        k if is_btrfs(k) => {
            let sb = dev.read_vec(BTRFS_SUPER, 0x78)?;
            if &sb[0x40..0x48] != b"_BHRfS_M" {
                bail!("no btrfs superblock at byte {BTRFS_SUPER}");
            }
            Ok(u64::from_le_bytes(sb[0x70..0x78].try_into().unwrap()))
        }
        k if is_xfs(k) => {
            // Big-endian: block size, then data blocks.
            let sb = dev.read_vec(0, 16)?;
            if &sb[..4] != b"XFSB" {
                bail!("no xfs superblock");
            }
            let bs = u64::from(u32::from_be_bytes(sb[4..8].try_into().unwrap()));
            let blocks = u64::from_be_bytes(sb[8..16].try_into().unwrap());
            blocks
                .checked_mul(bs)
                .context("xfs superblock: size overflows")
        }
        k => bail!("no size reader for {k}"),
    }
}

/// Where btrfs keeps its first superblock.
const BTRFS_SUPER: u64 = 64 << 10;

/// A file system mounted on a fresh directory for a tool that works only on
/// mounted ones; unmounted (and the directory removed) when dropped.
struct TempMount {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl TempMount {
    fn new(dev: &Path, fstype: &str) -> Result<Self> {
        use nix::mount::{MsFlags, mount};
        let dir = tempfile::Builder::new()
            .prefix("blockswarm-grow")
            .tempdir()
            .context("making a mount point")?;
        let flags =
            MsFlags::MS_NOATIME | MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
        mount(Some(dev), dir.path(), Some(fstype), flags, None::<&str>).with_context(|| {
            format!(
                "mounting {} ({fstype}) to grow it: does the kernel have the {fstype} driver?",
                dev.display()
            )
        })?;
        Ok(Self { dir, mounted: true })
    }

    fn unmount(mut self) -> Result<()> {
        self.mounted = false;
        nix::mount::umount(self.dir.path())
            .with_context(|| format!("unmounting {}", self.dir.path().display()))
    }
}

impl Drop for TempMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = nix::mount::umount(self.dir.path());
        }
    }
}

/// Most output kept for an error message.
const OUTPUT_TAIL: usize = 2000;

/// Runs a tool to completion; fails with its exit code and the end of its
/// output unless it exits 0.
fn run(cmd: &mut Command, input: Option<&[u8]>) -> Result<()> {
    let name = cmd.get_program().to_string_lossy().into_owned();
    let shown = format!(
        "{name} {}",
        cmd.get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    // The initramfs keeps tools in /sbin and /usr/sbin.
    .env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow::anyhow!("{name} is not installed (the deploy system must carry it)")
        } else {
            anyhow::Error::new(e).context(format!("starting {name}"))
        }
    })?;
    if let (Some(i), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(i)
            .with_context(|| format!("answering {name}"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("running {name}"))?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    let text = text.trim();
    let cut = text
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| text.len() - i <= OUTPUT_TAIL)
        .unwrap_or(0);
    bail!(
        "`{shown}` failed ({}): {}",
        out.status,
        text[cut..].replace('\n', " | ")
    )
}

/// Why a disk of `size` bytes is too small for the image of `m` (its used
/// blocks ending at byte `used_end`), by how much, and what to capture
/// differently.
pub fn too_small(m: &Manifest, used_end: u64, size: u64) -> String {
    let need = m.disk.min_target_size.max(used_end);
    let mut s = format!(
        "the disk is too small for image {}: {} ({size} bytes), {} bytes short of the {need} bytes the image needs",
        m.name,
        human_bytes(size),
        need - size
    );
    let table = &m.disk.table;
    // How far the last partition may reach on this disk (GPT: the backup
    // table after it), on the alignment partitioning tools use.
    let room = table.min_disk_size(0) - table.partitions.iter().map(|p| p.end()).max().unwrap_or(0);
    let fit_end = match table.kind {
        TableKind::None => size,
        _ => size.saturating_sub(room) / GROW_ALIGN * GROW_ALIGN,
    };
    let what = match table.partitions.last() {
        Some(p) if table.kind != TableKind::None => format!("partition {}", p.number),
        _ => "the file system".to_string(),
    };
    if used_end <= fit_end {
        s += &format!(
            ". The image uses {} ({} bytes), its last used block ending at byte {used_end}: \
             shrink {what} (and its file system) on the master to end by byte {fit_end} \
             ({}) before capturing, or capture from a disk no larger than this one",
            human_bytes(m.payload.size),
            m.payload.size,
            human_bytes(fit_end)
        );
    } else {
        s += &format!(
            ". The image uses {} ({} bytes), but its used blocks reach byte {used_end}, past byte {fit_end} \
             where {what} would have to end on this disk: shrinking {what} on the master \
             (resize2fs, ntfsresize or the OS's disk manager move the data down) to end by byte {fit_end} \
             is needed before capturing{}",
            human_bytes(m.payload.size),
            m.payload.size,
            if m.payload.size > fit_end {
                ", and the master holds more data than this disk can take: delete some"
            } else {
                ""
            }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn btrfs_below_256_mib_is_refused_before_anything_is_written() {
        let btrfs = FsKind::Other("btrfs".into());
        let e = check_new_size(&btrfs, 2, 200 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("partition 2 holds btrfs, which the kernel resizes only to 256.0 MiB or more, and it would be 200.0 MiB"), "{e}");
        check_new_size(&btrfs, 2, 256 << 20).unwrap();
        check_new_size(&FsKind::Ext4, 2, 8 << 20).unwrap();
    }

    #[test]
    fn too_small_says_when_the_used_blocks_themselves_do_not_fit() {
        // A bare file system of 1 MiB, its used blocks ending at byte 69632.
        let m = crate::image::manifest::tests::sample();
        let e = too_small(&m, 69632, 32768);
        assert_eq!(
            e,
            "the disk is too small for image t: 32.0 KiB (32768 bytes), 1015808 bytes short of the 1048576 bytes \
             the image needs. The image uses 8.0 KiB (8192 bytes), but its used blocks reach byte 69632, past byte 32768 \
             where the file system would have to end on this disk: shrinking the file system on the master (resize2fs, \
             ntfsresize or the OS's disk manager move the data down) to end by byte 32768 is needed before capturing"
        );
        let e = too_small(&m, 69632, 4096);
        assert!(
            e.ends_with("before capturing, and the master holds more data than this disk can take: delete some"),
            "{e}"
        );
    }
}
