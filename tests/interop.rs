//! Stock BitTorrent clients accept our torrents and agree with our hashes.

mod common;

use std::process::Command;

use std::path::Path;

use blockswarm::image::{Image, torrent};
use common::*;

#[test]
fn stock_clients_accept_the_torrent_and_its_piece_hashes() {
    let t = tempfile::tempdir().unwrap();
    let disk = mkdisk(t.path(), "d.img", "gpt", 16);
    let image = t.path().join("img");
    bs_ok(&[
        "capture",
        disk.to_str().unwrap(),
        "--out",
        image.to_str().unwrap(),
        "--store",
        "--piece-length",
        "65536",
    ]);
    let img = Image::open(&image).unwrap();
    let m = img.manifest.clone();
    let layout = torrent::layout(&img.torrent).unwrap();
    let torrent = image.join("image.torrent");

    let show = sh(Command::new("transmission-show").arg(&torrent));
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.contains(&format!("Hash: {}", m.payload.info_hash)),
        "{show}"
    );
    assert!(show.contains(&format!("{}/payload.bin", m.name)), "{show}");
    assert!(show.contains(&format!("{}/image.json", m.name)), "{show}");
    assert!(
        show.contains(&format!(
            "Piece Count: {}",
            layout.prefix_pieces() + m.payload.piece_count
        )),
        "{show}"
    );
    assert!(show.contains("Piece Size: 64.00 KiB"), "{show}");

    // The files as a stock client lays them out: aria2c hashes them itself,
    // the manifest's pieces and the payload's: every piece must match.
    let stock = |dir: &Path| {
        let d = dir.join(&m.name);
        std::fs::create_dir_all(d.join(".pad")).unwrap();
        std::fs::copy(image.join("payload.bin"), d.join("payload.bin")).unwrap();
        let json = torrent::embedded_manifest(&m).unwrap();
        std::fs::write(d.join("image.json"), &json).unwrap();
        // aria2c knows no BEP 47 pad files: it wants the zeros on disk.
        let pad = layout.prefix_len - json.len() as u64;
        std::fs::write(d.join(format!(".pad/{pad}")), vec![0u8; pad as usize]).unwrap();
    };
    let good = t.path().join("good");
    stock(&good);
    let out = sh(Command::new("aria2c")
        .args([
            "--check-integrity=true",
            "--seed-time=0",
            "--enable-dht=false",
            "--bt-enable-lpd=false",
            "--enable-peer-exchange=false",
            "--console-log-level=warn",
            "--summary-interval=0",
            "-d",
        ])
        .arg(&good)
        .arg(&torrent));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("|OK  |"),
        "aria2c did not find the image complete:\n{text}"
    );

    // A flipped byte in the payload, or in the manifest, makes aria2c see
    // a piece missing.
    for (file, at) in [("payload.bin", 70_000), ("image.json", 20)] {
        let copy = t.path().join(format!("bad-{file}"));
        stock(&copy);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(copy.join(&m.name).join(file))
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"\xff", at).unwrap();
        let out = Command::new("aria2c")
            .args([
                "--check-integrity=true",
                "--seed-time=0",
                "--enable-dht=false",
                "--bt-enable-lpd=false",
                "--enable-peer-exchange=false",
                "--bt-stop-timeout=3",
                "--console-log-level=warn",
                "--summary-interval=0",
                "-d",
            ])
            .arg(&copy)
            .arg(&torrent)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.contains("|OK  |"),
            "aria2c accepted a corrupt {file}:\n{text}"
        );
    }
}

/// aria2c flags that keep it on loopback: no DHT, no LPD, no PEX.
const ARIA2_LOCAL: &[&str] = &[
    "--enable-dht=false",
    "--enable-dht6=false",
    "--bt-enable-lpd=false",
    "--enable-peer-exchange=false",
    "--console-log-level=warn",
    "--summary-interval=0",
    "--bt-tracker-interval=2",
];

fn served_torrent(srv: &Server, dir: &std::path::Path) -> std::path::PathBuf {
    let (code, tor) = http_get(&format!("{}/images/lab/image.torrent", srv.url));
    assert_eq!(code, 200);
    let p = dir.join("served.torrent");
    std::fs::write(&p, tor).unwrap();
    p
}

fn lab(t: &std::path::Path) -> std::path::PathBuf {
    let disk = mkdisk(t, "master.img", "gpt", 16);
    capture(&disk, &t.join("images/lab"), true);
    disk
}

#[test]
fn aria2c_downloads_from_our_seed_through_our_tracker() {
    let t = tempfile::tempdir().unwrap();
    lab(t.path());
    let srv = Server::start(t.path(), Some(0), "[default_job]\nimage = \"lab\"\n");
    srv.wait_seeding("lab");
    let torrent = served_torrent(&srv, t.path());
    let out_dir = t.path().join("aria");
    let out = Command::new("timeout")
        .args([
            "120",
            "aria2c",
            "--seed-time=0",
            &format!("--listen-port={}", free_port()),
            "-d",
        ])
        .arg(&out_dir)
        .args(ARIA2_LOCAL)
        .arg(&torrent)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "aria2c failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The torrent alone carried the whole image: manifest and payload.
    let stored = t.path().join("images/lab");
    assert_eq!(
        sha256(&out_dir.join("lab/payload.bin")),
        sha256(&stored.join("payload.bin"))
    );
    let m = Image::open(&stored).unwrap().manifest;
    let json = std::fs::read(out_dir.join("lab/image.json")).unwrap();
    assert_eq!(json, torrent::embedded_manifest(&m).unwrap());
    let back = blockswarm::image::manifest::Manifest::parse(&json).unwrap();
    assert_eq!(back.regions.len(), m.regions.len());
    assert_eq!(back.disk.size, m.disk.size);
}

