//! FAT, NTFS and swap used-block maps checked against partclone's domain map
//! (and, for FAT, mtools' cluster chains) on images made by the real tools.
//! Differences from partclone are asserted exactly; see `fat_case`, `ntfs_case`.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use blockswarm::image::extent::{DevSlice, Extent, ExtentSet};
use blockswarm::image::fs::{fat, ntfs, swap};

/// Runs a tool, failing with an install hint if it is missing.
fn run(tool: &str, args: &[&str]) -> String {
    let pkg = match tool {
        t if t.starts_with("partclone") => "partclone",
        t if t.starts_with("mkfs.vfat") => "dosfstools",
        t if t.starts_with('m') && t != "mkswap" && t != "mkfs.ntfs" => "mtools",
        t if t.starts_with("ntfs") || t == "mkfs.ntfs" => "ntfs-3g",
        _ => "util-linux",
    };
    let out = Command::new(tool)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} ({e}): install the {pkg} package"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn blank(path: &Path, len: u64) {
    File::create(path).unwrap().set_len(len).unwrap();
}

fn cut(path: &Path, len: u64) {
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Writes `bytes` at `off` into `img`.
fn poke(img: &Path, off: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Parses the `+` lines of partclone's domain map for `img`.
fn partclone(tool: &str, img: &Path) -> Vec<Extent> {
    let (map, log) = (img.with_extension("map"), img.with_extension("log"));
    let _ = fs::remove_file(&map);
    run(
        tool,
        &["-D", "-q", "-s", s(img), "-o", s(&map), "-L", s(&log)],
    );
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    let mut set = ExtentSet::new();
    for line in fs::read_to_string(&map).unwrap().lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if !line.starts_with('#') && f.len() == 3 && f[2] == "+" {
            set.push(hex(f[0]), hex(f[1]));
        }
    }
    set.into_vec()
}

type Parser = fn(&DevSlice) -> anyhow::Result<Vec<Extent>>;
type Probe = fn(&DevSlice) -> anyhow::Result<bool>;

fn ours(img: &Path, f: Parser) -> anyhow::Result<Vec<Extent>> {
    let file = File::open(img).unwrap();
    let len = file.metadata().unwrap().len();
    f(&DevSlice::new(&file, 0, len))
}

fn probe(img: &Path, f: Probe) -> bool {
    let file = File::open(img).unwrap();
    let len = file.metadata().unwrap().len();
    f(&DevSlice::new(&file, 0, len)).unwrap()
}

/// `a` minus `b`, both sorted and merged.
fn minus(a: &[Extent], b: &[Extent]) -> Vec<Extent> {
    let mut out = ExtentSet::new();
    for e in a {
        let mut cur = e.start;
        for x in b.iter().filter(|x| x.end() > e.start && x.start < e.end()) {
            out.push(cur, x.start.saturating_sub(cur));
            cur = cur.max(x.end());
        }
        out.push(cur, e.end().saturating_sub(cur));
    }
    out.into_vec()
}

/// Writes a deterministic tree of `n` files (sizes up to `max`) in 8 dirs.
fn make_tree(root: &Path, n: usize, max: u64, seed: u64) -> Vec<PathBuf> {
    let mut x = seed | 1;
    let mut rnd = move || xorshift(&mut x) >> 8;
    let mut files = Vec::new();
    for i in 0..n {
        let dir = root.join(format!("d{}", i % 8)).join(format!("s{}", i % 3));
        fs::create_dir_all(&dir).unwrap();
        let size = match rnd() % 10 {
            0 => 0,
            1..=6 => rnd() % 8192,
            7 | 8 => rnd() % (max / 8),
            _ => rnd() % max,
        };
        let p = dir.join(format!("f{i}.bin"));
        fs::write(&p, vec![(i % 251) as u8 + 1; size as usize]).unwrap();
        files.push(p);
    }
    files
}

/// FAT geometry read independently of the crate; all but `clusters` and
/// `nfats` in bytes.
#[derive(Clone, Copy)]
struct Geo {
    fat: u64,
    fat_len: u64,
    nfats: u64,
    data: u64,
    cs: u64,
    clusters: u64,
    total: u64,
}

impl Geo {
    fn read(img: &Path) -> Geo {
        let b = fs::read(img).unwrap()[..512].to_vec();
        let le = |o: usize, n: usize| (0..n).rev().fold(0u64, |v, k| v << 8 | u64::from(b[o + k]));
        let (bps, spc, res, nfats) = (le(11, 2), le(13, 1), le(14, 2), le(16, 1));
        let fsz = if le(22, 2) != 0 { le(22, 2) } else { le(36, 4) };
        let tot = if le(19, 2) != 0 { le(19, 2) } else { le(32, 4) };
        let data = res + nfats * fsz + (le(17, 2) * 32).div_ceil(bps);
        let (fat, fat_len, cs, total) = (res * bps, fsz * bps, spc * bps, tot * bps);
        let clusters = (tot - data) / spc;
        Geo {
            fat,
            fat_len,
            nfats,
            data: data * bps,
            cs,
            clusters,
            total,
        }
    }
    /// Byte offset of cluster `c`.
    fn at(&self, c: u64) -> u64 {
        self.data + (c - 2) * self.cs
    }
}

/// Metadata plus every cluster `mshowfat` reports for the files and dirs.
fn mtools_oracle(img: &Path, g: Geo) -> Vec<Extent> {
    let listing = run("mdir", &["-i", s(img), "-/", "-b", "-a", "::/"]);
    let mut args = vec!["-i", s(img)];
    args.extend(listing.lines().map(|l| l.trim_end_matches('/')));
    let mut set = ExtentSet::new();
    set.push(0, g.data);
    let mut chains = run("mshowfat", &args);
    if g.clusters >= 65525 {
        // FAT32 root directory: follow the chain from the BPB's root cluster.
        let b = fs::read(img).unwrap();
        let le32 = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) & 0x0FFF_FFFF;
        let mut c = le32(44);
        while (2..0x0FFF_FFF8).contains(&c) {
            chains += &format!("<{c}>");
            c = le32(g.fat as usize + 4 * c as usize);
        }
    }
    for group in chains.split('<').skip(1) {
        for r in group.split('>').next().unwrap().split_whitespace() {
            let (a, z) = r.split_once('-').unwrap_or((r, r));
            let (a, z): (u64, u64) = (a.parse().unwrap(), z.parse().unwrap());
            set.push(g.at(a), (z - a + 1) * g.cs);
        }
    }
    set.into_vec()
}

