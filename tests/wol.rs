//! Staggered Wake-on-LAN (issue 19) on a real network, which the test makes
//! of two network namespaces: a sender and a receiver joined by one veth
//! pair per subnet (10.231.7.0/24 and 10.231.8.0/24). The sender sends to
//! the subnets' directed broadcasts; nothing reaches the host's network.
//! Times are the receiver's kernel timestamps, so the check is the pacing,
//! not how promptly a thread wakes. Needs root and iproute2.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::IoSliceMut;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use blockswarm::server::wol::{self, Pace, Target, WOL_PORT, WakeReport};
use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, setsockopt, sockopt};

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted (with its links) when dropped, on a panic
/// too.
struct Netns(String);

impl Netns {
    fn new(role: &str) -> Netns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let name = format!("bswol-{}-{n}-{role}", std::process::id());
        ip(&["netns", "add", &name]);
        Netns(name)
    }

    /// Moves the calling thread into this namespace; the sockets it opens
    /// after stay there.
    fn enter(&self) {
        let f = File::open(format!("/run/netns/{}", self.0)).unwrap();
        setns(f, CloneFlags::CLONE_NEWNET).unwrap();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Lab {
    tx: Netns,
    rx: Netns,
}

/// The sender has 10.231.N.1/24 and the receiver 10.231.N.2/24 on the veth
/// pair of subnet N, for each of 7 and 8.
fn lab() -> Lab {
    let lab = Lab {
        tx: Netns::new("tx"),
        rx: Netns::new("rx"),
    };
    for net in [7, 8] {
        let (t, r) = (format!("t{net}"), format!("r{net}"));
        ip(&[
            "-n", &lab.tx.0, "link", "add", &t, "type", "veth", "peer", "name", &r, "netns",
            &lab.rx.0,
        ]);
        for (ns, dev, host) in [(&lab.tx, &t, 1), (&lab.rx, &r, 2)] {
            let addr = format!("10.231.{net}.{host}/24");
            ip(&["-n", &ns.0, "addr", "add", &addr, "brd", "+", "dev", dev]);
            ip(&["-n", &ns.0, "link", "set", dev, "up"]);
        }
    }
    lab
}

fn broadcast(net: u8) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(10, 231, net, 255),
        WOL_PORT,
    ))
}

struct Arrival {
    /// The kernel's receive time.
    at: Duration,
    from: Ipv4Addr,
    payload: Vec<u8>,
}

/// Listens on port 9 in the receiver's namespace while `send` runs in the
/// sender's; returns what `send` returned and every packet that arrived
/// (`expected` of them, or what came within 15 s).
fn run<T: Send>(lab: &Lab, expected: usize, send: impl FnOnce() -> T + Send) -> (T, Vec<Arrival>) {
    let (ready_tx, ready_rx) = mpsc::channel();
    thread::scope(|s| {
        let receiver = s.spawn(move || {
            lab.rx.enter();
            let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, WOL_PORT)).unwrap();
            sock.set_broadcast(true).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            setsockopt(&sock, sockopt::ReceiveTimestampns, &true).unwrap();
            ready_tx.send(()).unwrap();
            let mut got = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(15);
            while got.len() < expected && Instant::now() < deadline {
                let mut buf = [0u8; 1500];
                let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
                let mut iov = [IoSliceMut::new(&mut buf)];
                let Ok(msg) = recvmsg::<SockaddrIn>(
                    sock.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::empty(),
                ) else {
                    continue;
                };
                let at = msg
                    .cmsgs()
                    .unwrap()
                    .find_map(|c| match c {
                        ControlMessageOwned::ScmTimestampns(t) => Some(Duration::from(t)),
                        _ => None,
                    })
                    .expect("a kernel timestamp");
                let from = msg.address.unwrap().ip();
                let len = msg.bytes;
                got.push(Arrival {
                    at,
                    from,
                    payload: buf[..len].to_vec(),
                });
            }
            got
        });
        ready_rx.recv().unwrap();
        let sender = s.spawn(|| {
            lab.tx.enter();
            send()
        });
        let sent = sender.join().unwrap();
        (sent, receiver.join().unwrap())
    })
}

/// Runs `wake_staggered` on a runtime of the calling thread's own.
fn wake(targets: &[Target], pace: Pace) -> WakeReport {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(wol::wake_staggered(targets, pace, std::future::pending()))
        .unwrap()
}

