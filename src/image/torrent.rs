//! The image's BitTorrent v1 metainfo (BEP 3): one file, the payload.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use buffers::ByteBuf;
use buffers::ByteBufOwned;
use librqbit_core::torrent_metainfo::{TorrentMetaV1, TorrentMetaV1Info, torrent_from_bytes};
use serde::Serialize;
use sha1w::ISha1;

use super::manifest::Manifest;
use super::map::PayloadMap;

/// Piece length for a payload: about 8192 pieces, between 128 KiB and 16 MiB.
/// 1 GiB gets 128 KiB pieces, 50 GiB 8 MiB, 500 GiB 16 MiB (32 000 pieces).
/// A piece takes about (N + 8) piece-times on a port to spread through a
/// room of N, which is the room's last seconds: small images want small
/// pieces (docs/benchmarks.md, "Tenth look").
pub fn default_piece_length(payload: u64) -> u32 {
    (payload / 8192)
        .next_power_of_two()
        .clamp(128 << 10, 16 << 20) as u32
}

/// Serialized metainfo and its info hash.
pub struct Built {
    pub bytes: Vec<u8>,
    pub info_hash: [u8; 20],
}

pub fn build(
    name: &str,
    length: u64,
    piece_length: u32,
    pieces: Vec<u8>,
    trackers: &[String],
) -> Result<Built> {
    let info = TorrentMetaV1Info::<ByteBufOwned> {
        name: Some(name.as_bytes().to_vec().into()),
        pieces: pieces.into(),
        piece_length,
        length: Some(length),
        ..Default::default()
    };
    let mut info_bytes = Vec::new();
    bencode::bencode_serialize_to_writer(&info, &mut info_bytes)
        .context("encoding the info dictionary")?;
    let mut h = sha1w::Sha1::new();
    h.update(&info_bytes);
    let info_hash = h.finish();

    let bytes = encode(&info_bytes, trackers)?;
    Ok(Built { bytes, info_hash })
}

/// The metainfo around an encoded info dictionary.
fn encode(info_bytes: &[u8], trackers: &[String]) -> Result<Vec<u8>> {
    #[derive(Serialize)]
    struct Meta<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        announce: Option<&'a str>,
        #[serde(rename = "announce-list", skip_serializing_if = "Vec::is_empty")]
        announce_list: Vec<Vec<&'a str>>,
        #[serde(rename = "created by")]
        created_by: &'a str,
        info: bencode::raw_value::RawValue<&'a [u8]>,
    }
    let meta = Meta {
        announce: trackers.first().map(String::as_str),
        announce_list: trackers.iter().map(|t| vec![t.as_str()]).collect(),
        created_by: concat!("blockswarm ", env!("CARGO_PKG_VERSION")),
        info: bencode::raw_value::RawValue(info_bytes),
    };
    let mut bytes = Vec::new();
    bencode::bencode_serialize_to_writer(&meta, &mut bytes).context("encoding the torrent")?;
    Ok(bytes)
}

/// librqbit's metainfo parser on bytes from outside. Its integer parsing
/// panics on overflow in builds with overflow checks (found by fuzzing).
fn parse(bytes: &[u8]) -> Result<TorrentMetaV1<ByteBuf<'_>>> {
    crate::util::guard("the torrent", || torrent_from_bytes(bytes))?
        .map_err(|e| anyhow::anyhow!("the torrent is not valid bencoded metainfo: {e}"))
}

/// The same torrent (same info hash) announcing to other trackers.
pub fn with_trackers(bytes: &[u8], trackers: &[String]) -> Result<Vec<u8>> {
    let t = parse(bytes)?;
    encode(t.info.raw_bytes.as_ref(), trackers)
}

