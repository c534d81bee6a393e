use super::*;

const H: InfoHash = [1u8; 20];

fn tracker() -> Tracker {
    tracker_with(Locality::default())
}

fn tracker_with(l: Locality) -> Tracker {
    let t = Tracker::new(Duration::from_secs(10), l);
    t.set_images([(H, true)]);
    t
}

fn origin() -> Option<SocketAddrV4> {
    Some("10.0.0.1:6881".parse().unwrap())
}

fn enc(b: &[u8]) -> String {
    b.iter().map(|x| format!("%{x:02X}")).collect()
}

fn q(id: &[u8; 20], port: u16, left: u64) -> String {
    format!(
        "info_hash={}&peer_id={}&port={port}&uploaded=0&downloaded=0&left={left}&compact=1",
        enc(&H),
        enc(id)
    )
}

fn id(n: u32) -> [u8; 20] {
    let mut b = [b'x'; 20];
    b[16..].copy_from_slice(&n.to_be_bytes());
    b
}

#[derive(serde::Deserialize)]
struct Resp {
    #[serde(rename = "failure reason")]
    failure: Option<buffers::ByteBufOwned>,
    peers: Option<buffers::ByteBufOwned>,
    #[serde(rename = "blockswarm hosts")]
    hosts: Option<buffers::ByteBufOwned>,
}

fn addrs(b: &Option<buffers::ByteBufOwned>) -> Vec<String> {
    b.as_ref()
        .map(|b| b.as_ref().to_vec())
        .unwrap_or_default()
        .chunks(6)
        .map(|c| {
            let ip = Ipv4Addr::new(c[0], c[1], c[2], c[3]);
            SocketAddrV4::new(ip, u16::from_be_bytes([c[4], c[5]])).to_string()
        })
        .collect()
}

/// (peers, the vouched hosts) of an announce from `ip`, as host `host`.
fn ask(t: &Tracker, query: &str, ip: &str, host: Option<&str>) -> (Vec<String>, Vec<String>) {
    ask_in(t, query, ip, host, None)
}

/// The same, the host in `group`.
fn ask_in(
    t: &Tracker,
    query: &str,
    ip: &str,
    host: Option<&str>,
    group: Option<&str>,
) -> (Vec<String>, Vec<String>) {
    let body = t.announce(query, ip.parse().unwrap(), origin(), |_| {
        host.map(|h| Vouched {
            host: h.into(),
            group: group.map(String::from),
        })
    });
    let r: Resp = bencode::from_bytes(&body).unwrap();
    assert!(
        r.failure.is_none(),
        "{}",
        String::from_utf8_lossy(r.failure.as_ref().unwrap().as_ref())
    );
    (addrs(&r.peers), addrs(&r.hosts))
}

fn with_token(query: String) -> String {
    query + "&token=t"
}

#[test]
fn hosts_get_the_origin_then_hosts_then_guests() {
    let t = tracker();
    ask(&t, &q(&id(9), 7009, 100), "10.0.0.9", None);
    ask(&t, &with_token(q(&id(2), 7002, 100)), "10.0.0.2", Some("a"));
    ask(&t, &with_token(q(&id(3), 7003, 0)), "10.0.0.3", Some("b"));
    let (peers, hosts) = ask(&t, &with_token(q(&id(4), 7004, 100)), "10.0.0.4", Some("c"));
    assert_eq!(
        peers,
        [
            "10.0.0.1:6881",
            "10.0.0.3:7003",
            "10.0.0.2:7002",
            "10.0.0.9:7009"
        ],
        "origin, the finished host, the other host, the guest"
    );
    let mut hosts = hosts;
    hosts.sort();
    assert_eq!(hosts, ["10.0.0.2:7002", "10.0.0.3:7003"]);
    // Guests get no list of vouched hosts; seeds get no peers.
    let (peers, hosts) = ask(&t, &q(&id(9), 7009, 100), "10.0.0.9", None);
    assert_eq!(peers[0], "10.0.0.1:6881");
    assert!(hosts.is_empty());
    let (peers, _) = ask(&t, &with_token(q(&id(3), 7003, 0)), "10.0.0.3", Some("b"));
    assert!(peers.is_empty(), "seeds need no peers");
    // numwant caps the list; a stopped host is forgotten.
    let few = q(&id(5), 7005, 100) + "&numwant=2";
    assert_eq!(ask(&t, &few, "10.0.0.5", None).0.len(), 2);
    ask(
        &t,
        &with_token(q(&id(2), 7002, 100) + "&event=stopped"),
        "10.0.0.2",
        Some("a"),
    );
    assert_eq!(t.counts(&H).complete, 1);
    assert_eq!(t.counts(&H).incomplete, 3);
    let ips = t.host_ips();
    assert_eq!(ips.len(), 2, "{ips:?}");
    assert!(ips.contains(&"10.0.0.3".parse().unwrap()));
}

