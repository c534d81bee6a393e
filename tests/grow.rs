//! `grow = "last"`: deployed to a larger disk, the last partition and its
//! file system run to the disk's end; the rest of the disk is the image's.
//! And the refusals: a disk too small, a file system this does not grow.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blockswarm::image::Image;
use blockswarm::image::table::{self, PartitionTable, TableKind};
use common::*;

const MIB: u64 = 1 << 20;

fn table_of(disk: &Path) -> PartitionTable {
    let f = std::fs::File::open(disk).unwrap();
    table::read(&f, f.metadata().unwrap().len(), 512).unwrap()
}

/// A server whose every host gets `image` with `extra` job lines.
fn server(dir: &Path, image: &str, extra: &str) -> Server {
    let cfg = format!("[default_job]\nimage = \"{image}\"\n{extra}{TEST_JOB}");
    let srv = Server::start(dir, Some(1), &cfg);
    srv.wait_seeding(image);
    srv
}

/// A value after `key` in `tool`'s output ("Block count:   12345").
fn field(out: &str, key: &str) -> u64 {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key:?} in:\n{out}"))
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Checks a target grown from `master`'s image: the GPT valid, its last
/// partition to the disk's end (aligned down to 1 MiB), the others as the
/// image has them; the file system as large as its partition, clean, its
/// files intact; every other used byte of the image as the master's.
fn check_grown(image: &Path, master: &Path, tgt: &Path, fs: &str) {
    let size = std::fs::metadata(tgt).unwrap().len();
    let want = table_of(master);
    let end = if want.kind == TableKind::Gpt {
        let v = sh(Command::new("sgdisk").arg("-v").arg(tgt));
        let v = String::from_utf8_lossy(&v.stdout);
        assert!(v.contains("No problems found"), "sgdisk -v:\n{v}");
        // Last usable LBA + 1 = sectors - 33 (128 entries and the backup header).
        (size / 512 - 33) / 2048 * 2048 * 512
    } else {
        sh(Command::new("sfdisk").arg("--verify").arg(tgt));
        size / MIB * MIB
    };
    let got = table_of(tgt);
    let n = got.partitions.len();
    assert_eq!(n, want.partitions.len());
    assert_eq!(got.partitions[..n - 1], want.partitions[..n - 1]);
    let (old, p) = (&want.partitions[n - 1], &got.partitions[n - 1]);
    assert_eq!((p.number, p.start), (old.number, old.start));
    assert_eq!(p.end(), end, "the last partition does not reach the end");
    assert!(p.size > old.size + size / 4, "{} from {}", p.size, old.size);

    let dir = tempfile::tempdir().unwrap();
    let part = dir.path().join("part.img");
    extract(tgt, p.start, p.size, &part);
    let sums = read_sums(&PathBuf::from(format!(
        "{}.files/p{}.sha256",
        master.display(),
        p.number
    )));
    assert!(!sums.is_empty());
    match fs {
        "ext" => {
            let info = sh(Command::new("dumpe2fs").arg("-h").arg(&part));
            let info = String::from_utf8_lossy(&info.stdout);
            let bytes = field(&info, "Block count:") * field(&info, "Block size:");
            assert_eq!(bytes, p.size, "the ext4 is not as large as its partition");
            sh(Command::new("e2fsck").arg("-fn").arg(&part));
            let files = dir.path().join("files");
            std::fs::create_dir(&files).unwrap();
            sh(Command::new("debugfs")
                .arg("-R")
                .arg(format!("rdump / {}", files.display()))
                .arg(&part));
            for (name, hash) in &sums {
                let f = files.join(name);
                assert_eq!(&sha256(&f), hash, "{name}");
            }
        }
        "ntfs" => {
            // -f: ntfsresize scheduled a chkdsk (the volume is marked dirty).
            let info = sh(Command::new("ntfsinfo").args(["-m", "-f"]).arg(&part));
            let info = String::from_utf8_lossy(&info.stdout);
            let cluster = field(&info, "Cluster Size:");
            let clusters = field(&info, "Volume Size in Clusters:");
            // NTFS keeps the partition's last sector for its backup boot sector.
            assert_eq!(clusters, (p.size - 512) / cluster, "NTFS size:\n{info}");
            sh(Command::new("ntfsfix").arg("-n").arg(&part));
            for (name, hash) in &sums {
                let out = sh(Command::new("ntfscat")
                    .arg("-f")
                    .arg(&part)
                    .arg(format!("/{name}")));
                let f = dir.path().join("file");
                std::fs::write(&f, out.stdout).unwrap();
                assert_eq!(&sha256(&f), hash, "{name}");
            }
        }
        "btrfs" => {
            let sb = sh(Command::new("btrfs")
                .args(["inspect-internal", "dump-super"])
                .arg(&part));
            let sb = String::from_utf8_lossy(&sb.stdout);
            assert_eq!(field(&sb, "total_bytes"), p.size, "btrfs size:\n{sb}");
            sh(Command::new("btrfs")
                .args(["check", "--readonly"])
                .arg(&part));
            let files = dir.path().join("files");
            std::fs::create_dir(&files).unwrap();
            sh(Command::new("btrfs").arg("restore").arg(&part).arg(&files));
            for (name, hash) in &sums {
                assert_eq!(&sha256(&files.join(name)), hash, "{name}");
            }
        }
        "xfs" => {
            let db = sh(Command::new("xfs_db")
                .args(["-r", "-c", "sb 0", "-c", "p dblocks", "-c", "p blocksize"])
                .arg(&part));
            let db = String::from_utf8_lossy(&db.stdout);
            let bytes = field(&db, "dblocks =") * field(&db, "blocksize =");
            assert_eq!(bytes, p.size, "xfs size:\n{db}");
            sh(Command::new("xfs_repair").arg("-n").arg(&part));
            let mnt = dir.path().join("mnt");
            std::fs::create_dir(&mnt).unwrap();
            sh(Command::new("mount")
                .args(["-o", "ro,loop,norecovery,nouuid"])
                .arg(&part)
                .arg(&mnt));
            let hashes: Vec<(String, String)> = sums
                .iter()
                .map(|(name, hash)| (sha256(&mnt.join(name)), hash.clone()))
                .collect();
            sh(Command::new("umount").arg(&mnt));
            for (got, want) in hashes {
                assert_eq!(got, want);
            }
        }
        other => panic!("no check for {other}"),
    }
    // The grown file system's own blocks may change; the GPT was refitted.
    assert_extents_equal(image, master, tgt, &[(0, MIB), (p.start, old.end())]);
}

