//! The native ext2/3/4 parser against partclone's used-block map.
//!
//! Each test makes a file system image with e2fsprogs, fills it with files
//! (`mkfs -d`), frees some of them again (`debugfs rm`) so the bitmaps have
//! holes, and asserts that `ext::used_extents` equals the `+` ranges of
//! `partclone.ext4 -D`, byte for byte. The tools must be installed: a missing
//! tool fails the test. No exception to byte-for-byte equality was needed: the
//! parser mirrors libext2fs, which partclone uses (including block 0 of 1 KiB
//! file systems, which partclone counts as used and so do we).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use blockswarm::image::extent::{DevSlice, Extent, total_len};
use blockswarm::image::fs::ext;
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

/// Finds a tool on PATH or in the sbin directories, or fails saying what to install.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"]);
    for dir in dirs {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    let pkg = if name.starts_with("partclone") {
        "partclone"
    } else {
        "e2fsprogs"
    };
    panic!("`{name}` is not installed: install the {pkg} package (apt-get install {pkg})");
}

/// Runs a tool, failing the test with its output if it fails; returns stdout.
fn run(name: &str, args: &[&str]) -> String {
    let out = Command::new(tool(name)).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{name} {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// xorshift64*: deterministic file sizes and contents.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Writes `len` bytes of nonzero data: random, or a cheap stamped pattern.
fn write_file(path: &Path, len: u64, rng: &mut Rng, random: bool) {
    let f = File::create(path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(MIB) as usize;
        if random {
            for c in buf[..n].chunks_mut(8) {
                c.copy_from_slice(&rng.next().to_le_bytes()[..c.len()]);
            }
        } else {
            for (i, c) in buf[..n].chunks_mut(512).enumerate() {
                c.fill(b'a' + (i % 26) as u8);
                let stamp = (off + i as u64 * 512).to_le_bytes();
                let k = c.len().min(8);
                c[..k].copy_from_slice(&stamp[..k]);
            }
        }
        f.write_all_at(&buf[..n], off).unwrap();
        off += n as u64;
    }
}

/// Fills `root` with `files` files of varied sizes in nested directories,
/// `big` large files, a sparse file and symlinks. Returns the regular files.
fn populate(root: &Path, seed: u64, files: usize, big: &[u64]) -> Vec<String> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    let dirs: Vec<String> = (0..12)
        .map(|i| {
            if i % 3 == 2 {
                format!("d{}/sub{i}", i - 1)
            } else {
                format!("d{i}")
            }
        })
        .collect();
    for d in &dirs {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    for i in 0..files {
        let size = match rng.below(10) {
            0 => 0,
            1..=3 => rng.below(256),
            4..=6 => rng.below(16 << 10),
            7..=8 => rng.below(200 << 10),
            _ => rng.below(MIB),
        };
        let rel = format!("{}/f{i}", dirs[i % dirs.len()]);
        write_file(&root.join(&rel), size, &mut rng, i % 2 == 0);
        out.push(rel);
    }
    for (i, &len) in big.iter().enumerate() {
        let rel = format!("big{i}");
        write_file(&root.join(&rel), len, &mut rng, i % 2 == 0);
        out.push(rel);
    }
    let sparse = File::create(root.join("sparse")).unwrap();
    sparse.write_all_at(b"head", 0).unwrap();
    sparse.write_all_at(b"tail", 3 * MIB).unwrap();
    symlink("d0/f0", root.join("short-link")).unwrap();
    symlink("x".repeat(300), root.join("long-link")).unwrap();
    out
}

/// A file system image in its own temporary directory.
struct Img {
    _dir: TempDir,
    path: PathBuf,
}

/// Runs `mkfs` on a sparse file of `size` bytes, filled via `-d` with
/// `files` small files and `big` large ones; then deletes every fourth file
/// and one large file, so that the bitmaps have holes.
fn make(mkfs: &str, size: u64, args: &[&str], files: usize, big: &[u64]) -> Img {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fs.img");
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    let written = populate(&src, size ^ args.len() as u64 ^ 0x5eed, files, big);
    File::create(&path).unwrap().set_len(size).unwrap();
    let mut a = vec!["-q", "-F"];
    a.extend_from_slice(args);
    a.extend(["-d", src.to_str().unwrap(), path.to_str().unwrap()]);
    run(mkfs, &a);
    fs::remove_dir_all(&src).unwrap();
    let rm: String = written
        .iter()
        .enumerate()
        .filter(|(i, f)| i % 4 == 1 || f.as_str() == "big0")
        .map(|(_, f)| format!("rm /{f}\n"))
        .collect();
    let cmds = dir.path().join("rm.cmds");
    fs::write(&cmds, rm).unwrap();
    run(
        "debugfs",
        &["-w", "-f", cmds.to_str().unwrap(), path.to_str().unwrap()],
    );
    run("e2fsck", &["-fn", path.to_str().unwrap()]);
    Img { _dir: dir, path }
}

/// The native map of a whole image file.
fn native(path: &Path) -> anyhow::Result<Vec<Extent>> {
    let f = File::open(path).unwrap();
    let dev = DevSlice::new(&f, 0, f.metadata().unwrap().len());
    ext::used_extents(&dev)
}

/// partclone's domain map: the `pos size +` lines, in bytes.
fn partclone_map(img: &Path) -> Vec<Extent> {
    let map = img.with_extension("map");
    let log = img.with_extension("log");
    let [img_s, map_s, log_s] = [img, &map, &log].map(|p| p.to_str().unwrap().to_owned());
    run(
        "partclone.ext4",
        &["-D", "-q", "-s", &img_s, "-O", &map_s, "-L", &log_s],
    );
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    let mut out: Vec<Extent> = Vec::new();
    for line in fs::read_to_string(&map).unwrap().lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if line.starts_with('#') || f.len() != 3 || f[2] != "+" {
            continue;
        }
        let e = Extent::new(hex(f[0]), hex(f[1]));
        match out.last_mut() {
            Some(last) if last.end() == e.start => last.len += e.len,
            _ => out.push(e),
        }
    }
    out
}

/// Byte ranges in `a` but not in `b` (both sorted and merged).
fn minus(a: &[Extent], b: &[Extent]) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut j = 0;
    for e in a {
        let mut pos = e.start;
        while j < b.len() && b[j].end() <= pos {
            j += 1;
        }
        let mut k = j;
        while pos < e.end() {
            match b.get(k) {
                Some(x) if x.start < e.end() => {
                    if x.start > pos {
                        out.push(Extent::new(pos, x.start - pos));
                    }
                    pos = pos.max(x.end());
                    k += 1;
                }
                _ => {
                    out.push(Extent::new(pos, e.end() - pos));
                    pos = e.end();
                }
            }
        }
    }
    out
}