#[test]
fn a_host_re_announcing_keeps_one_entry() {
    let t = tracker();
    // The same token with a new peer id and port (the agent restarted).
    ask(&t, &with_token(q(&id(2), 7002, 100)), "10.0.0.2", Some("a"));
    ask(&t, &with_token(q(&id(3), 7003, 100)), "10.0.0.2", Some("a"));
    let (peers, _) = ask(&t, &q(&id(9), 7009, 100), "10.0.0.9", None);
    assert_eq!(peers, ["10.0.0.1:6881", "10.0.0.2:7003"]);
}

#[test]
fn the_claimed_address_is_ignored() {
    let t = tracker();
    ask(&t, &(q(&id(9), 7009, 0) + "&ip=10.9.9.9"), "10.0.0.9", None);
    let (peers, _) = ask(&t, &q(&id(4), 7004, 100), "10.0.0.4", None);
    assert_eq!(peers, ["10.0.0.1:6881", "10.0.0.9:7009"]);
}

#[test]
fn a_peer_id_makes_no_origin() {
    let t = tracker();
    let mut fake = [b'z'; 20];
    fake[..crate::swarm::ORIGIN_PREFIX.len()].copy_from_slice(crate::swarm::ORIGIN_PREFIX);
    ask(&t, &q(&fake, 7009, 0), "10.0.0.9", None);
    ask(&t, &with_token(q(&id(2), 7002, 100)), "10.0.0.2", Some("a"));
    let (peers, _) = ask(&t, &with_token(q(&id(4), 7004, 100)), "10.0.0.4", Some("c"));
    assert_eq!(peers, ["10.0.0.1:6881", "10.0.0.2:7002", "10.0.0.9:7009"]);
    // Without the server's seed serving the image, there is no origin.
    t.set_images([(H, false)]);
    let (peers, _) = ask(&t, &with_token(q(&id(4), 7004, 100)), "10.0.0.4", Some("c"));
    assert_eq!(peers, ["10.0.0.2:7002", "10.0.0.9:7009"]);
}

#[test]
fn a_flood_of_guests_never_crowds_out_the_room() {
    let t = tracker();
    ask(&t, &with_token(q(&id(1), 7001, 0)), "10.0.0.2", Some("a"));
    // 5000 announces in the room's subnet: most from one address, the rest
    // from 100 others.
    for n in 0..5000u32 {
        let ip = if n < 2500 {
            "10.0.0.201".to_string()
        } else {
            format!("10.0.0.{}", 100 + n % 100)
        };
        ask(&t, &q(&id(100 + n), 9000, 100), &ip, None);
    }
    let g = t.lock();
    let s = &g[&H];
    assert!(s.guests.len() <= MAX_GUESTS, "{}", s.guests.len());
    let from_one = s
        .guests
        .values()
        .filter(|p| p.addr.ip().octets() == [10, 0, 0, 201])
        .count();
    assert!(from_one <= MAX_GUESTS_PER_IP, "{from_one}");
    drop(g);
    // A real host joins and gets the origin and the other host first.
    let (peers, hosts) = ask(&t, &with_token(q(&id(3), 7003, 100)), "10.0.0.3", Some("b"));
    assert_eq!(peers[..2], ["10.0.0.1:6881", "10.0.0.2:7001"]);
    assert_eq!(peers.len(), DEFAULT_NUMWANT);
    assert_eq!(hosts, ["10.0.0.2:7001"]);
}

#[test]
fn hosts_past_the_cap_evict_the_silent_longest() {
    let t = tracker();
    for n in 0..=MAX_HOSTS as u32 {
        let ip = Ipv4Addr::from(0x0a00_0000 + n).to_string();
        ask(
            &t,
            &with_token(q(&id(n), 7000, 0)),
            &ip,
            Some(&n.to_string()),
        );
    }
    let g = t.lock();
    assert_eq!(g[&H].hosts.len(), MAX_HOSTS);
    assert!(!g[&H].hosts.contains_key("0"));
    assert!(g[&H].hosts.contains_key(&MAX_HOSTS.to_string()));
}