/// A target 1.5 times the size of `master`.
fn larger_target(dir: &Path, master: &Path) -> PathBuf {
    let size = std::fs::metadata(master).unwrap().len();
    target_of(dir, size * 3 / 2 / 512 * 512)
}

fn target_of(dir: &Path, size: u64) -> PathBuf {
    let tgt = dir.join("pc.img");
    blank_target(&tgt, size, true);
    tgt
}

fn grew_line(log: &str) -> &str {
    log.lines()
        .find(|l| l.contains("grew partition"))
        .unwrap_or_else(|| panic!("the agent did not say what it grew:\n{log}"))
}

#[test]
fn ext4_last_partition_grows_to_the_end_and_regrows_after_an_incremental_reimage() {
    let t = tempfile::tempdir().unwrap();
    // One ext4 from 1 MiB to the last usable sector (an unaligned end).
    let master = mkdisk(t.path(), "master.img", "gpt-end", 40);
    capture(&master, &t.path().join("images/lab"), true);
    let image = t.path().join("images/lab");
    let srv = server(t.path(), "lab", "grow = \"last\"\n");
    let tgt = larger_target(t.path(), &master);
    let mac = "52:54:00:00:40:01";
    let mut a = Agent::start(&srv.url, mac, &tgt);
    a.wait_ok(180);
    let log = a.log();
    let line = grew_line(&log);
    assert!(line.contains("grew partition 1 (ext)"), "{line}");
    eprintln!("{line}");
    check_grown(&image, &master, &tgt, "ext");

    // Next term, the same image again, incremental, onto the grown disk:
    // what resize2fs changed is fetched again, and the disk grown again.
    let job = t.path().join("job.toml");
    std::fs::write(
        &job,
        format!("image = \"lab\"\nincremental = true\ngrow = \"last\"\n{TEST_JOB}"),
    )
    .unwrap();
    let admin = |args: &[&str]| srv.admin_ok(args);
    admin(&["set-job", mac, job.to_str().unwrap()]);
    admin(&["start", "--expect", "1"]);
    let mut b = Agent::start(&srv.url, mac, &tgt);
    b.wait_ok(180);
    let log = b.log();
    let second = log.rsplit("incremental: checking what is there").next();
    let second = second.unwrap_or_else(|| panic!("not incremental:\n{log}"));
    assert!(second.contains("grew partition 1 (ext)"), "{second}");
    check_grown(&image, &master, &tgt, "ext");
}