/// partclone 0.3.23 reads FAT12 entries as 16-bit words shifted right by 4
/// (`check_fat12_entry`): reproduce that so its FAT12 map can be checked.
fn partclone_fat12_bug(img: &Path, g: Geo) -> Vec<Extent> {
    let b = fs::read(img).unwrap();
    let mut set = ExtentSet::new();
    set.push(0, g.data);
    for c in 2..g.clusters + 2 {
        let o = (g.fat + 2 * c) as usize;
        if u16::from_le_bytes([b[o], b[o + 1]]) >> 4 != 0 {
            set.push(g.at(c), g.cs);
        }
    }
    set.push(g.at(g.clusters + 2), g.total - g.at(g.clusters + 2)); // the tail
    set.into_vec()
}

/// Builds a FAT image with a bad cluster, fills it, deletes some, and
/// checks it against mshowfat's chains and partclone.
fn fat_case(bits: u32, mib: u64, files: usize, extra: &[&str]) {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("fat.img");
    blank(&img, mib << 20);
    let bits_s = bits.to_string();
    let mut mk = vec!["-F", &bits_s];
    mk.extend(extra.iter().chain([&s(&img)]));
    run("mkfs.vfat", &mk);
    if bits != 32 {
        // One sector less: the last cluster goes, a partial one is left.
        let b = fs::read(&img).unwrap();
        assert!(b[13] > 1, "needs clusters of several sectors");
        match u16::from_le_bytes([b[19], b[20]]) {
            0 => {
                let t32 = u32::from_le_bytes(b[32..36].try_into().unwrap());
                poke(&img, 32, &(t32 - 1).to_le_bytes());
            }
            t16 => poke(&img, 19, &(t16 - 1).to_le_bytes()),
        }
    }
    let g = Geo::read(&img);
    let ty = match g.clusters {
        0..4085 => 12,
        4085..65525 => 16,
        _ => 32,
    };
    assert_eq!(bits, ty, "mkfs.vfat made FAT{ty}");

    // Cluster 40 marked bad in every FAT copy before any file is written.
    // FAT12: clusters 40 and 41 share bytes 60..63 (12-bit packing).
    let (bad, marker, at): (u64, &[u8], u64) = match bits {
        12 => (40, &[0xF7, 0x7F, 0xFF], 60),
        16 => (40, &[0xF7, 0xFF], 80),
        _ => (40, &[0xF7, 0xFF, 0xFF, 0x0F], 160),
    };
    for k in 0..g.nfats {
        poke(&img, g.fat + k * g.fat_len + at, marker);
    }

    let src = t.path().join("src");
    let list = make_tree(&src, files, (mib << 20) / files as u64, u64::from(bits));
    let dirs: Vec<_> = (0..8).map(|d| src.join(format!("d{d}"))).collect();
    let mut cp = vec!["-i", s(&img), "-s"];
    cp.extend(dirs.iter().map(|d| s(d)).chain(["::/"]));
    run("mcopy", &cp);
    // 40 files in the root: a FAT32 root directory of several clusters.
    let mut cp = vec!["-i", s(&img)];
    cp.extend(list[..40].iter().map(|p| s(p)).chain(["::/"]));
    run("mcopy", &cp);
    let mut del = vec![format!("-i{}", s(&img))];
    for p in list.iter().step_by(5) {
        del.push(format!("::/{}", s(p.strip_prefix(&src).unwrap())));
    }
    run("mdel", &del.iter().map(String::as_str).collect::<Vec<_>>());
    run("mdeltree", &["-i", s(&img), "::/d7/s1"]);
    let more = t.path().join("more"); // refills some holes
    make_tree(&more, files / 25, (mib << 20) / files as u64, 99);
    run("mcopy", &["-i", s(&img), "-s", s(&more), "::/"]);

    assert!(probe(&img, fat::probe));
    assert!(!probe(&img, ntfs::probe) && !probe(&img, swap::probe));
    let got = ours(&img, fat::used_extents).unwrap();
    assert_eq!(got, mtools_oracle(&img, g), "FAT{bits} vs mshowfat chains");
    assert!(got.len() > 3, "expected holes, got {got:?}");
    // The bad cluster (and FAT12's odd neighbour) is skipped, both sides used.
    let used = |c: u64| got.iter().any(|e| e.start <= g.at(c) && g.at(c) < e.end());
    let next = if bits == 12 { bad + 2 } else { bad + 1 };
    assert!(!used(bad) && !used(next - 1) && (2..bad).any(used));
    assert!((next..g.clusters + 2).any(used));

    let pc = partclone("partclone.fat", &img);
    // Exception: partclone starts from an all-used bitmap and never clears
    // the sectors after the last whole cluster. No cluster maps there, so
    // they hold nothing: we leave them out.
    let tail_at = g.at(g.clusters + 2);
    let tail = vec![Extent::new(tail_at, g.total - tail_at)];
    match bits {
        // Exception: partclone's FAT12 map is wrong (16-bit reads), so it is
        // checked against a model of its bug; ours is checked by mshowfat.
        12 => assert_eq!(pc, partclone_fat12_bug(&img, g), "partclone FAT12 model"),
        16 => {
            assert!(tail[0].len > 0);
            assert_eq!(minus(&pc, &got), tail, "FAT16: only the tail differs");
            assert_eq!(minus(&got, &pc), vec![], "FAT16: nothing beyond partclone");
        }
        _ => assert_eq!(got, pc, "FAT32 vs partclone"),
    }
}

