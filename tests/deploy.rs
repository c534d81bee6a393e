//! The boot server and agents on loopback: whole deployments and their
//! failure modes.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// Captures a GPT fixture into `dir/images/lab` (with a store file).
fn lab_image(dir: &Path, scale: u32) -> PathBuf {
    let disk = mkdisk(dir, "master.img", "gpt", scale);
    let image = dir.join("images/lab");
    std::fs::create_dir_all(dir.join("images")).unwrap();
    capture(&disk, &image, true);
    disk
}

fn job(extra: &str) -> String {
    format!("[default_job]\nimage = \"lab\"\n{TEST_JOB}{extra}")
}

fn mac(i: usize) -> String {
    format!("52:54:00:00:10:{i:02x}")
}

#[test]
fn server_and_four_agents() {
    let t = tempfile::tempdir().unwrap();
    let disk = lab_image(t.path(), 16);
    let size = std::fs::metadata(&disk).unwrap().len();
    let srv = Server::start(t.path(), Some(4), &job(""));
    srv.wait_seeding("lab");
    let mut agents: Vec<(Agent, PathBuf)> = (0..4)
        .map(|i| {
            let tgt = t.path().join(format!("pc{i}.img"));
            blank_target(&tgt, size, true);
            (Agent::start(&srv.url, &mac(i), &tgt), tgt)
        })
        .collect();
    for (a, _) in &mut agents {
        a.wait_ok(180);
    }
    let image = t.path().join("images/lab");
    for (_, tgt) in &agents {
        assert_extents_equal(&image, &disk, tgt, &[]);
        assert_untouched_outside(&image, tgt);
    }
    let v = srv.view();
    assert_eq!(v["done"], true, "{v}");
    let hosts = v["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 4);
    assert!(
        hosts
            .iter()
            .all(|h| h["state"] == "done" && h["finished_after_s"].is_number()),
        "{v}"
    );
    let img = &v["images"][0];
    let ratio = img["uploaded_bytes"].as_f64().unwrap() / img["payload_bytes"].as_f64().unwrap();
    assert!(
        ratio > 0.5 && ratio <= 4.0,
        "seed upload ÷ payload = {ratio}"
    );

    // Observability: metrics, dashboard page, admin CLI.
    let size_done = img["payload_bytes"].as_u64().unwrap();
    let (code, m) = http_get(&format!("{}/metrics", srv.url));
    let m = String::from_utf8(m).unwrap();
    assert_eq!(code, 200);
    assert!(
        m.contains(&format!(
            "blockswarm_host_done_bytes{{deployment=\"1\",mac=\"{}\"}} {size_done}",
            mac(0)
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "blockswarm_host_task_state{{deployment=\"1\",mac=\"{}\",state=\"done\"}} 1",
            mac(0)
        )),
        "{m}"
    );
    assert!(
        m.contains("blockswarm_seed_uploaded_bytes_total{image=\"lab\"}"),
        "{m}"
    );
    let (code, page) = http_get(&format!("{}/", srv.url));
    assert_eq!(code, 200);
    // The dashboard asks for the admin token first (tests/dashboard.rs).
    assert!(String::from_utf8_lossy(&page).contains("action=\"/login\""));
    let out = bs_ok(&["admin", "--server", &srv.url, "status"]);
    assert!(
        out.contains("deployment 1: done") && out.contains(&mac(3)),
        "{out}"
    );
    let out = srv.admin_ok(&["images"]);
    assert!(out.contains("lab") && out.contains("seeding"), "{out}");
    let out = bs_err(&["admin", "--server", &srv.url, "--token", "wrong", "images"]);
    assert!(out.contains("401") && out.contains("bearer token"), "{out}");
}

#[test]
fn waiting_agents_say_why_and_write_nothing() {
    let t = tempfile::tempdir().unwrap();
    let disk = lab_image(t.path(), 16);
    let size = std::fs::metadata(&disk).unwrap().len();
    // No default job, and one known host.
    let srv = Server::start(
        t.path(),
        None,
        &format!(
            "[[host]]\nmac = \"{}\"\n[host.job]\nimage = \"lab\"\nverify = \"readback\"\n{TEST_JOB}",
            mac(1)
        ),
    );
    srv.wait_seeding("lab");
    let unknown = t.path().join("unknown.img");
    blank_target(&unknown, size, true);
    let a = Agent::start(&srv.url, &mac(9), &unknown);
    a.wait_log(
        "no job: 52:54:00:00:10:09 is not registered: approve it, or open a deployment to unknown hosts",
        20,
    );
    let known = t.path().join("known.img");
    blank_target(&known, size, true);
    let mut b = Agent::start(&srv.url, &mac(1), &known);
    b.wait_log("no job: no deployment for 52:54:00:00:10:01 is running", 20);
    // Start the deployment from the admin CLI: the known host goes ahead.
    let out = srv.admin_ok(&["start", "--expect", "1"]);
    assert!(out.contains("deployment 1 started"), "{out}");
    b.wait_ok(120);
    assert!(
        b.log().contains("read-back verification passed"),
        "{}",
        b.log()
    );
    assert_extents_equal(&t.path().join("images/lab"), &disk, &known, &[]);
    std::thread::sleep(Duration::from_secs(1));
    assert!(a.log().contains("no job"));
    drop(a);
    let data = std::fs::read(&unknown).unwrap();
    assert!(
        data.iter().all(|&b| b == MARK),
        "the unknown host's disk was written"
    );
}

#[test]
fn malformed_job_or_manifest_writes_nothing() {
    // A stand-in server of static files answers with broken documents.
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("www");
    let jobs = root.join("api/v1/jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    std::fs::create_dir_all(root.join("images/lab")).unwrap();
    std::fs::write(jobs.join(mac(1)), "{\"job\": 17").unwrap();
    let good_job = format!(
        "{{\"mac\":\"{}\",\"host\":null,\"job\":{{\"image\":\"lab\",\"on_done\":\"nothing\"}},\"manifest_url\":\"/images/lab/manifest.json\",\"torrent_url\":\"/images/lab/image.torrent\",\"trackers\":[],\"deployment\":1}}",
        mac(2)
    );
    std::fs::write(jobs.join(mac(2)), good_job).unwrap();
    std::fs::write(
        root.join("images/lab/manifest.json"),
        "{\"format\":\"blockswarm-image\",\"version\":1,",
    )
    .unwrap();
    std::fs::write(root.join("images/lab/image.torrent"), "d8:announce0:e").unwrap();
    let port = free_port();
    let _www = Proc(
        std::process::Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(&root)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(700));
    let url = format!("http://127.0.0.1:{port}");

    let tgt = t.path().join("a.img");
    blank_target(&tgt, 64 << 20, true);
    let a = Agent::start(&url, &mac(1), &tgt);
    a.wait_log("the server's job is malformed", 20);
    drop(a);
    let tgt2 = t.path().join("b.img");
    blank_target(&tgt2, 64 << 20, true);
    let out = std::process::Command::new(bin())
        .args(["agent", "--server", &url, "--mac", &mac(2), "--target"])
        .arg(&tgt2)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a valid manifest") && !err.contains("panicked"),
        "{err}"
    );
    for f in [&tgt, &tgt2] {
        assert!(
            std::fs::read(f).unwrap().iter().all(|&b| b == MARK),
            "{} was written",
            f.display()
        );
    }
}

#[test]
fn http_server_refuses_traversal_and_garbage() {
    let t = tempfile::tempdir().unwrap();
    lab_image(t.path(), 16);
    std::fs::write(t.path().join("secret.txt"), "TOP SECRET").unwrap();
    let srv = Server::start(t.path(), Some(0), &job(""));
    srv.wait_seeding("lab");
    for path in [
        "/images/lab/../../secret.txt",
        "/images/..%2F..%2Fsecret.txt/manifest.json",
        "/images/lab/..%2F..%2Fsecret.txt",
        "/images/lab/payload.bin",
        "/images/lab%2F..%2F..%2Fsecret.txt/manifest.json",
        "/images/%2e%2e/server.toml",
    ] {
        let (code, body) = http_get(&format!("{}{path}", srv.url));
        let body = String::from_utf8_lossy(&body);
        assert!(code == 404 || code == 400, "{path}: {code}");
        assert!(
            !body.contains("TOP SECRET") && !body.contains("admin_token"),
            "{path}: {body}"
        );
    }
    let (code, _) = http_get(&format!("{}/images/lab/manifest.json", srv.url));
    assert_eq!(code, 200);
    // The served torrent announces to this server, with the same info hash.
    let (_, tor) = http_get(&format!("{}/images/lab/image.torrent", srv.url));
    assert!(String::from_utf8_lossy(&tor).contains(&format!("{}/announce", srv.url)));
    for q in [
        "",
        "info_hash=%zz",
        "info_hash=abc&peer_id=x",
        "port=0",
        "info_hash=%00%00%00%00%00%00%00%00%00%00%00%00%00%00%00%00%00%00%00%00&peer_id=%00%00%00%00%00%00%00%00%00%00%00%00%00%00%00%00%00%00%00%00&port=1&left=0",
    ] {
        let (code, body) = http_get(&format!("{}/announce?{q}", srv.url));
        assert_eq!(code, 200);
        assert!(
            String::from_utf8_lossy(&body).starts_with("d14:failure reason"),
            "{q}"
        );
    }
    let (code, _) = http_get(&format!("{}/api/v1/jobs/not-a-mac", srv.url));
    assert_eq!(code, 400);
}

#[test]
fn agents_survive_the_server_vanishing() {
    let t = tempfile::tempdir().unwrap();
    let disk = lab_image(t.path(), 24);
    let size = std::fs::metadata(&disk).unwrap().len();
    // A slow seed, so that the server can vanish mid-way.
    let extra = format!("seed_upload_limit = \"6M\"\n{}", job(""));
    let srv = Server::start(t.path(), Some(3), &extra);
    srv.wait_seeding("lab");
    let (port, seed_port) = (srv.port, srv.seed_port);
    let mut agents: Vec<(Agent, PathBuf)> = (0..3)
        .map(|i| {
            let tgt = t.path().join(format!("pc{i}.img"));
            blank_target(&tgt, size, false);
            (Agent::start(&srv.url, &mac(i), &tgt), tgt)
        })
        .collect();
    srv.wait_hosts_past(3, 4 << 20);
    drop(srv);
    std::thread::sleep(Duration::from_secs(4));
    for (a, _) in &mut agents {
        assert!(
            a.proc.0.try_wait().unwrap().is_none(),
            "an agent gave up:\n{}",
            a.log()
        );
    }
    let srv = Server::start_on(t.path(), Some(3), &extra, port, seed_port);
    for (a, _) in &mut agents {
        a.wait_ok(240);
        assert!(
            a.log().contains("server unreachable") && a.log().contains("server reachable again"),
            "{}",
            a.log()
        );
    }
    for (_, tgt) in &agents {
        assert_extents_equal(&t.path().join("images/lab"), &disk, tgt, &[]);
    }
    drop(srv);
}

#[test]
fn images_dropped_into_the_store_appear_only_when_whole() {
    let t = tempfile::tempdir().unwrap();
    lab_image(t.path(), 16);
    let srv = Server::start(t.path(), Some(0), &job(""));
    srv.wait_seeding("lab");
    // An admin copies a second image in, payload file last: half-way, the
    // manifest is there but the payload is short.
    let (src, dst) = (t.path().join("images/lab"), t.path().join("images/lab2"));
    std::fs::create_dir(&dst).unwrap();
    for f in ["image.torrent", "manifest.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let payload = std::fs::read(src.join("payload.bin")).unwrap();
    std::fs::write(dst.join("payload.bin"), &payload[..payload.len() / 2]).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let names = |v: &serde_json::Value| {
        v["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(&srv.view()),
        ["lab"],
        "a half-copied image was picked up"
    );
    let (code, _) = http_get(&format!("{}/images/lab2/manifest.json", srv.url));
    assert_eq!(code, 404);
    std::fs::write(dst.join("payload.bin"), &payload).unwrap();
    srv.wait_seeding("lab2");
    let (code, _) = http_get(&format!("{}/images/lab2/manifest.json", srv.url));
    assert_eq!(code, 200);
    // And one that disappears is dropped.
    std::fs::remove_dir_all(&dst).unwrap();
    srv.wait_for(|v| names(v) == ["lab"], "lab2 to be dropped");
}
