//! Capture tasks (issue 20): a network-booted master's agent maps its own
//! disk, uploads the manifest and torrent with a single-use capture token,
//! and seeds from the disk; the server pulls the payload into its store (or
//! serves the image from the master as the origin). Loopback only, on disk
//! files made with mkfs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MASTER: &str = "52:54:00:00:20:01";
const PC: &str = "52:54:00:00:20:02";

/// Every host's job: write, don't reboot, seed until the room is done.
fn config() -> String {
    format!("[default_job]\nimage = \"none\"\n{TEST_JOB}")
}

fn manifest_json(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// Waits for the agent to exit and returns whether it succeeded.
fn wait_exit(agent: &mut Agent, secs: u64) -> bool {
    let t0 = Instant::now();
    loop {
        if let Some(st) = agent.proc.0.try_wait().unwrap() {
            return st.success();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "agent did not finish in {secs} s:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Deploys `image` to a new marked file as host `mac` and checks it holds
/// the master's used bytes and a clean ext4 in partition 2.
fn deploy_and_compare(srv: &Server, dir: &Path, mac: &str, master: &Path, image_dir: &Path) {
    let size = std::fs::metadata(master).unwrap().len();
    let tgt = dir.join(format!("pc-{}.img", mac.replace(':', "")));
    blank_target(&tgt, size, true);
    let out = srv.admin_ok(&["start", "--host", mac, "--image", "lab"]);
    assert!(out.contains("started"), "{out}");
    let mut a = Agent::start(&srv.url, mac, &tgt);
    a.wait_ok(120);
    assert_extents_equal(image_dir, master, &tgt, &[]);
    fsck_ext_partition(&tgt, image_dir);
}

/// e2fsck of the ext4 partition (p2) of a mkdisk "gpt" disk.
fn fsck_ext_partition(disk: &Path, image_dir: &Path) {
    let m = blockswarm::image::Image::open(image_dir).unwrap().manifest;
    let p2 = m
        .disk
        .table
        .partitions
        .iter()
        .find(|p| p.number == 2)
        .unwrap();
    let part = disk.with_extension("p2");
    extract(disk, p2.start, p2.size, &part);
    sh(Command::new("e2fsck").arg("-fn").arg(&part));
    std::fs::remove_file(part).unwrap();
}

/// The master disk, and its local capture in `local/lab` (same name and
/// source path as the agent's, so the manifests compare whole).
fn master(dir: &Path) -> (PathBuf, PathBuf) {
    let disk = mkdisk(dir, "master.img", "gpt", 16);
    let local = dir.join("local/lab");
    std::fs::create_dir_all(local.parent().unwrap()).unwrap();
    capture(&disk, &local, true);
    (disk, local)
}

#[test]
fn a_master_is_captured_into_the_store_and_deployed() {
    let t = tempfile::tempdir().unwrap();
    let (disk, local) = master(t.path());
    let before = sha256(&disk);
    let srv = Server::start(t.path(), None, &config());
    let out = srv.admin_ok(&["capture", MASTER, "--image", "lab"]);
    assert!(
        out.contains("will capture its disk into image lab"),
        "{out}"
    );
    let mut m = Agent::start(&srv.url, MASTER, &disk);
    m.wait_ok(120);
    let log = m.log();
    assert!(log.contains("the server stored the image"), "{log}");
    assert_eq!(sha256(&disk), before, "the master's disk was written");

    // The store's image is the local capture's, byte for byte.
    let stored = srv.dir.join("images/lab");
    let (mut got, mut want) = (manifest_json(&stored), manifest_json(&local));
    // The source names the master, not a path another PC could hold.
    assert_eq!(
        got["source"].take(),
        format!("{} of {MASTER} (network capture)", disk.display())
    );
    want["source"].take();
    // The torrent carries the manifest, whose source differs: so do the
    // info hashes. The payload's pieces are the same.
    got["payload"]["info_hash"].take();
    want["payload"]["info_hash"].take();
    assert_eq!(got, want);
    let pieces = |dir: &std::path::Path| {
        let t = std::fs::read(dir.join("image.torrent")).unwrap();
        blockswarm::image::torrent::layout(&t)
            .unwrap()
            .payload_pieces()
            .to_vec()
    };
    assert_eq!(pieces(&stored), pieces(&local));
    assert_eq!(
        sha256(&stored.join("payload.bin")),
        sha256(&local.join("payload.bin"))
    );
    // Nothing temporary is left beside it.
    let names: Vec<String> = std::fs::read_dir(srv.dir.join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".blockswarm-host-key")
        .collect();
    assert_eq!(names, ["lab"]);
    // The task is done; the store serves the image like any other.
    let v = srv.view();
    assert_eq!(v["hosts"][0]["task"], "done", "{v}");
    assert_eq!(v["hosts"][0]["mac"], MASTER, "{v}");
    srv.wait_seeding("lab");
    deploy_and_compare(&srv, t.path(), PC, &disk, &local);

    // The name is taken now: a second capture into it is refused.
    let (ok, out) = srv.admin(&["capture", MASTER, "--image", "lab"]);
    assert!(!ok && out.contains("exists already"), "{out}");
    let (ok, out) = srv.admin(&["capture", MASTER, "--image", "../etc"]);
    assert!(!ok && out.contains("image name"), "{out}");
}

fn job(srv: &Server, mac: &str) -> serde_json::Value {
    http_json(&format!("{}/api/v1/jobs/{mac}", srv.url))
}

fn post(srv: &Server, path: &str, body: &serde_json::Value) -> (u16, String) {
    post_from("127.0.0.1", srv, path, body)
}

/// POSTs `body` from loopback address `from`.
fn post_from(from: &str, srv: &Server, path: &str, body: &serde_json::Value) -> (u16, String) {
    let out = Command::new("curl")
        .args(["--interface", from])
        .args([
            "-s",
            "-o",
            "/dev/stdout",
            "-w",
            "\n%{http_code}",
            "-X",
            "POST",
        ])
        .args([
            "-H",
            "content-type: application/json",
            "--data-binary",
            "@-",
        ])
        .arg(format!("{}{path}", srv.url))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .unwrap()
                .write_all(body.to_string().as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = s.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn a_capture_token_is_good_once_for_its_host_only() {
    let t = tempfile::tempdir().unwrap();
    let (_, local) = master(t.path());
    let srv = Server::start(t.path(), None, &config());
    srv.admin_ok(&["capture", MASTER, "--image", "lab", "--no-store"]);
    let j = job(&srv, MASTER);
    let token = j["capture"]["token"].as_str().unwrap().to_string();
    let url = j["capture"]["upload_url"].as_str().unwrap().to_string();
    assert!(j["job"]["capture"].is_object(), "{j}");
    let upload = |mac: &str, token: &str| {
        serde_json::json!({
            "mac": mac,
            "token": token,
            "port": 6881,
            "manifest": std::fs::read_to_string(local.join("manifest.json")).unwrap()
                .replace("\"stored\":true", "\"stored\":false"),
            "torrent": hex(&std::fs::read(local.join("image.torrent")).unwrap()),
        })
    };
    // A forged token, the host token, another host's MAC: refused.
    let mut forged = token.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    let (code, body) = post(&srv, &url, &upload(MASTER, &forged));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("not one this server issued"), "{body}");
    let host_token = j["token"].as_str().unwrap();
    assert_eq!(post(&srv, &url, &upload(MASTER, host_token)).0, 403);
    let (code, body) = post(&srv, &url, &upload(PC, &token));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("another host"), "{body}");
    // A job fetched again voids the token before it.
    let j2 = job(&srv, MASTER);
    let (code, body) = post(&srv, &url, &upload(MASTER, &token));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("newer capture token"), "{body}");
    // The right one, from another address than the job's request: refused,
    // and still good.
    let token = j2["capture"]["token"].as_str().unwrap();
    let (code, body) = post_from("127.0.0.2", &srv, &url, &upload(MASTER, token));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("another address"), "{body}");
    // From the job's address it is taken, once.
    let (code, body) = post(&srv, &url, &upload(MASTER, token));
    assert_eq!(code, 200, "{body}");
    let (code, body) = post(&srv, &url, &upload(MASTER, token));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("used already"), "{body}");
    // A body over the bound is refused before it is parsed.
    let big = serde_json::json!({ "mac": MASTER, "token": token, "port": 1,
        "manifest": "x".repeat(65 << 20), "torrent": "" });
    assert_eq!(post(&srv, &url, &big).0, 413);
}

/// Starts a capture of `disk` as MASTER and returns the agent's error log;
/// the agent must fail, and nothing may have been uploaded.
fn refused_capture(dir: &Path, disk: &Path) -> String {
    let srv = Server::start(dir, None, &config());
    srv.admin_ok(&["capture", MASTER, "--image", "lab"]);
    let mut m = Agent::start(&srv.url, MASTER, disk);
    assert!(
        !wait_exit(&mut m, 60),
        "a dirty master was captured:\n{}",
        m.log()
    );
    let log = std::fs::read_to_string(&srv.log).unwrap();
    assert!(
        !log.contains("capture lab from"),
        "something was uploaded:\n{log}"
    );
    assert!(!m.log().contains("phase announce"), "{}", m.log());
    let names: Vec<_> = std::fs::read_dir(srv.dir.join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != ".blockswarm-host-key")
        .collect();
    assert!(names.is_empty(), "{names:?}");
    m.log()
}

#[test]
fn a_master_whose_ext4_journal_needs_recovery_is_refused_before_upload() {
    let t = tempfile::tempdir().unwrap();
    let disk = mkdisk(t.path(), "master.img", "bare", 16);
    sh(Command::new("debugfs")
        .args(["-w", "-R", "feature needs_recovery"])
        .arg(&disk));
    let log = refused_capture(t.path(), &disk);
    assert!(
        log.contains("cannot be captured as it is: the disk: its ext journal needs recovery"),
        "{log}"
    );
}

#[test]
fn a_hibernated_windows_master_is_refused_before_upload() {
    let t = tempfile::tempdir().unwrap();
    let disk = mkdisk(t.path(), "master.img", "gpt", 16);
    // Fast startup leaves hiberfil.sys starting with "HIBR".
    let hib = t.path().join("hiberfil.sys");
    let mut b = b"HIBR".to_vec();
    b.resize(64 << 10, 0);
    std::fs::write(&hib, b).unwrap();
    // Partition 3 (NTFS) through a loop device of its own.
    let out = sh(Command::new("partx")
        .args(["-g", "-n", "3", "-o", "START,SECTORS"])
        .arg(&disk));
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: Vec<u64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    let out = sh(Command::new("losetup")
        .args(["--show", "-f", "-o", &(v[0] * 512).to_string()])
        .args(["--sizelimit", &(v[1] * 512).to_string()])
        .arg(&disk));
    let lo = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let r = Command::new("ntfscp")
        .args(["-q", &lo])
        .arg(&hib)
        .arg("/hiberfil.sys")
        .output();
    sh(Command::new("losetup").args(["-d", &lo]));
    let r = r.unwrap();
    assert!(r.status.success(), "ntfscp: {r:?}");
    let log = refused_capture(t.path(), &disk);
    assert!(
        log.contains("partition 3: Windows is hibernated or in fast startup"),
        "{log}"
    );
}

#[test]
fn a_master_kept_out_of_the_store_is_the_origin_of_a_deployment() {
    let t = tempfile::tempdir().unwrap();
    let (disk, local) = master(t.path());
    let srv = Server::start(t.path(), None, &config());
    let out = srv.admin_ok(&["capture", MASTER, "--image", "lab", "--no-store"]);
    let capture_id: String = out
        .rsplit("deployment ")
        .next()
        .unwrap()
        .trim_end_matches([')', '\n'])
        .to_string();
    let mut m = Agent::start(&srv.url, MASTER, &disk);
    m.wait_log("phase announce", 60);
    // The image is served from the master: listed, never stored.
    let t0 = Instant::now();
    while http_get(&format!("{}/images/lab/manifest.json", srv.url)).0 != 200 {
        assert!(t0.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(200));
    }
    deploy_and_compare(&srv, t.path(), PC, &disk, &local);
    assert!(!srv.dir.join("images/lab").exists());
    // Every byte came from the master: the server's seed has no such image.
    assert!(m.log().contains("is served from 127.0.0.1:"), "{}", m.log());
    let pc_log = std::fs::read_to_string(t.path().join("pc-525400002002.agent.log")).unwrap();
    assert!(!pc_log.contains(&format!(":{}", srv.seed_port)), "{pc_log}");
    // The admin ends the master's task; it stops seeding and exits.
    srv.admin_ok(&["stop", &capture_id]);
    m.wait_ok(30);
    assert!(m.log().contains("stopping the seed"), "{}", m.log());
}

#[test]
fn an_interrupted_capture_leaves_no_image() {
    let t = tempfile::tempdir().unwrap();
    let (disk, _) = master(t.path());
    let srv = Server::start(t.path(), None, &config());
    srv.admin_ok(&["capture", MASTER, "--image", "lab"]);
    // A master capped at 4 MiB/s: the pull of ~55 MiB takes a while.
    let log = t.path().join("master.agent.log");
    let mut m = Proc(
        Command::new(bin())
            .args(["agent", "--server", &srv.url, "--mac", MASTER, "--target"])
            .arg(&disk)
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--max-upload", "4M"])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let partial = srv.dir.join("images/.capture-lab.partial");
    let t0 = Instant::now();
    while !partial.join("payload.bin").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no pull began:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !srv.dir.join("images/lab").exists(),
        "a half image is visible"
    );
    m.0.kill().unwrap();
    m.0.wait().unwrap();
    srv.admin_ok(&["stop", "1"]);
    let t0 = Instant::now();
    while partial.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the partial pull stayed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let names: Vec<_> = std::fs::read_dir(srv.dir.join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != ".blockswarm-host-key")
        .collect();
    assert!(names.is_empty(), "{names:?}");
    let out = srv.admin_ok(&["images"]);
    assert!(!out.contains("lab"), "{out}");
    let log = std::fs::read_to_string(&srv.log).unwrap();
    assert!(
        log.contains("the capture was stopped by the admin"),
        "{log}"
    );
}

/// The deploy initramfs has no blkid: a master's regions that we do not
/// parse are then carried whole, instead of failing the capture.
#[test]
fn without_blkid_unparsed_regions_are_carried_whole() {
    let t = tempfile::tempdir().unwrap();
    let disk = mkdisk(t.path(), "other.img", "other", 16);
    let out = Command::new(bin())
        .args(["capture", disk.to_str().unwrap(), "--out"])
        .arg(t.path().join("img"))
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("blkid is not installed"), "{err}");
    let m = manifest_json(&t.path().join("img"));
    let parts: Vec<_> = m["regions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["partition"].is_number())
        .collect();
    assert!(!parts.is_empty(), "{m}");
    for r in parts {
        assert_eq!(r["used_bytes"], r["len"], "{r}");
    }
}
