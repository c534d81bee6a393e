//! Names the deployed system after this host: the server renders and checks
//! the name, the agent checks it again and writes it into every system it
//! finds on the target's mounted partitions.
//!
//! - Linux (an ext root holding etc/os-release or etc/hostname):
//!   etc/hostname, the 127.0.1.1 line of etc/hosts, a new random
//!   etc/machine-id (the dbus copy is removed so dbus follows it).
//! - Windows (an NTFS holding Windows/System32/config/SYSTEM): the
//!   ComputerName, ActiveComputerName, Tcpip Hostname and NV Hostname values
//!   of the SYSTEM hive, merged with chntpw's `reged -I` (76 KB, libc only;
//!   hivex's merging tool needs Perl). No unattend file: the hive is what
//!   Windows reads at every boot, sysprepped or not, while an unattend
//!   fragment acts only in a sysprep pass.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tracing::{info, warn};

use super::mount::Mounts;
use super::{run_bounded, tool};
use crate::image::fs::FsKind;
use crate::protocol::hostname;

const REGED_LIMIT: Duration = Duration::from_secs(60);
const HIVE_PREFIX: &str = r"HKEY_LOCAL_MACHINE\SYSTEM";

/// Writes `name` into each Linux and Windows system on the mounts.
pub fn write(mounts: &Mounts, name: &str) -> Result<()> {
    let windows = mounts.list.iter().any(|m| m.fs == FsKind::Ntfs);
    hostname::check(name, windows).context("the host name from the server")?;
    let mut named = 0;
    for m in &mounts.list {
        match m.fs {
            FsKind::Ext4 if is_linux_root(&m.dir) => {
                linux(&m.dir, name)
                    .with_context(|| format!("naming Linux on partition {}", m.number))?;
                info!("partition {}: Linux named {name}", m.number);
                named += 1;
            }
            FsKind::Ntfs => {
                if let Some(hive) = find_ci(&m.dir, &["Windows", "System32", "config", "SYSTEM"]) {
                    windows_hive(&hive, name)
                        .with_context(|| format!("naming Windows on partition {}", m.number))?;
                    info!(
                        "partition {}: Windows named {}",
                        m.number,
                        name.to_uppercase()
                    );
                    named += 1;
                }
            }
            _ => {}
        }
    }
    if named == 0 {
        warn!("no Linux root or Windows system found on the target: host name {name} not written");
    }
    Ok(())
}

fn is_linux_root(dir: &Path) -> bool {
    real_dir(dir, "etc").is_some_and(|etc| {
        etc.join("os-release").symlink_metadata().is_ok()
            || etc.join("hostname").symlink_metadata().is_ok()
    })
}

/// `root/rel` when every component of `rel` is a directory and none a
/// symlink: the deployed system's links point into its own root, which is
/// not ours (an absolute one would lead into the agent's).
fn real_dir(root: &Path, rel: &str) -> Option<PathBuf> {
    let mut p = root.to_path_buf();
    for c in rel.split('/') {
        p.push(c);
        if !p.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            return None;
        }
    }
    Some(p)
}

