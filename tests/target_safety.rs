//! The writer refuses disks that are in use.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// A mounted loop device is refused, whether named as the loop device or
/// as its backing file; once unmounted it is accepted.
#[test]
fn mounted_disks_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let img = mkdisk(t.path(), "d.img", "bare", 16);
    let lo =
        String::from_utf8(sh(Command::new("losetup").args(["--find", "--show"]).arg(&img)).stdout)
            .unwrap();
    let lo = lo.trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let _d = Detach(lo.clone());
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let before = sha256(&img);
    // Read-only, so that the mount itself changes nothing.
    sh(Command::new("mount")
        .args(["-o", "ro,noload"])
        .arg(&lo)
        .arg(&mnt));

    let err = format!(
        "{:#}",
        blockswarm::blockdev::open_target(Path::new(&lo)).unwrap_err()
    );
    assert!(err.contains("busy") || err.contains("mounted"), "{err}");
    let err = format!("{:#}", blockswarm::blockdev::open_target(&img).unwrap_err());
    assert!(err.contains("mounted at"), "{err}");
    // The receive command says the same, and writes nothing.
    let image = t.path().join("image");
    let src = mkdisk(t.path(), "s.img", "bare", 16);
    capture(&src, &image, false);
    let out = bs_err(&[
        "receive",
        image.to_str().unwrap(),
        "--target",
        &lo,
        "--peer",
        "127.0.0.1:9",
    ]);
    assert!(out.contains("busy") || out.contains("mounted"), "{out}");
    sh(Command::new("umount").arg(&mnt));
    assert_eq!(sha256(&img), before);
    blockswarm::blockdev::open_target(Path::new(&lo)).unwrap();
}
