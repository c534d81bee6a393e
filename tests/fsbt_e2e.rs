//! Capture, seed and receive whole disks on this machine, then check the
//! targets: used extents byte-identical, file systems clean, files intact.

mod common;

use std::path::Path;
use std::process::Command;

use blockswarm::image::Image;
use common::*;

const GIB: u64 = 1 << 30;

fn receive(image: &Path, target: &Path, peer: std::net::SocketAddr) {
    bs_ok(&[
        "receive",
        image.to_str().unwrap(),
        "--target",
        target.to_str().unwrap(),
        "--peer",
        &peer.to_string(),
    ]);
}

/// fsck and file checksums of one partition of `disk`, by file-system type.
fn check_partition(disk: &Path, sums_dir: &Path, part: &str, fs: &str, start: u64, size: u64) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("part.img");
    extract(disk, start, size, &img);
    if fs == "swap" {
        let out = sh(Command::new("blkid")
            .arg("-p")
            .arg("-o")
            .arg("value")
            .arg("-s")
            .arg("TYPE")
            .arg(&img));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "swap");
        return;
    }
    let sums = read_sums(&sums_dir.join(format!("{part}.sha256")));
    let files = dir.path().join("files");
    std::fs::create_dir(&files).unwrap();
    match fs {
        "fat" => {
            sh(Command::new("fsck.vfat").arg("-n").arg(&img));
            sh(Command::new("mcopy")
                .env("MTOOLS_SKIP_CHECK", "1")
                .arg("-s")
                .arg("-i")
                .arg(&img)
                .arg("::/")
                .arg(&files));
        }
        "ext" => {
            sh(Command::new("e2fsck").arg("-fn").arg(&img));
            sh(Command::new("debugfs")
                .arg("-R")
                .arg(format!("rdump / {}", files.display()))
                .arg(&img));
        }
        "ntfs" => {
            sh(Command::new("ntfsfix").arg("-n").arg(&img));
            for (name, hash) in &sums {
                let out = sh(Command::new("ntfscat").arg(&img).arg(format!("/{name}")));
                let f = files.join(name);
                std::fs::write(&f, out.stdout).unwrap();
                assert_eq!(&sha256(&f), hash, "{part}: /{name}");
            }
            return;
        }
        "btrfs" => {
            sh(Command::new("btrfs")
                .args(["check", "--readonly"])
                .arg(&img));
            sh(Command::new("btrfs").arg("restore").arg(&img).arg(&files));
        }
        other => panic!("no check for {other}"),
    }
    assert!(!sums.is_empty());
    for (name, hash) in &sums {
        // mcopy of ::/ lands the tree in files/, debugfs rdump as files/<root>.
        let direct = files.join(name);
        let f = if direct.exists() {
            direct
        } else {
            files.join(".").join(name)
        };
        assert!(f.exists(), "{part}: {name} is missing on the target");
        assert_eq!(&sha256(&f), hash, "{part}: {name}");
    }
}

/// Checks every partition of a target against the fixture's file lists.
fn check_target(image: &Path, src: &Path, target: &Path) {
    let img = Image::open(image).unwrap();
    let sums = src.with_extension("img.files");
    for r in &img.manifest.regions {
        let Some(fs) = &r.fs else { continue };
        let part = r.partition.map_or("disk".to_string(), |n| format!("p{n}"));
        check_partition(target, &sums, &part, &fs.to_string(), r.start, r.len);
    }
}

