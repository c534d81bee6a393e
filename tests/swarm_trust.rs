//! Whom the swarm engine trusts, on loopback (each peer plays a host of its
//! own 127.0.0.x address): peers that forge the origin's or a host's peer
//! id, strangers at the server's seed, a peer that lies, a payload changed
//! in place under its seed, a receiver started before its seed.

mod common;
mod hostile;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use blockswarm::swarm::{Limits, ORIGIN_PREFIX, SwarmConfig, Trust};
use common::*;
use hostile::*;

/// A fake host that claims every piece (our message 0xB5) over and over.
fn claim_everything(mut s: TcpStream, pieces: u32) -> std::io::Result<()> {
    let mut r = s.try_clone()?;
    std::thread::spawn(move || while read_msg(&mut r).is_ok() {});
    loop {
        let all: Vec<u8> = (0..pieces).flat_map(|i| msg(0xB5, &u32s(&[i]))).collect();
        s.write_all(&all)?;
        std::thread::sleep(Duration::from_secs(2));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_host_id_does_not_steer_the_picker() {
    let fx = fixture();
    let (seed, _st) = fx.seed(true, Limits::default(), Trust::default()).await;
    let pieces = fx.pieces;
    let (liar, _) = fake_peer(&fx, 3, peer_id(HOST_PREFIX), move |s| {
        claim_everything(s, pieces)
    });
    // The server vouches for nobody here: a host's peer id is no claim to
    // being one.
    let (_rs, rt, rst) = fx
        .receiver(SwarmConfig {
            peers: vec![liar, seed.listen_addr()],
            origin: Some(seed.listen_addr()),
            ..Default::default()
        })
        .await;
    complete_within(&rt, 60, "the host").await;
    fx.assert_holds_payload(&rst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_origin_id_gets_no_origin_treatment() {
    let fx = fixture();
    let (payload, plen, pieces) = (Arc::new(fx.payload.clone()), fx.plen, fx.pieces);
    // An honest seed that calls itself the origin.
    let (fake_origin, _) = fake_peer(&fx, 2, peer_id(ORIGIN_PREFIX), move |s| {
        serve_honestly(s, payload.clone(), plen, pieces)
    });
    // A host the server vouches for, counting the claims it hears: a host
    // claims only what it fetches from the origin.
    let claims = Arc::new(AtomicUsize::new(0));
    let heard = claims.clone();
    let (host, _) = fake_peer(&fx, 3, peer_id(HOST_PREFIX), move |mut s| {
        loop {
            if read_msg(&mut s)?.first() == Some(&0xB5) {
                heard.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let (_rs, rt, rst) = fx
        .receiver(SwarmConfig {
            peers: vec![host, fake_origin],
            trust: Arc::new(Trust::new([ip(3)])),
            ..Default::default()
        })
        .await;
    complete_within(&rt, 60, "the host").await;
    fx.assert_holds_payload(&rst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        claims.load(Ordering::SeqCst),
        0,
        "pieces from a peer that only calls itself the origin were claimed"
    );
}

/// Asks for one whole piece from 127.0.0.`from` after `start`; returns the
/// bytes `total` had reached when its first and its last block came.
fn fetch_piece(
    fx: (SocketAddr, [u8; 20], u32),
    from: u8,
    start: &Barrier,
    total: &AtomicU64,
) -> (u64, u64) {
    let (addr, info_hash, plen) = fx;
    let piece = u32::from(from);
    let mut s = dial_from(from, addr, None);
    handshake(&mut s, info_hash, &peer_id(b"-XX0000-")).unwrap();
    s.write_all(&msg(2, &[])).unwrap();
    start.wait();
    if from == 2 {
        // The vouched host asks last.
        std::thread::sleep(Duration::from_millis(50));
    }
    let req: Vec<u8> = (0..plen)
        .step_by(BLOCK as usize)
        .flat_map(|b| msg(6, &u32s(&[piece, b, BLOCK])))
        .collect();
    s.write_all(&req).unwrap();
    let (mut got, mut first) = (0, None);
    while got < plen as usize {
        let m = read_msg(&mut s).unwrap();
        if m.first() == Some(&7) {
            got += m.len() - 9;
            let at = total.fetch_add(m.len() as u64 - 9, Ordering::SeqCst);
            first.get_or_insert(at);
        }
    }
    (first.unwrap_or(0), total.load(Ordering::SeqCst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_share_one_of_the_origin_s_slots() {
    let fx = fixture();
    assert!(fx.pieces > 10);
    // Nine pieces take about 1.1 s.
    let limits = Limits {
        upload: Some(u64::from(fx.plen) * 8),
        download: None,
    };
    let (seed, _st) = fx.seed(true, limits, Trust::new([ip(2)])).await;
    let args = (seed.listen_addr(), fx.info_hash, fx.plen);
    let start = Arc::new(Barrier::new(9));
    let total = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Mutex::new(Vec::new()));
    // Eight strangers (127.0.0.3 to .10) and a vouched host (127.0.0.2),
    // each asking for a piece.
    let threads: Vec<_> = (2..=10u8)
        .map(|from| {
            let (start, total, done) = (start.clone(), total.clone(), done.clone());
            std::thread::spawn(move || {
                let (first, last) = fetch_piece(args, from, &start, &total);
                done.lock().unwrap().push((from, first, last));
            })
        })
        .collect();
    tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| t.join().unwrap()))
        .await
        .unwrap();
    let mut done = done.lock().unwrap().clone();
    done.sort_by_key(|d| d.1);
    let plen = u64::from(fx.plen);
    // One stranger at a time: each stranger's piece starts when the one
    // before is about done (what was still in flight, at most a piece).
    let strangers: Vec<_> = done.iter().filter(|d| d.0 != 2).collect();
    for w in strangers.windows(2) {
        assert!(
            w[1].1 + plen >= w[0].2,
            "strangers served at once (first and last block, in bytes sent): {done:?}"
        );
    }
    // The vouched host did not wait behind the strangers (it shared the
    // port with one of them).
    let vouched = done.iter().find(|d| d.0 == 2).unwrap().2;
    let all = 9 * plen;
    assert!(
        vouched <= all * 6 / 10,
        "the vouched host's piece was done after {vouched} of {all} bytes"
    );
}

/// Answers every request with a block of 0x5A.
fn serve_lies(mut s: TcpStream, pieces: u32) -> std::io::Result<()> {
    let mut out = bitfield_all(pieces);
    out.extend_from_slice(&msg(1, &[]));
    s.write_all(&out)?;
    loop {
        let m = read_msg(&mut s)?;
        if m.first() == Some(&6) && m.len() == 13 {
            let len = u32::from_be_bytes(m[9..13].try_into().unwrap());
            let mut body = m[1..9].to_vec();
            body.extend(std::iter::repeat_n(0x5A, len as usize));
            s.write_all(&msg(7, &body))?;
        }
    }
}

/// An HTTP tracker on 127.0.0.1 naming `peer` in every answer, asking to
/// be asked again each second; counts its announces.
fn tracker(peer: SocketAddr) -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/announce", l.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let n = count.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut req = Vec::new();
            let mut b = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => req.extend_from_slice(&b[..k]),
                }
            }
            n.fetch_add(1, Ordering::SeqCst);
            let IpAddr::V4(v4) = peer.ip() else { panic!() };
            let mut body = b"d8:intervali1e5:peers6:".to_vec();
            body.extend_from_slice(&v4.octets());
            body.extend_from_slice(&peer.port().to_be_bytes());
            body.push(b'e');
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(&body);
        }
    });
    (url, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupting_peer_is_banned_and_never_dialled_again() {
    let fx = fixture();
    let liar_id = peer_id(b"-LIAR0-");
    let pieces = fx.pieces;
    let (liar, conns) = fake_peer(&fx, 2, liar_id, move |s| serve_lies(s, pieces));
    let (url, announces) = tracker(liar);
    // The honest seed takes about 8 s: time for the tracker to name the
    // liar again and again.
    let rate = fx.payload.len() as u64 / 8;
    let limits = Limits {
        upload: Some(rate),
        download: None,
    };
    let (seed, _st) = fx.seed(false, limits, Trust::default()).await;
    let (rs, rt, rst) = fx
        .receiver(SwarmConfig {
            peers: vec![seed.listen_addr()],
            trackers: vec![url],
            ..Default::default()
        })
        .await;
    complete_within(&rt, 60, "the receiver").await;
    fx.assert_holds_payload(&rst);
    assert!(
        announces.load(Ordering::SeqCst) >= 4,
        "the tracker was asked {} times: the test proves nothing",
        announces.load(Ordering::SeqCst)
    );
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "the liar was dialled again after it was dropped"
    );
    // Nor is it let in when it dials.
    let mut s = dial_from(2, rs.listen_addr(), None);
    s.write_all(&our_handshake(fx.info_hash, &peer_id(b"-OTHER-")))
        .unwrap();
    let mut hs = [0u8; 68];
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(
        s.read_exact(&mut hs).is_err(),
        "the banned address got a handshake back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_changed_under_its_seed_fails_the_seed_and_is_never_served() {
    let fx = fixture();
    let copy = fx.dir.join("payload-copy.bin");
    std::fs::copy(fx.dir.join("payload.bin"), &copy).unwrap();
    let (seed, st) = fx
        .seed_from(&copy, false, Limits::default(), Trust::default())
        .await;
    // Changed in place after the seed checked it.
    let bad = 3u32;
    {
        let f = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"changed", u64::from(bad * fx.plen) + 100)
            .unwrap();
    }
    let (_rs, rt, rst) = fx
        .receiver(SwarmConfig {
            peers: vec![seed.listen_addr()],
            ..Default::default()
        })
        .await;
    assert!(
        eventually(Duration::from_secs(60), || st.check_error().is_err()).await,
        "the seed still serves a changed payload"
    );
    let e = format!("{:#}", st.check_error().unwrap_err());
    // The torrent's piece: the payload's, after the manifest's.
    assert!(
        e.contains(&format!("piece {} ", bad + fx.base)) && e.contains("changed since capture"),
        "{e}"
    );
    // The receiver wrote the good pieces it got, and nothing of piece 3.
    let mut buf = vec![0u8; fx.payload_len as usize];
    rst.read(0, &mut buf).unwrap();
    let bad = bad + fx.base;
    for i in fx.base..fx.pieces {
        let off = ((i - fx.base) * fx.plen) as usize;
        let got = &buf[off..off + fx.piece(i).len()];
        assert!(
            got == fx.piece(i) || got.iter().all(|&b| b == 0),
            "piece {i} on the target is neither the payload's nor blank"
        );
        if i == bad {
            assert!(got.iter().all(|&b| b == 0), "piece {bad} was written");
        }
    }
    assert!(!rt.progress().finished);
}

#[test]
fn the_seed_command_stops_with_the_reason_when_its_source_changes() {
    let fx = fixture();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = fx.dir.join("seed.log");
    let mut seed = Proc(
        Command::new(bin())
            .args([
                "seed",
                fx.dir.to_str().unwrap(),
                "--listen",
                &addr.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let t0 = Instant::now();
    while !read_log().contains("seeding ") {
        assert!(t0.elapsed() < Duration::from_secs(60), "{}", read_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let bad = 2u32;
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(fx.dir.join("payload.bin"))
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"changed", u64::from(bad * fx.plen) + 7)
            .unwrap();
    }
    // A peer asks for that piece, and gets none of it.
    let mut s = dial_from(2, addr, None);
    handshake(&mut s, fx.info_hash, &peer_id(b"-XX0000-")).unwrap();
    let mut out = msg(2, &[]);
    out.extend_from_slice(&requests(&fx, bad + fx.base));
    s.write_all(&out).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    while let Ok(m) = read_msg(&mut s) {
        assert_ne!(m.first(), Some(&7), "a block of the changed piece was sent");
    }
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = seed.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "`seed` still runs with a changed source:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let log = read_log();
    // The torrent's piece (after the manifest's), named by payload bytes.
    let at = u64::from(bad * fx.plen);
    assert!(
        log.contains(&format!("piece {} (payload bytes {at}..", bad + fx.base))
            && log.contains("changed since capture"),
        "{log}"
    );
}

#[test]
fn receive_waits_for_a_peer_that_is_not_up_yet() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let disk = mkdisk(t, "disk.img", "bare", 24);
    let size = std::fs::metadata(&disk).unwrap().len();
    let image = t.join("image");
    // A tracker this engine does not speak: skipped, with one warning.
    bs_ok(&[
        "capture",
        disk.to_str().unwrap(),
        "--out",
        image.to_str().unwrap(),
        "--store",
        "--tracker",
        "udp://127.0.0.1:9/announce",
    ]);
    let tgt = t.join("tgt.img");
    blank_target(&tgt, size, true);
    let port = free_port();
    let log = t.join("receive.log");
    let mut recv = Proc(
        Command::new(bin())
            .args(["receive", image.to_str().unwrap(), "--target"])
            .arg(&tgt)
            .args(["--peer", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let t0 = Instant::now();
    while !read_log().contains("connection refused; retrying in") {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "receive did not say it retries:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    let _seed = Proc(
        Command::new(bin())
            .args(["seed", image.to_str().unwrap(), "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = recv.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "receive did not finish once its peer was up:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = read_log();
    assert!(status.success(), "receive failed:\n{log}");
    assert!(log.contains("connected"), "{log}");
    let udp: Vec<&str> = log.lines().filter(|l| l.contains("udp://")).collect();
    assert!(
        udp.len() == 1 && udp[0].contains("not supported"),
        "the UDP tracker: {udp:#?}"
    );
    bs_ok(&[
        "verify",
        image.to_str().unwrap(),
        "--target",
        tgt.to_str().unwrap(),
    ]);
}