/// Checks that a torrent is well formed and describes the manifest's payload.
pub fn check(bytes: &[u8], m: &Manifest) -> Result<()> {
    let t = parse(bytes)?;
    let hash = hex(&t.info_hash.0);
    if hash != m.payload.info_hash {
        bail!(
            "the torrent's info hash {hash} does not match the manifest's {}",
            m.payload.info_hash
        );
    }
    let info = &t.info.data;
    if info.files.is_some() || info.length != Some(m.payload.size) {
        bail!(
            "the torrent is not the single {}-byte payload file the manifest describes",
            m.payload.size
        );
    }
    if info.piece_length != m.payload.piece_length {
        bail!(
            "the torrent's piece length {} differs from the manifest's {}",
            info.piece_length,
            m.payload.piece_length
        );
    }
    if info.pieces.as_ref().len() as u64 != m.payload.piece_count * 20 {
        bail!(
            "the torrent holds {} piece hashes, the manifest expects {}",
            info.pieces.as_ref().len() / 20,
            m.payload.piece_count
        );
    }
    if info.name.as_ref().map(|n| n.as_ref()) != Some(m.payload.file.as_bytes()) {
        bail!(
            "the torrent's file name differs from the manifest's {:?}",
            m.payload.file
        );
    }
    Ok(())
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Reads payload bytes at a payload offset.
pub type PayloadReader<'a> = &'a (dyn Fn(u64, &mut [u8]) -> Result<()> + Sync);

/// A reader of `src`'s payload through `map`.
pub fn device_reader<'a>(
    src: &'a File,
    map: &'a PayloadMap,
) -> impl Fn(u64, &mut [u8]) -> Result<()> + Sync + 'a {
    move |off, buf| {
        for seg in map.segments(off, buf.len())? {
            src.read_exact_at(
                &mut buf[seg.buf_offset..seg.buf_offset + seg.len],
                seg.dev_offset,
            )
            .with_context(|| {
                format!(
                    "reading {} bytes at device offset {}",
                    seg.len, seg.dev_offset
                )
            })?;
        }
        Ok(())
    }
}

/// Reads a `len`-byte payload once, hashing every piece and, if `store` is
/// given, writing it there too. Each core reads and hashes its own pieces,
/// taken in order, so reads stay nearly sequential. Memory: one piece per
/// core. Returns the concatenated SHA-1s.
pub fn hash_payload(
    read: PayloadReader,
    len: u64,
    piece_length: u32,
    store: Option<&File>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<u8>> {
    let plen = u64::from(piece_length);
    let count = len.div_ceil(plen) as usize;
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8);
    let hashes = Mutex::new(vec![0u8; count * 20]);
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let work = || -> Result<()> {
        let mut buf = vec![0u8; piece_length as usize];
        loop {
            let idx = next.fetch_add(1, Ordering::Relaxed);
            if idx >= count || failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            let off = idx as u64 * plen;
            let buf = &mut buf[..plen.min(len - off) as usize];
            let r = read(off, buf).and_then(|()| match store {
                Some(f) => f.write_all_at(buf, off).context("writing the store file"),
                None => Ok(()),
            });
            if let Err(e) = r {
                failed.store(true, Ordering::Relaxed);
                return Err(e);
            }
            let mut h = sha1w::Sha1::new();
            h.update(buf);
            let h = h.finish();
            hashes.lock().unwrap_or_else(|e| e.into_inner())[idx * 20..idx * 20 + 20]
                .copy_from_slice(&h);
            progress(done.fetch_add(buf.len() as u64, Ordering::Relaxed) + buf.len() as u64);
        }
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers).map(|_| s.spawn(work)).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a hashing thread panicked")))
            })
            .collect::<Result<Vec<()>>>()
    })?;
    Ok(hashes.into_inner().unwrap_or_else(|e| e.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_length_scales() {
        assert_eq!(default_piece_length(1 << 30), 128 << 10);
        assert_eq!(default_piece_length(2 << 30), 256 << 10);
        assert_eq!(default_piece_length(50 << 30), 8 << 20);
        assert_eq!(default_piece_length(500 << 30), 16 << 20);
        assert_eq!(default_piece_length(1000), 128 << 10);
    }

    #[test]
    fn builds_a_parseable_torrent() {
        let b = build(
            "payload.bin",
            5,
            16384,
            vec![7u8; 20],
            &["http://t/announce".into()],
        )
        .unwrap();
        let t = torrent_from_bytes(&b.bytes).unwrap();
        assert_eq!(t.info_hash.0, b.info_hash);
        assert_eq!(t.info.data.length, Some(5));
        let re = with_trackers(&b.bytes, &["http://other/announce".into()]).unwrap();
        let t2 = torrent_from_bytes(&re).unwrap();
        assert_eq!(t2.info_hash.0, b.info_hash);
        assert!(String::from_utf8_lossy(&re).contains("http://other/announce"));
    }

    #[test]
    fn an_integer_past_64_bits_is_an_error() {
        // Found by fuzzing (torrent): librqbit's bencode parser multiplied
        // past u64 and panicked (debug builds and tests check overflows).
        let b = build("p", 5, 16384, vec![7u8; 20], &[]).unwrap().bytes;
        let text = String::from_utf8_lossy(&b).into_owned();
        let bad = text.replace("6:lengthi5e", "6:lengthi99999999999999999999999e");
        assert_ne!(bad, text);
        let e = with_trackers(bad.as_bytes(), &[]).unwrap_err().to_string();
        assert!(e.contains("the torrent is corrupt"), "{e}");
    }
}
