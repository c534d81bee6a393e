//! An image travels as one .torrent: a server given only the torrent pulls
//! manifest and payload through the swarm from another server.

mod common;

use std::path::Path;

use blockswarm::image::Image;
use common::*;

fn images_of(srv: &Server) -> serde_json::Value {
    srv.view()["images"].clone()
}

/// Asserts that `dst`'s stored image is `src`'s: the same payload bytes,
/// the same manifest, the same torrent (info hash).
fn assert_same_image(src: &Path, dst: &Path) {
    assert_eq!(
        sha256(&dst.join("payload.bin")),
        sha256(&src.join("payload.bin"))
    );
    assert_eq!(
        std::fs::read(dst.join("manifest.json")).unwrap(),
        std::fs::read(src.join("manifest.json")).unwrap(),
        "the manifests differ"
    );
    let (a, b) = (Image::open(src).unwrap(), Image::open(dst).unwrap());
    assert_eq!(a.manifest.payload.info_hash, b.manifest.payload.info_hash);
    assert!(b.manifest.payload.stored);
}

#[test]
fn a_server_given_only_the_torrent_pulls_the_image_from_another() {
    let t = tempfile::tempdir().unwrap();
    let (a_dir, b_dir, c_dir) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
    let disk = mkdisk(t.path(), "master.img", "gpt", 16);
    capture(&disk, &a_dir.join("images/lab"), true);
    let a = Server::start(&a_dir, None, "");
    a.wait_seeding("lab");
    // The torrent as server A hands it out: it announces to A's tracker.
    let torrent_url = format!("{}/images/lab/image.torrent", a.url);
    let (code, torrent) = http_get(&torrent_url);
    assert_eq!(code, 200);

    // B: the torrent dropped into its store; peers from A's tracker.
    let b = Server::start(&b_dir, None, "");
    std::fs::write(b_dir.join("images/lab.torrent"), &torrent).unwrap();
    // C: `admin images add URL`, with A's seed named as a peer too.
    let c = Server::start(&c_dir, None, "");
    let said = c.admin_ok(&[
        "images",
        "add",
        &torrent_url,
        "--peer",
        &format!("127.0.0.1:{}", a.seed_port),
    ]);
    assert!(said.contains("pulls image lab"), "{said}");
    // A second add of the same image is refused while it is pulled.
    let again = c.admin_err(&["images", "add", &torrent_url]);
    assert!(
        again.contains("being pulled already") || again.contains("exists already"),
        "{again}"
    );

    for (srv, dir) in [(&b, &b_dir), (&c, &c_dir)] {
        srv.wait_seeding("lab");
        assert_same_image(&a_dir.join("images/lab"), &dir.join("images/lab"));
        let left: Vec<_> = std::fs::read_dir(dir.join("images"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".blockswarm-host-key")
            .collect();
        assert_eq!(left, vec!["lab".to_string()], "{left:?}");
        assert_eq!(images_of(srv)[0]["name"], "lab");
        let log = std::fs::read_to_string(&srv.log).unwrap();
        assert!(
            log.contains("its manifest came through the swarm and checks"),
            "{log}"
        );
    }
}

#[test]
fn a_torrent_that_is_not_an_image_is_refused_with_its_reason() {
    let t = tempfile::tempdir().unwrap();
    let srv = Server::start(t.path(), None, "");
    // An ordinary single-file torrent (no manifest inside).
    let file = t.path().join("x.torrent");
    std::fs::write(
        &file,
        b"d4:infod6:lengthi5e4:name1:x12:piece lengthi16384e6:pieces20:aaaaaaaaaaaaaaaaaaaaee",
    )
    .unwrap();
    let e = srv.admin_err(&["images", "add", file.to_str().unwrap()]);
    assert!(
        e.contains("single-file torrent without the image's manifest"),
        "{e}"
    );
}
