//! Disk discovery through libudev, and the job's target selector.
//!
//! Selection refuses rather than guesses: a selector that matches no disk or
//! more than one, or a "largest disk" tie, is an error listing the disks.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::blockdev::Dev;
use crate::protocol::{DiskIdentity, TargetSelector};
use crate::util::human_bytes;

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Disk {
    pub devnode: PathBuf,
    pub size: u64,
    pub by_path: Option<String>,
    pub serial: Option<String>,
    pub wwn: Option<String>,
    pub model: Option<String>,
    pub bus: Option<String>,
    pub removable: bool,
    pub rotational: bool,
    pub read_only: bool,
}

impl std::fmt::Display for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, {} {}, serial {}{})",
            self.devnode.display(),
            human_bytes(self.size),
            self.bus.as_deref().unwrap_or("?"),
            self.model.as_deref().unwrap_or("?"),
            self.serial.as_deref().unwrap_or("?"),
            if self.removable { ", removable" } else { "" }
        )
    }
}

/// Whole disks the kernel knows, without loop, RAM, optical and mapper devices.
pub fn discover() -> Result<Vec<Disk>> {
    let mut e = udev::Enumerator::new().context("opening libudev")?;
    e.match_subsystem("block")?;
    e.match_property("DEVTYPE", "disk")?;
    let mut out = Vec::new();
    for d in e.scan_devices().context("listing block devices")? {
        let name = d.sysname().to_string_lossy().into_owned();
        if ["loop", "ram", "zram", "sr", "dm-", "md", "nbd", "fd"]
            .iter()
            .any(|p| name.starts_with(p))
        {
            continue;
        }
        if let Some(disk) = from_udev(&d) {
            out.push(disk);
        }
    }
    Ok(out)
}

/// What udev says of one block device; `None` without a node or a size.
fn from_udev(d: &udev::Device) -> Option<Disk> {
    let node = d.devnode()?;
    // Bounded: these strings travel to the server and into the marker.
    let prop = |k: &str| {
        d.property_value(k)
            .map(|v| v.to_string_lossy().into_owned())
            .filter(|v| !v.is_empty() && v.len() <= DiskIdentity::MAX_FIELD)
    };
    let attr = |k: &str| {
        d.attribute_value(k)
            .map(|v| v.to_string_lossy().trim().to_string())
    };
    let sectors: u64 = attr("size").and_then(|s| s.parse().ok()).unwrap_or(0);
    if sectors == 0 {
        return None;
    }
    Some(Disk {
        devnode: node.to_owned(),
        size: sectors * 512,
        by_path: prop("ID_PATH"),
        serial: prop("ID_SERIAL_SHORT").or_else(|| prop("ID_SERIAL")),
        wwn: prop("ID_WWN"),
        model: prop("ID_MODEL").map(|m| m.replace('_', " ")),
        bus: prop("ID_BUS").or_else(|| bus_from_path(prop("ID_PATH").as_deref())),
        removable: attr("removable").as_deref() == Some("1"),
        rotational: attr("queue/rotational").as_deref() == Some("1"),
        read_only: attr("ro").as_deref() == Some("1"),
    })
}

impl Disk {
    pub fn identity(&self) -> DiskIdentity {
        DiskIdentity {
            size: self.size,
            wwn: self.wwn.clone(),
            serial: self.serial.clone(),
            by_path: self.by_path.clone(),
        }
    }
}

/// The identity of an open target: udev's names for a block device, the
/// canonical path for an image file (tests, demos).
pub fn identify(dev: &Dev) -> DiskIdentity {
    let from_udev = dev.rdev.and_then(|rdev| {
        let d = udev::Device::from_devnum(udev::DeviceType::Block, rdev).ok()?;
        from_udev(&d)
    });
    match from_udev {
        Some(d) => DiskIdentity {
            size: dev.size,
            ..d.identity()
        },
        None => DiskIdentity {
            size: dev.size,
            wwn: None,
            serial: None,
            by_path: std::fs::canonicalize(&dev.path)
                .ok()
                .map(|p| p.display().to_string())
                .filter(|p| p.len() <= DiskIdentity::MAX_FIELD),
        },
    }
}

/// The one disk that is `id`: a host held to the disk it started writing.
pub fn find<'a>(disks: &'a [Disk], id: &DiskIdentity) -> Result<&'a Disk> {
    let hits: Vec<&Disk> = disks
        .iter()
        .filter(|d| d.identity().same_disk(id))
        .collect();
    match hits[..] {
        [d] => Ok(d),
        [] => bail!(
            "the disk this host was writing ({id}) is not present; refusing to write another. Disks seen:{}",
            disks.iter().map(|d| format!("\n  {d}")).collect::<String>()
        ),
        _ => bail!(
            "{} disks answer to the identity of the one this host was writing ({id}); refusing to guess",
            hits.len()
        ),
    }
}

/// virtio and NVMe disks often lack ID_BUS; their path says what they are.
fn bus_from_path(path: Option<&str>) -> Option<String> {
    let p = path?;
    ["usb", "nvme", "ata", "scsi", "virtio"]
        .iter()
        .find(|b| p.contains(*b))
        .map(|b| b.to_string())
}

fn has_criteria(s: &TargetSelector) -> bool {
    s.by_path.is_some()
        || s.serial.is_some()
        || s.wwn.is_some()
        || s.model.is_some()
        || s.min_size.is_some()
        || s.max_size.is_some()
}

