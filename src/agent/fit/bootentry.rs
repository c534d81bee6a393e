//! The UEFI firmware boot entry for the deployed ESP's loader, so that the
//! PC boots its disk through an entry of its own, not the removable-media
//! fallback path (`\EFI\BOOT\BOOTX64.EFI`) nor the firmware's guess.
//!
//! Only when this agent runs under UEFI and the image's GPT has an ESP. The
//! loader is found by reading the ESP's FAT in-process (no mount); the
//! entry is made with efibootmgr, replacing the ones made for this disk
//! before (same label or same ESP), and put in BootOrder right after the
//! network entry this boot came through.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use tracing::{info, warn};

use crate::image::extent::DevSlice;
use crate::image::fs::fatdir;
use crate::image::table::{Partition, PartitionTable, TableKind};
use crate::protocol::Job;

/// The GPT type of an EFI System Partition.
pub const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
pub const DEFAULT_LABEL: &str = "blockswarm";
const EFI_DIR: &str = "/sys/firmware/efi";
const EFIVARS: &str = "/sys/firmware/efi/efivars";
const LOOP_MAJOR: u64 = 7;
/// Distribution loaders, in order: shim (Secure Boot), then GRUB, then
/// systemd-boot, in any `\EFI\<distro>` directory.
const DISTRO_LOADERS: [&str; 3] = ["shimx64.efi", "grubx64.efi", "systemd-bootx64.efi"];
const WINDOWS_LOADER: &str = "\\EFI\\Microsoft\\Boot\\bootmgfw.efi";
const FALLBACK_LOADER: &str = "\\EFI\\BOOT\\BOOTX64.EFI";

/// The image's ESP, if it has one (GPT only: that is what UEFI boots).
pub fn esp(table: &PartitionTable) -> Option<&Partition> {
    if table.kind != TableKind::Gpt {
        return None;
    }
    table
        .partitions
        .iter()
        .find(|p| p.type_id.eq_ignore_ascii_case(ESP_TYPE))
}

/// The loader to boot on the FAT file system `esp`: a distribution's
/// (directories in name order), else Windows', else the fallback path; as
/// spelled on the ESP, with backslashes. None if there is none of them.
pub fn choose_loader(esp: &DevSlice) -> Result<Option<String>> {
    let Some(efi) = fatdir::read_dir(esp, "\\EFI")? else {
        return Ok(None);
    };
    let mut distros: Vec<_> = efi
        .iter()
        .filter(|e| e.is_dir && !e.is("BOOT") && !e.is("Microsoft"))
        .collect();
    distros.sort_by_key(|e| e.name.to_ascii_lowercase());
    for loader in DISTRO_LOADERS {
        for d in &distros {
            let dir = format!("\\EFI\\{}", d.name);
            let found = fatdir::read_dir(esp, &dir)?
                .unwrap_or_default()
                .into_iter()
                .find(|f| !f.is_dir && f.is(loader));
            if let Some(f) = found {
                return Ok(Some(format!("{dir}\\{}", f.name)));
            }
        }
    }
    for path in [WINDOWS_LOADER, FALLBACK_LOADER] {
        if fatdir::find(esp, path)?.is_some_and(|f| !f.is_dir) {
            return Ok(Some(path.to_string()));
        }
    }
    Ok(None)
}

/// What `efibootmgr -v` says.
#[derive(Debug, Default, PartialEq)]
pub struct BootVars {
    pub current: Option<u16>,
    pub order: Vec<u16>,
    pub entries: Vec<BootEntry>,
}

#[derive(Debug, PartialEq)]
pub struct BootEntry {
    pub num: u16,
    pub label: String,
    /// The device path as efibootmgr prints it (may be empty).
    pub path: String,
}

