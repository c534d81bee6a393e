//! Interrupted runs resume; incremental runs fetch only what changed.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::*;

/// (fetched, already on disk) from an agent's log.
fn fetched(log: &str) -> (u64, u64) {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("bytes fetched"))
        .unwrap_or_else(|| panic!("no summary line:\n{log}"));
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    let n = nums.len();
    (nums[n - 2], nums[n - 1])
}

#[test]
fn killed_agent_resumes_where_it_was() {
    let t = tempfile::tempdir().unwrap();
    let disk = mkdisk(t.path(), "master.img", "gpt", 24);
    let size = std::fs::metadata(&disk).unwrap().len();
    capture(&disk, &t.path().join("images/lab"), true);
    let cfg = format!("seed_upload_limit = \"8M\"\n[default_job]\nimage = \"lab\"\n{TEST_JOB}");
    let srv = Server::start(t.path(), Some(1), &cfg);
    srv.wait_seeding("lab");
    let tgt = t.path().join("pc.img");
    blank_target(&tgt, size, true);
    let a = Agent::start(&srv.url, "52:54:00:00:20:01", &tgt);
    srv.wait_for(
        |v| v["hosts"][0]["done_bytes"].as_u64().unwrap_or(0) > 20 << 20,
        "half the image",
    );
    drop(a); // SIGKILL, mid-download
    assert_shows_nothing(&tgt, "killed mid-download");

    let mut b = Agent::start(&srv.url, "52:54:00:00:20:01", &tgt);
    b.wait_ok(180);
    let log = b.log();
    assert!(log.contains("resuming"), "{log}");
    let (fetched, kept) = fetched(&log);
    eprintln!("resume: fetched {fetched}, kept {kept}");
    assert!(kept > 15 << 20, "{kept} bytes kept:\n{log}");
    assert_extents_equal(&t.path().join("images/lab"), &disk, &tgt, &[]);
}