#[test]
fn ntfs_last_partition_grows_to_the_end() {
    let t = tempfile::tempdir().unwrap();
    // ESP, ext4, NTFS: the NTFS is last.
    let master = mkdisk(t.path(), "master.img", "gpt", 24);
    capture(&master, &t.path().join("images/lab"), true);
    let srv = server(t.path(), "lab", "grow = \"last\"\n");
    let tgt = larger_target(t.path(), &master);
    let mut a = Agent::start(&srv.url, "52:54:00:00:40:02", &tgt);
    a.wait_ok(180);
    let log = a.log();
    let line = grew_line(&log);
    assert!(line.contains("grew partition 3 (ntfs)"), "{line}");
    eprintln!("{line}");
    check_grown(&t.path().join("images/lab"), &master, &tgt, "ntfs");
}

#[test]
fn btrfs_last_partition_grows_to_the_end() {
    let t = tempfile::tempdir().unwrap();
    // GPT, one btrfs (128 MiB: mkfs.btrfs's smallest with DUP metadata).
    let master = t.path().join("master.img");
    sh(Command::new("truncate").args(["-s", "130M"]).arg(&master));
    sh(Command::new("sgdisk")
        .args(["-n", "1:1M:+128M", "-t", "1:8300"])
        .arg(&master));
    let files = t.path().join("files");
    std::fs::create_dir_all(files.join("sub")).unwrap();
    for (i, name) in ["a.txt", "sub/b.bin", "sub/c.bin"].iter().enumerate() {
        let data: Vec<u8> = (0..(i as u32 + 1) * 300_000)
            .map(|x| (u64::from(x) * 7919 % 251) as u8)
            .collect();
        std::fs::write(files.join(name), data).unwrap();
    }
    let sums_dir = PathBuf::from(format!("{}.files", master.display()));
    std::fs::create_dir(&sums_dir).unwrap();
    let list = sh(Command::new("sh")
        .arg("-c")
        .arg("find . -type f | sort | xargs sha256sum")
        .current_dir(&files));
    std::fs::write(sums_dir.join("p1.sha256"), list.stdout).unwrap();
    let part = t.path().join("p1.img");
    sh(Command::new("truncate").args(["-s", "128M"]).arg(&part));
    sh(Command::new("mkfs.btrfs")
        .args(["-q", "--rootdir"])
        .arg(&files)
        .arg(&part));
    assert_eq!(std::fs::metadata(&part).unwrap().len(), 128 * MIB);
    sh(Command::new("dd")
        .arg(format!("if={}", part.display()))
        .arg(format!("of={}", master.display()))
        .args(["bs=1M", "seek=1", "conv=notrunc", "status=none"]));
    let image = t.path().join("images/lab");
    capture(&master, &image, true);
    let srv = server(t.path(), "lab", "grow = \"last\"\n");
    // The kernel resizes btrfs to 256 MiB or more only.
    let tgt = target_of(t.path(), 325 * MIB);
    let mut a = Agent::start(&srv.url, "52:54:00:00:40:06", &tgt);
    a.wait_ok(180);
    let log = a.log();
    let line = grew_line(&log);
    assert!(line.contains("grew partition 1 (btrfs)"), "{line}");
    eprintln!("{line}");
    check_grown(&image, &master, &tgt, "btrfs");
}

