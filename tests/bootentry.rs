//! The UEFI boot entry step: the loader it picks on real FAT ESPs (made with
//! mkfs.fat and mtools), the FAT directory reader under it, and the
//! BootOrder it writes.

use std::fs::File;
use std::path::Path;
use std::process::Command;

use blockswarm::agent::fit::bootentry::{BootVars, boot_order, choose_loader};
use blockswarm::image::extent::DevSlice;
use blockswarm::image::fs::fatdir;

fn run(tool: &str, args: &[&str]) {
    let out = Command::new(tool)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} ({e}): install dosfstools and mtools"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A FAT file system of `fat` bits (12, 16, 32) holding `files` (paths with
/// '/'; each file's content is its path), its directories made first.
fn esp(dir: &Path, fat: u32, files: &[&str]) -> std::path::PathBuf {
    let img = dir.join(format!("esp{fat}.img"));
    let _ = std::fs::remove_file(&img);
    let kib = match fat {
        12 => "1024",
        16 => "8192",
        _ => "65536",
    };
    let bits = fat.to_string();
    // One sector per cluster: directories with many entries span clusters.
    run(
        "mkfs.fat",
        &[
            "-F",
            &bits,
            "-s",
            "1",
            "-n",
            "ESP",
            "-C",
            img.to_str().unwrap(),
            kib,
        ],
    );
    let i = img.to_str().unwrap();
    let mut made = std::collections::BTreeSet::new();
    for f in files {
        let parts: Vec<&str> = f.split('/').collect();
        for k in 1..parts.len() {
            let d = parts[..k].join("/");
            if made.insert(d.clone()) {
                run("mmd", &["-i", i, &format!("::/{d}")]);
            }
        }
        let src = dir.join("content");
        std::fs::write(&src, f).unwrap();
        run(
            "mcopy",
            &["-i", i, src.to_str().unwrap(), &format!("::/{f}")],
        );
    }
    img
}

fn pick(img: &Path) -> Option<String> {
    let file = File::open(img).unwrap();
    let dev = DevSlice::new(&file, 0, file.metadata().unwrap().len());
    choose_loader(&dev).unwrap()
}

#[test]
fn loader_choice_on_real_fat() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for fat in [12, 16, 32] {
        let case = |files: &[&str]| pick(&esp(d, fat, files));
        assert_eq!(case(&[]), None, "FAT{fat}: an empty ESP");
        assert_eq!(
            case(&["EFI/BOOT/BOOTX64.EFI"]),
            Some("\\EFI\\BOOT\\BOOTX64.EFI".into()),
            "FAT{fat}: only the fallback path"
        );
        assert_eq!(
            case(&["EFI/BOOT/BOOTX64.EFI", "EFI/Microsoft/Boot/bootmgfw.efi"]),
            Some("\\EFI\\Microsoft\\Boot\\bootmgfw.efi".into()),
            "FAT{fat}: Windows before the fallback"
        );
        // A long (LFN) directory name, as the e2e test image has.
        assert_eq!(
            case(&[
                "EFI/BOOT/BOOTX64.EFI",
                "EFI/Microsoft/Boot/bootmgfw.efi",
                "EFI/blockswarm-test/grubx64.efi"
            ]),
            Some("\\EFI\\blockswarm-test\\grubx64.efi".into()),
            "FAT{fat}: a distribution's GRUB before Windows"
        );
        // shim before GRUB, in any distribution's directory.
        assert_eq!(
            case(&[
                "EFI/debian/grubx64.efi",
                "EFI/ubuntu/grubx64.efi",
                "EFI/ubuntu/shimx64.efi",
                "EFI/BOOT/BOOTX64.EFI"
            ]),
            Some("\\EFI\\ubuntu\\shimx64.efi".into()),
            "FAT{fat}: shim first"
        );
        // Directories in name order, whatever their case.
        assert_eq!(
            case(&["EFI/fedora/grubx64.efi", "EFI/Debian/GRUBX64.EFI"]),
            Some("\\EFI\\Debian\\GRUBX64.EFI".into()),
            "FAT{fat}: names compare without case"
        );
        // A directory named like a loader is no loader.
        assert_eq!(
            case(&["EFI/debian/shimx64.efi/x", "EFI/BOOT/BOOTX64.EFI"]),
            Some("\\EFI\\BOOT\\BOOTX64.EFI".into()),
            "FAT{fat}: a directory called shimx64.efi"
        );
    }
}

#[test]
fn fat_directories_span_clusters_and_long_names() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // 200 long names in one directory: far more than one 512-byte cluster.
    let names: Vec<String> = (0..200)
        .map(|i| format!("EFI/tools/a-long-file-name-number-{i:03}.efi"))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    for fat in [16, 32] {
        let img = esp(d, fat, &refs);
        let file = File::open(&img).unwrap();
        let dev = DevSlice::new(&file, 0, file.metadata().unwrap().len());
        let list = fatdir::read_dir(&dev, "/EFI/tools").unwrap().unwrap();
        let got: Vec<&str> = list.iter().map(|e| e.name.as_str()).collect();
        let want: Vec<&str> = refs.iter().map(|n| &n[10..]).collect();
        assert_eq!(got, want, "FAT{fat}");
        let last = fatdir::find(&dev, "\\efi\\TOOLS\\A-LONG-FILE-NAME-NUMBER-199.EFI")
            .unwrap()
            .unwrap();
        assert_eq!(last.size as usize, names[199].len());
        assert!(!last.is_dir);
        assert!(
            fatdir::find(&dev, "/EFI/tools/nothing.efi")
                .unwrap()
                .is_none()
        );
        assert!(fatdir::read_dir(&dev, "/EFI/none").unwrap().is_none());
    }
}

