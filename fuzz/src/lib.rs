//! Fuzz targets: one function per parser of outside bytes.
//!
//! Each target takes any bytes and must return without panicking or
//! hanging. After a successful parse it also checks what callers rely on
//! (extents inside the device, partitions on the disk), so a wrong answer
//! is a finding too, not only a crash.

use std::fs::File;
use std::net::IpAddr;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;
use std::time::Duration;

use blockswarm::image::extent::{DevSlice, Extent};
use blockswarm::image::fs::{ext, fat, ntfs};
use blockswarm::image::manifest::Manifest;
use blockswarm::image::{self, Image, table};
use blockswarm::protocol::Job;
use blockswarm::server::config::ServerConfig;
use blockswarm::server::tracker::room::Locality;
use blockswarm::server::tracker::{Tracker, Vouched};
use blockswarm::swarm::wire::{self, Lengths, Message};
use librqbit_core::torrent_metainfo::torrent_from_bytes;

pub struct Target {
    /// Also the name of its corpus directory, fuzz/corpus/NAME.
    pub name: &'static str,
    pub run: fn(&[u8]),
    /// What the input is.
    pub input: &'static str,
}

/// Every target, in one place: the AFL harness, the replayer and
/// scripts/fuzz (through `replay --list`) take their names from here.
pub const TARGETS: &[Target] = &[
    Target {
        name: "manifest",
        run: manifest,
        input: "manifest.json, checked against the fixture's torrent",
    },
    Target {
        name: "torrent",
        run: torrent,
        input: "image.torrent, checked against the fixture's manifest",
    },
    Target {
        name: "job_toml",
        run: job_toml,
        input: "a job, as TOML (admin, server.toml) and as JSON (agent)",
    },
    Target {
        name: "server_toml",
        run: server_toml,
        input: "server.toml",
    },
    Target {
        name: "table",
        run: table,
        input: "head of a disk: MBR/EBR or GPT",
    },
    Target {
        name: "fs_ext",
        run: fs_ext,
        input: "head of an ext2/3/4 file system",
    },
    Target {
        name: "fs_fat",
        run: fs_fat,
        input: "head of a FAT12/16/32 file system",
    },
    Target {
        name: "fs_ntfs",
        run: fs_ntfs,
        input: "head of an NTFS file system",
    },
    Target {
        name: "tracker_query",
        run: tracker_query,
        input: "announce query strings, one per line, to one tracker",
    },
    Target {
        name: "tracker_response",
        run: tracker_response,
        input: "an HTTP tracker's answer (bencoded), as an agent reads it",
    },
    Target {
        name: "peer_wire",
        run: peer_wire,
        input: "peer-wire frames, each with its 4-byte length, as a reader splits them",
    },
];

pub fn find(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// With FUZZ_DEBUG set, prints each parse's outcome (to check that seeds
/// reach deep code: `FUZZ_DEBUG=1 replay TARGET FILE`).
fn show<T: std::fmt::Debug>(what: &str, r: &anyhow::Result<T>) {
    static ON: OnceLock<bool> = OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("FUZZ_DEBUG").is_some()) {
        match r {
            Ok(v) => eprintln!("{what}: ok: {:.300}", format!("{v:?}")),
            Err(e) => eprintln!("{what}: error: {e:#}"),
        }
    }
}

/// The image the manifest and torrent targets check their input against:
/// a capture of `tests/fixtures/mkdisk OUT mbr` (see fuzz/make-seeds).
const FIXTURE_MANIFEST: &[u8] = include_bytes!("../fixtures/manifest.json");
const FIXTURE_TORRENT: &[u8] = include_bytes!("../fixtures/image.torrent");

fn fixture_manifest() -> &'static Manifest {
    static M: OnceLock<Manifest> = OnceLock::new();
    M.get_or_init(|| Manifest::parse(FIXTURE_MANIFEST).expect("the fixture manifest parses"))
}

fn manifest(data: &[u8]) {
    let m = Manifest::parse(data);
    show("Manifest::parse", &m);
    if let Ok(m) = m {
        // What the agent and the server do next with a manifest.
        let map = m.payload_map().expect("a valid manifest maps its payload");
        assert_eq!(map.len(), m.payload.size);
        let pl = u64::from(m.payload.piece_length);
        for piece in [0, m.payload.piece_count.saturating_sub(1)] {
            let off = piece * pl;
            if off < map.len() {
                let len = pl.min(map.len() - off) as usize;
                let segs: Vec<_> = map
                    .segments(off, len)
                    .expect("a piece inside the payload maps")
                    .collect();
                assert_eq!(segs.iter().map(|s| s.len).sum::<usize>(), len);
            }
        }
    }
    let img = Image::from_bytes("fuzz", data, FIXTURE_TORRENT.to_vec());
    show(
        "Image::from_bytes",
        &img.as_ref()
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("{e:#}")),
    );
    if let Ok(img) = img {
        image::describe(&img, &mut std::io::sink()).expect("describe writes to a sink");
    }
}