#[test]
fn gpt_disk_to_same_size_and_larger_targets() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (disk, size, image) = captured(t, "gpt", 32);
    let m = Image::open(&image).unwrap().manifest;
    let kinds: Vec<String> = m
        .regions
        .iter()
        .filter_map(|r| r.fs.as_ref().map(|f| f.to_string()))
        .collect();
    assert_eq!(kinds, ["fat", "ext", "ntfs"]);
    assert!(
        m.payload.size < size * 3 / 4,
        "only used blocks are carried: {} of {size}",
        m.payload.size
    );

    // Same size, seeded from the store file; the target starts marked.
    let same = t.join("same.img");
    blank_target(&same, size, true);
    {
        let (_seed, addr) = seed(&image, None);
        receive(&image, &same, addr);
    }
    assert_extents_equal(&image, &disk, &same, &[]);
    assert_untouched_outside(&image, &same);
    check_target(&image, &disk, &same);
    let v = sh(Command::new("sgdisk").arg("-v").arg(&same));
    assert!(String::from_utf8_lossy(&v.stdout).contains("No problems found"));

    // One GiB larger, seeded straight from the source disk.
    let big = t.join("big.img");
    blank_target(&big, size + GIB, false);
    {
        let (_seed, addr) = seed(&image, Some(&disk));
        receive(&image, &big, addr);
    }
    // The protective MBR's size and the primary GPT header are refitted.
    assert_extents_equal(&image, &disk, &big, &[(446 + 12, 446 + 16), (512, 1024)]);
    check_target(&image, &disk, &big);
    let v = sh(Command::new("sgdisk").arg("-v").arg(&big));
    let v = String::from_utf8_lossy(&v.stdout);
    assert!(v.contains("No problems found"), "sgdisk -v:\n{v}");
    let p = sh(Command::new("sgdisk").arg("-p").arg(&big));
    let p = String::from_utf8_lossy(&p.stdout);
    let out = bs_ok(&[
        "verify",
        image.to_str().unwrap(),
        "--target",
        big.to_str().unwrap(),
    ]);
    assert!(
        out.contains("pieces match") && out.contains("GPT refitted"),
        "{out}"
    );
    // A flipped byte inside a used extent is found.
    let out = bs_ok(&[
        "verify",
        image.to_str().unwrap(),
        "--target",
        same.to_str().unwrap(),
    ]);
    assert!(
        out.contains(&format!("all {} pieces match", m.payload.piece_count)),
        "{out}"
    );
    let e = m.regions[2].extents[0];
    let f = std::fs::OpenOptions::new().write(true).open(&same).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5A], e.start + e.len / 2).unwrap();
    let out = bs_err(&[
        "verify",
        image.to_str().unwrap(),
        "--target",
        same.to_str().unwrap(),
    ]);
    assert!(
        out.contains("1 of") && out.contains("pieces differ"),
        "{out}"
    );
    let last = (size + GIB) / 512 - 34;
    assert!(p.contains(&format!("last usable sector is {last}")), "{p}");
}

#[test]
fn mbr_disk_with_logical_partitions() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let disk = mkdisk(t, "disk.img", "mbr", 16);
    let size = std::fs::metadata(&disk).unwrap().len();
    let image = t.join("image");
    capture(&disk, &image, false);
    let m = Image::open(&image).unwrap().manifest;
    let names: Vec<&str> = m.regions.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["boot", "p1", "ebr5", "p5", "ebr6", "p6"]);
    let swap = m.regions.iter().find(|r| r.name == "p6").unwrap();
    assert_eq!(swap.used_bytes, 4096, "swap carries only its header");

    let tgt = t.join("tgt.img");
    blank_target(&tgt, size, true);
    {
        let (_seed, addr) = seed(&image, Some(&disk));
        receive(&image, &tgt, addr);
    }
    assert_extents_equal(&image, &disk, &tgt, &[]);
    assert_untouched_outside(&image, &tgt);
    check_target(&image, &disk, &tgt);
    let l = sh(Command::new("sfdisk").arg("-d").arg(&tgt));
    let l0 = sh(Command::new("sfdisk").arg("-d").arg(&disk));
    let strip = |o: &[u8]| {
        String::from_utf8_lossy(o)
            .lines()
            .filter(|l| l.contains("start="))
            .map(|l| l.split_once(':').unwrap().1.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&l.stdout), strip(&l0.stdout));
    assert_eq!(strip(&l.stdout).len(), 4);
}

