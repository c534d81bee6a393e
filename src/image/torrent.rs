//! The image's BitTorrent v1 metainfo (BEP 3): a multi-file torrent that
//! carries the manifest as its first file, padded to a piece boundary (BEP
//! 47), then the payload. The torrent alone is the image: any client that
//! holds it can hand another server (or a stock client) everything.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use buffers::ByteBuf;
use buffers::ByteBufOwned;
use librqbit_core::torrent_metainfo::{
    TorrentMetaV1, TorrentMetaV1File, TorrentMetaV1Info, torrent_from_bytes,
};
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

/// The image's manifest as the torrent's first file (see [`prefix`]).
pub const MANIFEST_IN_TORRENT: &str = "image.json";
/// BEP 47's folder of pad files.
const PAD_DIR: &str = ".pad";
/// Longest manifest a torrent may carry: half a million extents take a
/// few MiB.
pub const MAX_MANIFEST: u64 = 64 << 20;

/// The manifest as the torrent carries it. The info hash is the torrent's
/// own (it cannot be inside what it hashes) and `stored` is a fact of one
/// store, so both are left out: blank and false. Two builds of one image
/// serialize it alike (serde's field order, no maps), so the bytes can be
/// rebuilt from a manifest and proved by the torrent's piece hashes.
pub fn embedded_manifest(m: &Manifest) -> Result<Vec<u8>> {
    let mut m = m.clone();
    m.payload.info_hash = String::new();
    m.payload.stored = false;
    serde_json::to_vec(&m).context("encoding the manifest")
}

/// The torrent's bytes before the payload: the manifest, then zeros up to
/// the next piece boundary (a BEP 47 pad file), so the payload's pieces are
/// the same as on their own.
pub fn prefix(m: &Manifest) -> Result<Vec<u8>> {
    let mut b = embedded_manifest(m)?;
    let plen = m.payload.piece_length as usize;
    b.resize(b.len().div_ceil(plen) * plen, 0);
    Ok(b)
}

/// Concatenated SHA-1s of `bytes` in `piece_length` pieces.
fn piece_hashes(bytes: &[u8], piece_length: u32) -> Vec<u8> {
    bytes
        .chunks(piece_length as usize)
        .flat_map(|c| {
            let mut h = sha1w::Sha1::new();
            h.update(c);
            h.finish()
        })
        .collect()
}

