//! Refuse unless certain: checks on a chosen disk before it is opened.

use std::path::Path;

use anyhow::{Result, bail};

/// Refuses the disk the system booted from (kernel `root=`, or
/// `blockswarm.boot_disk=`), and disks with active swap.
pub fn check_disk(devnode: &Path) -> Result<()> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let real = std::fs::canonicalize(devnode).unwrap_or_else(|_| devnode.to_owned());
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for arg in cmdline.split_whitespace() {
        let Some((k, v)) = arg.split_once('=') else {
            continue;
        };
        if k != "root" && k != "blockswarm.boot_disk" {
            continue;
        }
        if let Some(dev) = resolve(v) {
            let dev = std::fs::canonicalize(&dev).unwrap_or(dev);
            let dn = dev
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if dev == real || is_partition_of(&dn, &name) {
                bail!(
                    "{} is the boot medium ({arg}): refusing to write to it",
                    devnode.display()
                );
            }
        }
    }
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    for line in swaps.lines().skip(1) {
        if let Some(dev) = line.split_whitespace().next() {
            let dn = Path::new(dev)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if is_partition_of(&dn, &name) || dn == name {
                bail!("{} holds active swap ({dev})", devnode.display());
            }
        }
    }
    Ok(())
}

fn resolve(v: &str) -> Option<std::path::PathBuf> {
    if let Some(u) = v.strip_prefix("UUID=") {
        return Some(format!("/dev/disk/by-uuid/{u}").into());
    }
    if let Some(u) = v.strip_prefix("PARTUUID=") {
        return Some(format!("/dev/disk/by-partuuid/{u}").into());
    }
    v.starts_with("/dev/").then(|| v.into())
}

/// "sda2" of "sda", "nvme0n1p1" of "nvme0n1".
fn is_partition_of(part: &str, disk: &str) -> bool {
    !disk.is_empty()
        && part.len() > disk.len()
        && part.starts_with(disk)
        && Path::new("/sys/class/block").join(disk).join(part).exists()
}