#[test]
fn xfs_last_partition_grows_to_the_end() {
    let t = tempfile::tempdir().unwrap();
    // GPT, one 300 MiB xfs (mkfs.xfs's smallest), files copied in mounted.
    let master = t.path().join("master.img");
    sh(Command::new("truncate").args(["-s", "302M"]).arg(&master));
    sh(Command::new("sgdisk")
        .args(["-n", "1:1M:+300M", "-t", "1:8300"])
        .arg(&master));
    let part = t.path().join("p1.img");
    sh(Command::new("truncate").args(["-s", "300M"]).arg(&part));
    sh(Command::new("mkfs.xfs").arg("-q").arg(&part));
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    sh(Command::new("mount")
        .arg("-o")
        .arg("loop")
        .arg(&part)
        .arg(&mnt));
    let mut list = String::new();
    for (i, name) in ["a.txt", "b.bin"].iter().enumerate() {
        let data: Vec<u8> = (0..(i as u64 + 1) * 400_000)
            .map(|x| (x * 7919 % 251) as u8)
            .collect();
        std::fs::write(mnt.join(name), data).unwrap();
        list += &format!("{}  ./{name}\n", sha256(&mnt.join(name)));
    }
    sh(Command::new("umount").arg(&mnt));
    let sums_dir = PathBuf::from(format!("{}.files", master.display()));
    std::fs::create_dir(&sums_dir).unwrap();
    std::fs::write(sums_dir.join("p1.sha256"), list).unwrap();
    sh(Command::new("dd")
        .arg(format!("if={}", part.display()))
        .arg(format!("of={}", master.display()))
        .args(["bs=1M", "seek=1", "conv=notrunc", "status=none"]));
    let image = t.path().join("images/lab");
    capture(&master, &image, true);
    let srv = server(t.path(), "lab", "grow = \"last\"\n");
    let tgt = larger_target(t.path(), &master);
    let mut a = Agent::start(&srv.url, "52:54:00:00:40:08", &tgt);
    a.wait_ok(180);
    let log = a.log();
    let line = grew_line(&log);
    assert!(line.contains("grew partition 1 (xfs)"), "{line}");
    eprintln!("{line}");
    check_grown(&image, &master, &tgt, "xfs");
}

#[test]
fn mbr_primary_last_partition_grows_to_the_end() {
    let t = tempfile::tempdir().unwrap();
    // MBR: a FAT16 and an ext4, both primary.
    let master = t.path().join("master.img");
    sh(Command::new("truncate").args(["-s", "50M"]).arg(&master));
    let mut sf = Command::new("sfdisk");
    sf.arg("-q").arg(&master).stdin(Stdio::piped());
    let mut child = sf.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: dos\nstart=2048, size=8M, type=6\nstart=18432, size=40M, type=83\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    let files = t.path().join("files");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("a.txt"), vec![b'a'; 200_000]).unwrap();
    let sums_dir = PathBuf::from(format!("{}.files", master.display()));
    std::fs::create_dir(&sums_dir).unwrap();
    std::fs::write(
        sums_dir.join("p2.sha256"),
        format!("{}  ./a.txt\n", sha256(&files.join("a.txt"))),
    )
    .unwrap();
    let part = t.path().join("p2.img");
    sh(Command::new("truncate").args(["-s", "40M"]).arg(&part));
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&files)
        .arg(&part));
    sh(Command::new("dd")
        .arg(format!("if={}", part.display()))
        .arg(format!("of={}", master.display()))
        .args(["bs=1M", "seek=9", "conv=notrunc", "status=none"]));
    let image = t.path().join("images/lab");
    capture(&master, &image, true);
    let srv = server(t.path(), "lab", "grow = \"last\"\n");
    let tgt = larger_target(t.path(), &master);
    let mut a = Agent::start(&srv.url, "52:54:00:00:40:07", &tgt);
    a.wait_ok(180);
    let log = a.log();
    let line = grew_line(&log);
    assert!(line.contains("grew partition 2 (ext)"), "{line}");
    check_grown(&image, &master, &tgt, "ext");
}

