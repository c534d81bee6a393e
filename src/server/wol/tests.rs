use std::net::UdpSocket;

use super::*;

#[test]
fn sends_magic_packets() {
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let n = wake(&["52:54:00:aa:bb:cc"], rx.local_addr().unwrap()).unwrap();
    assert_eq!(n, 1);
    let mut buf = [0u8; 200];
    let (len, _) = rx.recv_from(&mut buf).unwrap();
    assert_eq!(len, 102);
    assert_eq!(&buf[..6], &[0xFF; 6]);
    assert_eq!(&buf[96..102], &[0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc]);
}

#[test]
fn directed_broadcasts() {
    let ok = [
        ("10.0.12.0/24", "10.0.12.255"),
        ("10.0.12.7/24", "10.0.12.255"),
        ("172.16.0.0/12", "172.31.255.255"),
        ("192.168.1.64/26", "192.168.1.127"),
        ("10.1.2.0/30", "10.1.2.3"),
        ("0.0.0.0/0", "255.255.255.255"),
    ];
    for (cidr, want) in ok {
        assert_eq!(
            directed_broadcast(cidr).unwrap().to_string(),
            want,
            "{cidr}"
        );
    }
    let bad = [
        (
            "10.0.12.0",
            "\"10.0.12.0\" is not a subnet such as 10.0.12.0/24",
        ),
        (
            "10.0.12/24",
            "\"10.0.12/24\": \"10.0.12\" is not an IPv4 address",
        ),
        (
            "10.0.12.0/33",
            "\"10.0.12.0/33\": the prefix length must be 0-32, not \"33\"",
        ),
        (
            "10.0.12.0/x",
            "\"10.0.12.0/x\": the prefix length must be 0-32, not \"x\"",
        ),
        (
            "10.0.12.1/31",
            "\"10.0.12.1/31\": a /31 has no broadcast address",
        ),
        (
            "fd00::/64",
            "\"fd00::/64\": \"fd00::\" is not an IPv4 address",
        ),
    ];
    for (cidr, want) in bad {
        let e = directed_broadcast(cidr).unwrap_err();
        assert_eq!(format!("{e}"), want);
    }
}

fn target(n: u8, to: SocketAddr) -> Target {
    Target {
        mac: [0x52, 0x54, 0, 0, 0, n],
        to,
    }
}

#[test]
fn destinations_take_turns() {
    let a: SocketAddr = "10.0.1.255:9".parse().unwrap();
    let b: SocketAddr = "10.0.2.255:9".parse().unwrap();
    let c: SocketAddr = "10.0.3.255:9".parse().unwrap();
    let ts = [
        target(0, a),
        target(1, a),
        target(2, a),
        target(3, b),
        target(4, c),
        target(5, c),
    ];
    let (dests, order) = interleave(&ts);
    assert_eq!(dests, [a, b, c]);
    assert_eq!(order, [(0, 0), (1, 3), (2, 4), (0, 1), (2, 5), (0, 2)]);
    assert_eq!(interleave(&[]), (vec![], vec![]));
}

/// Two loopback receivers, standing for two subnets.
fn receivers() -> [UdpSocket; 2] {
    [0, 1].map(|_| {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_nonblocking(true).unwrap();
        s
    })
}

/// The MACs of the packets waiting on `s`, checking each is a magic packet.
fn drain(s: &UdpSocket) -> Vec<u8> {
    let mut macs = Vec::new();
    let mut buf = [0u8; 200];
    while let Ok(n) = s.recv(&mut buf) {
        assert_eq!(n, 102);
        let mac: [u8; 6] = buf[6..12].try_into().unwrap();
        assert_eq!(buf[..n], magic_packet(mac));
        macs.push(mac[5]);
    }
    macs
}

#[tokio::test(start_paused = true)]
async fn paced_by_the_rate() {
    let rx = receivers();
    let to = rx.each_ref().map(|s| s.local_addr().unwrap());
    let ts: Vec<Target> = (0..5).map(|n| target(n, to[n as usize % 2])).collect();
    let pace = Pace {
        rate: 10,
        repeat: 2,
        gap: Duration::from_millis(300),
    };
    let start = Instant::now();
    let r = wake_staggered(&ts, pace, std::future::pending())
        .await
        .unwrap();
    // Ten packets 100 ms apart; each PC's second is 500 ms after its first.
    assert_eq!(start.elapsed(), Duration::from_millis(900));
    assert!(!r.cancelled);
    assert_eq!(r.sent(), 10);
    assert_eq!(r.failed(), 0);
    assert_eq!(r.destinations[0].to, to[0]);
    assert_eq!(r.destinations[0].sent, 6);
    assert_eq!(r.destinations[1].sent, 4);
    assert_eq!(drain(&rx[0]), [0, 2, 4, 0, 2, 4]);
    assert_eq!(drain(&rx[1]), [1, 3, 1, 3]);
}

#[tokio::test(start_paused = true)]
async fn repeats_keep_their_gap() {
    let rx = receivers();
    let to = rx[0].local_addr().unwrap();
    let ts = [target(7, to), target(8, to)];
    let pace = Pace {
        rate: 100,
        repeat: 3,
        gap: Duration::from_millis(500),
    };
    let start = Instant::now();
    let r = wake_staggered(&ts, pace, std::future::pending())
        .await
        .unwrap();
    // At 0, 10 ms, 500, 510, 1000, 1010.
    assert_eq!(start.elapsed(), Duration::from_millis(1010));
    assert_eq!(r.sent(), 6);
    assert_eq!(drain(&rx[0]), [7, 8, 7, 8, 7, 8]);
}

#[tokio::test(start_paused = true)]
async fn cancelled_midway() {
    let rx = receivers();
    let to = rx[0].local_addr().unwrap();
    let ts: Vec<Target> = (0..20).map(|n| target(n, to)).collect();
    let pace = Pace {
        rate: 10,
        repeat: 1,
        gap: Duration::ZERO,
    };
    let start = Instant::now();
    let cancel = tokio::time::sleep(Duration::from_millis(250));
    let r = wake_staggered(&ts, pace, cancel).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(250));
    assert!(r.cancelled);
    assert_eq!(r.sent(), 3);
    assert_eq!(drain(&rx[0]), [0, 1, 2]);
}

#[tokio::test]
async fn a_bad_pace_is_refused() {
    let cases = [
        (
            0,
            1,
            0,
            "the Wake-on-LAN rate must be 1-10000 packets a second",
        ),
        (20, 0, 0, "Wake-on-LAN packets must be sent 1-10 times"),
        (20, 11, 0, "Wake-on-LAN packets must be sent 1-10 times"),
        (
            20,
            3,
            61,
            "the gap between Wake-on-LAN repeats must be at most 60 s",
        ),
    ];
    for (rate, repeat, gap, want) in cases {
        let pace = Pace {
            rate,
            repeat,
            gap: Duration::from_secs(gap),
        };
        let e = wake_staggered(&[], pace, std::future::pending()).await;
        assert_eq!(format!("{:#}", e.unwrap_err()), want);
    }
    let r = wake_staggered(&[], Pace::default(), std::future::pending()).await;
    assert_eq!(r.unwrap(), WakeReport::default());
}
