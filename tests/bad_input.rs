//! Bad input: each case fails with an error that names the problem, without
//! a panic, and without writing to the target.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::*;

fn try_capture(src: &Path, out: &Path) -> (bool, String) {
    bs(&[
        "capture",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

fn poke(path: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn assert_marked(path: &Path) {
    let data = std::fs::read(path).unwrap();
    assert!(
        data.iter().all(|&b| b == MARK),
        "{} was written to",
        path.display()
    );
}

#[test]
fn corrupt_ext4_superblock() {
    let t = tempfile::tempdir().unwrap();
    let disk = mkdisk(t.path(), "d.img", "bare", 16);
    // s_log_block_size = 30: a 1 TiB block size.
    poke(&disk, 1024 + 24, &30u32.to_le_bytes());
    let (ok, out) = try_capture(&disk, &t.path().join("img"));
    assert!(!ok && !out.contains("panicked"), "{out}");
    assert!(
        out.to_lowercase().contains("ext") && out.contains("block size"),
        "{out}"
    );
    assert!(!t.path().join("img/manifest.json").exists());
}

#[test]
fn corrupt_fat_boot_sector() {
    let t = tempfile::tempdir().unwrap();
    let disk = mkdisk(t.path(), "d.img", "gpt", 16);
    // Sectors per cluster = 3 in the ESP's boot sector (not a power of two).
    poke(&disk, (1 << 20) + 13, &[3]);
    let (ok, out) = try_capture(&disk, &t.path().join("img"));
    assert!(!ok && !out.contains("panicked"), "{out}");
    assert!(
        out.contains("partition 1") && out.to_lowercase().contains("fat"),
        "{out}"
    );
}

#[test]
fn corrupt_ntfs_mft() {
    let t = tempfile::tempdir().unwrap();
    let disk = mkdisk(t.path(), "d.img", "gpt", 16);
    // The NTFS partition is p3; find its MFT from the boot sector and zero it.
    let layout = sh(Command::new("sgdisk").arg("-i").arg("3").arg(&disk));
    let text = String::from_utf8_lossy(&layout.stdout);
    let first: u64 = text
        .lines()
        .find(|l| l.starts_with("First sector"))
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    let start = first * 512;
    let f = std::fs::File::open(&disk).unwrap();
    let mut bs_ = [0u8; 512];
    f.read_exact_at(&mut bs_, start).unwrap();
    let cluster = u64::from(u16::from_le_bytes([bs_[11], bs_[12]])) * u64::from(bs_[13]);
    let mft_lcn = u64::from_le_bytes(bs_[0x30..0x38].try_into().unwrap());
    poke(&disk, start + mft_lcn * cluster, &vec![0u8; 16 * 1024]);
    let (ok, out) = try_capture(&disk, &t.path().join("img"));
    assert!(!ok && !out.contains("panicked"), "{out}");
    assert!(out.contains("partition 3") && out.contains("MFT"), "{out}");
}

#[test]
fn truncated_disk_image() {
    let t = tempfile::tempdir().unwrap();
    let disk = mkdisk(t.path(), "d.img", "gpt", 16);
    let len = std::fs::metadata(&disk).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (ok, out) = try_capture(&disk, &t.path().join("img"));
    assert!(!ok && !out.contains("panicked"), "{out}");
    assert!(out.contains("past the end"), "{out}");
}

#[test]
fn source_mounted_read_write_is_refused_unless_forced() {
    let t = tempfile::tempdir().unwrap();
    let disk = mkdisk(t.path(), "d.img", "bare", 16);
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    sh(Command::new("mount")
        .arg("-o")
        .arg("loop,rw")
        .arg(&disk)
        .arg(&mnt));
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _u = Unmount(&mnt);
    let (ok, out) = try_capture(&disk, &t.path().join("img"));
    assert!(!ok, "{out}");
    assert!(
        out.contains("mounted read-write") && out.contains(mnt.to_str().unwrap()),
        "{out}"
    );
    // --force passes the mount check; the ext4 parser then still refuses a
    // journal that needs recovery, since its bitmaps may be stale.
    let (ok, out) = bs(&[
        "capture",
        disk.to_str().unwrap(),
        "--out",
        t.path().join("img2").to_str().unwrap(),
        "--force",
    ]);
    assert!(
        !ok && !out.contains("mounted read-write") && out.contains("journal needs recovery"),
        "{out}"
    );
    // Read-only is fine.
    sh(Command::new("mount").arg("-o").arg("remount,ro").arg(&mnt));
    capture(&disk, &t.path().join("img3"), false);
}

/// An image and a marked target, for the receive-side cases.
fn image_and_target(
    t: &Path,
    target_size: Option<u64>,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let disk = mkdisk(t, "d.img", "bare", 16);
    let image = t.join("img");
    capture(&disk, &image, true);
    let tgt = t.join("tgt.img");
    let size = target_size.unwrap_or_else(|| std::fs::metadata(&disk).unwrap().len());
    blank_target(&tgt, size, true);
    (disk, image, tgt)
}

fn receive_err(image: &Path, target: &Path) -> String {
    bs_err(&[
        "receive",
        image.to_str().unwrap(),
        "--target",
        target.to_str().unwrap(),
        "--peer",
        "127.0.0.1:9",
    ])
}

#[test]
fn target_is_the_source() {
    let t = tempfile::tempdir().unwrap();
    let (disk, image, _) = image_and_target(t.path(), None);
    let before = sha256(&disk);
    let out = receive_err(&image, &disk);
    assert!(out.contains("own source"), "{out}");
    let out = receive_err(&image, &image.join("payload.bin"));
    assert!(out.contains("own source"), "{out}");
    assert_eq!(sha256(&disk), before);
}

#[test]
fn target_in_use_by_a_seed_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (disk, image, _) = image_and_target(t.path(), None);
    // A copy of the source under another name, being seeded from.
    let copy = t.path().join("copy.img");
    std::fs::copy(&disk, &copy).unwrap();
    let (_seed, _addr) = seed(&image, Some(&copy));
    let out = receive_err(&image, &copy);
    assert!(out.contains("in use"), "{out}");
}

#[test]
fn target_too_small() {
    let t = tempfile::tempdir().unwrap();
    let (_, image, tgt) = image_and_target(t.path(), Some(8 << 20));
    let out = receive_err(&image, &tgt);
    assert!(out.contains("too small"), "{out}");
    assert_marked(&tgt);
}

#[test]
fn manifest_that_does_not_match_the_torrent() {
    let t = tempfile::tempdir().unwrap();
    let (_, image, tgt) = image_and_target(t.path(), None);
    // Another image's torrent in this image's directory.
    let other_disk = mkdisk(t.path(), "o.img", "bare", 16);
    let other = t.path().join("other");
    capture(&other_disk, &other, false);
    std::fs::copy(other.join("image.torrent"), image.join("image.torrent")).unwrap();
    let out = receive_err(&image, &tgt);
    assert!(
        out.contains("does not match") && out.contains("info hash"),
        "{out}"
    );
    assert_marked(&tgt);
}

#[test]
fn corrupt_manifest_and_torrent() {
    let t = tempfile::tempdir().unwrap();
    let (_, image, tgt) = image_and_target(t.path(), None);
    let mpath = image.join("manifest.json");
    let good = std::fs::read(&mpath).unwrap();
    // Truncated manifest.
    std::fs::write(&mpath, &good[..good.len() / 2]).unwrap();
    let out = receive_err(&image, &tgt);
    assert!(out.contains("manifest.json: not a valid manifest"), "{out}");
    // A manifest whose extents do not add up to the payload.
    let text =
        String::from_utf8(good.clone())
            .unwrap()
            .replacen("\"used_bytes\":", "\"used_bytes\":1", 1);
    std::fs::write(&mpath, text).unwrap();
    let out = receive_err(&image, &tgt);
    assert!(out.contains("add up to"), "{out}");
    // A truncated torrent.
    std::fs::write(&mpath, &good).unwrap();
    let tpath = image.join("image.torrent");
    let tor = std::fs::read(&tpath).unwrap();
    std::fs::write(&tpath, &tor[..tor.len() / 2]).unwrap();
    let out = receive_err(&image, &tgt);
    assert!(out.contains("not valid bencoded metainfo"), "{out}");
    assert_marked(&tgt);
    // Inspect says the same, and never panics.
    let out = bs_err(&["inspect", image.to_str().unwrap()]);
    assert!(out.contains("image.torrent"), "{out}");
}