#[test]
fn grow_on_a_disk_of_the_image_size_changes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let master = mkdisk(t.path(), "master.img", "gpt-end", 24);
    let image = t.path().join("images/lab");
    capture(&master, &image, true);
    let srv = server(t.path(), "lab", "grow = \"last\"\n");
    let tgt = t.path().join("pc.img");
    blank_target(&tgt, std::fs::metadata(&master).unwrap().len(), true);
    let mut a = Agent::start(&srv.url, "52:54:00:00:40:03", &tgt);
    a.wait_ok(180);
    let log = a.log();
    assert!(log.contains("nothing to grow"), "{log}");
    assert!(!log.contains("grew partition"), "{log}");
    assert_eq!(table_of(&tgt), table_of(&master));
    assert_extents_equal(&image, &master, &tgt, &[]);
}

/// The last partition holds swap: refused, with the reason, and the disk
/// keeps the image as written.
#[test]
fn grow_of_a_file_system_it_cannot_grow_is_refused_and_changes_nothing() {
    let t = tempfile::tempdir().unwrap();
    // FAT16, then an extended partition with an ext4 and a swap.
    let master = mkdisk(t.path(), "master.img", "mbr", 16);
    let image = t.path().join("images/lab");
    capture(&master, &image, true);
    let srv = server(t.path(), "lab", "grow = \"last\"\n");
    let tgt = larger_target(t.path(), &master);
    let a = Agent::start(&srv.url, "52:54:00:00:40:04", &tgt);
    let t0 = Instant::now();
    let mut a = a;
    let st = loop {
        if let Some(st) = a.proc.0.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(180), "{}", a.log());
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = a.log();
    assert!(!st.success(), "{log}");
    assert!(
        log.contains("partition 6 holds a swap file system: grow = \"last\" grows ext2/3/4, NTFS, btrfs and xfs only (nothing was changed)"),
        "{log}"
    );
    assert_eq!(table_of(&tgt).partitions, table_of(&master).partitions);
    assert_extents_equal(&image, &master, &tgt, &[]);
}

/// A power cut while the file system is being grown: the disk shows
/// nothing (the in-progress marker is back in sector 0), and the next run
/// resumes, re-checks every piece, and grows again.
#[test]
fn power_cut_while_growing_resumes_and_grows() {
    let t = tempfile::tempdir().unwrap();
    let master = mkdisk(t.path(), "master.img", "gpt-end", 24);
    let image = t.path().join("images/lab");
    capture(&master, &image, true);
    let srv = server(t.path(), "lab", "grow = \"last\"\n");
    let tgt = larger_target(t.path(), &master);
    let mac = "52:54:00:00:40:05";
    let log = tgt.with_extension("agent.log");
    let child = Command::new(bin())
        .args(["agent", "--server", &srv.url, "--mac", mac, "--target"])
        .arg(&tgt)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .env("BLOCKSWARM_FAULT_PAUSE", "grow:resized")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let a = Agent {
        proc: Proc(child),
        log,
    };
    a.wait_log("fault point grow:resized", 180);
    drop(a); // SIGKILL: the table and the file system are grown, sector 0 not
    assert_shows_nothing(&tgt, "killed while growing");
    // The server counted the host imaged once it seeded: the admin
    // re-images it (the PC, network-booted, waits for that).
    srv.admin_ok(&["reimage", mac]);
    let mut b = Agent::start(&srv.url, mac, &tgt);
    b.wait_ok(180);
    let log = b.log();
    let second = log.rsplit("fault point").next().unwrap();
    assert!(second.contains("resuming"), "{second}");
    assert!(second.contains("grew partition 1 (ext)"), "{second}");
    check_grown(&image, &master, &tgt, "ext");
}