/// Replaces `path` with a regular file holding `text`: a symlink in the
/// deployed system is removed, never followed (it would point into the
/// agent's own root).
fn put(path: &Path, text: &str) -> Result<()> {
    if path.symlink_metadata().is_ok_and(|m| !m.is_file()) {
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// A regular file's text, or empty when it is missing or not a file.
fn get(path: &Path) -> Result<String> {
    match path.symlink_metadata() {
        Ok(m) if m.is_file() && m.len() <= 1 << 20 => {
            Ok(String::from_utf8_lossy(&std::fs::read(path)?).into_owned())
        }
        _ => Ok(String::new()),
    }
}

fn linux(root: &Path, name: &str) -> Result<()> {
    let Some(etc) = real_dir(root, "etc") else {
        bail!("etc is not a directory");
    };
    put(&etc.join("hostname"), &format!("{name}\n"))?;
    let hosts = get(&etc.join("hosts"))?;
    put(&etc.join("hosts"), &hosts_with(&hosts, name))?;
    put(&etc.join("machine-id"), &format!("{}\n", machine_id()?))?;
    let dbus = real_dir(root, "var/lib/dbus").map(|d| d.join("machine-id"));
    if let Some(dbus) = dbus.filter(|d| d.symlink_metadata().is_ok_and(|m| m.is_file())) {
        std::fs::remove_file(&dbus).with_context(|| format!("removing {}", dbus.display()))?;
    }
    Ok(())
}

/// `hosts` with its 127.0.1.1 line naming `name` (added when missing).
fn hosts_with(hosts: &str, name: &str) -> String {
    let line = format!("127.0.1.1\t{name}");
    let mut found = false;
    let mut out: Vec<String> = hosts
        .lines()
        .map(|l| {
            if l.split_whitespace().next() == Some("127.0.1.1") {
                found = true;
                line.clone()
            } else {
                l.to_string()
            }
        })
        .collect();
    if !found {
        out.push(line);
    }
    out.join("\n") + "\n"
}

/// 128 random bits as systemd writes them: 32 lowercase hex digits, with
/// the bits of a version 4 UUID.
fn machine_id() -> Result<String> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The path below `dir` whose components match `parts` ignoring case, as
/// Windows does (NTFS keeps the case it was given).
fn find_ci(dir: &Path, parts: &[&str]) -> Option<PathBuf> {
    let mut p = dir.to_path_buf();
    for (i, part) in parts.iter().enumerate() {
        let e = std::fs::read_dir(&p)
            .ok()?
            .flatten()
            .find(|e| e.file_name().to_string_lossy().eq_ignore_ascii_case(part))?;
        p = e.path();
        // A junction (a symlink here) is not followed.
        let dir = p.symlink_metadata().ok()?.is_dir();
        if i + 1 < parts.len() && !dir {
            return None;
        }
    }
    p.symlink_metadata().is_ok_and(|m| m.is_file()).then_some(p)
}

fn windows_hive(hive: &Path, name: &str) -> Result<()> {
    let set = format!("ControlSet{:03}", current_control_set(hive)?);
    let netbios = name.to_uppercase();
    let reg = format!(
        "Windows Registry Editor Version 5.00\r\n\r\n\
         [{HIVE_PREFIX}\\{set}\\Control\\ComputerName\\ComputerName]\r\n\
         \"ComputerName\"=\"{netbios}\"\r\n\r\n\
         [{HIVE_PREFIX}\\{set}\\Control\\ComputerName\\ActiveComputerName]\r\n\
         \"ComputerName\"=\"{netbios}\"\r\n\r\n\
         [{HIVE_PREFIX}\\{set}\\Services\\Tcpip\\Parameters]\r\n\
         \"Hostname\"=\"{name}\"\r\n\
         \"NV Hostname\"=\"{name}\"\r\n"
    );
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("identity.reg");
    std::fs::write(&file, reg)?;
    // reged exits 2 when it saved a changed hive: success is what the
    // hive holds afterwards, read back below.
    let (out, status) = run_bounded(
        Command::new("reged")
            .args(["-I", "-C"])
            .arg(hive)
            .arg(HIVE_PREFIX)
            .arg(&file),
        REGED_LIMIT,
    )
    .context("running reged")?;
    if status.is_none() || !out.contains("operation SUCCEEDED") {
        bail!(
            "reged could not merge the names into {}: {}",
            hive.display(),
            out.trim()
        );
    }
    let got = export(hive, &format!(r"\{set}\Control\ComputerName\ComputerName"))?;
    if !got.contains(&format!("\"ComputerName\"=\"{netbios}\"")) {
        bail!("the SYSTEM hive does not hold ComputerName {netbios} after the merge");
    }
    Ok(())
}

/// `Select\Current`: the control set Windows boots with (1 when absent).
fn current_control_set(hive: &Path) -> Result<u32> {
    let text = export(hive, r"\Select").unwrap_or_default();
    let n = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("\"Current\"=dword:"))
        .and_then(|h| u32::from_str_radix(h.trim(), 16).ok())
        .filter(|n| (1..=999).contains(n))
        .unwrap_or(1);
    Ok(n)
}

/// One key of the hive, as a .reg text (reged -x).
fn export(hive: &Path, key: &str) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("out.reg");
    // reged's exit status does not tell: the file it writes does.
    let _ = tool(
        Command::new("reged")
            .arg("-x")
            .arg(hive)
            .arg(HIVE_PREFIX)
            .arg(key)
            .arg(&out),
        REGED_LIMIT,
    );
    let b = std::fs::read(&out).with_context(|| format!("reged exported no key {key}"))?;
    // .reg files are UTF-16 or 8-bit text; reged writes 8-bit.
    Ok(String::from_utf8_lossy(&b).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_line_is_replaced_or_added() {
        let h = "127.0.0.1\tlocalhost\n127.0.1.1\tmaster\n::1 localhost\n";
        assert_eq!(
            hosts_with(h, "lab-01"),
            "127.0.0.1\tlocalhost\n127.0.1.1\tlab-01\n::1 localhost\n"
        );
        assert_eq!(
            hosts_with("127.0.0.1 localhost\n", "x1"),
            "127.0.0.1 localhost\n127.0.1.1\tx1\n"
        );
    }

    #[test]
    fn symlinked_directories_are_not_followed() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::create_dir_all(outside.join("dbus")).unwrap();
        std::fs::write(outside.join("dbus/machine-id"), "keep").unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("var")).unwrap();
        std::fs::write(root.join("etc/hostname"), "old\n").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("var/lib")).unwrap();
        assert!(is_linux_root(&root));
        linux(&root, "pc-1").unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "pc-1\n"
        );
        assert_eq!(
            std::fs::read_to_string(outside.join("dbus/machine-id")).unwrap(),
            "keep"
        );
        // An etc that is a link is no root to name.
        let other = t.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        std::os::unix::fs::symlink(root.join("etc"), other.join("etc")).unwrap();
        assert!(!is_linux_root(&other));
        assert!(find_ci(&other, &["ETC", "hostname"]).is_none());
        assert!(find_ci(&root, &["ETC", "HOSTNAME"]).is_some());
    }

    #[test]
    fn machine_ids_differ_and_look_like_systemds() {
        let (a, b) = (machine_id().unwrap(), machine_id().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(&a[12..13], "4");
    }
}