/// Number of groups flagged BLOCK_UNINIT, and the feature line, per dumpe2fs.
fn dumpe2fs(img: &Path) -> (usize, String) {
    let out = run("dumpe2fs", &[img.to_str().unwrap()]);
    let uninit = out.lines().filter(|l| l.contains("BLOCK_UNINIT")).count();
    let features = out
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .unwrap_or("");
    (uninit, features.to_owned())
}

/// Evicts the image from the page cache, so that timings include the reads.
fn drop_cache(path: &Path) {
    use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
    let f = File::open(path).unwrap();
    f.sync_all().unwrap();
    posix_fadvise(&f, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED).unwrap();
}

/// Asserts that the native map equals partclone's (timing both with a cold
/// page cache); returns the BLOCK_UNINIT
/// group count and the features.
fn check(name: &str, img: &Img) -> (usize, String) {
    drop_cache(&img.path);
    let t = Instant::now();
    let ours = native(&img.path).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let t_ours = t.elapsed();
    drop_cache(&img.path);
    let t = Instant::now();
    let theirs = partclone_map(&img.path);
    let t_theirs = t.elapsed();
    let (uninit, features) = dumpe2fs(&img.path);
    println!(
        "{name}: {} used bytes in {} extents, {uninit} BLOCK_UNINIT groups; native {t_ours:?}, \
         partclone {t_theirs:?}\n  {features}",
        total_len(&ours),
        ours.len(),
    );
    assert!(
        ours.windows(2).all(|w| w[0].end() < w[1].start),
        "{name}: not sorted+merged"
    );
    let (extra, missing) = (minus(&ours, &theirs), minus(&theirs, &ours));
    assert!(
        extra.is_empty() && missing.is_empty(),
        "{name}: differs from partclone\n  only native: {extra:?}\n  only partclone: {missing:?}"
    );
    (uninit, features)
}

fn fs_test(name: &str, mkfs: &str, size: u64, args: &[&str]) -> (usize, String) {
    let img = make(mkfs, size, args, 300, &[3 * MIB, 7 * MIB, 12 * MIB]);
    check(name, &img)
}

#[test]
fn ext4_default_4k() {
    let (_, features) = fs_test("ext4 4K", "mkfs.ext4", 1024 * MIB, &[]);
    assert!(
        features.contains("flex_bg") && features.contains("64bit"),
        "{features}"
    );
}

#[test]
fn ext4_1k_blocks() {
    fs_test("ext4 1K", "mkfs.ext4", 256 * MIB, &["-b", "1024"]);
}