#[test]
fn bare_ext4_without_partition_table() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (disk, size, image) = captured(t, "bare", 48);
    let m = Image::open(&image).unwrap().manifest;
    assert_eq!(m.regions.len(), 1);
    assert_eq!(m.regions[0].fs.as_ref().unwrap().to_string(), "ext");
    let tgt = t.join("tgt.img");
    blank_target(&tgt, size, true);
    {
        let (_seed, addr) = seed(&image, None);
        receive(&image, &tgt, addr);
    }
    assert_extents_equal(&image, &disk, &tgt, &[]);
    assert_untouched_outside(&image, &tgt);
    check_target(&image, &disk, &tgt);
}

#[test]
fn other_file_systems_through_partclone() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let disk = mkdisk(t, "disk.img", "other", 32);
    let size = std::fs::metadata(&disk).unwrap().len();
    let image = t.join("image");
    capture(&disk, &image, false);
    let m = Image::open(&image).unwrap().manifest;
    let (bt, raw) = (&m.regions[1], &m.regions[2]);
    assert_eq!(bt.fs.as_ref().unwrap().to_string(), "btrfs");
    assert!(
        bt.warning.is_none() && bt.used_bytes < bt.len / 2,
        "btrfs is mapped: {} of {}",
        bt.used_bytes,
        bt.len
    );
    assert_eq!(raw.used_bytes, raw.len, "unknown data is carried whole");
    assert!(raw.warning.as_deref().unwrap().contains("whole"));

    let tgt = t.join("tgt.img");
    blank_target(&tgt, size, true);
    {
        let (_seed, addr) = seed(&image, Some(&disk));
        receive(&image, &tgt, addr);
    }
    assert_extents_equal(&image, &disk, &tgt, &[]);
    assert_untouched_outside(&image, &tgt);
    check_partition(
        &tgt,
        &disk.with_extension("img.files"),
        "p1",
        "btrfs",
        bt.start,
        bt.len,
    );
}

/// The layout most installers make: the last partition runs to the last
/// usable sector, so its last blocks share the disk's last MiB with the
/// backup GPT. Finishing the target (the backup table written last) must
/// not touch them, on a target of the same size, one sector larger and one
/// MiB larger.
#[test]
fn last_partition_to_the_end_of_the_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let disk = {
        let out = t.join("disk.img");
        sh(Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/mkdisk"
        ))
        .arg(&out)
        .arg("gpt-end")
        .env("SCALE", "64")
        .env("FILL", "80"));
        out
    };
    let size = std::fs::metadata(&disk).unwrap().len();
    let image = t.join("image");
    capture(&disk, &image, true);
    let m = Image::open(&image).unwrap().manifest;
    let end = m.extents().map(|e| e.end()).max().unwrap();
    assert!(
        end > size - (1 << 20),
        "the fixture must have used blocks in the disk's last MiB (last ends {} bytes before the end)",
        size - end
    );
    let (_seed, addr) = seed(&image, None);
    for extra in [0, 512, 1 << 20] {
        let tgt = t.join(format!("target-{extra}.img"));
        blank_target(&tgt, size + extra, true);
        receive(&image, &tgt, addr);
        let out = bs_ok(&[
            "verify",
            image.to_str().unwrap(),
            "--target",
            tgt.to_str().unwrap(),
        ]);
        assert!(out.contains("pieces match"), "+{extra}: {out}");
        // Past the first MiB, every used byte is the source's.
        assert_extents_equal(&image, &disk, &tgt, &[(0, 1 << 20)]);
        assert_untouched_outside(&image, &tgt);
        check_target(&image, &disk, &tgt);
        let v = sh(Command::new("sgdisk").arg("-v").arg(&tgt));
        let v = String::from_utf8_lossy(&v.stdout);
        assert!(v.contains("No problems found"), "+{extra}: sgdisk -v:\n{v}");
    }
}