/// Changes about 5% of the master's payload: new files in ext4 and FAT.
fn change_master(disk: &Path, image: &Path) -> u64 {
    let m = blockswarm::image::Image::open(image).unwrap().manifest;
    let d = tempfile::tempdir().unwrap();
    let new = d.path().join("new.bin");
    let budget = m.payload.size / 40; // two files: 5% in all
    std::fs::write(
        &new,
        (0..budget)
            .map(|i| (i * 7919 % 251) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    for r in &m.regions {
        let part = d.path().join("part.img");
        match r.fs.as_ref().map(|f| f.to_string()).as_deref() {
            Some("ext") => {
                extract(disk, r.start, r.len, &part);
                sh(Command::new("debugfs")
                    .arg("-w")
                    .arg("-R")
                    .arg(format!("write {} term2.bin", new.display()))
                    .arg(&part));
            }
            Some("fat") => {
                extract(disk, r.start, r.len, &part);
                sh(Command::new("mcopy")
                    .env("MTOOLS_SKIP_CHECK", "1")
                    .arg("-i")
                    .arg(&part)
                    .arg(&new)
                    .arg("::/TERM2.BIN"));
            }
            _ => continue,
        }
        let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
        let data = std::fs::read(&part).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &data, r.start).unwrap();
    }
    2 * budget
}

#[test]
fn incremental_reimaging_fetches_only_changes() {
    let t = tempfile::tempdir().unwrap();
    let disk = mkdisk(t.path(), "master.img", "gpt", 32);
    let size = std::fs::metadata(&disk).unwrap().len();
    let v1 = t.path().join("images/lab");
    capture(&disk, &v1, true);
    let cfg = format!("seed_upload_limit = \"20M\"\n[default_job]\nimage = \"lab\"\n{TEST_JOB}");
    let srv = Server::start(t.path(), Some(2), &cfg);
    srv.wait_seeding("lab");
    // The third PC joins for the next term, its disk blank (a new PC): it
    // is far behind the other two, which hold most of the new image.
    let macs = [
        "52:54:00:00:30:01",
        "52:54:00:00:30:02",
        "52:54:00:00:30:03",
    ];
    let tgts: Vec<_> = (0..3)
        .map(|i| t.path().join(format!("pc{i}.img")))
        .collect();
    let t0 = Instant::now();
    let mut agents: Vec<Agent> = (0..2)
        .map(|i| {
            blank_target(&tgts[i], size, false);
            Agent::start(&srv.url, macs[i], &tgts[i])
        })
        .collect();
    agents.iter_mut().for_each(|a| a.wait_ok(180));
    let full = t0.elapsed().as_secs_f64();
    let full_fetched: u64 = agents.iter().map(|a| fetched(&a.log()).0).sum();

    // Next term: 5% of the master changes; capture it as a new image.
    let changed = change_master(&disk, &v1);
    let v2 = t.path().join("images/lab2");
    capture(&disk, &v2, true);
    srv.wait_seeding("lab2");
    let job = t.path().join("job.toml");
    std::fs::write(
        &job,
        format!("image = \"lab2\"\nincremental = true\n{TEST_JOB}"),
    )
    .unwrap();
    blank_target(&tgts[2], size, false);
    for m in macs {
        srv.admin_ok(&["set-job", m, job.to_str().unwrap()]);
    }
    srv.admin_ok(&["start", "--expect", "3"]);
    let t1 = Instant::now();
    let mut agents: Vec<Agent> = (0..3)
        .map(|i| Agent::start(&srv.url, macs[i], &tgts[i]))
        .collect();
    agents.iter_mut().for_each(|a| a.wait_ok(180));
    let inc = t1.elapsed().as_secs_f64();
    let payload = blockswarm::image::Image::open(&v2)
        .unwrap()
        .manifest
        .payload
        .size;
    let mut inc_fetched = 0;
    for (a, tgt) in agents.iter().zip(&tgts) {
        assert_extents_equal(&v2, &disk, tgt, &[]);
        let log = a.log();
        assert!(log.contains("incremental"), "{log}");
        let (f, _) = fetched(&log);
        if tgt == &tgts[2] {
            assert!(
                f > payload / 2,
                "the new PC fetched {f} of {payload}:\n{log}"
            );
            continue;
        }
        inc_fetched += f;
        assert!(f < payload / 4, "fetched {f} of {payload}:\n{log}");
    }
    eprintln!(
        "incremental: changed {changed} bytes of a {payload}-byte payload; fetched {inc_fetched} bytes for 2 hosts in {inc:.1} s \
         (full deployment: {full_fetched} bytes in {full:.1} s)"
    );
}

/// A power cut while the target is being finished: after the backup GPT,
/// and after the boot area but before its first sector. Either way the disk
/// shows no partition table and no file system (its first sector is still
/// the in-progress marker), and the next run resumes and completes.
#[test]
fn power_cut_while_finishing_resumes() {
    let t = tempfile::tempdir().unwrap();
    let (disk, size, image) = captured(t.path(), "gpt", 16);
    let (_seed, addr) = seed(&image, None);
    for point in ["finish:backup-gpt", "finish:boot-area"] {
        let tgt = t.path().join("pc.img");
        blank_target(&tgt, size, true);
        let log = t.path().join("receive.log");
        let child = Command::new(bin())
            .args(["receive", image.to_str().unwrap(), "--target"])
            .arg(&tgt)
            .args(["--peer", &addr.to_string()])
            .env("BLOCKSWARM_FAULT_PAUSE", point)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let p = Proc(child);
        let t0 = Instant::now();
        while !std::fs::read_to_string(&log)
            .unwrap()
            .contains("fault point")
        {
            assert!(
                t0.elapsed().as_secs() < 120,
                "{point} never reached:\n{}",
                std::fs::read_to_string(&log).unwrap()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        drop(p); // SIGKILL: every write before the point was flushed
        assert_shows_nothing(&tgt, point);
        let out = bs_ok(&[
            "receive",
            image.to_str().unwrap(),
            "--target",
            tgt.to_str().unwrap(),
            "--peer",
            &addr.to_string(),
        ]);
        assert!(out.contains("resuming"), "{point}: {out}");
        assert_extents_equal(&image, &disk, &tgt, &[]);
        let v = sh(Command::new("sgdisk").arg("-v").arg(&tgt));
        assert!(String::from_utf8_lossy(&v.stdout).contains("No problems found"));
    }
}

/// A host that started writing one disk is held to it: restarted with
/// another disk in the same deployment (as the default selector would pick
/// the next largest when the first one fails), the agent refuses and writes
/// nothing there; the first disk still resumes.
#[test]
fn a_retry_is_held_to_the_disk_it_started() {
    let t = tempfile::tempdir().unwrap();
    let disk = mkdisk(t.path(), "master.img", "gpt", 24);
    let size = std::fs::metadata(&disk).unwrap().len();
    capture(&disk, &t.path().join("images/lab"), true);
    let cfg = format!("seed_upload_limit = \"8M\"\n[default_job]\nimage = \"lab\"\n{TEST_JOB}");
    let srv = Server::start(t.path(), Some(1), &cfg);
    srv.wait_seeding("lab");
    let mac = "52:54:00:00:20:02";
    let first = t.path().join("first.img");
    blank_target(&first, size, true);
    let a = Agent::start(&srv.url, mac, &first);
    srv.wait_for(
        |v| v["hosts"][0]["done_bytes"].as_u64().unwrap_or(0) > 4 << 20,
        "the download under way",
    );
    drop(a);
    let other = t.path().join("other.img");
    blank_target(&other, size, true);
    let mut b = Agent::start(&srv.url, mac, &other);
    let t0 = Instant::now();
    while b.proc.0.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed().as_secs() < 60,
            "the agent went on:\n{}",
            b.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let log = b.log();
    assert!(
        log.contains("this host was writing another disk in deployment 1"),
        "{log}"
    );
    assert!(
        std::fs::read(&other).unwrap().iter().all(|&x| x == MARK),
        "the other disk was written"
    );
    let mut c = Agent::start(&srv.url, mac, &first);
    c.wait_ok(180);
    assert!(c.log().contains("resuming"), "{}", c.log());
    assert_extents_equal(&t.path().join("images/lab"), &disk, &first, &[]);
}