fn magic(mac: [u8; 6]) -> Vec<u8> {
    let mut p = vec![0xFF; 6];
    for _ in 0..16 {
        p.extend_from_slice(&mac);
    }
    p
}

#[test]
fn forty_pcs_on_two_subnets_at_twenty_a_second() {
    let lab = lab();
    // Given subnet by subnet: the sender must take them in turn.
    let targets: Vec<Target> = [7u8, 8]
        .iter()
        .flat_map(|&net| {
            (0..20).map(move |i| Target {
                mac: [0x52, 0x54, 0, 0xbb, net, i],
                to: broadcast(net),
            })
        })
        .collect();
    let pace = Pace {
        rate: 20,
        repeat: 1,
        gap: Duration::ZERO,
    };
    let (report, mut got) = run(&lab, 40, || wake(&targets, pace));

    assert_eq!(report.sent(), 40, "{report:?}");
    assert_eq!(report.failed(), 0, "{report:?}");
    let per_dest: Vec<_> = report.destinations.iter().map(|d| (d.to, d.sent)).collect();
    assert_eq!(per_dest, [(broadcast(7), 20), (broadcast(8), 20)]);

    assert_eq!(got.len(), 40, "packets received");
    got.sort_by_key(|a| a.at);
    // Every PC's packet came, once, a magic packet, on its own subnet.
    let mut by_mac = BTreeMap::new();
    for a in &got {
        assert_eq!(a.payload.len(), 102);
        let mac: [u8; 6] = a.payload[6..12].try_into().unwrap();
        assert_eq!(a.payload, magic(mac));
        assert_eq!(a.from, Ipv4Addr::new(10, 231, mac[4], 1), "{mac:02x?}");
        assert!(by_mac.insert(mac, a.at).is_none(), "{mac:02x?} twice");
    }
    let want: Vec<[u8; 6]> = targets.iter().map(|t| t.mac).collect();
    assert_eq!(by_mac.keys().copied().collect::<Vec<_>>(), want);
    // The subnets take turns.
    let nets: Vec<u8> = got.iter().map(|a| a.from.octets()[2]).collect();
    let turns: Vec<u8> = (0..40).map(|i| if i % 2 == 0 { 7 } else { 8 }).collect();
    assert_eq!(nets, turns);
    // Paced: 39 intervals of 50 ms, none much shorter.
    let total = got[39].at - got[0].at;
    let closest = got.windows(2).map(|w| w[1].at - w[0].at).min().unwrap();
    eprintln!("40 packets in {total:?}, closest two {closest:?} apart");
    assert!(
        (Duration::from_millis(1900)..=Duration::from_secs(3)).contains(&total),
        "{total:?}"
    );
    assert!(closest >= Duration::from_millis(40), "{closest:?}");
}

#[test]
fn repeats_apart_and_an_unreachable_subnet_reported() {
    let lab = lab();
    // The sender's namespace has no route to 10.99.0.0/16.
    let nowhere = SocketAddr::from(([10, 99, 0, 255], WOL_PORT));
    let mut targets: Vec<Target> = (0..4)
        .map(|i| Target {
            mac: [0x52, 0x54, 0, 0xcc, 7, i],
            to: broadcast(7),
        })
        .collect();
    targets.push(Target {
        mac: [0x52, 0x54, 0, 0xcc, 99, 0],
        to: nowhere,
    });
    let pace = Pace {
        rate: 50,
        repeat: 2,
        gap: Duration::from_millis(300),
    };
    let (report, got) = run(&lab, 8, || wake(&targets, pace));

    assert_eq!(report.destinations.len(), 2);
    assert_eq!(report.destinations[0].sent, 8);
    assert!(report.destinations[0].failures.is_empty());
    let bad = &report.destinations[1];
    assert_eq!((bad.to, bad.sent, bad.failures.len()), (nowhere, 0, 2));
    for f in &bad.failures {
        assert_eq!(f.mac, "52:54:00:cc:63:00");
        assert!(f.error.contains("unreachable"), "{f:?}");
    }

    assert_eq!(got.len(), 8);
    let mut times: BTreeMap<u8, Vec<Duration>> = BTreeMap::new();
    for a in &got {
        let mac: [u8; 6] = a.payload[6..12].try_into().unwrap();
        assert_eq!(a.payload, magic(mac));
        times.entry(mac[5]).or_default().push(a.at);
    }
    assert_eq!(times.keys().copied().collect::<Vec<_>>(), [0, 1, 2, 3]);
    for (mac, t) in &times {
        assert_eq!(t.len(), 2, "PC {mac}");
        let apart = t[1].abs_diff(t[0]);
        assert!(apart >= Duration::from_millis(280), "PC {mac}: {apart:?}");
    }
}

