//! The swarm engine against a peer that lies: it claims every piece and
//! answers every request with wrong bytes. The receiver must drop it, write
//! nothing it sent, and finish from the honest seed.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use blockswarm::image::Image;
use common::*;

/// A BEP 3 peer that has "everything" and serves 0x5A for every block.
/// Returns its address and the count of blocks it served.
fn liar(info_hash: [u8; 20], pieces: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
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
    let (liar_addr, served) = liar(info_hash, m.payload.piece_count as usize);
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
        log.contains("failed their hash; dropped"),
        "the receiver did not say it dropped the liar:\n{log}"
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