#[test]
fn ext4_2k_blocks() {
    fs_test("ext4 2K", "mkfs.ext4", 256 * MIB, &["-b", "2048"]);
}

#[test]
fn ext4_meta_bg() {
    // 1 MiB groups, 16 descriptors per block: 16 meta groups, most uninit.
    let args = ["-b", "1024", "-g", "1024", "-O", "meta_bg,^resize_inode"];
    let (uninit, features) = fs_test("ext4 meta_bg", "mkfs.ext4", 256 * MIB, &args);
    assert!(
        features.contains("meta_bg") && uninit > 100,
        "{uninit} {features}"
    );
}

#[test]
fn ext4_meta_bg_4k_32bit() {
    let args = ["-g", "1024", "-O", "meta_bg,^resize_inode,^64bit"];
    fs_test("ext4 meta_bg 4K ^64bit", "mkfs.ext4", 1024 * MIB, &args);
}

#[test]
fn ext4_no_flex_bg() {
    let args = ["-b", "4096", "-g", "8192", "-O", "^flex_bg"];
    let (_, features) = fs_test("ext4 ^flex_bg", "mkfs.ext4", 1024 * MIB, &args);
    assert!(!features.contains("flex_bg"), "{features}");
}

#[test]
fn ext4_small_flex_groups() {
    let args = ["-b", "4096", "-g", "4096", "-G", "4"];
    fs_test("ext4 -G 4", "mkfs.ext4", 1024 * MIB, &args);
}

#[test]
fn ext4_64bit() {
    let args = ["-b", "1024", "-O", "64bit"];
    let (_, features) = fs_test("ext4 64bit", "mkfs.ext4", 256 * MIB, &args);
    assert!(features.contains("64bit"), "{features}");
}

#[test]
fn ext4_not_64bit() {
    let args = ["-b", "1024", "-O", "^64bit"];
    let (_, features) = fs_test("ext4 ^64bit", "mkfs.ext4", 256 * MIB, &args);
    assert!(!features.contains("64bit"), "{features}");
}

#[test]
fn ext4_sparse_super2() {
    let args = ["-b", "1024", "-O", "sparse_super2"];
    let (_, features) = fs_test("ext4 sparse_super2", "mkfs.ext4", 256 * MIB, &args);
    assert!(features.contains("sparse_super2"), "{features}");
}

#[test]
fn ext4_gdt_csum() {
    // uninit_bg: BLOCK_UNINIT trusted via the older crc16 descriptor checksums.
    let args = ["-b", "4096", "-g", "4096", "-O", "^metadata_csum,uninit_bg"];
    let (uninit, features) = fs_test("ext4 uninit_bg", "mkfs.ext4", 600 * MIB, &args);
    assert!(
        features.contains("uninit_bg") && uninit > 0,
        "{uninit} {features}"
    );
}

#[test]
fn ext2() {
    let (uninit, _) = fs_test("ext2", "mkfs.ext2", 256 * MIB, &[]);
    assert_eq!(uninit, 0);
}

#[test]
fn ext2_no_sparse_super_2k() {
    fs_test(
        "ext2 ^sparse_super",
        "mkfs.ext2",
        256 * MIB,
        &["-b", "2048", "-O", "^sparse_super,^resize_inode"],
    );
}

#[test]
fn ext3() {
    let (_, features) = fs_test(
        "ext3",
        "mkfs.ext3",
        512 * MIB,
        &["-b", "4096", "-g", "8192"],
    );
    assert!(features.contains("has_journal"), "{features}");
}

#[test]
fn ext4_block_uninit() {
    let img = make("mkfs.ext4", 600 * MIB, &["-b", "4096"], 20, &[]);
    let (uninit, _) = check("ext4 BLOCK_UNINIT", &img);
    assert!(uninit > 0, "dumpe2fs shows no BLOCK_UNINIT group");
}

/// Prints native vs partclone timings on a 2.5 GiB file system with ~1 GiB of
/// files (run with --nocapture to see them).
#[test]
fn ext4_large_timing() {
    let big: Vec<u64> = (0..40).map(|i| (20 + i % 10) * MIB).collect();
    let img = make("mkfs.ext4", 2560 * MIB, &[], 300, &big);
    check("ext4 2.5 GiB", &img);
}

#[test]
fn external_journal_is_all_used() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.img");
    File::create(&path).unwrap().set_len(32 * MIB).unwrap();
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-O",
            "journal_dev",
            "-b",
            "4096",
            path.to_str().unwrap(),
        ],
    );
    assert_eq!(native(&path).unwrap(), vec![Extent::new(0, 32 * MIB)]);
}

// ---- corrupt input: errors, never panics ----