fn matches(d: &Disk, s: &TargetSelector) -> bool {
    let eq = |want: &Option<String>, have: &Option<String>| {
        want.as_ref()
            .is_none_or(|w| have.as_deref() == Some(w.as_str()))
    };
    eq(&s.by_path, &d.by_path)
        && eq(&s.serial, &d.serial)
        && eq(&s.wwn, &d.wwn)
        && s.model
            .as_ref()
            .is_none_or(|m| d.model.as_deref().is_some_and(|dm| dm.contains(m.as_str())))
        && s.min_size.is_none_or(|m| d.size >= m.0)
        && s.max_size.is_none_or(|m| d.size <= m.0)
}

/// Picks the one disk the selector means, or says why it cannot.
pub fn select<'a>(disks: &'a [Disk], s: &TargetSelector) -> Result<&'a Disk> {
    let list = |ds: &[&Disk]| ds.iter().map(|d| format!("\n  {d}")).collect::<String>();
    let all: Vec<&Disk> = disks.iter().collect();
    if disks.is_empty() {
        bail!("no disks found");
    }
    let usable: Vec<&Disk> = disks
        .iter()
        .filter(|d| !d.read_only && (s.allow_usb || d.bus.as_deref() != Some("usb")))
        .collect();
    if has_criteria(s) {
        let hits: Vec<&Disk> = usable.iter().copied().filter(|d| matches(d, s)).collect();
        match hits.len() {
            1 => Ok(hits[0]),
            0 => bail!(
                "no disk matches the target selector{}; disks seen:{}",
                usb_note(s),
                list(&all)
            ),
            n => bail!(
                "the target selector matches {n} disks, refusing to guess:{}",
                list(&hits)
            ),
        }
    } else {
        let internal: Vec<&Disk> = usable.iter().copied().filter(|d| !d.removable).collect();
        let Some(max) = internal.iter().map(|d| d.size).max() else {
            bail!(
                "no internal non-removable disk{}; disks seen:{}",
                usb_note(s),
                list(&all)
            );
        };
        let largest: Vec<&Disk> = internal.into_iter().filter(|d| d.size == max).collect();
        if largest.len() > 1 {
            bail!(
                "{} disks tie for the largest, refusing to guess; give a selector:{}",
                largest.len(),
                list(&largest)
            );
        }
        Ok(largest[0])
    }
}

fn usb_note(s: &TargetSelector) -> &'static str {
    if s.allow_usb {
        ""
    } else {
        " (USB disks are excluded unless allow_usb = true)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Size;

    fn disk(node: &str, size: u64, bus: &str, serial: &str) -> Disk {
        Disk {
            devnode: node.into(),
            size,
            bus: Some(bus.into()),
            serial: Some(serial.into()),
            model: Some(format!("Model {serial}")),
            ..Default::default()
        }
    }

    #[test]
    fn largest_internal_by_default() {
        let ds = vec![
            disk("/dev/sda", 500, "ata", "A"),
            disk("/dev/sdb", 1000, "usb", "U"),
            disk("/dev/nvme0n1", 800, "nvme", "N"),
        ];
        assert_eq!(
            select(&ds, &TargetSelector::default()).unwrap().devnode,
            PathBuf::from("/dev/nvme0n1")
        );
        let sel = TargetSelector {
            allow_usb: true,
            ..Default::default()
        };
        assert_eq!(
            select(&ds, &sel).unwrap().devnode,
            PathBuf::from("/dev/sdb")
        );
    }

    #[test]
    fn refuses_ties_and_ambiguity() {
        let ds = vec![
            disk("/dev/sda", 500, "ata", "A"),
            disk("/dev/sdb", 500, "ata", "B"),
        ];
        let e = select(&ds, &TargetSelector::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("tie"), "{e}");
        let sel = TargetSelector {
            min_size: Some(Size(100)),
            ..Default::default()
        };
        let e = select(&ds, &sel).unwrap_err().to_string();
        assert!(
            e.contains("matches 2 disks") && e.contains("/dev/sda") && e.contains("/dev/sdb"),
            "{e}"
        );
        let sel = TargetSelector {
            serial: Some("B".into()),
            ..Default::default()
        };
        assert_eq!(
            select(&ds, &sel).unwrap().devnode,
            PathBuf::from("/dev/sdb")
        );
        let sel = TargetSelector {
            serial: Some("Z".into()),
            ..Default::default()
        };
        assert!(
            select(&ds, &sel)
                .unwrap_err()
                .to_string()
                .contains("no disk matches")
        );
    }

    #[test]
    fn usb_only_when_allowed() {
        let ds = vec![disk("/dev/sdb", 1000, "usb", "U")];
        let sel = TargetSelector {
            serial: Some("U".into()),
            ..Default::default()
        };
        assert!(
            select(&ds, &sel)
                .unwrap_err()
                .to_string()
                .contains("allow_usb")
        );
        let sel = TargetSelector {
            serial: Some("U".into()),
            allow_usb: true,
            ..Default::default()
        };
        assert!(select(&ds, &sel).is_ok());
    }

    #[test]
    fn a_host_is_held_to_its_disk() {
        let ds = vec![
            disk("/dev/sda", 500, "ata", "A"),
            disk("/dev/sdb", 1000, "ata", "B"),
        ];
        let was = ds[0].identity();
        assert_eq!(find(&ds, &was).unwrap().devnode, PathBuf::from("/dev/sda"));
        // The disk it was writing is gone: no other is taken, though the
        // default selector would now pick /dev/sdb.
        let e = find(&ds[1..], &was).unwrap_err().to_string();
        assert!(e.contains("not present") && e.contains("serial A"), "{e}");
    }

    #[test]
    fn discovers_this_machines_disks() {
        // Every machine running the tests has at least its own root disk.
        let ds = discover().unwrap();
        assert!(!ds.is_empty(), "udev found no disks");
        assert!(
            ds.iter()
                .all(|d| d.size > 0 && d.devnode.starts_with("/dev"))
        );
    }
}