fn torrent(data: &[u8]) {
    let r = image::torrent::with_trackers(data, &["http://127.0.0.1:8080/announce".into()]);
    show("with_trackers", &r.map(|b| b.len()));
    let m = fixture_manifest();
    let r = image::torrent::check(data, m);
    show("check", &r);
    if r.is_ok() {
        // agent::verify and swarm::Torrent::add index the piece hashes by
        // the manifest's piece count, after the manifest's own pieces, once
        // `check` passed.
        let t = torrent_from_bytes(data).expect("a checked torrent parses");
        let hashes = t.info.data.pieces.as_ref();
        let l = image::torrent::layout(data).expect("a checked torrent has the layout");
        assert_eq!(
            hashes.len() as u64,
            (l.prefix_pieces() + m.payload.piece_count) * 20
        );
        assert_eq!(l.payload_pieces().len() as u64, m.payload.piece_count * 20);
    }
}

fn job_toml(data: &[u8]) {
    let job = std::str::from_utf8(data)
        .map_err(anyhow::Error::from)
        .and_then(|text| toml::from_str::<Job>(text).map_err(anyhow::Error::from));
    show("toml Job", &job);
    if let Ok(job) = job {
        // Jobs go to the agent as JSON: the round trip must hold.
        let json = serde_json::to_vec(&job).expect("a job serializes");
        serde_json::from_slice::<Job>(&json).expect("a serialized job parses back");
    }
    show(
        "json Job",
        &serde_json::from_slice::<Job>(data).map_err(anyhow::Error::from),
    );
}

fn server_toml(data: &[u8]) {
    let c = std::str::from_utf8(data)
        .map_err(anyhow::Error::from)
        .and_then(ServerConfig::parse);
    show("ServerConfig::parse", &c);
    if let Ok(c) = c {
        let _ = c.public_url();
        let _ = c.announce_url();
    }
}

/// Size of the device an input is the head of. The rest reads as zeros,
/// like a disk's free space, so that a small input can describe a table or
/// a file system of realistic size (FAT16 needs 4085 clusters: over 2 MiB;
/// seeds hold the heads of 64 MiB file systems).
pub const DEVICE_SIZE: u64 = 64 << 20;

/// Runs `f` on a memory file holding `data`, zero-padded to [`DEVICE_SIZE`].
fn with_device(data: &[u8], f: impl FnOnce(&File, u64)) {
    thread_local! {
        static MEM: File = File::from(
            nix::sys::memfd::memfd_create(c"fuzz-device", nix::sys::memfd::MFdFlags::empty())
                .expect("memfd_create"),
        );
    }
    MEM.with(|file| {
        let size = (data.len() as u64).max(DEVICE_SIZE);
        file.set_len(0).expect("truncating the memfd");
        file.write_all_at(data, 0).expect("writing the memfd");
        file.set_len(size).expect("sizing the memfd");
        f(file, size);
    });
}

fn table(data: &[u8]) {
    read_table(data);
    // Again with the GPT's CRCs made right: a fuzzer does not find CRC32s
    // by itself, and the fields they guard are what gptman trusts.
    for ss in [512, 4096] {
        if let Some(fixed) = fix_gpt_crcs(data, ss) {
            read_table(&fixed);
        }
    }
}

fn read_table(data: &[u8]) {
    with_device(data, |file, size| {
        for ss in [512, 4096] {
            let t = table::read(file, size, ss);
            show(&format!("table::read, {ss}-byte sectors"), &t);
            if let Ok(t) = t {
                let mut end = 0;
                for p in &t.partitions {
                    assert!(p.size > 0 && p.start >= end, "partitions sorted, apart");
                    end = p.start.checked_add(p.size).expect("partition end");
                    assert!(end <= size, "partition {} past the disk", p.number);
                }
                assert!(t.min_disk_size(size) >= end);
                let _ = t.boot_area_end();
            }
        }
    });
}

const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// `data` with the header and entry-array CRCs of the GPT header at sector 1
/// (of `ss` bytes) recomputed; `None` without a GPT signature there. Entries
/// past the input read as zeros, as on the padded device; an array of more
/// than 4096 entries keeps its CRC (only the header's is fixed).
fn fix_gpt_crcs(data: &[u8], ss: usize) -> Option<Vec<u8>> {
    let h = data.get(ss..ss + 92)?;
    if &h[..8] != b"EFI PART" {
        return None;
    }
    let le32 = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
    let lba = u64::from_le_bytes(h[72..80].try_into().expect("8 bytes"));
    let (n, esz) = (le32(80), u64::from(le32(84)));
    let mut out = data.to_vec();
    if n <= 4096 {
        let mut digest = CRC32.digest();
        for i in 0..u64::from(n) {
            let mut entry = [0u8; 128];
            let at = lba
                .checked_mul(ss as u64)
                .and_then(|o| o.checked_add(i * esz));
            if let Some(at) = at.and_then(|a| usize::try_from(a).ok())
                && at < data.len()
            {
                let end = data.len().min(at + 128);
                entry[..end - at].copy_from_slice(&data[at..end]);
            }
            digest.update(&entry);
        }
        out[ss + 88..ss + 92].copy_from_slice(&digest.finalize().to_le_bytes());
    }
    out[ss + 16..ss + 20].fill(0);
    let crc = CRC32.checksum(&out[ss..ss + 92]);
    out[ss + 16..ss + 20].copy_from_slice(&crc.to_le_bytes());
    Some(out)
}