/// The image's torrent: a multi-file torrent named after the image holding
/// the manifest ([`MANIFEST_IN_TORRENT`]), a pad file up to a piece
/// boundary, and the payload (`m.payload.file`), whose concatenated piece
/// hashes are `payload_pieces`. Stock clients write it as `NAME/image.json`
/// and `NAME/payload.bin`.
pub fn build(m: &Manifest, payload_pieces: Vec<u8>, trackers: &[String]) -> Result<Built> {
    let p = &m.payload;
    let embedded = embedded_manifest(m)?;
    let prefix = prefix(m)?;
    let pad = (prefix.len() - embedded.len()) as u64;
    let file = |length: u64, path: Vec<&str>, attr: Option<&str>| TorrentMetaV1File {
        length,
        path: path
            .into_iter()
            .map(|c| ByteBufOwned::from(c.as_bytes().to_vec()))
            .collect(),
        attr: attr.map(|a| a.as_bytes().to_vec().into()),
        sha1: None,
        symlink_path: None,
    };
    let mut files = vec![file(embedded.len() as u64, vec![MANIFEST_IN_TORRENT], None)];
    if pad > 0 {
        files.push(file(pad, vec![PAD_DIR, &pad.to_string()], Some("p")));
    }
    files.push(file(p.size, vec![p.file.as_str()], None));
    let mut pieces = piece_hashes(&prefix, p.piece_length);
    pieces.extend_from_slice(&payload_pieces);
    let info = TorrentMetaV1Info::<ByteBufOwned> {
        name: Some(m.name.as_bytes().to_vec().into()),
        pieces: pieces.into(),
        piece_length: p.piece_length,
        files: Some(files),
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

/// An image's torrent, parsed and checked for the layout [`build`] makes.
#[derive(Debug, Clone)]
pub struct Layout {
    pub info_hash: [u8; 20],
    /// The torrent's name: the image's.
    pub name: String,
    pub piece_length: u32,
    /// Bytes of the manifest file.
    pub manifest_len: u64,
    /// Bytes before the payload: the manifest and its pad, whole pieces.
    pub prefix_len: u64,
    pub payload_len: u64,
    pub payload_file: String,
    /// Concatenated SHA-1s of every piece, the prefix's first.
    pub pieces: Vec<u8>,
    /// Trackers the torrent names, in order.
    pub trackers: Vec<String>,
}

impl Layout {
    /// The torrent's whole length.
    pub fn total(&self) -> u64 {
        self.prefix_len + self.payload_len
    }

    pub fn prefix_pieces(&self) -> u64 {
        self.prefix_len / u64::from(self.piece_length)
    }

    /// The payload's own piece hashes (as a single-file torrent has them).
    pub fn payload_pieces(&self) -> &[u8] {
        &self.pieces[self.prefix_pieces() as usize * 20..]
    }

    /// Checks that `prefix` (manifest and pad) is what the torrent's first
    /// pieces hash to.
    pub fn check_prefix(&self, prefix: &[u8]) -> Result<()> {
        if prefix.len() as u64 != self.prefix_len {
            bail!(
                "the manifest takes {} bytes with its pad, the torrent's {}",
                prefix.len(),
                self.prefix_len
            );
        }
        let got = piece_hashes(prefix, self.piece_length);
        if got != self.pieces[..got.len()] {
            bail!("the manifest differs from the one the torrent's piece hashes describe");
        }
        Ok(())
    }
}

fn utf8(b: &[u8], what: &str) -> Result<String> {
    String::from_utf8(b.to_vec()).map_err(|_| anyhow::anyhow!("the torrent's {what} is not UTF-8"))
}

/// Parses an image's torrent: `NAME/image.json`, an optional BEP 47 pad file
/// to the next piece boundary, then the payload file; nothing else.
pub fn layout(bytes: &[u8]) -> Result<Layout> {
    let t = parse(bytes)?;
    let info = &t.info.data;
    let plen = u64::from(info.piece_length);
    if info.piece_length < 16384 || !info.piece_length.is_power_of_two() {
        bail!(
            "the torrent's piece length {} is not a power of two of at least 16 KiB",
            info.piece_length
        );
    }
    let Some(files) = &info.files else {
        bail!(
            "the torrent is a single-file torrent without the image's manifest \
             (made before blockswarm carried the manifest in the torrent)"
        );
    };
    let path = |f: &TorrentMetaV1File<ByteBuf<'_>>| -> Result<Vec<String>> {
        f.path
            .iter()
            .map(|c| utf8(c.as_ref(), "file path"))
            .collect()
    };
    let shape = || {
        anyhow::anyhow!(
            "the torrent's files are not an image's ({MANIFEST_IN_TORRENT}, a pad file, the payload)"
        )
    };
    let (first, payload, pad) = match files.as_slice() {
        [m, p] => (m, p, None),
        [m, pad, p] => (m, p, Some(pad)),
        _ => return Err(shape()),
    };
    if path(first)? != [MANIFEST_IN_TORRENT] {
        return Err(shape());
    }
    let manifest_len = first.length;
    if manifest_len == 0 || manifest_len > MAX_MANIFEST {
        bail!("the torrent's manifest is {manifest_len} bytes (1 to {MAX_MANIFEST} taken)");
    }
    let pad_len = match pad {
        None => 0,
        Some(f) => {
            let is_pad = f.attr.as_ref().is_some_and(|a| a.as_ref().contains(&b'p'))
                && path(f)?.first().map(String::as_str) == Some(PAD_DIR);
            if !is_pad || f.length >= plen {
                return Err(shape());
            }
            f.length
        }
    };
    let prefix_len = manifest_len + pad_len;
    if !prefix_len.is_multiple_of(plen) {
        bail!("the torrent's manifest and pad end at {prefix_len}, not on a piece boundary");
    }
    let payload_file = match path(payload)?.as_slice() {
        [f] if !f.is_empty() && !f.starts_with('.') => f.clone(),
        _ => return Err(shape()),
    };
    let payload_len = payload.length;
    let total = prefix_len
        .checked_add(payload_len)
        .ok_or_else(|| anyhow::anyhow!("the torrent's length overflows"))?;
    let count = total.div_ceil(plen);
    if info.pieces.as_ref().len() as u64 != count * 20 {
        bail!(
            "the torrent holds {} piece hashes for {count} pieces",
            info.pieces.as_ref().len() / 20
        );
    }
    let name = utf8(
        info.name.as_ref().map(|n| n.as_ref()).unwrap_or_default(),
        "name",
    )?;
    let mut trackers: Vec<String> = t
        .announce
        .iter()
        .map(|a| String::from_utf8_lossy(a.as_ref()).into_owned())
        .collect();
    for tier in t.announce_list.iter() {
        for a in tier {
            let a = String::from_utf8_lossy(a.as_ref()).into_owned();
            if !trackers.contains(&a) {
                trackers.push(a);
            }
        }
    }
    Ok(Layout {
        info_hash: t.info_hash.0,
        name,
        piece_length: info.piece_length,
        manifest_len,
        prefix_len,
        payload_len,
        payload_file,
        pieces: info.pieces.as_ref().to_vec(),
        trackers,
    })
}

/// Checks that a torrent is an image's (see [`layout`]) and carries this
/// manifest; returns the bytes before the payload (manifest and pad).
pub fn check(bytes: &[u8], m: &Manifest) -> Result<Vec<u8>> {
    let l = layout(bytes)?;
    let hash = hex(&l.info_hash);
    if hash != m.payload.info_hash {
        bail!(
            "the torrent's info hash {hash} does not match the manifest's {}",
            m.payload.info_hash
        );
    }
    check_payload(&l, m)?;
    let prefix = prefix(m)?;
    l.check_prefix(&prefix)?;
    Ok(prefix)
}

/// Checks the torrent's payload file against the manifest's.
pub fn check_payload(l: &Layout, m: &Manifest) -> Result<()> {
    let p = &m.payload;
    if l.payload_len != p.size {
        bail!(
            "the torrent's payload is {} bytes, the manifest's {}",
            l.payload_len,
            p.size
        );
    }
    if l.piece_length != p.piece_length {
        bail!(
            "the torrent's piece length {} differs from the manifest's {}",
            l.piece_length,
            p.piece_length
        );
    }
    if l.payload_file != p.file {
        bail!(
            "the torrent's payload file {:?} differs from the manifest's {:?}",
            l.payload_file,
            p.file
        );
    }
    if l.name != m.name {
        bail!(
            "the torrent is named {:?}, its manifest {:?}",
            l.name,
            m.name
        );
    }
    Ok(())
}

/// Whether a torrent is the single-file kind made before the manifest
/// travelled in it.
pub fn is_single_file(bytes: &[u8]) -> bool {
    parse(bytes).is_ok_and(|t| t.info.data.files.is_none() && t.info.data.length.is_some())
}

/// An image's old single-file torrent turned into the self-contained one:
/// same payload pieces (nothing is read again), a new info hash, which is
/// written into the returned manifest.
pub fn convert(old: &[u8], m: &Manifest) -> Result<(Manifest, Built)> {
    let t = parse(old)?;
    let info = &t.info.data;
    let hash = hex(&t.info_hash.0);
    if hash != m.payload.info_hash {
        bail!(
            "the torrent's info hash {hash} does not match the manifest's {}",
            m.payload.info_hash
        );
    }
    if info.files.is_some()
        || info.length != Some(m.payload.size)
        || info.piece_length != m.payload.piece_length
        || info.pieces.as_ref().len() as u64 != m.payload.piece_count * 20
    {
        bail!("the old torrent does not describe the manifest's payload");
    }
    let trackers: Vec<String> = t
        .announce
        .iter()
        .map(|a| String::from_utf8_lossy(a.as_ref()).into_owned())
        .collect();
    let built = build(m, info.pieces.as_ref().to_vec(), &trackers)?;
    let mut m = m.clone();
    m.payload.info_hash = hex(&built.info_hash);
    Ok((m, built))
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
pub(crate) mod tests {
    use super::*;

    #[test]
    fn piece_length_scales() {
        assert_eq!(default_piece_length(1 << 30), 128 << 10);
        assert_eq!(default_piece_length(2 << 30), 256 << 10);
        assert_eq!(default_piece_length(50 << 30), 8 << 20);
        assert_eq!(default_piece_length(500 << 30), 16 << 20);
        assert_eq!(default_piece_length(1000), 128 << 10);
    }

    /// The sample manifest with a payload of `size` bytes in 16 KiB pieces,
    /// its payload and that payload's own piece hashes.
    pub(crate) fn sample(size: u64) -> (Manifest, Vec<u8>, Vec<u8>) {
        let mut m = crate::image::manifest::tests::sample();
        m.payload.size = size;
        m.payload.piece_count = size.div_ceil(16384);
        m.regions[0].extents = vec![crate::image::extent::Extent::new(0, size)];
        m.regions[0].used_bytes = size;
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let pieces = piece_hashes(&payload, 16384);
        (m, payload, pieces)
    }

    #[test]
    fn the_torrent_carries_the_manifest_then_the_payload_on_a_piece_boundary() {
        let (mut m, payload, pieces) = sample(40000);
        let b = build(&m, pieces.clone(), &["http://t/announce".into()]).unwrap();
        m.payload.info_hash = hex(&b.info_hash);
        let l = layout(&b.bytes).unwrap();
        assert_eq!(l.info_hash, b.info_hash);
        assert_eq!(l.name, m.name);
        assert_eq!(l.payload_file, "payload.bin");
        assert_eq!(l.payload_len, 40000);
        assert_eq!(l.prefix_len % 16384, 0);
        // The payload's pieces are the single-file torrent's, unchanged.
        assert_eq!(l.payload_pieces(), &pieces[..]);
        assert_eq!(l.pieces.len() as u64, (l.prefix_pieces() + 3) * 20);
        // The prefix is the manifest (info hash blank, not stored), then zeros.
        let prefix = check(&b.bytes, &m).unwrap();
        let json = &prefix[..l.manifest_len as usize];
        let back = Manifest::parse(json).unwrap();
        assert_eq!(back.payload.info_hash, "");
        assert_eq!(back.name, m.name);
        assert!(prefix[l.manifest_len as usize..].iter().all(|&z| z == 0));
        // Prefix then payload, hashed as one stream, gives every piece hash.
        let mut all = prefix.clone();
        all.extend_from_slice(&payload);
        assert_eq!(piece_hashes(&all, 16384), l.pieces);
        // A stock client sees a BEP 47 pad file between the two.
        let t = torrent_from_bytes(&b.bytes).unwrap();
        let files = t.info.data.files.unwrap();
        assert_eq!(files.len(), 3);
        assert_eq!(files[1].attr.as_ref().unwrap().as_ref(), b"p");
        assert_eq!(files[0].length + files[1].length, l.prefix_len);
        // Other trackers keep the info hash.
        let re = with_trackers(&b.bytes, &["http://other/announce".into()]).unwrap();
        assert_eq!(layout(&re).unwrap().info_hash, b.info_hash);
        assert!(String::from_utf8_lossy(&re).contains("http://other/announce"));
    }

    #[test]
    fn a_manifest_the_piece_hashes_do_not_describe_is_refused() {
        let (mut m, _, pieces) = sample(40000);
        let b = build(&m, pieces, &[]).unwrap();
        m.payload.info_hash = hex(&b.info_hash);
        check(&b.bytes, &m).unwrap();
        // The same info hash claimed for another manifest.
        let mut other = m.clone();
        other.source = "/dev/evil".into();
        let e = format!("{:#}", check(&b.bytes, &other).unwrap_err());
        assert!(
            e.contains("differs from the one the torrent's piece hashes"),
            "{e}"
        );
        // One flipped byte of the manifest's piece.
        let l = layout(&b.bytes).unwrap();
        let mut p = prefix(&m).unwrap();
        p[10] ^= 1;
        assert!(l.check_prefix(&p).is_err());
        // A torrent whose payload is another size.
        let mut big = m.clone();
        big.payload.size += 1;
        assert!(check(&b.bytes, &big).is_err());
    }

    /// The single-file torrent of `m`'s payload, as made before issue 21;
    /// sets `m`'s info hash to it.
    pub(crate) fn old_single_file(m: &mut Manifest, pieces: &[u8]) -> Vec<u8> {
        let info = TorrentMetaV1Info::<ByteBufOwned> {
            name: Some(b"payload.bin".to_vec().into()),
            pieces: pieces.to_vec().into(),
            piece_length: m.payload.piece_length,
            length: Some(m.payload.size),
            ..Default::default()
        };
        let mut info_bytes = Vec::new();
        bencode::bencode_serialize_to_writer(&info, &mut info_bytes).unwrap();
        let old = encode(&info_bytes, &["http://t/announce".into()]).unwrap();
        let mut h = sha1w::Sha1::new();
        h.update(&info_bytes);
        m.payload.info_hash = hex(&h.finish());
        old
    }

    #[test]
    fn an_old_single_file_torrent_converts_with_its_pieces_kept() {
        let (mut m, _, pieces) = sample(40000);
        let old = old_single_file(&mut m, &pieces);
        assert!(is_single_file(&old));
        let e = layout(&old).unwrap_err().to_string();
        assert!(e.contains("single-file"), "{e}");
        let (new_m, built) = convert(&old, &m).unwrap();
        assert_ne!(new_m.payload.info_hash, m.payload.info_hash);
        check(&built.bytes, &new_m).unwrap();
        let l = layout(&built.bytes).unwrap();
        assert_eq!(l.payload_pieces(), &pieces[..]);
        assert_eq!(l.trackers, vec!["http://t/announce".to_string()]);
    }

    #[test]
    fn an_integer_past_64_bits_is_an_error() {
        // Found by fuzzing (torrent): librqbit's bencode parser multiplied
        // past u64 and panicked (debug builds and tests check overflows).
        let (m, _, pieces) = sample(40000);
        let b = build(&m, pieces, &[]).unwrap().bytes;
        let text = String::from_utf8_lossy(&b).into_owned();
        let bad = text.replace("6:lengthi40000e", "6:lengthi99999999999999999999999e");
        assert_ne!(bad, text);
        let e = with_trackers(bad.as_bytes(), &[]).unwrap_err().to_string();
        assert!(e.contains("the torrent is corrupt"), "{e}");
    }
}
