//! Stock BitTorrent clients accept our torrents and agree with our hashes.

mod common;

use std::process::Command;

use blockswarm::image::Image;
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
    let m = Image::open(&image).unwrap().manifest;
    let torrent = image.join("image.torrent");

    let show = sh(Command::new("transmission-show").arg(&torrent));
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.contains(&format!("Hash: {}", m.payload.info_hash)),
        "{show}"
    );
    assert!(show.contains("payload.bin"), "{show}");
    assert!(
        show.contains(&format!("Piece Count: {}", m.payload.piece_count)),
        "{show}"
    );
    assert!(show.contains("Piece Size: 64.00 KiB"), "{show}");

    // aria2c hashes the store file itself: every piece must match.
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
        .arg(&image)
        .arg(&torrent));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("|OK  |"),
        "aria2c did not find the payload complete:\n{text}"
    );

    // A flipped byte in the store makes aria2c see a piece missing.
    let copy = t.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    std::fs::copy(image.join("payload.bin"), copy.join("payload.bin")).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(copy.join("payload.bin"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"\xff\x00\xff", 70_000).unwrap();
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
        "aria2c accepted a corrupt payload:\n{text}"
    );
}