/// Our agent fills a target from a swarm whose only seed is a stock client.
fn agent_from_stock_seed(start_seed: impl FnOnce(&Server, &std::path::Path) -> Proc) {
    let t = tempfile::tempdir().unwrap();
    let disk = lab(t.path());
    let size = std::fs::metadata(&disk).unwrap().len();
    let srv = Server::start(
        t.path(),
        Some(1),
        &format!("seed = false\n[default_job]\nimage = \"lab\"\n{TEST_JOB}"),
    );
    srv.wait_for(
        |v| v["images"][0]["state"] == "external",
        "the image to load",
    );
    let _seed = start_seed(&srv, t.path());
    let tgt = t.path().join("pc.img");
    blank_target(&tgt, size, true);
    let mut a = Agent::start(&srv.url, "52:54:00:00:40:01", &tgt);
    a.wait_ok(180);
    assert_extents_equal(&t.path().join("images/lab"), &disk, &tgt, &[]);
    assert_eq!(
        srv.view()["images"][0]["uploaded_bytes"],
        0,
        "the server seeded after all"
    );
}

#[test]
fn agent_completes_from_an_aria2c_seed() {
    agent_from_stock_seed(|srv, dir| {
        let torrent = served_torrent(srv, dir);
        let child = Command::new("aria2c")
            .args([
                "--check-integrity=true",
                "--seed-ratio=0.0",
                &format!("--listen-port={}", free_port()),
                "-d",
            ])
            // The torrent is the folder lab/: payload.bin is found there.
            .arg(dir.join("images"))
            .args(ARIA2_LOCAL)
            .arg(&torrent)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Proc(child)
    });
}

#[test]
fn agent_completes_from_a_transmission_seed() {
    agent_from_stock_seed(|srv, dir| {
        let torrent = served_torrent(srv, dir);
        let conf = dir.join("transmission");
        std::fs::create_dir_all(&conf).unwrap();
        // Loopback only: no DHT, LPD, PEX, uTP or port mapping.
        std::fs::write(
            conf.join("settings.json"),
            r#"{"dht-enabled": false, "lpd-enabled": false, "pex-enabled": false, "utp-enabled": false, "port-forwarding-enabled": false, "blocklist-enabled": false, "bind-address-ipv4": "127.0.0.1", "bind-address-ipv6": "::1"}"#,
        )
        .unwrap();
        let child = Command::new("transmission-cli")
            .args(["-g"])
            .arg(&conf)
            .args(["-M", "-p", &free_port().to_string(), "-w"])
            .arg(dir.join("images"))
            .arg(&torrent)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        Proc(child)
    });
}

#[test]
fn opentracker_replaces_our_tracker() {
    let t = tempfile::tempdir().unwrap();
    let disk = lab(t.path());
    let size = std::fs::metadata(&disk).unwrap().len();
    let hash = blockswarm::image::Image::open(&t.path().join("images/lab"))
        .unwrap()
        .manifest
        .payload
        .info_hash;
    // Debian's opentracker only tracks whitelisted hashes, refuses to run
    // as root, and chroots to -d.
    let root = t.path().join("opentracker");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("whitelist.txt"), format!("{hash}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for p in [t.path(), root.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let port = free_port();
    let _ot = Proc(
        Command::new("opentracker")
            .args([
                "-i",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-P",
                &port.to_string(),
                "-d",
            ])
            .arg(&root)
            .args(["-w", "whitelist.txt", "-u", "_opentracker"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let announce = format!("http://127.0.0.1:{port}/announce");
    let srv = Server::start(
        t.path(),
        Some(2),
        &format!("tracker = \"{announce}\"\n[default_job]\nimage = \"lab\"\n{TEST_JOB}"),
    );
    srv.wait_seeding("lab");
    let torrent = served_torrent(&srv, t.path());
    assert!(String::from_utf8_lossy(&std::fs::read(&torrent).unwrap()).contains(&announce));
    let mut agents: Vec<(Agent, std::path::PathBuf)> = (0..2)
        .map(|i| {
            let tgt = t.path().join(format!("pc{i}.img"));
            blank_target(&tgt, size, false);
            (
                Agent::start(&srv.url, &format!("52:54:00:00:50:0{i}"), &tgt),
                tgt,
            )
        })
        .collect();
    for (a, tgt) in &mut agents {
        a.wait_ok(180);
        assert_extents_equal(&t.path().join("images/lab"), &disk, tgt, &[]);
    }
    // Our own tracker saw nobody: opentracker did the work.
    assert_eq!(srv.view()["images"][0]["leechers"], 0);
    assert_eq!(srv.view()["images"][0]["seeders"], 0);
}
