//! The target's partitions, mounted read-write for the identity step and
//! the hooks, and always let go of: each is a loop device over the
//! partition's byte range of the target (a disk or, in tests, a disk file),
//! so the same code serves both and no partition node has to appear first.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tracing::{info, warn};

use super::tool;
use crate::image::fs::FsKind;
use crate::image::manifest::Manifest;
use crate::image::table::PartitionTable;

/// A mount, unmount, losetup or fsck that takes longer has hung.
const TOOL_LIMIT: Duration = Duration::from_secs(120);

/// One mounted partition.
pub struct Mounted {
    /// The partition's number in the table (1-based).
    pub number: u32,
    pub fs: FsKind,
    pub dir: PathBuf,
    loop_dev: String,
    mounted: bool,
}

/// The target's mounted partitions; dropping it unmounts them and frees
/// their loop devices (`finish` does the same and checks the file systems).
pub struct Mounts {
    pub list: Vec<Mounted>,
    root: PathBuf,
}

impl Mounts {
    /// Mounts every ext2/3/4 and NTFS partition of `manifest` on `target`
    /// under `root/<number>`, each over its extent in `table`, the table now
    /// on the disk (a grown partition is larger than in the image).
    pub fn all(
        target: &Path,
        manifest: &Manifest,
        table: Option<&PartitionTable>,
        root: &Path,
    ) -> Result<Self> {
        // In the initramfs these are modules no device asks udev for; where
        // they are built in (or absent) this fails and mount says why.
        let _ = super::run_bounded(
            // crc32c: ext4's checksums, a soft dependency modules.dep omits.
            Command::new("modprobe").args(["-a", "-q", "loop", "crc32c", "ext4", "fuse"]),
            Duration::from_secs(30),
        );
        let mut m = Mounts {
            list: Vec::new(),
            root: root.to_owned(),
        };
        for r in &manifest.regions {
            let (Some(n), Some(fs)) = (r.partition, &r.fs) else {
                continue;
            };
            if !matches!(fs, FsKind::Ext4 | FsKind::Ntfs) {
                continue;
            }
            let len = table
                .and_then(|t| t.partitions.iter().find(|p| p.number == n))
                .filter(|p| p.start == r.start)
                .map_or(r.len, |p| p.size);
            m.list
                .push(mount(target, n, fs.clone(), r.start, len, root)?);
        }
        Ok(m)
    }

    /// Unmounts everything, then checks each file system without changing
    /// it: a fit that left one inconsistent fails the task.
    pub fn finish(mut self) -> Result<()> {
        let mut checks = Vec::new();
        for p in &mut self.list {
            release(p, false)?;
            checks.push((p.number, p.fs.clone(), p.loop_dev.clone()));
        }
        for (n, fs, dev) in &checks {
            check(*n, fs, dev)?;
        }
        for p in &mut self.list {
            detach(p);
        }
        self.list.clear();
        let _ = std::fs::remove_dir(&self.root);
        Ok(())
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for p in self.list.iter_mut().rev() {
            if let Err(e) = release(p, true) {
                warn!("{e:#}");
            }
            detach(p);
        }
        let _ = std::fs::remove_dir(&self.root);
    }
}

fn mount(target: &Path, n: u32, fs: FsKind, start: u64, len: u64, root: &Path) -> Result<Mounted> {
    let dir = root.join(n.to_string());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dev = tool(
        Command::new("losetup")
            .args(["--find", "--show", "--offset", &start.to_string()])
            .args(["--sizelimit", &len.to_string()])
            .arg(target),
        TOOL_LIMIT,
    )
    .with_context(|| format!("partition {n}: attaching a loop device"))?
    .trim()
    .to_string();
    if !dev.starts_with("/dev/loop") {
        bail!("partition {n}: losetup said {dev:?}, not a loop device");
    }
    let mut p = Mounted {
        number: n,
        fs,
        dir,
        loop_dev: dev,
        mounted: false,
    };
    let mut cmd = match p.fs {
        FsKind::Ntfs => {
            // ntfs-3g (FUSE): the kernel here has no ntfs3.
            let mut c = Command::new("ntfs-3g");
            c.arg(&p.loop_dev).arg(&p.dir);
            c
        }
        _ => {
            let mut c = Command::new("mount");
            c.args(["-t", "ext4"]).arg(&p.loop_dev).arg(&p.dir);
            c
        }
    };
    if let Err(e) = tool(&mut cmd, TOOL_LIMIT) {
        detach(&mut p);
        return Err(e.context(format!("partition {n} ({}): mounting", p.fs)));
    }
    p.mounted = true;
    info!("partition {n} ({}) mounted on {}", p.fs, p.dir.display());
    Ok(p)
}

/// Unmounts (lazily when `lazy`, as a last resort on the error path).
fn release(p: &mut Mounted, lazy: bool) -> Result<()> {
    if !p.mounted {
        return Ok(());
    }
    nix::unistd::sync();
    let mut c = Command::new("umount");
    if lazy {
        c.arg("-l");
    }
    tool(c.arg(&p.dir), TOOL_LIMIT)
        .with_context(|| format!("partition {}: unmounting {}", p.number, p.dir.display()))?;
    p.mounted = false;
    let _ = std::fs::remove_dir(&p.dir);
    Ok(())
}

fn detach(p: &mut Mounted) {
    if p.loop_dev.is_empty() {
        return;
    }
    if let Err(e) = tool(
        Command::new("losetup").args(["-d", &p.loop_dev]),
        TOOL_LIMIT,
    ) {
        warn!("freeing {}: {e:#}", p.loop_dev);
    }
    p.loop_dev.clear();
}

/// A read-only check: e2fsck -fn for ext, ntfsfix -n for NTFS.
fn check(n: u32, fs: &FsKind, dev: &str) -> Result<()> {
    let mut c = match fs {
        FsKind::Ntfs => {
            let mut c = Command::new("ntfsfix");
            c.args(["-n", dev]);
            c
        }
        _ => {
            let mut c = Command::new("e2fsck");
            c.args(["-fn", dev]);
            c
        }
    };
    tool(&mut c, TOOL_LIMIT)
        .with_context(|| format!("partition {n} ({fs}) is not clean after the fit"))?;
    info!("partition {n} ({fs}) checked clean");
    Ok(())
}
