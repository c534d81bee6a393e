//! The swarm engine against hand-written BEP 3 peers: one that lies (it
//! claims every piece and answers every request with wrong bytes; the
//! receiver must drop it, write nothing it sent, and finish from the honest
//! seed), and many that ask the server's seed for a piece each at once (it
//! must serve a few whole pieces at a time, not all of them in parallel).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};

use blockswarm::image::Image;
use blockswarm::image::map::PayloadMap;
use blockswarm::storage::DeviceStorage;
use blockswarm::swarm::{Limits, SwarmConfig, SwarmSession, Trust};
use common::*;

/// A BEP 3 peer that has "everything" and serves 0x5A for every block.
/// Returns its address and the count of blocks it served. It plays another
/// host (127.0.0.2): the receiver bans its address.
fn liar(info_hash: [u8; 20], pieces: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.2:0").unwrap();
    let addr = l.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let count = count.clone();
            std::thread::spawn(move || {
                let _ = serve_lies(s, info_hash, pieces, &count);
            });
        }
    });
    (addr, served)
}

fn serve_lies(
    mut s: TcpStream,
    info_hash: [u8; 20],
    pieces: usize,
    served: &AtomicUsize,
) -> std::io::Result<()> {
    let mut hs = [0u8; 68];
    s.read_exact(&mut hs)?;
    let mut out = vec![19u8];
    out.extend_from_slice(b"BitTorrent protocol");
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&info_hash);
    out.extend_from_slice(b"-LIAR0-0123456789012");
    // Bitfield: all pieces; then unchoke.
    let bits = pieces.div_ceil(8);
    out.extend_from_slice(&(bits as u32 + 1).to_be_bytes());
    out.push(5);
    let mut field = vec![0xFFu8; bits];
    if !pieces.is_multiple_of(8) {
        field[bits - 1] = 0xFF << (8 - pieces % 8);
    }
    out.extend_from_slice(&field);
    out.extend_from_slice(&[0, 0, 0, 1, 1]);
    s.write_all(&out)?;
    loop {
        let mut len = [0u8; 4];
        s.read_exact(&mut len)?;
        let mut msg = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut msg)?;
        if msg.first() == Some(&6) && msg.len() == 13 {
            let block = u32::from_be_bytes(msg[9..13].try_into().unwrap());
            let mut reply = (9 + block).to_be_bytes().to_vec();
            reply.push(7);
            reply.extend_from_slice(&msg[1..9]);
            reply.extend(std::iter::repeat_n(0x5A, block as usize));
            s.write_all(&reply)?;
            served.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[test]
fn a_lying_peer_is_dropped_and_nothing_it_sent_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (disk, size, image) = captured(t, "bare", 48);
    let m = Image::open(&image).unwrap().manifest;
    let hex = &m.payload.info_hash;
    let info_hash: [u8; 20] = (0..20)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    // The torrent's pieces: the manifest's, then the payload's.
    let torrent = std::fs::read(image.join("image.torrent")).unwrap();
    let pieces = blockswarm::image::torrent::layout(&torrent)
        .unwrap()
        .pieces
        .len()
        / 20;
    let (liar_addr, served) = liar(info_hash, pieces);
    let tgt = t.join("tgt.img");
    blank_target(&tgt, size, true);
    let (_seed, seed_addr) = seed(&image, None);
    let (ok, log) = bs(&[
        "receive",
        image.to_str().unwrap(),
        "--target",
        tgt.to_str().unwrap(),
        "--peer",
        &liar_addr.to_string(),
        "--peer",
        &seed_addr.to_string(),
    ]);
    assert!(ok, "receive failed:\n{log}");
    assert!(
        served.load(Ordering::Relaxed) >= 16,
        "the liar was never asked for a whole piece; the test proves nothing"
    );
    assert!(
        log.contains("failed their hash; banned for this torrent; dropped"),
        "the receiver did not say it dropped and banned the liar:\n{log}"
    );
    assert_extents_equal(&image, &disk, &tgt, &[]);
    assert_untouched_outside(&image, &tgt);
    bs_ok(&[
        "verify",
        image.to_str().unwrap(),
        "--target",
        tgt.to_str().unwrap(),
    ]);
}

fn info_hash_of(image: &Image) -> [u8; 20] {
    let hex = &image.manifest.payload.info_hash;
    (0..20)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap()
}

