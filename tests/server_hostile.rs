//! The boot server against a hostile LAN, on loopback: floods, spoofed
//! reports, slow and silent connections, a store that changes under it.
//! Each test plays the attacker from 127.0.0.2 and up, and a real agent
//! from 127.0.0.1.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

// ---- a minimal HTTP/1.1 client that can pick its source address ----

fn connect_from(src: &str, port: u16) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let from: SocketAddr = format!("{src}:0").parse().unwrap();
    s.bind(&from.into()).unwrap();
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    s.connect(&to.into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn send(
    s: &mut TcpStream,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    // One write: head and body in two would wait on a delayed ACK.
    let mut req = head.into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req)?;
    read_response(s)
}

fn read_response(s: &mut TcpStream) -> std::io::Result<(u16, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut b = [0u8; 8192];
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut b)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&b[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let code = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = buf[end..].to_vec();
    while body.len() < len {
        let n = s.read(&mut b)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        body.extend_from_slice(&b[..n]);
    }
    Ok((code, body))
}

fn get_json(port: u16, path: &str) -> (u16, Value) {
    let mut s = connect_from("127.0.0.1", port);
    let (code, body) = send(&mut s, "GET", path, b"").unwrap();
    (code, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn post_json(port: u16, path: &str, v: &Value) -> (u16, Value) {
    let mut s = connect_from("127.0.0.1", port);
    let (code, body) = send(&mut s, "POST", path, v.to_string().as_bytes()).unwrap();
    (code, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn report(mac: &str, token: &str, state: &str) -> Value {
    json!({
        "mac": mac, "state": state, "deployment": 1, "image": "lab", "target": null,
        "done_bytes": 1, "total_bytes": 1, "uploaded_bytes": 0, "down_bps": 0.0,
        "up_bps": 0.0, "peers": 0, "error": null, "elapsed_s": 1.0, "token": token,
    })
}

fn metric(port: u16, name: &str) -> f64 {
    let mut s = connect_from("127.0.0.1", port);
    let (_, body) = send(&mut s, "GET", "/metrics", b"").unwrap();
    let text = String::from_utf8(body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("blockswarm_{name} ")))
        .unwrap_or_else(|| panic!("no metric {name}:\n{text}"))
        .parse()
        .unwrap()
}

/// Peak and current resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| -> u64 {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// A server seeding a small image "lab", a deployment running.
fn lab_server(t: &Path, extra: &str) -> Server {
    let disk = mkdisk(t, "master.img", "bare", 16);
    capture(&disk, &t.join("images/lab"), true);
    let srv = Server::start(
        t,
        Some(0),
        &format!("{extra}\n[default_job]\nimage = \"lab\"\n{TEST_JOB}"),
    );
    srv.wait_seeding("lab");
    srv
}

// ---- the tracker ----

fn enc(b: &[u8]) -> String {
    b.iter().map(|x| format!("%{x:02X}")).collect()
}

fn info_hash(srv: &Server) -> [u8; 20] {
    let img = blockswarm::image::Image::open(&srv.dir.join("images/lab")).unwrap();
    blockswarm::util::parse_hex20(&img.manifest.payload.info_hash).unwrap()
}

fn announce_path(base: &str, h: &[u8; 20], id: &[u8; 20], port: u16, left: u64) -> String {
    let sep = if base.contains('?') { '&' } else { '?' };
    format!(
        "{base}{sep}info_hash={}&peer_id={}&port={port}&uploaded=0&downloaded=0&left={left}&compact=1",
        enc(h),
        enc(id)
    )
}

#[derive(serde::Deserialize)]
struct Announced {
    #[serde(rename = "failure reason")]
    failure: Option<buffers::ByteBufOwned>,
    peers: Option<buffers::ByteBufOwned>,
    #[serde(rename = "blockswarm hosts")]
    hosts: Option<buffers::ByteBufOwned>,
}

fn addrs(b: &Option<buffers::ByteBufOwned>) -> Vec<String> {
    let b = b.as_ref().map(|b| b.as_ref().to_vec()).unwrap_or_default();
    b.chunks(6)
        .map(|c| {
            format!(
                "{}.{}.{}.{}:{}",
                c[0],
                c[1],
                c[2],
                c[3],
                u16::from_be_bytes([c[4], c[5]])
            )
        })
        .collect()
}

/// (peers, vouched hosts) of one announce over `s`.
fn announce(s: &mut TcpStream, path: &str) -> (Vec<String>, Vec<String>) {
    let (code, body) = send(s, "GET", path, b"").unwrap();
    assert_eq!(code, 200);
    let r: Announced = bencode::from_bytes(&body).unwrap();
    if let Some(f) = &r.failure {
        panic!("{path}: {}", String::from_utf8_lossy(f.as_ref()));
    }
    (addrs(&r.peers), addrs(&r.hosts))
}

/// A host's job: its tracker URL (with its token) and its token.
fn job(port: u16, mac: &str) -> Value {
    let (code, j) = get_json(port, &format!("/api/v1/jobs/{mac}"));
    assert_eq!(code, 200, "{j}");
    j
}

fn tracker_path(j: &Value) -> String {
    let url = j["trackers"][0].as_str().unwrap();
    url[url.find("/announce").unwrap()..].to_string()
}

#[test]
fn a_tracker_flood_never_crowds_out_the_room() {
    let t = tempfile::tempdir().unwrap();
    let srv = lab_server(t.path(), "");
    let h = info_hash(&srv);
    let origin = format!("127.0.0.1:{}", srv.seed_port);
    // A real host, finished, announces with its token.
    let a = job(srv.port, "52:54:00:00:70:01");
    let mut s = connect_from("127.0.0.1", srv.port);
    announce(
        &mut s,
        &announce_path(&tracker_path(&a), &h, &[b'a'; 20], 7001, 0),
    );
    // 5000 announces from 20 addresses: each a new peer, half of them with
    // the origin's peer id prefix and all claiming another address.
    let t0 = Instant::now();
    for src in 2..22 {
        let mut s = connect_from(&format!("127.0.0.{src}"), srv.port);
        for n in 0..250u32 {
            let mut id = *b"-BS0ORIGIN-000000000";
            if n % 2 == 1 {
                id[..11].copy_from_slice(b"-XX0000-zzz");
            }
            id[12..16].copy_from_slice(&n.to_be_bytes());
            id[16] = src;
            let path = announce_path("/announce", &h, &id, 9000, 0) + "&ip=10.9.9.9";
            announce(&mut s, &path);
        }
    }
    eprintln!("5000 announces in {:.2?}", t0.elapsed());
    // A second real host joins: the origin first, the other host next, and
    // the flood nowhere ahead of them.
    let b = job(srv.port, "52:54:00:00:70:02");
    let (peers, hosts) = announce(
        &mut s,
        &announce_path(&tracker_path(&b), &h, &[b'b'; 20], 7002, 100),
    );
    assert_eq!(
        peers[..2],
        [origin.clone(), "127.0.0.1:7001".into()],
        "{peers:?}"
    );
    assert_eq!(hosts, ["127.0.0.1:7001"]);
    assert!(
        peers[2..]
            .iter()
            .all(|p| p.ends_with(":9000") && !p.starts_with("10.")),
        "the flood's claimed address was used: {peers:?}"
    );
    // Each flooding address keeps only a few entries.
    let guests = peers.iter().filter(|p| p.starts_with("127.0.0.2:")).count();
    assert!(guests <= 4, "{guests} entries from 127.0.0.2");
    // A stranger with the origin's peer id prefix is a guest like any other.
    let mut s3 = connect_from("127.0.0.3", srv.port);
    let (peers, hosts) = announce(
        &mut s3,
        &announce_path("/announce", &h, b"-BS0ORIGIN-abcdefghi", 9100, 100),
    );
    assert_eq!(peers[..2], [origin, "127.0.0.1:7001".into()]);
    assert!(
        hosts.is_empty(),
        "a stranger was told whom the server vouches for"
    );
    let (hwm, rss) = rss_kib(srv.proc.0.id());
    eprintln!("server memory after the flood: peak {hwm} KiB, now {rss} KiB");
}

/// Rooms come from the server's groups, else subnets (docs/rooms.md):
/// a host learns of its room's hosts only, unless `locality = false`.
#[test]
fn the_tracker_lists_each_host_its_own_room() {
    let groups = "[[group]]\nname = \"g1\"\nmembers = [\"52:54:00:00:72:01\", \"52:54:00:00:72:03\"]\n\
                  [[group]]\nname = \"g2\"\nmembers = [\"52:54:00:00:72:02\"]\n";
    for locality in [true, false] {
        let t = tempfile::tempdir().unwrap();
        let srv = lab_server(t.path(), &format!("locality = {locality}\n{groups}"));
        let h = info_hash(&srv);
        let origin = format!("127.0.0.1:{}", srv.seed_port);
        let ask = |mac: &str, from: &str, port: u16, left: u64| {
            let j = job(srv.port, mac);
            let mut s = connect_from(from, srv.port);
            let id = [port as u8; 20];
            let (peers, mut hosts) = announce(
                &mut s,
                &announce_path(&tracker_path(&j), &h, &id, port, left),
            );
            hosts.sort();
            (peers, hosts)
        };
        // g1 and g2 in one subnet, then g1's second host from another subnet,
        // then a host in no group in the first subnet.
        ask("52:54:00:00:72:01", "127.0.0.1", 7001, 0);
        ask("52:54:00:00:72:02", "127.0.0.2", 7002, 0);
        let c = ask("52:54:00:00:72:03", "127.0.9.3", 7003, 100);
        let d = ask("52:54:00:00:72:04", "127.0.0.4", 7004, 100);
        if locality {
            let a = "127.0.0.1:7001".to_string();
            assert_eq!(c, (vec![origin.clone(), a.clone()], vec![a]), "g1's room");
            assert_eq!(d, (vec![origin], vec![]), "grouped hosts are not its room");
        } else {
            assert_eq!(c.1, ["127.0.0.1:7001", "127.0.0.2:7002"], "every host");
            assert_eq!(d.1.len(), 3, "{d:?}");
            assert_eq!(d.0[0], origin);
        }
    }
}

// ---- status reports ----

#[test]
fn reports_need_the_host_s_token() {
    let t = tempfile::tempdir().unwrap();
    let srv = lab_server(t.path(), "");
    let mac = "52:54:00:00:71:01";
    // A spoofed "done" for a host that never asked for a job.
    let (code, v) = post_json(srv.port, "/api/v1/status", &report(mac, "", "done"));
    assert_eq!(code, 403, "{v}");
    assert!(v["error"].as_str().unwrap().contains("token"), "{v}");
    // With a token issued to another host.
    let other = job(srv.port, "52:54:00:00:71:02");
    let tok = other["token"].as_str().unwrap();
    let (code, _) = post_json(srv.port, "/api/v1/status", &report(mac, tok, "done"));
    assert_eq!(code, 403);
    let (_, v) = get_json(srv.port, "/api/v1/deployment");
    assert_eq!(v["done"], false, "{v}");
    // Only the host that fetched a job is in the deployment.
    let hosts = v["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 1, "{v}");
    assert_eq!(hosts[0]["mac"], "52:54:00:00:71:02", "{v}");
    assert_eq!(hosts[0]["done_bytes"], 0, "{v}");
    assert_eq!(metric(srv.port, "status_reports_refused_total"), 2.0);
    // The host's own token: counted, and not shown to anyone.
    let j = job(srv.port, mac);
    let tok = j["token"].as_str().unwrap();
    assert_eq!(
        j["token"],
        job(srv.port, mac)["token"],
        "one token per host"
    );
    let (code, ack) = post_json(srv.port, "/api/v1/status", &report(mac, tok, "done"));
    assert_eq!(code, 200, "{ack}");
    // The other host fetched its job: the deployment waits for it.
    assert_eq!(ack["deployment_done"], false);
    let (code, ack) = post_json(
        srv.port,
        "/api/v1/status",
        &report(
            "52:54:00:00:71:02",
            other["token"].as_str().unwrap(),
            "done",
        ),
    );
    assert_eq!(code, 200, "{ack}");
    assert_eq!(ack["deployment_done"], true);
    let (_, v) = get_json(srv.port, "/api/v1/deployment");
    assert!(
        v["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["mac"] == mac),
        "{v}"
    );
    assert!(!v.to_string().contains(tok), "the view shows a token: {v}");
}

#[test]
fn reports_cannot_bloat_the_deployment_view() {
    let t = tempfile::tempdir().unwrap();
    let srv = lab_server(t.path(), "");
    // 20 reports of 1.9 MB, with valid tokens.
    for i in 0..20 {
        let mac = format!("52:54:00:00:72:{i:02x}");
        let (code, j) = send(
            &mut connect_from(&format!("127.0.3.{i}"), srv.port),
            "GET",
            &format!("/api/v1/jobs/{mac}"),
            b"",
        )
        .unwrap();
        assert_eq!(code, 200);
        let j: Value = serde_json::from_slice(&j).unwrap();
        let tok = j["token"].as_str().unwrap().to_string();
        let mut r = report(&mac, &tok, "downloading");
        r["error"] = json!("x".repeat(1_900_000));
        let mut s = connect_from("127.0.0.1", srv.port);
        // Refused before it is all sent: either a 413 or a closed socket.
        if let Ok((code, _)) = send(&mut s, "POST", "/api/v1/status", r.to_string().as_bytes()) {
            assert_eq!(code, 413);
        }
        // Under the body limit, the long strings are cut.
        r["error"] = json!("é".repeat(10_000));
        r["target"] = json!("/dev/".repeat(3_000));
        let (code, v) = post_json(srv.port, "/api/v1/status", &r);
        assert_eq!(code, 200, "{v}");
    }
    let mut s = connect_from("127.0.0.1", srv.port);
    let (_, body) = send(&mut s, "GET", "/api/v1/deployment", b"").unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["hosts"].as_array().unwrap().len(), 20);
    assert!(body.len() < 64 * 1024, "the view is {} bytes", body.len());
    let err = v["hosts"][0]["error"].as_str().unwrap();
    assert!(err.ends_with("bytes cut)"), "{err}");
    // 5000 made-up hosts from one address (the deployment is open to any
    // PC), each with the longest strings kept: 16 join, the rest are told
    // why not.
    let mut s = connect_from("127.0.0.2", srv.port);
    let mut joined = 0;
    for i in 0..5000u32 {
        let b = i.to_be_bytes();
        let mac = format!("52:54:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3]);
        let (code, j) = send(&mut s, "GET", &format!("/api/v1/jobs/{mac}"), b"").unwrap();
        let j: Value = serde_json::from_slice(&j).unwrap();
        if code != 200 {
            assert_eq!(code, 503, "{j}");
            assert!(
                j["error"]
                    .as_str()
                    .unwrap()
                    .contains("too many hosts joined from it"),
                "{j}"
            );
            continue;
        }
        joined += 1;
        let mut r = report(&mac, j["token"].as_str().unwrap(), "downloading");
        r["error"] = json!("e".repeat(2000));
        r["target"] = json!("t".repeat(2000));
        let (code, _) = send(&mut s, "POST", "/api/v1/status", r.to_string().as_bytes()).unwrap();
        assert_eq!(code, 200);
    }
    assert_eq!(joined, 16);
    // And from 2100 addresses, one each: the deployment holds 2048 hosts.
    for i in 0..2100u32 {
        let b = i.to_be_bytes();
        let mut s = connect_from(&format!("127.1.{}.{}", b[2], b[3]), srv.port);
        let mac = format!("52:55:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3]);
        let (code, j) = send(&mut s, "GET", &format!("/api/v1/jobs/{mac}"), b"").unwrap();
        let j: Value = serde_json::from_slice(&j).unwrap();
        if i < 2048 - 16 - 20 {
            assert_eq!(code, 200, "{j}");
        } else {
            assert_eq!(code, 503, "{j}");
            assert!(
                j["error"]
                    .as_str()
                    .unwrap()
                    .contains("is full (2048 hosts)"),
                "{j}"
            );
        }
    }
    let (_, body) = send(&mut s, "GET", "/api/v1/deployment", b"").unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["hosts"].as_array().unwrap().len(), 2048);
    let (hwm, rss) = rss_kib(srv.proc.0.id());
    eprintln!(
        "after 5000 made-up hosts: the view is {} KiB; server memory peak {hwm} KiB, now {rss} KiB",
        body.len() / 1024
    );
}

#[test]
fn a_retry_is_held_to_the_disk_reported() {
    let t = tempfile::tempdir().unwrap();
    let srv = lab_server(t.path(), "");
    let mac = "52:54:00:00:73:01";
    let j = job(srv.port, mac);
    assert!(j["disk"].is_null());
    assert_eq!(j["origin"], format!("127.0.0.1:{}", srv.seed_port));
    let tok = j["token"].as_str().unwrap();
    assert!(
        j["trackers"][0]
            .as_str()
            .unwrap()
            .ends_with(&format!("/announce?token={tok}"))
    );
    let mut r = report(mac, tok, "downloading");
    r["disk"] = json!({"size": 1u64 << 30, "serial": "S1", "wwn": null, "by_path": "pci-0:1"});
    assert_eq!(post_json(srv.port, "/api/v1/status", &r).0, 200);
    // A later report naming another disk does not move the host.
    r["disk"]["serial"] = json!("S2");
    assert_eq!(post_json(srv.port, "/api/v1/status", &r).0, 200);
    let again = job(srv.port, mac);
    assert_eq!(again["disk"]["serial"], "S1", "{again}");
    assert_eq!(again["disk"]["size"], 1u64 << 30);
    // An identity too long to be one is refused, not cut.
    r["disk"]["serial"] = json!("s".repeat(300));
    let (code, v) = post_json(srv.port, "/api/v1/status", &r);
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("disk.serial"), "{v}");
}

// ---- connections ----

/// Reads until the server closes the connection or `limit` passes:
/// how long it took, and what arrived.
fn until_closed(s: &mut TcpStream, limit: Duration) -> (Duration, Vec<u8>) {
    let t0 = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return (t0.elapsed(), got),
            Ok(n) => got.extend_from_slice(&b[..n]),
        }
        if t0.elapsed() > limit {
            return (t0.elapsed(), got);
        }
    }
}

#[test]
fn slow_and_silent_connections_are_closed_while_slow_downloads_go_on() {
    let t = tempfile::tempdir().unwrap();
    let boot = t.path().join("boot");
    std::fs::create_dir_all(&boot).unwrap();
    let big: Vec<u8> = (0..24u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(boot.join("initramfs.img"), &big).unwrap();
    let srv = lab_server(t.path(), &format!("boot_dir = \"{}\"", boot.display()));
    let port = srv.port;
    let limit = Duration::from_secs(25);
    type Closed = std::thread::JoinHandle<(Duration, Vec<u8>)>;
    let mut tests: Vec<(&str, Closed)> = Vec::new();
    tests.push((
        "silent",
        std::thread::spawn(move || until_closed(&mut connect_from("127.0.0.2", port), limit)),
    ));
    tests.push((
        "partial headers",
        std::thread::spawn(move || {
            let mut s = connect_from("127.0.0.3", port);
            s.write_all(b"GET /api/v1/deployment HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            let t0 = Instant::now();
            // One more header line every 2 s, never the end.
            while t0.elapsed() < limit {
                if s.write_all(b"X-Slow: 1\r\n").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_secs(2));
            }
            let (_, got) = until_closed(&mut s, Duration::from_secs(1));
            (t0.elapsed(), got)
        }),
    ));
    tests.push((
        "partial body",
        std::thread::spawn(move || {
            let mut s = connect_from("127.0.0.4", port);
            s.write_all(
                b"POST /api/v1/status HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"mac\":",
            )
            .unwrap();
            until_closed(&mut s, limit)
        }),
    ));
    // A reader that takes the 24 MiB over about 40 s, never pausing long.
    let slow = std::thread::spawn(move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(64 << 10).unwrap();
        s.connect(
            &format!("127.0.0.1:{port}")
                .parse::<SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        let mut s: TcpStream = s.into();
        s.write_all(b"GET /boot/initramfs.img HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut got = Vec::new();
        let mut b = vec![0u8; 64 << 10];
        let mut since_pause = 0;
        let mut head = None;
        let t0 = Instant::now();
        loop {
            match s.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&b[..n]);
                    since_pause += n;
                }
            }
            if head.is_none() {
                head = got.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
            }
            if head.is_some_and(|h| got.len() - h >= big.len()) {
                break;
            }
            if since_pause >= 1 << 20 {
                since_pause = 0;
                std::thread::sleep(Duration::from_millis(1500));
            }
        }
        let head = head.expect("a response");
        assert!(got[head..] == big[..], "the slow reader got other bytes");
        (t0.elapsed(), got.len() - head)
    });
    // A reader that stops reading after the first bytes.
    let stalled = std::thread::spawn(move || {
        let mut s = connect_from("127.0.0.5", port);
        s.write_all(b"GET /boot/initramfs.img HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_secs(45));
        until_closed(&mut s, Duration::from_secs(30)).1.len()
    });
    for (what, h) in tests {
        let (took, got) = h.join().unwrap();
        let got = String::from_utf8_lossy(&got);
        assert!(took < limit, "{what}: still open after {took:.1?} ({got})");
        eprintln!("{what}: closed after {took:.1?}: {:?}", got.lines().next());
    }
    let (took, n) = slow.join().unwrap();
    assert!(
        n == 24 << 20 && took > Duration::from_secs(30),
        "the slow reader got {n} of {} bytes in {took:.1?}",
        24 << 20
    );
    let n = stalled.join().unwrap();
    assert!(
        n < 24 << 20,
        "a reader that stalled for 45 s still got it all"
    );
}

#[test]
fn a_slowloris_from_many_addresses_leaves_room_for_the_agents() {
    let t = tempfile::tempdir().unwrap();
    let srv = lab_server(t.path(), "");
    let port = srv.port;
    // 500 connections, 100 from each of five addresses, each sending half
    // a request.
    let mut held: Vec<(u8, TcpStream)> = Vec::new();
    for src in 2..7u8 {
        for _ in 0..100 {
            let mut s = connect_from(&format!("127.0.0.{src}"), port);
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n");
            held.push((src, s));
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    // Past 64 from one address, the server closed them at once.
    let mut open = [0usize; 7];
    for (src, s) in &mut held {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 64];
        match s.read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => open[*src as usize] += 1,
            _ => {}
        }
    }
    eprintln!("open per address: {:?}", &open[2..]);
    assert!(open[2..].iter().all(|&n| n <= 64), "{open:?}");
    // Meanwhile a real agent is answered at once.
    let t0 = Instant::now();
    let j = job(port, "52:54:00:00:74:01");
    let r = report(
        "52:54:00:00:74:01",
        j["token"].as_str().unwrap(),
        "downloading",
    );
    assert_eq!(post_json(port, "/api/v1/status", &r).0, 200);
    assert_eq!(get_json(port, "/api/v1/deployment").0, 200);
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "{:.1?}",
        t0.elapsed()
    );
    assert!(metric(port, "http_connections_refused_total") >= 180.0);
    // And the rest are closed within the header deadline.
    std::thread::sleep(Duration::from_secs(15));
    let mut still = 0;
    for (_, s) in &mut held {
        let mut b = [0u8; 64];
        if matches!(s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
            still += 1;
        }
    }
    assert_eq!(still, 0, "{still} half-sent requests still open after 16 s");
    let (hwm, rss) = rss_kib(srv.proc.0.id());
    eprintln!("server memory after the slowloris: peak {hwm} KiB, now {rss} KiB");
}

// ---- the store ----

#[test]
fn a_store_unreadable_for_a_while_keeps_its_images() {
    let t = tempfile::tempdir().unwrap();
    let srv = lab_server(t.path(), "");
    let (store, away) = (t.path().join("images"), t.path().join("images.away"));
    std::fs::rename(&store, &away).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let v = srv.view();
    std::fs::rename(&away, &store).unwrap();
    assert_eq!(v["images"][0]["state"], "seeding", "{v}");
    std::thread::sleep(Duration::from_secs(5));
    srv.wait_seeding("lab");
    let log = std::fs::read_to_string(&srv.log).unwrap();
    assert!(log.contains("keeping the images loaded"), "{log}");
    assert_eq!(
        log.matches("verifying its source").count(),
        1,
        "the image was hashed again:\n{log}"
    );
}

#[test]
fn a_payload_changed_in_place_fails_the_image_and_stops_its_agents() {
    let t = tempfile::tempdir().unwrap();
    let srv = lab_server(t.path(), "seed_upload_limit = \"1M\"");
    let size = std::fs::metadata(t.path().join("master.img"))
        .unwrap()
        .len();
    let tgt = t.path().join("pc.img");
    blank_target(&tgt, size, true);
    let mut a = Agent::start(&srv.url, "52:54:00:00:75:01", &tgt);
    srv.wait_for(
        |v| v["hosts"][0]["done_bytes"].as_u64().unwrap_or(0) > 0,
        "the agent to start",
    );
    // Patch the payload's last bytes in place, as an admin's tool might.
    let payload = t.path().join("images/lab/payload.bin");
    let len = std::fs::metadata(&payload).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&payload)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"PATCHED", len - 4096).unwrap();
    let v = srv.wait_for(
        |v| v["images"][0]["state"] == "failed",
        "the image to be marked failed",
    );
    let why = v["images"][0]["error"].as_str().unwrap();
    assert!(why.contains("changed in place"), "{why}");
    // The agent is told, and stops with the server's reason.
    let t0 = Instant::now();
    let st = loop {
        if let Some(st) = a.proc.0.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", a.log());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!st.success());
    assert!(
        a.log().contains("the server stopped serving image lab")
            && a.log().contains("changed in place"),
        "{}",
        a.log()
    );
    // New hosts are told to wait.
    let (code, v) = get_json(srv.port, "/api/v1/jobs/52:54:00:00:75:02");
    assert_eq!(code, 503, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("cannot be served"),
        "{v}"
    );
    let _ = &mut a;
}

// ---- the config ----

#[test]
fn a_udp_tracker_is_refused_with_a_reason() {
    let t = tempfile::tempdir().unwrap();
    let cfg = t.path().join("server.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{}\"\nimages = \"{}\"\ntracker = \"udp://127.0.0.1:6969/announce\"\n",
            free_port(),
            t.path().join("images").display()
        ),
    )
    .unwrap();
    let mut p = Proc(
        std::process::Command::new(bin())
            .args(["serve", "--config"])
            .arg(&cfg)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while p.0.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the server started with a UDP tracker"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut err = String::new();
    p.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!p.0.wait().unwrap().success());
    assert!(
        err.contains("UDP trackers (BEP 15) are not supported") && err.contains("http://"),
        "{err}"
    );
}