#[test]
fn fat_directory_loop_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let img = esp(tmp.path(), 32, &["EFI/BOOT/BOOTX64.EFI"]);
    // Point the root directory's FAT entry (cluster 2) at itself.
    let file = File::options().read(true).write(true).open(&img).unwrap();
    let mut bs = [0u8; 512];
    use std::os::unix::fs::FileExt;
    file.read_exact_at(&mut bs, 0).unwrap();
    let reserved = u64::from(u16::from_le_bytes([bs[14], bs[15]]));
    let root = u32::from_le_bytes([bs[44], bs[45], bs[46], bs[47]]);
    file.write_all_at(&root.to_le_bytes(), reserved * 512 + 4 * u64::from(root))
        .unwrap();
    let dev = DevSlice::new(&file, 0, file.metadata().unwrap().len());
    let err = fatdir::read_dir(&dev, "").unwrap_err();
    assert!(format!("{err:#}").contains("longer than"), "{err:#}");
}

/// `efibootmgr -v` on OVMF, as the e2e PC sees it (version 17).
const OVMF: &str = "BootCurrent: 0001\n\
Timeout: 0 seconds\n\
BootOrder: 0001,0002,0003,0000,0004,0007\n\
Boot0000* UiApp\tFvVol(7cb8bdc9-f8eb-4f34-aaea-3ee4af6516a1)/FvFile(462caa21-7614-4503-836e-8ab6f4662331)\n\
Boot0001* UEFI PXEv4 (MAC:525400E2E203)\tPciRoot(0x0)/Pci(0x2,0x0)/MAC(525400e2e203,1)/IPv4(0.0.0.00.0.0.0,0,0)N.....YM....R,Y.\n\
Boot0002* UEFI HTTPv4 (MAC:525400E2E203)\tPciRoot(0x0)/Pci(0x2,0x0)/MAC(525400e2e203,1)/IPv4(0.0.0.00.0.0.0,0,0)/Uri()N.....YM....R,Y.\n\
Boot0003* UEFI Misc Device\tPciRoot(0x0)/Pci(0x3,0x0)N.....YM....R,Y.\n\
Boot0004* EFI Internal Shell\tFvVol(7cb8bdc9-f8eb-4f34-aaea-3ee4af6516a1)/FvFile(7c04a583-9e3e-4f1c-ad65-e05268d0b4d1)\n\
Boot0005* debian\tHD(2,GPT,0b4ac2c6-2e34-4a4d-9e6c-7a1b7e0a4f2e,0x1000,0x20000)/File(\\EFI\\debian\\shimx64.efi)\n\
Boot0007* blockswarm\tHD(2,GPT,11111111-2222-3333-4444-555555555555,0x1000,0x20000)/File(\\EFI\\x\\grubx64.efi)\n\
Boot0008  inactive\tHD(1,GPT,0b4ac2c6-2e34-4a4d-9e6c-7a1b7e0a4f2e,0x800,0x800)/File(\\x.efi)\n";

#[test]
fn efibootmgr_output_and_our_entries() {
    let v = BootVars::parse(OVMF);
    assert_eq!(v.current, Some(1));
    assert_eq!(v.order, [1, 2, 3, 0, 4, 7]);
    assert_eq!(v.entries.len(), 8);
    assert_eq!(v.entries[1].label, "UEFI PXEv4 (MAC:525400E2E203)");
    assert_eq!(v.entries[7].num, 8);
    assert_eq!(v.entries[7].label, "inactive");
    // By label (7) and by the ESP's partition GUID, in any case (5, 8).
    assert_eq!(
        v.ours("blockswarm", "0B4AC2C6-2E34-4A4D-9E6C-7A1B7E0A4F2E"),
        [5, 7, 8]
    );
    assert_eq!(
        v.ours("lab", "0B4AC2C6-0000-0000-0000-000000000000"),
        [] as [u16; 0]
    );
}

#[test]
fn boot_order_puts_ours_right_after_the_network_entry() {
    // After BootCurrent (PXE), before HTTP boot and the firmware's disk guess;
    // the entries replaced leave, everything else keeps its place.
    assert_eq!(
        boot_order(&[1, 2, 3, 0, 4, 7], Some(1), 9, &[5, 7]),
        [1, 9, 2, 3, 0, 4]
    );
    // Booted from the second network entry.
    assert_eq!(boot_order(&[1, 2, 3], Some(2), 9, &[]), [1, 2, 9, 3]);
    // The firmware reused a replaced entry's number: it appears once.
    assert_eq!(boot_order(&[1, 7, 2], Some(1), 7, &[7]), [1, 7, 2]);
    assert_eq!(boot_order(&[7, 1, 2], Some(1), 7, &[]), [1, 7, 2]);
    // BootCurrent not in BootOrder (a one-time boot) or unknown: last.
    assert_eq!(boot_order(&[1, 2], Some(5), 9, &[]), [1, 2, 9]);
    assert_eq!(boot_order(&[1, 2], None, 9, &[]), [1, 2, 9]);
    assert_eq!(boot_order(&[], None, 9, &[]), [9]);
}
