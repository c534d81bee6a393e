//! Unattended rooms (issue 19), over HTTP against the real server: the
//! server decides every network boot, a task is one-shot, unknown PCs are
//! never imaged, and a server killed mid-deployment carries on where it was.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const A: &str = "52:54:00:00:19:01";
const B: &str = "52:54:00:00:19:02";
const C: &str = "52:54:00:00:19:03";
const STRANGER: &str = "52:54:00:00:19:99";

fn lab_image(dir: &Path, scale: u32) -> PathBuf {
    let disk = mkdisk(dir, "master.img", "gpt", scale);
    std::fs::create_dir_all(dir.join("images")).unwrap();
    capture(&disk, &dir.join("images/lab"), true);
    disk
}

/// A room of `members`, whose job writes `lab` and, with `seed`, seeds
/// until the room is done; a default job too (which must not make unknown
/// PCs join).
fn room(members: &[&str], extra: &str, seed: bool) -> String {
    let list: Vec<String> = members.iter().map(|m| format!("\"{m}\"")).collect();
    format!(
        "{extra}\n[[group]]\nname = \"room-19\"\nmembers = [{}]\n[group.job]\nimage = \"lab\"\n\
         on_done = \"nothing\"\nkeep_seeding = \"{}\"\n\n[default_job]\nimage = \"lab\"\n",
        list.join(", "),
        if seed { "deployment" } else { "off" }
    )
}

fn boot_script(srv: &Server, mac: &str, platform: &str) -> String {
    let (code, body) = http_get(&format!(
        "{}/boot.ipxe?mac={}&platform={platform}",
        srv.url,
        mac.replace(':', "-")
    ));
    assert_eq!(code, 200);
    String::from_utf8(body).unwrap()
}

fn job_error(srv: &Server, mac: &str) -> (u16, String) {
    let (code, body) = http_get(&format!("{}/api/v1/jobs/{mac}", srv.url));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    (code, v["error"].as_str().unwrap_or("").to_string())
}

#[test]
fn a_pc_is_imaged_once_then_boots_its_disk_and_strangers_never_join() {
    let t = tempfile::tempdir().unwrap();
    let disk = lab_image(t.path(), 16);
    let size = std::fs::metadata(&disk).unwrap().len();
    let srv = Server::start(t.path(), None, &room(&[A, B], "", false));
    srv.wait_seeding("lab");
    // Before any deployment, the room's PCs boot their disk.
    let s = boot_script(&srv, A, "pcbios");
    assert!(
        s.contains("sanboot --no-describe --drive 0x80") && !s.contains("kernel "),
        "{s}"
    );
    let out = srv.admin_ok(&["start", "--group", "room-19"]);
    assert!(out.contains("deployment 1 started"), "{out}");
    // Now they boot the agent; an unknown PC boots its disk (UEFI: exit),
    // even though a default job exists.
    let s = boot_script(&srv, A, "pcbios");
    assert!(s.contains("kernel ") && s.contains("BOOTIF="), "{s}");
    let s = boot_script(&srv, STRANGER, "efi");
    assert!(s.ends_with("\nexit 1\n") && !s.contains("kernel "), "{s}");
    assert!(s.contains("is not registered"), "{s}");
    let (code, why) = job_error(&srv, STRANGER);
    assert_eq!(code, 404, "{why}");
    assert!(why.contains("is not registered"), "{why}");
    // Its agent, if it ran anyway, waits and writes nothing.
    let stranger = t.path().join("stranger.img");
    blank_target(&stranger, size, true);
    let s_agent = Agent::start(&srv.url, STRANGER, &stranger);

    let tgt = t.path().join("a.img");
    blank_target(&tgt, size, false);
    let mut a = Agent::start(&srv.url, A, &tgt);
    a.wait_ok(120);
    assert_extents_equal(&t.path().join("images/lab"), &disk, &tgt, &[]);
    // The PC reboots into the network: it is sent to its disk, and its job
    // is not handed out again.
    let s = boot_script(&srv, A, "pcbios");
    assert!(s.contains("sanboot") && !s.contains("kernel "), "{s}");
    assert!(s.contains("was imaged by deployment 1"), "{s}");
    let (code, why) = job_error(&srv, A);
    assert_eq!(code, 404, "{why}");
    // Its log is on the server.
    let log = srv.admin_ok(&["log", A]);
    assert!(log.contains(&format!("agent for {A}")), "{log}");
    assert!(log.contains("deployment 1"), "{log}");
    // The admin sees who is who, and can ask for A again.
    let hosts: serde_json::Value =
        serde_json::from_str(&srv.admin_ok(&["--json", "hosts"])).unwrap();
    let find = |m: &str| {
        hosts
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["mac"] == m)
            .cloned()
            .unwrap()
    };
    assert_eq!(find(STRANGER)["registered"], false);
    assert_eq!(find(A)["task"]["task"], "done");
    assert_eq!(find(B)["task"]["task"], "pending");
    let out = srv.admin_ok(&["reimage", A]);
    assert!(out.contains("deployment 2"), "{out}");
    assert!(boot_script(&srv, A, "pcbios").contains("kernel "));
    drop(s_agent);
    assert!(
        std::fs::read(&stranger).unwrap().iter().all(|&b| b == MARK),
        "the unknown PC's disk was written"
    );
}