#[test]
fn fat32_vs_partclone() {
    fat_case(32, 80, 400, &[]);
}

#[test]
fn fat16_vs_partclone() {
    fat_case(16, 40, 300, &[]);
}

#[test]
fn fat16_4k_sectors() {
    fat_case(16, 64, 200, &["-S", "4096"]);
}

#[test]
fn fat12_vs_mtools() {
    fat_case(12, 12, 250, &[]);
}

/// Builds an NTFS image, fills it, frees some files, and checks partclone.
fn ntfs_case(mib: u64, cluster: Option<&str>, files: usize) {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("ntfs.img");
    let i = s(&img);
    blank(&img, mib << 20);
    let mut mk = vec!["-F", "-Q"];
    mk.extend(cluster.iter().flat_map(|c| ["-c", c]).chain([i]));
    run("mkfs.ntfs", &mk);
    let list = make_tree(
        &t.path().join("src"),
        files,
        (mib << 20) / files as u64 / 2,
        7,
    );
    for (k, p) in list.iter().enumerate() {
        run("ntfscp", &["-q", i, s(p), &format!("/f{k}.bin")]);
    }
    // Free every 4th file's data (no ntfs-3g tool deletes without a mount).
    for line in run("ntfsls", &["-i", i]).lines().step_by(4) {
        let inode = line.split_whitespace().next().unwrap();
        run("ntfstruncate", &["-q", i, inode, "0"]);
    }
    for (k, p) in list.iter().take(files / 8).enumerate() {
        run("ntfscp", &["-q", i, s(p), &format!("/g{k}.bin")]);
    }

    assert!(probe(&img, ntfs::probe));
    assert!(!probe(&img, fat::probe) && !probe(&img, swap::probe));
    let got = ours(&img, ntfs::used_extents).unwrap();
    let pc = partclone("partclone.ntfs", &img);
    // Exception: partclone maps $Bitmap's clusters only; the backup boot
    // sector sits at total_sectors * sector_size, past the last cluster, and
    // a restore without it leaves a volume that chkdsk reports as damaged.
    let b = fs::read(&img).unwrap()[..512].to_vec();
    let bps = u64::from(u16::from_le_bytes([b[11], b[12]]));
    let total = u64::from_le_bytes(b[0x28..0x30].try_into().unwrap());
    let backup = vec![Extent::new(total * bps, bps)];
    assert_eq!(
        minus(&got, &pc),
        backup,
        "NTFS: only the backup boot sector is extra"
    );
    assert_eq!(
        minus(&pc, &got),
        vec![],
        "NTFS: every partclone block is ours"
    );
    assert!(got.len() > 5, "expected a fragmented map, got {got:?}");
}