#[test]
fn garbage_gets_a_failure_reason() {
    let t = tracker();
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    let other = q(&id(1), 1, 0).replace(&enc(&H), &enc(&[9; 20]));
    for (query, why) in [
        ("", "missing info_hash"),
        ("info_hash=abc", "20 bytes"),
        ("info_hash=%ZZ", "percent"),
        (other.as_str(), "unknown info_hash"),
        (&q(&id(1), 1, 0).replace("port=1", "port=99999"), "port"),
        (&q(&id(1), 1, 0).replace("left=0", "left=-4"), "left"),
    ] {
        let body = String::from_utf8_lossy(&t.announce(query, ip, None, |_| None)).into_owned();
        assert!(
            body.starts_with("d14:failure reason") && body.contains(why),
            "{query}: {body}"
        );
    }
    let v6 = t.announce(&q(&id(1), 1, 0), "fe80::1".parse().unwrap(), None, |_| None);
    assert!(String::from_utf8_lossy(&v6).contains("IPv6"));
}

/// Host `n` at `ip`, wanting pieces, in `group`: (peers, vouched hosts),
/// each sorted after the origin.
fn room_ask(t: &Tracker, n: u32, ip: &str, group: Option<&str>) -> (Vec<String>, Vec<String>) {
    let q = with_token(q(&id(n), 7000 + n as u16, 100));
    let (mut peers, mut hosts) = ask_in(t, &q, ip, Some(&n.to_string()), group);
    assert_eq!(
        peers.first().map(String::as_str),
        Some("10.0.0.1:6881"),
        "origin first"
    );
    peers[1..].sort();
    hosts.sort();
    (peers, hosts)
}

/// Two subnets, three hosts each (hosts 1-3 in 10.0.1.0/24, 4-6 in
/// 10.0.2.0/24), announced in turn.
fn two_rooms(t: &Tracker) {
    for n in 1..=6u32 {
        room_ask(t, n, &format!("10.0.{}.{n}", 1 + (n - 1) / 3), None);
    }
}

#[test]
fn hosts_learn_of_their_own_subnet_only() {
    let t = tracker();
    two_rooms(&t);
    let (peers, hosts) = room_ask(&t, 1, "10.0.1.1", None);
    assert_eq!(peers, ["10.0.0.1:6881", "10.0.1.2:7002", "10.0.1.3:7003"]);
    assert_eq!(
        hosts,
        ["10.0.1.2:7002", "10.0.1.3:7003"],
        "vouched: the room only"
    );
    let (peers, hosts) = room_ask(&t, 5, "10.0.2.5", None);
    assert_eq!(peers, ["10.0.0.1:6881", "10.0.2.4:7004", "10.0.2.6:7006"]);
    assert_eq!(hosts, ["10.0.2.4:7004", "10.0.2.6:7006"]);
    // Alone in its room: the origin only, and no early re-announce.
    let body = t.announce(
        &with_token(q(&id(9), 7009, 100)),
        "10.0.3.9".parse().unwrap(),
        origin(),
        |_| {
            Some(Vouched {
                host: "9".into(),
                group: None,
            })
        },
    );
    let r: Resp = bencode::from_bytes(&body).unwrap();
    assert_eq!(addrs(&r.peers), ["10.0.0.1:6881"]);
    assert!(addrs(&r.hosts).is_empty());
    assert!(String::from_utf8_lossy(&body).contains("8:intervali10e"));
}

#[test]
fn the_seed_feeds_the_rooms_of_its_hosts() {
    let t = tracker();
    assert_eq!(t.rooms(), 0);
    two_rooms(&t);
    room_ask(&t, 7, "10.0.1.7", Some("lab"));
    assert_eq!(t.rooms(), 3, "two subnets and a group");
    // Hosts of a swarm the seed does not serve do not count.
    t.set_images([(H, false)]);
    assert_eq!(t.rooms(), 0);
    let off = tracker_with(Locality {
        on: false,
        prefix: 24,
    });
    two_rooms(&off);
    assert_eq!(off.rooms(), 1);
}

#[test]
fn locality_off_lists_every_host_as_before_rooms() {
    let t = tracker_with(Locality {
        on: false,
        prefix: 24,
    });
    two_rooms(&t);
    let (peers, hosts) = room_ask(&t, 1, "10.0.1.1", Some("a"));
    let others: Vec<String> = (2..=6u32)
        .map(|n| format!("10.0.{}.{n}:{}", 1 + (n - 1) / 3, 7000 + n))
        .collect();
    assert_eq!(peers[1..], others[..]);
    assert_eq!(hosts, others);
}