impl BootVars {
    pub fn parse(text: &str) -> Self {
        let mut v = BootVars::default();
        for line in text.lines() {
            if let Some(c) = line.strip_prefix("BootCurrent: ") {
                v.current = hex16(c.trim());
            } else if let Some(o) = line.strip_prefix("BootOrder: ") {
                v.order = o.trim().split(',').filter_map(hex16).collect();
            } else if let Some(rest) = line.strip_prefix("Boot")
                && rest.len() > 5
                && let Some(num) = rest.get(..4).and_then(hex16)
                && matches!(rest.as_bytes()[4], b'*' | b' ')
            {
                // "Boot0004* label<TAB>HD(...)/File(...)"
                let (label, path) = rest[5..].split_once('\t').unwrap_or((&rest[5..], ""));
                v.entries.push(BootEntry {
                    num,
                    label: label.trim().to_string(),
                    path: path.trim().to_string(),
                });
            }
        }
        v
    }

    /// Entries made earlier for this disk: the same label, or a device
    /// path naming the ESP's partition GUID.
    pub fn ours(&self, label: &str, part_guid: &str) -> Vec<u16> {
        let guid = part_guid.to_ascii_lowercase();
        self.entries
            .iter()
            .filter(|e| e.label == label || e.path.to_ascii_lowercase().contains(&guid))
            .map(|e| e.num)
            .collect()
    }
}

fn hex16(s: &str) -> Option<u16> {
    (s.len() == 4).then(|| u16::from_str_radix(s, 16).ok())?
}

/// The new BootOrder: `ours` right after `current`, the entry this boot
/// came through, with `gone` (the entries replaced) left out and every
/// other entry kept in its place. The PCs boot the network first and the
/// server decides each boot (sends the PC to the agent or back to the
/// firmware with iPXE's `exit`): so our entry must not go first, but right
/// after the network entry, so that the firmware's next try is the disk,
/// not a slow one (HTTP boot, other NICs) or its own guess. If `current`
/// is not in BootOrder (a one-time boot), ours goes last: nothing that
/// boots before it today is displaced.
pub fn boot_order(before: &[u16], current: Option<u16>, ours: u16, gone: &[u16]) -> Vec<u16> {
    let mut order: Vec<u16> = before
        .iter()
        .copied()
        .filter(|n| *n != ours && !gone.contains(n))
        .collect();
    let at = current
        .and_then(|c| order.iter().position(|&n| n == c))
        .map_or(order.len(), |i| i + 1);
    order.insert(at, ours);
    order
}