#[test]
fn a_server_killed_mid_deployment_carries_on_with_the_same_deployment() {
    let t = tempfile::tempdir().unwrap();
    let disk = lab_image(t.path(), 24);
    let size = std::fs::metadata(&disk).unwrap().len();
    // A slow seed, so that the server dies mid-way.
    let cfg = room(&[A, B, C], "seed_upload_limit = \"6M\"", true);
    let srv = Server::start(t.path(), None, &cfg);
    srv.wait_seeding("lab");
    srv.admin_ok(&["start", "--group", "room-19"]);
    let (port, seed_port) = (srv.port, srv.seed_port);
    let mut agents: Vec<(Agent, PathBuf)> = [A, B, C]
        .iter()
        .map(|m| {
            let tgt = t.path().join(format!("{}.img", &m[15..]));
            blank_target(&tgt, size, false);
            (Agent::start(&srv.url, m, &tgt), tgt)
        })
        .collect();
    srv.wait_hosts_past(3, 2 << 20);
    // kill -9: no chance to save anything.
    let mut srv = srv;
    srv.proc.0.kill().unwrap();
    srv.proc.0.wait().unwrap();
    drop(srv);
    std::thread::sleep(Duration::from_secs(2));
    let srv = Server::start_on(t.path(), None, &cfg, port, seed_port);
    let v = srv.view();
    assert_eq!(v["id"], 1, "{v}");
    assert_eq!(v["running"], true, "{v}");
    for (a, tgt) in &mut agents {
        a.wait_ok(240);
        assert_extents_equal(&t.path().join("images/lab"), &disk, tgt, &[]);
    }
    let t0 = Instant::now();
    let v = loop {
        let v = srv.view();
        if v["done"] == true || t0.elapsed() > Duration::from_secs(30) {
            break v;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(v["done"], true, "{v}");
    assert_eq!(v["tasks"]["done"], 3, "{v}");
    // The history has it once, and ids go on.
    let h: serde_json::Value = serde_json::from_str(&srv.admin_ok(&["--json", "history"])).unwrap();
    assert_eq!(h.as_array().unwrap().len(), 1, "{h}");
    assert_eq!(h[0]["state"], "done", "{h}");
    let out = srv.admin_ok(&["start", "--host", A]);
    assert!(out.contains("deployment 2 started"), "{out}");
}

/// Two rooms, two images, one server, at once: each PC gets its room's
/// image, and each deployment ends on its own.
#[test]
fn two_rooms_deploy_two_images_at_once() {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(t.path().join("images")).unwrap();
    let gpt = mkdisk(t.path(), "win.img", "gpt", 16);
    capture(&gpt, &t.path().join("images/win"), true);
    let mbr = mkdisk(t.path(), "linux.img", "mbr", 16);
    capture(&mbr, &t.path().join("images/linux"), true);
    let rooms = [
        (
            "room-a",
            "win",
            &gpt,
            ["52:54:00:00:1a:01", "52:54:00:00:1a:02"],
        ),
        (
            "room-b",
            "linux",
            &mbr,
            ["52:54:00:00:1b:01", "52:54:00:00:1b:02"],
        ),
    ];
    let mut cfg = String::from("seed_upload_limit = \"20M\"\n");
    for (name, image, _, members) in &rooms {
        cfg += &format!(
            "[[group]]\nname = \"{name}\"\nmembers = [\"{}\", \"{}\"]\n[group.job]\nimage = \"{image}\"\n\
             on_done = \"nothing\"\nkeep_seeding = \"deployment\"\nseed_cap_minutes = 2\n\n",
            members[0], members[1]
        );
    }
    let srv = Server::start(t.path(), None, &cfg);
    srv.wait_seeding("win");
    srv.wait_seeding("linux");
    let a = srv.admin_ok(&["start", "--group", "room-a"]);
    let b = srv.admin_ok(&["start", "--group", "room-b"]);
    assert!(
        a.contains("deployment 1 started") && b.contains("deployment 2 started"),
        "{a}{b}"
    );
    let mut agents = Vec::new();
    for (_, image, disk, members) in &rooms {
        let size = std::fs::metadata(disk).unwrap().len();
        for m in members {
            let tgt = t.path().join(format!("{}.img", &m[12..].replace(':', "")));
            blank_target(&tgt, size, false);
            agents.push((Agent::start(&srv.url, m, &tgt), tgt, image, disk));
        }
    }
    for (a, tgt, image, disk) in &mut agents {
        a.wait_ok(180);
        assert_extents_equal(&t.path().join("images").join(image), disk, tgt, &[]);
    }
    for id in [1, 2] {
        let v: serde_json::Value =
            serde_json::from_str(&srv.admin_ok(&["--json", "status", &id.to_string()])).unwrap();
        assert_eq!(v["done"], true, "{v}");
        assert_eq!(v["tasks"]["done"], 2, "{v}");
    }
}

#[test]
fn the_admin_command_says_when_the_server_is_unreachable() {
    let port = free_port();
    let out = std::process::Command::new(bin())
        .args(["admin", "--json", "hosts"])
        .env("BLOCKSWARM_SERVER", format!("http://127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "cannot reach the server at http://127.0.0.1:{port}"
        )) && err.contains("BLOCKSWARM_SERVER"),
        "{err}"
    );
}