#[test]
fn ntfs_default_clusters_vs_partclone() {
    ntfs_case(128, None, 300);
}

#[test]
fn ntfs_64k_clusters_vs_partclone() {
    ntfs_case(160, Some("65536"), 150);
}

#[test]
fn ntfs_512b_clusters_vs_partclone() {
    ntfs_case(100, Some("512"), 150);
}

#[test]
fn swap_header_page_only() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("swap.img");
    blank(&img, 64 << 20);
    run("mkswap", &[s(&img)]);
    assert!(probe(&img, swap::probe));
    assert!(!probe(&img, fat::probe) && !probe(&img, ntfs::probe));
    let got = ours(&img, swap::used_extents).unwrap();
    assert_eq!(got, vec![Extent::new(0, 4096)]);
    blank(&img, 64 << 20);
    assert!(!probe(&img, swap::probe));
    assert!(ours(&img, swap::used_extents).is_err());
}

fn err(img: &Path, f: Parser) -> String {
    format!("{:#}", ours(img, f).expect_err("corrupt image must fail"))
}

#[test]
fn fat_corrupt() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("fat.img");
    blank(&img, 64 << 20);
    run("mkfs.vfat", &["-F", "32", s(&img)]);
    let good = fs::read(&img).unwrap();
    for spc in [0u8, 3] {
        poke(&img, 13, &[spc]);
        // The boot sector still names itself FAT: recognized, then refused.
        assert!(probe(&img, fat::probe), "sectors per cluster {spc}");
        let e = err(&img, fat::used_extents);
        assert!(e.contains("sectors per cluster"), "{e}");
    }
    poke(&img, 13, &good[13..14]);
    poke(&img, 16, &[9]);
    assert!(err(&img, fat::used_extents).contains("FAT count"));
    poke(&img, 16, &good[16..17]);
    assert!(probe(&img, fat::probe));

    // Cut inside the first FAT.
    let g = Geo::read(&img);
    let len = g.fat + g.fat_len / 2;
    cut(&img, len);
    assert!(probe(&img, fat::probe), "the boot sector is intact");
    let e = err(&img, fat::used_extents);
    assert!(
        e.contains("truncated") && e.contains(&len.to_string()),
        "{e}"
    );
    cut(&img, 100);
    assert!(!probe(&img, fat::probe));
    assert!(err(&img, fat::used_extents).contains("boot sector"));
}