/// `admin start --group … --at +4s --wake`, through the real server in the
/// sender's namespace: nothing before the time, then each member's packet
/// to its group's subnet broadcast, paced at `wol_rate`, and the
/// deployment started.
#[test]
fn a_scheduled_start_wakes_its_room_at_its_time() {
    let lab = lab();
    ip(&["-n", &lab.tx.0, "link", "set", "lo", "up"]);
    let t = tempfile::tempdir().unwrap();
    let disk = common::mkdisk(t.path(), "master.img", "gpt", 16);
    std::fs::create_dir_all(t.path().join("images")).unwrap();
    common::capture(&disk, &t.path().join("images/lab"), true);
    let macs: Vec<[u8; 6]> = (1..=6).map(|i| [0x52, 0x54, 0, 0xcc, 7, i]).collect();
    let members: Vec<String> = macs
        .iter()
        .map(|m| {
            format!(
                "\"{}\"",
                m.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":")
            )
        })
        .collect();
    let port = 18080;
    let cfg = t.path().join("server.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\nseed_listen = \"127.0.0.1:{}\"\nimages = \"{}\"\n\
             state_dir = \"{}\"\nadmin_token = \"t0ken\"\nwol_rate = 10\nwol_repeat = 1\n\
             [[group]]\nname = \"room-7\"\nmembers = [{}]\nwake = \"10.231.7.255:9\"\n\
             [group.job]\nimage = \"lab\"\n",
            port + 1,
            t.path().join("images").display(),
            t.path().join("state").display(),
            members.join(", ")
        ),
    )
    .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let (next, got) = run(&lab, macs.len(), || {
        // In the sender's namespace: the server, and the admin's commands.
        let _server = common::Proc(
            Command::new(common::bin())
                .args(["serve", "--config"])
                .arg(&cfg)
                .stderr(File::create(t.path().join("serve.log")).unwrap())
                .spawn()
                .unwrap(),
        );
        let t0 = Instant::now();
        while !String::from_utf8_lossy(&common::http_get(&format!("{url}/api/v1/deployment")).1)
            .contains("\"state\":\"seeding\"")
        {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "the server never seeded"
            );
            thread::sleep(Duration::from_millis(100));
        }
        let out = common::bs_ok(&[
            "admin", "--server", &url, "--token", "t0ken", "--json", "start", "--group", "room-7",
            "--at", "+4s", "--wake",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let next: jiff::Timestamp = v["next"].as_str().unwrap().parse().unwrap();
        // Wait for the packets to be sent, then check the history.
        while jiff::Timestamp::now() < next + jiff::SignedDuration::from_secs(3) {
            thread::sleep(Duration::from_millis(100));
        }
        let h = common::bs_ok(&[
            "admin", "--server", &url, "--token", "t0ken", "--json", "history",
        ]);
        let h: serde_json::Value = serde_json::from_str(&h).unwrap();
        assert_eq!(h[0]["group"], "room-7", "{h}");
        assert_eq!(h[0]["tasks"]["pending"], 6, "{h}");
        next
    });
    assert_eq!(got.len(), macs.len(), "packets received");
    let at = |a: &Arrival| jiff::Timestamp::from_nanosecond(a.at.as_nanos() as i128).unwrap();
    let first = at(&got[0]);
    eprintln!("scheduled for {next}, first packet at {first}");
    assert!(first >= next, "woken early: {first} < {next}");
    assert!(
        first < next + jiff::SignedDuration::from_millis(2500),
        "woken late: {first} for {next}"
    );
    let mut seen: Vec<[u8; 6]> = got
        .iter()
        .map(|a| {
            assert_eq!(a.from, Ipv4Addr::new(10, 231, 7, 1));
            a.payload[6..12].try_into().unwrap()
        })
        .collect();
    seen.sort();
    assert_eq!(seen, macs);
    let closest = got.windows(2).map(|w| w[1].at - w[0].at).min().unwrap();
    assert!(
        closest >= Duration::from_millis(80),
        "not paced at 10/s: {closest:?}"
    );
}