/// Extents as every fs map must return them: sorted, apart, non-empty,
/// inside the region.
fn check_extents(v: &[Extent], len: u64) {
    let mut end = 0;
    for e in v {
        assert!(e.len > 0 && e.start >= end, "extents sorted and apart");
        end = e.start.checked_add(e.len).expect("extent end");
        assert!(end <= len, "extent {}+{} past the region", e.start, e.len);
    }
}

fn fs_map(data: &[u8], probe: fn(&DevSlice) -> anyhow::Result<bool>, map: MapFn) {
    with_device(data, |file, size| {
        let dev = DevSlice::new(file, 0, size);
        show("probe", &probe(&dev));
        let r = map(&dev);
        show("used extents", &r);
        if let Ok(v) = r {
            check_extents(&v, size);
        }
        // The same file system on a region that ends where the input does.
        let dev = DevSlice::new(file, 0, data.len() as u64);
        let r = map(&dev);
        show("used extents, region of the input's length", &r);
        if let Ok(v) = r {
            check_extents(&v, data.len() as u64);
        }
    });
}

type MapFn = fn(&DevSlice) -> anyhow::Result<Vec<Extent>>;

fn fs_ext(data: &[u8]) {
    fs_map(data, ext::probe, ext::used_extents);
}

fn fs_fat(data: &[u8]) {
    fs_map(data, fat::probe, fat::used_extents);
}

fn fs_ntfs(data: &[u8]) {
    fs_map(data, ntfs::probe, ntfs::used_extents);
}

/// The info hash the tracker knows.
pub const KNOWN_HASH: [u8; 20] = *b"blockswarm-fuzz-hash";

/// A query's `token=` value that the tracker takes for a host's.
pub const HOST_TOKEN: &str = "1.52:54:00:00:00:01.host";

fn tracker_query(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let t = Tracker::new(Duration::from_secs(5), Locality::default());
    t.set_images([(KNOWN_HASH, true)]);
    let origin = "10.0.0.9:6881".parse().ok();
    for (k, q) in text.lines().enumerate() {
        // From a few addresses, so that the per-address caps come into play.
        let remote = IpAddr::from([10, 0, 0, 1 + (k % 5) as u8]);
        // The host is in a group (its room) on some lines, by subnet on others.
        let body = t.announce(q, remote, origin, |tok| {
            (tok == HOST_TOKEN).then(|| Vouched {
                host: "52:54:00:00:00:01".to_string(),
                group: (k % 2 == 0).then(|| "room-1".to_string()),
            })
        });
        show(
            "announce",
            &Ok::<_, anyhow::Error>(String::from_utf8_lossy(&body)),
        );
        assert!(
            body.first() == Some(&b'd') && body.last() == Some(&b'e'),
            "the answer is a bencoded dictionary"
        );
        // What the agent's side makes of the tracker's own answers.
        let _ = blockswarm::swarm::parse_tracker_response(&body);
    }
    let _ = t.counts(&KNOWN_HASH);
    let _ = t.host_ips();
}

fn tracker_response(data: &[u8]) {
    let r = blockswarm::swarm::parse_tracker_response(data);
    show("parse_tracker_response", &r);
    if let Ok(r) = r {
        assert!((1..=1800).contains(&r.interval.as_secs()), "interval clamped");
        assert!(r.peers.iter().all(|p| p.port() != 0 && !p.ip().is_unspecified()));
    }
}

/// Splits `data` into frames by their length prefixes, as the reader does,
/// and decodes each for two torrents: many pieces with a short last one,
/// and a tiny one.
fn peer_wire(data: &[u8]) {
    let torrents = [
        Lengths::new(1000 * 262_144 + 5, 262_144).expect("valid lengths"),
        Lengths::new(100, 16_384).expect("valid lengths"),
    ];
    let mut rest = data;
    while let Some((prefix, _)) = rest.split_first_chunk::<4>() {
        let n = (u32::from_be_bytes(*prefix) as usize).min(rest.len() - 4);
        let (frame, next) = rest.split_at(4 + n);
        rest = next;
        for l in &torrents {
            let m = wire::decode(frame, l);
            show("wire::decode", &m.clone().map_err(anyhow::Error::from));
            match m {
                Ok(Message::Have(p) | Message::Claim(p)) => assert!(p.get() < l.count()),
                Ok(Message::Request(b) | Message::Cancel(b) | Message::Piece(b)) => {
                    assert!(b.piece().get() < l.count());
                    let end = u64::from(b.begin()) + u64::from(b.len());
                    assert!(end <= u64::from(l.size(b.piece())), "block inside its piece");
                }
                Ok(Message::Bitfield(bits)) => assert_eq!(bits.len(), l.count()),
                _ => {}
            }
        }
    }
}