/// Asks `addr` for one whole piece, after `start`; returns the piece and
/// `total` (bytes received by every such peer) when its last block came.
fn fetch_piece(
    addr: SocketAddr,
    info_hash: [u8; 20],
    piece: u32,
    len: u32,
    start: &Barrier,
    total: &AtomicU64,
) -> std::io::Result<(Vec<u8>, u64)> {
    let mut s = TcpStream::connect(addr)?;
    let mut hs = vec![19u8];
    hs.extend_from_slice(b"BitTorrent protocol");
    hs.extend_from_slice(&[0; 8]);
    hs.extend_from_slice(&info_hash);
    hs.extend_from_slice(format!("-FAKE0-{piece:013}").as_bytes());
    s.write_all(&hs)?;
    let mut theirs = [0u8; 68];
    s.read_exact(&mut theirs)?;
    s.write_all(&[0, 0, 0, 1, 2])?; // interested
    start.wait();
    let block = 16u32 << 10;
    let mut req = Vec::new();
    for begin in (0..len).step_by(block as usize) {
        req.extend_from_slice(&13u32.to_be_bytes());
        req.push(6);
        req.extend_from_slice(&piece.to_be_bytes());
        req.extend_from_slice(&begin.to_be_bytes());
        req.extend_from_slice(&block.min(len - begin).to_be_bytes());
    }
    s.write_all(&req)?;
    let mut buf = vec![0u8; len as usize];
    let mut got = 0;
    while got < len as usize {
        let mut l = [0u8; 4];
        s.read_exact(&mut l)?;
        let mut msg = vec![0u8; u32::from_be_bytes(l) as usize];
        s.read_exact(&mut msg)?;
        if msg.first() == Some(&7) && msg.len() > 9 {
            let begin = u32::from_be_bytes(msg[5..9].try_into().unwrap()) as usize;
            let data = &msg[9..];
            buf[begin..begin + data.len()].copy_from_slice(data);
            got += data.len();
            total.fetch_add(data.len() as u64, Ordering::SeqCst);
        }
    }
    Ok((buf, total.load(Ordering::SeqCst)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_seed_serves_a_few_whole_pieces_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let (_disk, _size, dir) = captured(tmp.path(), "bare", 48);
    let image = Image::open(&dir).unwrap();
    let plen = image.manifest.payload.piece_length;
    let payload = std::fs::read(dir.join("payload.bin")).unwrap();
    let peers = 20u32;
    assert!(payload.len() as u64 > u64::from(peers + 1) * u64::from(plen));
    let storage = DeviceStorage::reader(
        Arc::new(std::fs::File::open(dir.join("payload.bin")).unwrap()),
        PayloadMap::identity(payload.len() as u64),
    );
    // Twenty pieces take 2.5 s.
    let limits = Limits {
        upload: Some(u64::from(plen) * 8),
        download: None,
    };
    let session = SwarmSession::start(Some("127.0.0.1:0".parse().unwrap()), limits, true)
        .await
        .unwrap();
    // Its twenty peers come from one address: the server vouches for it (a
    // torrent takes at most 8 connections from an address it does not).
    let cfg = SwarmConfig {
        disable_trackers: true,
        trust: Arc::new(Trust::new(["127.0.0.1".parse().unwrap()])),
        ..Default::default()
    };
    let torrent = session.add(&image, &storage, &cfg).await.unwrap();
    torrent.wait_initialized().await.unwrap();

    let addr = session.listen_addr();
    let info_hash = info_hash_of(&image);
    // The payload's pieces come after the manifest's.
    let base = blockswarm::image::torrent::layout(&image.torrent)
        .unwrap()
        .prefix_pieces() as u32;
    let start = Arc::new(Barrier::new(peers as usize));
    let total = Arc::new(AtomicU64::new(0));
    let results = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..peers)
        .map(|i| {
            let (start, total, results) = (start.clone(), total.clone(), results.clone());
            std::thread::spawn(move || {
                let r = fetch_piece(addr, info_hash, i + base, plen, &start, &total).unwrap();
                results.lock().unwrap().push((i, r.0, r.1));
            })
        })
        .collect();
    tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| t.join().unwrap()))
        .await
        .unwrap();
    let results = std::mem::take(&mut *results.lock().unwrap());
    assert_eq!(results.len(), peers as usize);
    for (i, piece, _) in &results {
        let off = *i as usize * plen as usize;
        assert!(
            piece == &payload[off..off + plen as usize],
            "piece {i} differs from the payload"
        );
    }
    // Served in parallel, every piece would end when nearly all bytes were
    // sent. A few slots (8), each a whole piece: the first pieces are done
    // when about 8 of the 20 are sent.
    let first = results.iter().map(|r| r.2).min().unwrap();
    let all = u64::from(peers) * u64::from(plen);
    assert!(
        first <= all * 6 / 10,
        "the first piece was done only after {first} of {all} bytes were sent"
    );
    session.remove(&torrent).await.unwrap();
    session.stop().await;
}
