//! File systems we do not parse ourselves: blkid names them, partclone maps
//! their used blocks (`partclone.<fs> -D`, a ddrescue domain map). Without
//! partclone, or with no file system at all, the whole region is carried.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{FsKind, UsedMap};
use crate::image::extent::{DevSlice, Extent, ExtentSet};

pub fn used_map(dev: &DevSlice) -> Result<UsedMap> {
    let whole = |kind: FsKind, warning: String| UsedMap {
        kind,
        extents: if dev.is_empty() {
            vec![]
        } else {
            vec![Extent::new(0, dev.len())]
        },
        warning: Some(warning),
    };
    let Some(fstype) = blkid_type(dev)? else {
        return Ok(whole(
            FsKind::Unknown,
            "no file system recognized: copying the whole region".into(),
        ));
    };
    let kind = FsKind::Other(fstype.clone());
    let Some(tool) = tool_for(&fstype) else {
        return Ok(whole(
            kind,
            format!("{fstype}: no used-block map for this file system: copying it whole"),
        ));
    };
    if which(&tool).is_none() {
        return Ok(whole(
            kind,
            format!("{fstype}: {tool} is not installed: copying it whole"),
        ));
    }
    let extents = run_partclone(dev, &tool)
        .with_context(|| format!("{fstype}: mapping used blocks with {tool}"))?;
    Ok(UsedMap {
        kind,
        extents,
        warning: None,
    })
}

/// This process's own path to an open file, usable by child processes.
fn fd_path(dev: &DevSlice) -> PathBuf {
    PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        dev.file().as_raw_fd()
    ))
}

fn blkid_type(dev: &DevSlice) -> Result<Option<String>> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE", "-O"])
        .arg(dev.start().to_string())
        .arg("-S")
        .arg(dev.len().to_string())
        .arg(fd_path(dev))
        .output();
    match out {
        // blkid exits 2 when it finds nothing.
        Ok(o) if o.status.success() => {
            let t = String::from_utf8_lossy(&o.stdout).trim().to_string();
            Ok((!t.is_empty()).then_some(t))
        }
        Ok(_) => Ok(None),
        // The deploy initramfs has no blkid: a master captured there
        // carries such regions whole, as when blkid finds nothing.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!("blkid is not installed: file systems we do not parse are copied whole");
            Ok(None)
        }
        Err(e) => bail!("running blkid: {e}"),
    }
}

fn tool_for(fstype: &str) -> Option<String> {
    let t = match fstype {
        "btrfs" | "xfs" | "exfat" | "f2fs" | "minix" | "apfs" | "reiser4" | "ntfs" | "ext2"
        | "ext3" | "ext4" => fstype,
        "hfsplus" => "hfsplus",
        "vfat" => "fat",
        _ => return None,
    };
    Some(format!("partclone.{t}"))
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// A read-only loop device over one region, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(dev: &DevSlice) -> Result<Self> {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--read-only", "--offset"])
            .arg(dev.start().to_string())
            .arg("--sizelimit")
            .arg(dev.len().to_string())
            .arg(fd_path(dev))
            .output()
            .context("running losetup")?;
        if !out.status.success() {
            bail!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Self(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn run_partclone(dev: &DevSlice, tool: &str) -> Result<Vec<Extent>> {
    let lo = Loop::attach(dev)?;
    let dir = tempfile::tempdir()?;
    let (map, log) = (dir.path().join("domain"), dir.path().join("log"));
    let out = Command::new(which(tool).unwrap_or_else(|| tool.into()))
        .args(["-D", "-s", &lo.0, "-o"])
        .arg(&map)
        .arg("-L")
        .arg(&log)
        .output()
        .with_context(|| format!("running {tool}"))?;
    if !out.status.success() {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        let last: Vec<&str> = log.lines().rev().take(3).collect();
        bail!("{tool} failed ({}): {}", out.status, last.join(" / "));
    }
    parse_domain(&std::fs::read_to_string(&map)?, dev.len())
}

/// Parses a ddrescue domain map: `pos size status` lines, `+` is used.
pub fn parse_domain(text: &str, limit: u64) -> Result<Vec<Extent>> {
    let mut set = ExtentSet::new();
    for (n, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if line.starts_with('#') || f.len() != 3 {
            continue;
        }
        let num = |s: &str| {
            u64::from_str_radix(s.trim_start_matches("0x"), 16)
                .with_context(|| format!("domain map line {}: bad number {s:?}", n + 1))
        };
        let (pos, size) = (num(f[0])?, num(f[1])?);
        if f[2] != "+" {
            continue;
        }
        if pos.checked_add(size).is_none_or(|end| end > limit) {
            bail!(
                "domain map line {}: used run {pos:#x}+{size:#x} lies outside the {limit}-byte region",
                n + 1
            );
        }
        set.push(pos, size);
    }
    Ok(set.into_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_domain_maps() {
        let text = "# Domain logfile\n0x0C800000     ?\n#      pos        size  status\n0x00000000  0x00014000  +\n0x00014000  0x00CEC000  ?\n0x00D00000  0x002E0000  +\n";
        let e = parse_domain(text, 0x0C800000).unwrap();
        assert_eq!(
            e,
            vec![Extent::new(0, 0x14000), Extent::new(0xD00000, 0x2E0000)]
        );
        assert!(parse_domain("0x0 0x10 +\n", 8).is_err());
        assert!(parse_domain("0x0 0x10 ?\n", 8).unwrap().is_empty());
        assert!(parse_domain("0xZZ 0x10 +\n", 100).is_err());
    }
}