/// A small NTFS image with a few files; returns (image, MFT byte offset, cluster size).
fn small_ntfs(dir: &Path) -> (PathBuf, u64, u64) {
    let img = dir.join("ntfs.img");
    blank(&img, 100 << 20);
    run("mkfs.ntfs", &["-F", "-Q", s(&img)]);
    let files = make_tree(&dir.join("src"), 10, 1 << 20, 3);
    for (k, p) in files.iter().enumerate() {
        run("ntfscp", &["-q", s(&img), s(p), &format!("/f{k}")]);
    }
    let b = fs::read(&img).unwrap()[..512].to_vec();
    let cs = u64::from(u16::from_le_bytes([b[11], b[12]])) * u64::from(b[13]);
    let lcn = u64::from_le_bytes(b[0x30..0x38].try_into().unwrap());
    (img, lcn * cs, cs)
}

#[test]
fn ntfs_corrupt() {
    let t = tempfile::tempdir().unwrap();
    let (img, mft, cs) = small_ntfs(t.path());
    let good = fs::read(&img).unwrap();
    assert!(ours(&img, ntfs::used_extents).is_ok());

    // Zeroed MFT: the boot sector still probes, the map fails naming the MFT.
    poke(&img, mft, &vec![0; 4 * cs as usize]);
    assert!(probe(&img, ntfs::probe));
    let e = err(&img, ntfs::used_extents);
    assert!(e.contains("MFT"), "{e}");

    // Only record 6 ($Bitmap) zeroed.
    fs::write(&img, &good).unwrap();
    poke(&img, mft + 6 * 1024, &[0; 1024]);
    let e = err(&img, ntfs::used_extents);
    assert!(e.contains("MFT record 6"), "{e}");

    // MFT LCN past the end, and a bad sectors-per-cluster byte.
    fs::write(&img, &good).unwrap();
    poke(&img, 0x30, &u64::MAX.to_le_bytes());
    assert!(!probe(&img, ntfs::probe));
    assert!(err(&img, ntfs::used_extents).contains("MFT cluster"));
    fs::write(&img, &good).unwrap();
    poke(&img, 13, &[3]);
    assert!(err(&img, ntfs::used_extents).contains("sectors per cluster"));

    // Truncated images.
    for len in [good.len() / 2, 1 << 20, 600] {
        fs::write(&img, &good[..len]).unwrap();
        let e = err(&img, ntfs::used_extents);
        assert!(e.contains("truncated"), "cut at {len}: {e}");
    }
}

/// Tiny xorshift for the mutation tests.
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Random byte damage in the metadata must give Ok or Err, never a panic.
#[test]
fn mutated_metadata_never_panics() {
    let t = tempfile::tempdir().unwrap();
    let fat_img = t.path().join("fat.img");
    blank(&fat_img, 12 << 20);
    run("mkfs.vfat", &["-F", "12", s(&fat_img)]);
    let src = t.path().join("fsrc");
    make_tree(&src, 30, 100_000, 5);
    run(
        "mcopy",
        &["-i", s(&fat_img), "-s", s(&src.join("d1")), "::/"],
    );
    let (ntfs_img, mft, _) = small_ntfs(t.path());
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let (fu, fp): (Parser, Probe) = (fat::used_extents, fat::probe);
    let (nu, np): (Parser, Probe) = (ntfs::used_extents, ntfs::probe);
    // Boot sector + FATs; NTFS boot sector; the first 16 MFT records.
    let cases = [(&fat_img, 0, 40 * 512, fu, fp), (&ntfs_img, 0, 512, nu, np)];
    for (img, lo, hi, f, p) in cases
        .into_iter()
        .chain([(&ntfs_img, mft, mft + 16384, nu, np)])
    {
        let good = fs::read(img).unwrap();
        for _ in 0..300 {
            for _ in 0..1 + xorshift(&mut x) % 8 {
                let off = lo + xorshift(&mut x) % (hi - lo);
                poke(img, off, &[xorshift(&mut x) as u8]);
            }
            let file = File::open(img).unwrap();
            let dev = DevSlice::new(&file, 0, good.len() as u64);
            let _ = p(&dev);
            if let Err(e) = f(&dev) {
                assert!(!format!("{e:#}").contains("panicked"), "{e:#}");
            }
            poke(img, lo, &good[lo as usize..hi as usize]);
        }
    }
}