fn fmt_order(o: &[u16]) -> String {
    o.iter()
        .map(|n| format!("{n:04X}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Adds the boot entry for `disk` (imaged with `table`) if this PC boots
/// UEFI and the image has an ESP. An error means no entry was made (or it
/// is not in BootOrder); the disk still boots through the fallback path.
pub fn run(job: &Job, table: &PartitionTable, disk: &Path) -> Result<()> {
    let Some(esp) = esp(table) else {
        return Ok(());
    };
    if !Path::new(EFI_DIR).exists() {
        info!("the image has an ESP, but this PC did not boot UEFI: no firmware boot entry");
        return Ok(());
    }
    let disk =
        std::fs::canonicalize(disk).with_context(|| format!("resolving {}", disk.display()))?;
    let file = File::open(&disk).with_context(|| format!("opening {}", disk.display()))?;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = file.metadata()?;
    // A loop device (tests, demos) is no disk the firmware can boot.
    if !meta.file_type().is_block_device() || nix::sys::stat::major(meta.rdev()) == LOOP_MAJOR {
        info!("{} is not a firmware's disk: no boot entry", disk.display());
        return Ok(());
    }
    let bin = efibootmgr_bin()?;
    let label = job.efi_label.as_deref().unwrap_or(DEFAULT_LABEL);
    ensure!(
        !label.is_empty() && label.len() <= 64 && !label.chars().any(char::is_control),
        "efi_label {label:?} must be 1..64 printable characters"
    );
    let slice = DevSlice::new(&file, esp.start, esp.size);
    let loader = match &job.efi_loader {
        Some(l) => {
            let l = l.replace('/', "\\");
            let found = fatdir::find(&slice, &l).context("reading the ESP")?;
            ensure!(
                found.is_some_and(|f| !f.is_dir),
                "the job's efi_loader {l} is not a file on the ESP (partition {})",
                esp.number
            );
            l
        }
        None => choose_loader(&slice)
            .context("reading the ESP")?
            .with_context(|| {
                format!(
                    "no loader on the ESP (partition {}): no \\EFI\\*\\{}, {WINDOWS_LOADER} \
                     or {FALLBACK_LOADER}",
                    esp.number,
                    DISTRO_LOADERS.join("|")
                )
            })?,
    };
    let guid = part_guid(&file, table.sector_size, esp.number)?;
    mount_efivarfs()?;

    let before = BootVars::parse(&efibootmgr(&bin, &["-v"])?);
    let gone = before.ours(label, &guid);
    for n in &gone {
        efibootmgr(&bin, &["-b", &format!("{n:04X}"), "-B"])?;
    }
    // -C: create without touching BootOrder (-c would put it first).
    let part = esp.number.to_string();
    let disk_s = disk.to_string_lossy();
    let made = BootVars::parse(&efibootmgr(
        &bin,
        &[
            "-C", "-d", &disk_s, "-p", &part, "-l", &loader, "-L", label, "-v",
        ],
    )?);
    let ours = made
        .entries
        .iter()
        .find(|e| {
            e.label == label
                && !before
                    .entries
                    .iter()
                    .any(|b| b.num == e.num && !gone.contains(&b.num))
        })
        .map(|e| e.num)
        .context("efibootmgr made no entry (the firmware refused to store it?)")?;
    if before.current.is_none_or(|c| !before.order.contains(&c)) {
        warn!(
            "BootCurrent ({}) is not in BootOrder: Boot{ours:04X} goes last",
            before.current.map_or("none".into(), |c| format!("{c:04X}"))
        );
    }
    let order = boot_order(&before.order, before.current, ours, &gone);
    efibootmgr(&bin, &["-o", &fmt_order(&order)])?;
    let after = BootVars::parse(&efibootmgr(&bin, &["-v"])?);
    ensure!(
        after.order == order,
        "the firmware kept BootOrder {} instead of {}",
        fmt_order(&after.order),
        fmt_order(&order)
    );
    let current = before.current.map_or("none".into(), |c| format!("{c:04X}"));
    let replaced = if gone.is_empty() {
        String::new()
    } else {
        format!("; replaces {}", fmt_order(&gone))
    };
    info!(
        "UEFI boot entry Boot{ours:04X} \"{label}\": {} partition {} {loader}; \
         BootOrder {} -> {} (after BootCurrent {current}){replaced}",
        disk.display(),
        esp.number,
        fmt_order(&before.order),
        fmt_order(&after.order),
    );
    Ok(())
}

/// The unique GUID of GPT partition `number` on the disk just written.
fn part_guid(file: &File, sector_size: u64, number: u32) -> Result<String> {
    let mut f = file;
    let gpt = crate::util::guard("GPT", || gptman::GPT::read_from(&mut f, sector_size))?
        .context("reading the written GPT")?;
    let p = gpt
        .iter()
        .find(|(i, p)| *i == number && p.is_used())
        .map(|(_, p)| p)
        .with_context(|| format!("the written GPT has no partition {number}"))?;
    Ok(crate::image::table::guid_string(&p.unique_partition_guid))
}

/// efivarfs on its usual place (the deploy system's /init does not mount it).
fn mount_efivarfs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("efivarfs"))
    {
        return Ok(());
    }
    // A module in Debian's kernel; built in elsewhere (then modprobe fails).
    let _ = Command::new("modprobe").arg("efivarfs").status();
    nix::mount::mount(
        Some("efivarfs"),
        EFIVARS,
        Some("efivarfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting efivarfs on {EFIVARS}"))
}

fn efibootmgr_bin() -> Result<PathBuf> {
    [
        "/usr/bin/efibootmgr",
        "/bin/efibootmgr",
        "/usr/sbin/efibootmgr",
        "/sbin/efibootmgr",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .context("efibootmgr is not in the deploy system")
}

fn efibootmgr(bin: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running efibootmgr {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "efibootmgr {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
