//! The swarm engine against peers that abuse its sockets and queues, on
//! loopback (each plays a host of its own 127.0.0.x address): peers that
//! never read, flood requests, send half a message or bytes that overflow,
//! or sit idle by the thousand.

mod common;
mod hostile;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockswarm::swarm::{Limits, SwarmConfig, Trust};
use hostile::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_never_read_do_not_hold_the_origin_s_slots() {
    let fx = fixture();
    // All vouched for: only the write deadlines can help the honest host.
    let trust = Trust::new((1..=9).map(ip));
    let (seed, st) = fx.seed(true, Limits::default(), trust).await;
    let addr = seed.listen_addr();
    // Eight hosts ask for many pieces each and never read: each takes one
    // of the eight upload slots.
    let mut stuck = Vec::new();
    for k in 0..8u32 {
        let mut s = dial_from(2 + k as u8, addr, Some(4096));
        handshake(&mut s, fx.info_hash, &peer_id(HOST_PREFIX)).unwrap();
        let mut out = msg(2, &[]);
        for i in 0..64 {
            out.extend_from_slice(&requests(&fx, (k * 8 + i) % fx.pieces));
        }
        s.write_all(&out).unwrap();
        stuck.push(s);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (_rs, rt, rst) = fx
        .receiver(SwarmConfig {
            peers: vec![addr],
            ..Default::default()
        })
        .await;
    complete_within(&rt, 60, "the honest host").await;
    fx.assert_holds_payload(&rst);
    // Their writes made no progress: they are dropped (the honest host
    // stays).
    assert!(
        eventually(Duration::from_secs(60), || st.progress().peers <= 1).await,
        "{} peers still connected to the seed",
        st.progress().peers
    );
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_requests_is_bounded_and_its_peer_dropped() {
    let fx = fixture();
    let (seed, st) = fx.seed(false, Limits::default(), Trust::default()).await;
    let mut s = dial_from(2, seed.listen_addr(), Some(4096));
    handshake(&mut s, fx.info_hash, &peer_id(b"-XX0000-")).unwrap();
    s.write_all(&msg(2, &[])).unwrap();
    let chunk: Vec<u8> = (0..1000)
        .flat_map(|_| msg(6, &u32s(&[0, 0, BLOCK])))
        .collect();
    let (mut sent, t0) = (0u64, Instant::now());
    let r = loop {
        if sent >= 1_000_000 || t0.elapsed() > Duration::from_secs(60) {
            break Ok(());
        }
        match s.write_all(&chunk) {
            Ok(()) => sent += 1000,
            Err(e) => break Err(e),
        }
    };
    assert!(
        r.is_err(),
        "the seed took {sent} requests from a peer that reads nothing, and kept it"
    );
    // What the sockets' buffers at both ends held (a few MiB) came on top
    // of what the seed read before it dropped the peer.
    assert!(sent < 600_000, "the peer was dropped after {sent} requests");
    assert!(
        eventually(Duration::from_secs(10), || st.progress().peers == 0).await,
        "the flooding peer is still connected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_message_is_dropped_after_its_deadline() {
    let fx = fixture();
    let (seed, st) = fx.seed(false, Limits::default(), Trust::default()).await;
    let mut s = dial_from(2, seed.listen_addr(), None);
    handshake(&mut s, fx.info_hash, &peer_id(b"-XX0000-")).unwrap();
    // A request: its length prefix and 3 of its 13 bytes.
    s.write_all(&[0, 0, 0, 13, 6, 0, 0]).unwrap();
    let t0 = Instant::now();
    let closed =
        tokio::task::spawn_blocking(move || closed_within(&mut s, Duration::from_secs(60)))
            .await
            .unwrap();
    assert!(closed, "still connected after 60 s");
    assert!(
        t0.elapsed() >= Duration::from_secs(10),
        "dropped at once ({:?}), not at the message's deadline",
        t0.elapsed()
    );
    assert_eq!(st.progress().peers, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_by_the_thousand_do_not_lock_a_newcomer_out() {
    raise_fd_limit();
    let fx = fixture();
    let (seed, st) = fx.seed(false, Limits::default(), Trust::default()).await;
    let addr = seed.listen_addr();
    let (info_hash, id) = (fx.info_hash, peer_id(b"-XX0000-"));
    // 1024 connections from 128 addresses, 8 each, that do nothing.
    let idle = tokio::task::spawn_blocking(move || {
        let mut v = Vec::new();
        for last in 2..130u8 {
            for k in 0..8u8 {
                let mut s = dial_from(last, addr, None);
                let mut id = id;
                id[17] = last;
                id[18] = k;
                handshake(&mut s, info_hash, &id).unwrap();
                v.push(s);
            }
        }
        v
    })
    .await
    .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || st.progress().peers == 1024).await,
        "{} of 1024 idle peers connected",
        st.progress().peers
    );
    // A ninth from one address is not let in.
    let mut ninth = dial_from(2, addr, None);
    let mut id9 = id;
    id9[17] = 2;
    id9[18] = 9;
    let _ = handshake(&mut ninth, fx.info_hash, &id9);
    assert!(closed_within(&mut ninth, Duration::from_secs(10)));

    let (_rs, rt, rst) = fx
        .receiver(SwarmConfig {
            peers: vec![addr],
            ..Default::default()
        })
        .await;
    complete_within(&rt, 60, "the newcomer").await;
    fx.assert_holds_payload(&rst);
    assert!(st.progress().peers <= 1024);
    drop(idle);
}

/// A hostile peer on 127.0.0.2 that has everything, and answers the first
/// request with `reply(index)`; records whether its connection was closed
/// on it within 10 s.
fn hostile(
    fx: &Fixture,
    reply: impl Fn(u32) -> Vec<u8> + Send + Sync + 'static,
) -> (SocketAddr, Arc<Mutex<Option<bool>>>) {
    let closed = Arc::new(Mutex::new(None));
    let c = closed.clone();
    let pieces = fx.pieces;
    let (addr, _) = fake_peer(fx, 2, peer_id(b"-EVIL0-"), move |mut s| {
        let mut out = bitfield_all(pieces);
        out.extend_from_slice(&msg(1, &[]));
        s.write_all(&out)?;
        loop {
            let m = read_msg(&mut s)?;
            if m.first() == Some(&6) {
                let index = u32::from_be_bytes(m[1..5].try_into().unwrap());
                s.write_all(&reply(index))?;
                let r = closed_within(&mut s, Duration::from_secs(10));
                *c.lock().unwrap() = Some(r);
                return Ok(());
            }
        }
    });
    (addr, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_wire_bytes_drop_the_peer_without_a_panic() {
    let fx = fixture();
    let (seed, _st) = fx.seed(false, Limits::default(), Trust::default()).await;
    let n = fx.pieces;
    type Reply = Box<dyn Fn(u32) -> Vec<u8> + Send + Sync>;
    let cases: Vec<(&str, Reply)> = vec![
        (
            // begin + length past 2^32.
            "an overflowing block",
            Box::new(|i| {
                let mut b = u32s(&[i, 0xFFFF_C000]);
                b.extend_from_slice(&[0x5A; BLOCK as usize]);
                msg(7, &b)
            }),
        ),
        (
            "a have past the last piece",
            Box::new(move |_| msg(4, &u32s(&[n + 7]))),
        ),
        (
            "a request past the last piece",
            Box::new(move |_| msg(6, &u32s(&[u32::MAX, 0, BLOCK]))),
        ),
        (
            "a claim past the last piece",
            Box::new(move |_| msg(0xB5, &u32s(&[n]))),
        ),
    ];
    for (what, reply) in cases {
        let (evil, closed) = hostile(&fx, reply);
        let (_rs, rt, rst) = fx
            .receiver(SwarmConfig {
                peers: vec![evil, seed.listen_addr()],
                ..Default::default()
            })
            .await;
        complete_within(&rt, 60, what).await;
        fx.assert_holds_payload(&rst);
        let t0 = Instant::now();
        while closed.lock().unwrap().is_none() && t0.elapsed() < Duration::from_secs(15) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            *closed.lock().unwrap(),
            Some(true),
            "{what}: the peer that sent it was not dropped"
        );
        assert_eq!(rt.progress().peers, 1, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_under_way_are_bounded_per_address() {
    let fx = fixture();
    let (seed, _st) = fx.seed(false, Limits::default(), Trust::default()).await;
    let addr = seed.listen_addr();
    let closed = tokio::task::spawn_blocking(move || {
        // Sixteen connections that say nothing take every place of their
        // address; a seventeenth is closed at once (each of them would be
        // at its handshake's deadline, 10 s).
        let _silent: Vec<_> = (0..16).map(|_| dial_from(2, addr, None)).collect();
        std::thread::sleep(Duration::from_millis(300));
        let mut s = dial_from(2, addr, None);
        let t0 = Instant::now();
        let closed = closed_within(&mut s, Duration::from_secs(3));
        // Another address is still let in.
        let mut other = dial_from(3, addr, None);
        let hs = handshake(&mut other, fx.info_hash, &peer_id(b"-XX0000-"));
        (closed, t0.elapsed(), hs.is_ok())
    })
    .await
    .unwrap();
    assert!(
        closed.0,
        "a 17th silent connection from one address was kept"
    );
    assert!(closed.1 < Duration::from_secs(3));
    assert!(closed.2, "another address was refused");
}