/// A disk smaller than the image's last partition, but larger than what the
/// image uses: the error says by how much, and what to capture differently.
#[test]
fn a_disk_too_small_says_by_how_much_and_what_to_capture() {
    let t = tempfile::tempdir().unwrap();
    // GPT, one 48 MiB ext4 holding a few files: its used blocks end early.
    let master = t.path().join("master.img");
    sh(Command::new("truncate").args(["-s", "64M"]).arg(&master));
    sh(Command::new("sgdisk")
        .args(["-n", "1:2048:+48M", "-t", "1:8300"])
        .arg(&master));
    let files = t.path().join("files");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("a.txt"), b"hello").unwrap();
    let part = t.path().join("p1.img");
    sh(Command::new("truncate").args(["-s", "48M"]).arg(&part));
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(&files)
        .arg(&part));
    sh(Command::new("dd")
        .arg(format!("if={}", part.display()))
        .arg(format!("of={}", master.display()))
        .args(["bs=1M", "seek=1", "conv=notrunc", "status=none"]));
    let image = t.path().join("image");
    capture(&master, &image, true);
    let m = Image::open(&image).unwrap().manifest;
    let used_end = m.extents().map(|e| e.end()).max().unwrap();
    let need = m.disk.min_target_size;
    assert_eq!(
        need,
        49 * MIB + 33 * 512,
        "the partition's end and the backup GPT"
    );
    let size = 40 * MIB;
    assert!(used_end < size - MIB, "used blocks end at {used_end}");
    let tgt = t.path().join("small.img");
    blank_target(&tgt, size, true);
    let out = bs_err(&[
        "receive",
        image.to_str().unwrap(),
        "--target",
        tgt.to_str().unwrap(),
        "--peer",
        "127.0.0.1:9",
    ]);
    // The last partition may end 33 sectors before the disk's end, rounded
    // down to 1 MiB: by byte 39 MiB.
    let fit_end = 39 * MIB;
    let want = format!(
        "the disk is too small for image image: 40.0 MiB ({size} bytes), {} bytes short of the {need} bytes the image needs. \
         The image uses {} ({} bytes), its last used block ending at byte {used_end}: shrink partition 1 (and its file system) \
         on the master to end by byte {fit_end} (39.0 MiB) before capturing, or capture from a disk no larger than this one",
        need - size,
        blockswarm::util::human_bytes(m.payload.size),
        m.payload.size
    );
    eprintln!("{out}");
    assert!(out.contains(&want), "got:\n{out}\nwant:\n{want}");
    assert!(
        std::fs::read(&tgt).unwrap().iter().all(|&b| b == MARK),
        "the small disk was written"
    );
}

/// Runs debugfs `cmd` on the ext4 at byte `off` of `disk` (e2fsprogs'
/// `?offset=` names a file system inside a disk file).
fn debugfs(disk: &Path, off: u64, cmd: &str) -> String {
    let spec = format!("{}?offset={off}", disk.display());
    let out = sh(Command::new("debugfs").args(["-w", "-R", cmd, &spec]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Grow, then the host name: the name is written into the grown file
/// system, mounted over the whole grown partition (it was mounted over the
/// image's smaller partition, which the kernel refused: "mount ... failed").
#[test]
fn a_grown_root_is_named_and_checked_whole() {
    let t = tempfile::tempdir().unwrap();
    let master = mkdisk(t.path(), "master.img", "gpt-end", 40);
    let hostname = t.path().join("hostname");
    std::fs::write(&hostname, "master\n").unwrap();
    debugfs(&master, MIB, "mkdir /etc");
    debugfs(
        &master,
        MIB,
        &format!("write {} /etc/hostname", hostname.display()),
    );
    capture(&master, &t.path().join("images/lab"), true);
    let mac = "52:54:00:00:40:09";
    let cfg = format!(
        "[[host]]\nmac = \"{mac}\"\nname = \"lab-09\"\n[host.job]\nimage = \"lab\"\n\
         grow = \"last\"\n{TEST_JOB}"
    );
    let srv = Server::start(t.path(), Some(1), &cfg);
    srv.wait_seeding("lab");
    let tgt = larger_target(t.path(), &master);
    let mut a = Agent::start(&srv.url, mac, &tgt);
    a.wait_ok(180);
    let log = a.log();
    assert!(grew_line(&log).contains("grew partition 1 (ext)"), "{log}");
    check_grown(&t.path().join("images/lab"), &master, &tgt, "ext");
    assert_eq!(debugfs(&tgt, MIB, "cat /etc/hostname"), "lab-09\n");
}