/// A small empty ext4 (4K blocks, descriptors in block 1) to corrupt.
fn small_img() -> Img {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fs.img");
    File::create(&path).unwrap().set_len(32 * MIB).unwrap();
    run(
        "mkfs.ext4",
        &["-q", "-F", "-b", "4096", path.to_str().unwrap()],
    );
    Img { _dir: dir, path }
}

fn patch(path: &Path, off: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn probe(path: &Path) -> bool {
    let f = File::open(path).unwrap();
    ext::probe(&DevSlice::new(&f, 0, f.metadata().unwrap().len())).unwrap()
}

fn error(path: &Path) -> String {
    format!(
        "{:#}",
        native(path).expect_err("a corrupt file system must not map")
    )
}

#[test]
fn zeroed_superblock_is_not_ext() {
    let img = small_img();
    assert!(probe(&img.path));
    patch(&img.path, 1024, &[0; 1024]);
    assert!(!probe(&img.path));
    assert!(error(&img.path).contains("no superblock magic"));
}

#[test]
fn zero_blocks_per_group_is_an_error() {
    let img = small_img();
    patch(&img.path, 1024 + 0x20, &0u32.to_le_bytes());
    assert!(probe(&img.path));
    let e = error(&img.path);
    assert!(e.contains("0 blocks per group"), "{e}");
}

#[test]
fn huge_blocks_per_group_is_an_error() {
    let img = small_img();
    patch(&img.path, 1024 + 0x20, &(1u32 << 30).to_le_bytes());
    let e = error(&img.path);
    assert!(e.contains("blocks per group is not in 1..=32768"), "{e}");
}

#[test]
fn huge_block_size_is_an_error() {
    let img = small_img();
    patch(&img.path, 1024 + 0x18, &20u32.to_le_bytes());
    assert!(probe(&img.path));
    let e = error(&img.path);
    assert!(
        e.contains("block size 2^(10+20) is not 1 KiB..64 KiB"),
        "{e}"
    );
}

#[test]
fn bitmap_past_the_end_is_an_error() {
    let img = small_img();
    // Group 0's descriptor is at block 1; its block bitmap field comes first.
    patch(&img.path, 4096, &0xFFFF_FFF0u32.to_le_bytes());
    let e = error(&img.path);
    assert!(
        e.contains("block group 0 descriptor: block bitmap at block 4294967280 is outside"),
        "{e}"
    );
}

#[test]
fn truncated_image_is_an_error() {
    let img = small_img();
    let f = OpenOptions::new().write(true).open(&img.path).unwrap();
    f.set_len(16 * MIB).unwrap();
    let e = error(&img.path);
    assert!(
        e.contains("region is only 16777216 bytes (truncated image?)"),
        "{e}"
    );
    // A region that claims more than the file holds (a short device): the
    // bitmap read fails. With flex_bg all bitmaps sit after the descriptors.
    f.set_len(3 * 4096).unwrap();
    let r = File::open(&img.path).unwrap();
    let e = format!(
        "{:#}",
        ext::used_extents(&DevSlice::new(&r, 0, 32 * MIB)).unwrap_err()
    );
    assert!(
        e.contains("ext: reading the block bitmap of group 0 at block"),
        "{e}"
    );
    // Cut inside the superblock: the read of the superblock fails.
    f.set_len(1500).unwrap();
    assert!(!probe(&img.path));
    let e = error(&img.path);
    assert!(
        e.contains("ext: reading the superblock") && e.contains("past the end"),
        "{e}"
    );
}

#[test]
fn random_corruption_never_panics() {
    let img = make(
        "mkfs.ext4",
        64 * MIB,
        &["-b", "1024", "-g", "2048"],
        30,
        &[],
    );
    let good = fs::read(&img.path).unwrap();
    let f = OpenOptions::new().write(true).open(&img.path).unwrap();
    let mut rng = Rng(42);
    let (mut ok, mut failed) = (0, 0);
    for _ in 0..3000 {
        // A few bytes of the superblock and descriptors, or of the first 2 MiB.
        let spots: Vec<usize> = (0..1 + rng.below(8))
            .map(|_| {
                if rng.below(2) == 0 {
                    1024 + rng.below(4096)
                } else {
                    rng.below(2 * MIB)
                }
            })
            .map(|at| at as usize)
            .collect();
        for &at in &spots {
            f.write_all_at(&[rng.next() as u8], at as u64).unwrap();
        }
        match native(&img.path) {
            Ok(v) => {
                assert!(total_len(&v) <= good.len() as u64);
                ok += 1;
            }
            Err(_) => failed += 1,
        }
        for &at in &spots {
            f.write_all_at(&good[at..at + 1], at as u64).unwrap();
        }
    }
    println!("random corruption: {ok} mapped, {failed} refused");
    assert!(failed > 0);
}