#[test]
fn one_subnet_is_one_room_as_before_rooms() {
    // Everyone in 10.0.0.0/24: on and off give the same lists, in order.
    let lists = |l: Locality| {
        let t = tracker_with(l);
        ask(&t, &q(&id(9), 7009, 100), "10.0.0.9", None);
        ask(&t, &with_token(q(&id(2), 7002, 100)), "10.0.0.2", Some("a"));
        ask(&t, &with_token(q(&id(3), 7003, 0)), "10.0.0.3", Some("b"));
        let (peers, mut hosts) = ask(&t, &with_token(q(&id(4), 7004, 100)), "10.0.0.4", Some("c"));
        hosts.sort();
        (
            peers,
            hosts,
            ask(&t, &q(&id(8), 7008, 100), "10.0.0.8", None),
        )
    };
    let on = lists(Locality::default());
    let off = lists(Locality {
        on: false,
        prefix: 24,
    });
    assert_eq!(on, off);
    assert_eq!(on.0.len(), 4, "{on:?}");
}

#[test]
fn a_group_is_a_room_whatever_the_subnets() {
    let t = tracker();
    // Group "lab" spans two subnets; host 3 shares 10.0.1.0/24 but no group.
    room_ask(&t, 1, "10.0.1.1", Some("lab"));
    room_ask(&t, 2, "10.0.2.2", Some("lab"));
    room_ask(&t, 3, "10.0.1.3", None);
    room_ask(&t, 4, "10.0.1.4", Some("other"));
    let (peers, hosts) = room_ask(&t, 1, "10.0.1.1", Some("lab"));
    assert_eq!(peers, ["10.0.0.1:6881", "10.0.2.2:7002"]);
    assert_eq!(hosts, ["10.0.2.2:7002"]);
    let (peers, hosts) = room_ask(&t, 3, "10.0.1.3", None);
    assert_eq!(
        peers,
        ["10.0.0.1:6881"],
        "grouped hosts are in their group's room"
    );
    assert!(hosts.is_empty());
    // A guest goes by subnets: it learns of the hosts of its subnet, and
    // they of it.
    ask(&t, &q(&id(50), 7050, 100), "10.0.1.50", None);
    ask(&t, &q(&id(51), 7051, 100), "10.0.2.51", None);
    let (mut peers, hosts) = ask(&t, &q(&id(52), 7052, 100), "10.0.1.52", None);
    peers.sort();
    assert_eq!(
        peers,
        [
            "10.0.0.1:6881",
            "10.0.1.1:7001",
            "10.0.1.3:7003",
            "10.0.1.4:7004",
            "10.0.1.50:7050"
        ]
    );
    assert!(hosts.is_empty());
    let (peers, _) = room_ask(&t, 2, "10.0.2.2", Some("lab"));
    assert_eq!(peers, ["10.0.0.1:6881", "10.0.1.1:7001", "10.0.2.51:7051"]);
}

#[test]
fn the_prefix_sets_the_subnet_rooms() {
    for (prefix, room_of_1) in [
        (
            16,
            &[
                "10.0.1.2:7002",
                "10.0.1.3:7003",
                "10.0.2.4:7004",
                "10.0.2.5:7005",
                "10.0.2.6:7006",
            ][..],
        ),
        (
            0,
            &[
                "10.0.1.2:7002",
                "10.0.1.3:7003",
                "10.0.2.4:7004",
                "10.0.2.5:7005",
                "10.0.2.6:7006",
            ][..],
        ),
        (24, &["10.0.1.2:7002", "10.0.1.3:7003"][..]),
        (32, &[][..]),
    ] {
        let t = tracker_with(Locality { on: true, prefix });
        two_rooms(&t);
        let (_, hosts) = room_ask(&t, 1, "10.0.1.1", None);
        assert_eq!(hosts, room_of_1, "/{prefix}");
    }
}

#[test]
fn rooms_keep_the_swarm_bounded() {
    // Hosts from MAX_HOSTS + 1 subnets and groups of their own: the swarm
    // still holds MAX_HOSTS; rooms are kept per peer, in no map of their own.
    let t = tracker();
    for n in 0..=MAX_HOSTS as u32 {
        let ip = Ipv4Addr::from(0x0a00_0000 + (n << 8) + 1).to_string();
        let g = (n % 2 == 0).then(|| format!("g{n}"));
        room_ask(&t, n, &ip, g.as_deref());
    }
    assert_eq!(t.lock()[&H].hosts.len(), MAX_HOSTS);
}

#[test]
fn the_first_hosts_are_those_a_full_sort_puts_first() {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for len in [0usize, 1, 2, 5, 50, 300] {
        let v: Vec<(bool, u64)> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x & 1 == 0, x % 17)
            })
            .collect();
        let mut all = v.clone();
        all.sort_unstable();
        for n in [0usize, 1, 3, 50, 400] {
            let mut got = v.clone();
            first_sorted(&mut got, n, |p| *p);
            assert_eq!(got, all[..n.min(len)], "len {len}, n {n}");
        }
    }
}
