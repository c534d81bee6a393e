//! Swarm storage over a raw device, a partition, or a plain payload file.
//!
//! The torrent has one file, the payload; a [`PayloadMap`] turns payload
//! offsets into device offsets, so nothing outside the used extents is ever
//! read or written, and no file is created or removed.
//!
//! Two behaviours serve the receiver:
//! - **Held head.** Payload bytes that land in the first [`HEAD_LEN`] bytes of
//!   the device (MBR, primary GPT, boot code, a bare file system's superblock)
//!   are kept in memory and written only by [`DeviceStorage::take_head`]'s
//!   caller, after the whole image is verified. A half-imaged disk never boots
//!   and never looks like a good one.
//! - **Flushed as it goes.** A target is flushed every [`FLUSH_BYTES`] or
//!   [`FLUSH_EVERY`]: a failing disk shows within seconds, and the error names
//!   the device ranges written since the last good flush (buffered writes
//!   fail at writeback, not at the write). The first I/O error is kept
//!   ([`DeviceStorage::io_error`]) so that the caller can tell a failing disk
//!   from a failing network.
//! - **No initial check on a fresh target.** A storage created with
//!   `fresh = true` holds nothing yet, so the swarm starts downloading at once
//!   instead of hashing garbage. With `fresh = false` (seed, resume,
//!   incremental re-imaging) every piece is checked first.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::image::map::PayloadMap;

/// Bytes at the start of a target that are held in memory until the end.
pub const HEAD_LEN: u64 = 1 << 20;
/// A target is flushed once this much was written since its last flush...
pub const FLUSH_BYTES: u64 = 64 << 20;
/// ... or this long after the first write since then.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);
/// Ranges named in a flush error at most (the span covers all of them).
const NAMED_RANGES: usize = 4;

#[derive(Clone)]
pub struct DeviceStorage {
    inner: Arc<Inner>,
    /// The torrent's bytes before the payload (see [`DeviceStorage::with_prefix`]).
    prefix: Option<Arc<Prefix>>,
}

/// The image's manifest and its pad, the torrent's first pieces: in
/// memory, never on the device.
struct Prefix {
    bytes: Mutex<Vec<u8>>,
    /// Known from the image, so present from the start; otherwise filled
    /// by the swarm (a server pulling an image from its torrent alone).
    known: bool,
}

struct Inner {
    file: Arc<File>,
    map: PayloadMap,
    writable: bool,
    /// Device bytes `[0, head.len())`, when held.
    head: Option<Mutex<Vec<u8>>>,
    /// `head.len()`, readable without the lock; 0 once taken.
    head_len: AtomicU64,
    fresh: bool,
    written: AtomicU64,
    unflushed: Mutex<Unflushed>,
    /// The first read, write or flush error of the device.
    io_error: Mutex<Option<String>>,
}

/// Device ranges written since the last flush, merged where they touch.
#[derive(Default)]
struct Unflushed {
    ranges: Vec<(u64, u64)>,
    bytes: u64,
    since: Option<Instant>,
}

impl Unflushed {
    fn add(&mut self, start: u64, len: u64) {
        self.bytes += len;
        self.since.get_or_insert_with(Instant::now);
        match self.ranges.last_mut() {
            Some((_, end)) if *end == start => *end += len,
            _ => self.ranges.push((start, start + len)),
        }
    }

    fn due(&self) -> bool {
        self.bytes >= FLUSH_BYTES || self.since.is_some_and(|t| t.elapsed() >= FLUSH_EVERY)
    }

    /// "device bytes 4096..8192, 1048576..2097152 and 3 more ranges (within 4096..9437184)".
    fn describe(&self) -> String {
        let mut r = self.ranges.clone();
        r.sort_unstable();
        let named: Vec<String> = r
            .iter()
            .take(NAMED_RANGES)
            .map(|(a, b)| format!("{a}..{b}"))
            .collect();
        let mut s = format!("device bytes {}", named.join(", "));
        if r.len() > NAMED_RANGES {
            let (lo, hi) = (r[0].0, r.iter().map(|x| x.1).max().unwrap_or(0));
            s.push_str(&format!(
                " and {} more ranges (all within {lo}..{hi})",
                r.len() - NAMED_RANGES
            ));
        }
        s
    }
}

impl DeviceStorage {
    /// A read-only storage, for seeding.
    pub fn reader(file: Arc<File>, map: PayloadMap) -> Self {
        Self::new(file, map, false, false)
    }

    /// A storage that writes to a target. `fresh` skips the initial check.
    pub fn writer(file: Arc<File>, map: PayloadMap, fresh: bool) -> Self {
        Self::new(file, map, true, fresh)
    }

    fn new(file: Arc<File>, map: PayloadMap, writable: bool, fresh: bool) -> Self {
        let head_len = if writable {
            HEAD_LEN.min(map.device_end())
        } else {
            0
        };
        let head = writable.then(|| Mutex::new(vec![0u8; head_len as usize]));
        Self {
            prefix: None,
            inner: Arc::new(Inner {
                file,
                map,
                writable,
                head,
                head_len: AtomicU64::new(head_len),
                fresh,
                written: AtomicU64::new(0),
                unflushed: Mutex::default(),
                io_error: Mutex::default(),
            }),
        }
    }

    /// Starts the held head from what the device holds (incremental runs).
    pub fn set_head(&self, bytes: &[u8]) {
        if let Some(h) = &self.inner.head {
            let mut h = h.lock().unwrap_or_else(|e| e.into_inner());
            let n = h.len().min(bytes.len());
            h[..n].copy_from_slice(&bytes[..n]);
        }
    }

    /// The held head of the device, to write last.
    pub fn take_head(&self) -> Option<Vec<u8>> {
        let head = self.inner.head.as_ref()?;
        Some(std::mem::take(
            &mut *head.lock().unwrap_or_else(|e| e.into_inner()),
        ))
    }

    /// Payload bytes written so far.
    pub fn written(&self) -> u64 {
        self.inner.written.load(Ordering::Relaxed)
    }

    /// Whether this storage writes (a target), or only reads (a seed's source).
    pub fn is_writable(&self) -> bool {
        self.inner.writable
    }

    /// Whether the target held nothing of the image when this was made.
    pub fn is_fresh(&self) -> bool {
        self.inner.fresh
    }

    /// Payload length in bytes.
    pub fn payload_len(&self) -> u64 {
        self.inner.map.len()
    }

    /// The first I/O error of the device, if any: the disk, not the swarm,
    /// failed.
    pub fn io_error(&self) -> Option<String> {
        self.inner
            .io_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn note_error<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.inner
                .io_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert_with(|| format!("{e:#}"));
        }
        r
    }

    /// Flushes the device's written bytes now. A failure names the device
    /// ranges written since the last good flush: one of them failed.
    pub fn flush(&self) -> Result<()> {
        let mut u = self
            .inner
            .unflushed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if u.bytes == 0 {
            return Ok(());
        }
        let r = self.inner.file.sync_data().map_err(|e| {
            anyhow::anyhow!(
                "the target failed to write {} ({} bytes written since its last flush): {e}",
                u.describe(),
                u.bytes
            )
        });
        if r.is_ok() {
            *u = Unflushed::default();
        }
        drop(u);
        self.note_error(r)
    }

    /// Reads payload bytes, from the held head or the device. With a
    /// prefix, offsets are the torrent's: the prefix first.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let (n, rest) = self.split_prefix(offset, buf.len());
        self.prefix_io(offset, n, |p| buf[..n].copy_from_slice(p));
        if n == buf.len() {
            return Ok(());
        }
        let r = self.read_inner(rest, &mut buf[n..]);
        self.note_error(r)
    }

    fn read_inner(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.io(offset, buf.len(), |dev_off, range, head| match head {
            Some(h) => {
                buf[range.clone()]
                    .copy_from_slice(&h[dev_off as usize..dev_off as usize + range.len()]);
                Ok(())
            }
            None => self
                .inner
                .file
                .read_exact_at(&mut buf[range.clone()], dev_off)
                .with_context(|| {
                    format!("reading {} bytes at device offset {dev_off}", range.len())
                }),
        })
    }

    /// Writes payload bytes: into the held head or onto the device; flushes
    /// the device when a flush is due.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        if !self.inner.writable {
            bail!("the seed's source is read-only");
        }
        let (n, rest) = self.split_prefix(offset, buf.len());
        self.prefix_io(offset, n, |p| p.copy_from_slice(&buf[..n]));
        let (offset, buf) = (rest, &buf[n..]);
        if buf.is_empty() {
            return Ok(());
        }
        let r = self.io(offset, buf.len(), |dev_off, range, head| match head {
            Some(h) => {
                h[dev_off as usize..dev_off as usize + range.len()].copy_from_slice(&buf[range]);
                Ok(())
            }
            None => {
                let len = range.len();
                self.inner
                    .file
                    .write_all_at(&buf[range], dev_off)
                    .with_context(|| format!("writing {len} bytes at device offset {dev_off}"))?;
                self.inner
                    .unflushed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .add(dev_off, len as u64);
                Ok(())
            }
        });
        self.note_error(r)?;
        self.inner
            .written
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        let due = self
            .inner
            .unflushed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .due();
        if due { self.flush() } else { Ok(()) }
    }

    /// The same storage behind the torrent's first bytes, `prefix` (the
    /// manifest and its pad, whole pieces): they are read from and written
    /// to memory, never the device. `known`: the prefix is the image's, so
    /// its pieces are checked even on a fresh target (see
    /// [`DeviceStorage::prefix_known`]).
    pub fn with_prefix(&self, prefix: Vec<u8>, known: bool) -> Self {
        Self {
            inner: self.inner.clone(),
            prefix: Some(Arc::new(Prefix {
                bytes: Mutex::new(prefix),
                known,
            })),
        }
    }

    /// Bytes of the prefix (0 without one).
    pub fn prefix_len(&self) -> u64 {
        self.prefix.as_ref().map_or(0, |p| {
            p.bytes.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
        })
    }

    /// Whether the prefix holds the image's bytes from the start.
    pub fn prefix_known(&self) -> bool {
        self.prefix.as_ref().is_some_and(|p| p.known)
    }

    /// The prefix's bytes as they are now.
    pub fn prefix(&self) -> Option<Vec<u8>> {
        let p = self.prefix.as_ref()?;
        Some(p.bytes.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// The torrent's length: prefix and payload.
    pub fn torrent_len(&self) -> u64 {
        self.prefix_len() + self.payload_len()
    }

    /// How many of `len` bytes at torrent offset `offset` lie in the prefix,
    /// and the payload offset of the rest.
    fn split_prefix(&self, offset: u64, len: usize) -> (usize, u64) {
        let p = self.prefix_len();
        if offset >= p {
            (0, offset - p)
        } else {
            (((p - offset) as usize).min(len), 0)
        }
    }

    /// Calls `f` on the prefix's `n` bytes at `offset` (see
    /// [`DeviceStorage::split_prefix`]).
    fn prefix_io(&self, offset: u64, n: usize, f: impl FnOnce(&mut [u8])) {
        if n == 0 {
            return;
        }
        if let Some(p) = &self.prefix {
            let mut b = p.bytes.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut b[offset as usize..offset as usize + n]);
        }
    }

    /// Walks the device segments of a payload range, splitting off the part
    /// that falls in the held head, and calls `f` for each. The head's lock
    /// is taken only for that part.
    fn io(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(u64, std::ops::Range<usize>, Option<&mut [u8]>) -> Result<()>,
    ) -> Result<()> {
        for seg in self.inner.map.segments(offset, len)? {
            let mut dev = seg.dev_offset;
            let mut b = seg.buf_offset;
            let end = seg.buf_offset + seg.len;
            if dev < self.inner.head_len.load(Ordering::Acquire)
                && let Some(head) = &self.inner.head
            {
                let mut g = head.lock().unwrap_or_else(|e| e.into_inner());
                // Re-checked under the lock: the head may have been taken.
                let head_len = g.len() as u64;
                if dev < head_len {
                    let n = ((head_len - dev) as usize).min(seg.len);
                    f(dev, b..b + n, Some(g.as_mut_slice()))?;
                    dev += n as u64;
                    b += n;
                }
            }
            if b < end {
                f(dev, b..end, None)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::extent::Extent;

    #[test]
    fn writes_only_mapped_bytes_and_holds_the_head() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[0xEE; 4 << 20], 0).unwrap();
        let map = PayloadMap::new(vec![
            Extent::new(512, 512),
            Extent::new((1 << 20) - 100, 200),
            Extent::new(3 << 20, 100),
        ])
        .unwrap();
        let s = DeviceStorage::writer(Arc::new(f.try_clone().unwrap()), map, true);
        assert!(s.is_fresh());
        s.write(0, &[1u8; 812]).unwrap();
        let mut back = [0u8; 812];
        s.read(0, &mut back).unwrap();
        assert_eq!(back, [1u8; 812]);
        let mut disk = vec![0u8; 4 << 20];
        f.read_exact_at(&mut disk, 0).unwrap();
        // Head bytes are not on disk yet; the rest is, and nothing else moved.
        assert!(disk[..1 << 20].iter().all(|&x| x == 0xEE));
        assert_eq!(&disk[1 << 20..(1 << 20) + 100], &[1u8; 100]);
        assert_eq!(&disk[3 << 20..(3 << 20) + 100], &[1u8; 100]);
        assert!(disk[(1 << 20) + 100..3 << 20].iter().all(|&x| x == 0xEE));
        let head = s.take_head().unwrap();
        assert_eq!(&head[512..1024], &[1u8; 512]);
        assert_eq!(&head[(1 << 20) - 100..], &[1u8; 100]);
        assert!(head[..512].iter().all(|&x| x == 0));
        assert!(s.read(800, &mut [0u8; 13]).is_err(), "past the payload");
    }

    #[test]
    fn a_failed_flush_names_what_was_written_since_the_last() {
        let mut u = Unflushed::default();
        u.add(4096, 4096);
        u.add(8192, 4096);
        u.add(1 << 20, 512);
        assert_eq!(u.describe(), "device bytes 4096..12288, 1048576..1049088");
        for i in 0..5 {
            u.add((10 + 2 * i) << 20, 512);
        }
        assert!(
            u.describe()
                .ends_with("and 3 more ranges (all within 4096..18874880)"),
            "{}",
            u.describe()
        );
        assert!(!u.due());
        u.add(100 << 20, FLUSH_BYTES);
        assert!(u.due());
    }

    #[test]
    fn the_prefix_lives_in_memory_and_shifts_the_payload() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4096).unwrap();
        let s = DeviceStorage::writer(
            Arc::new(f.try_clone().unwrap()),
            PayloadMap::identity(4096),
            true,
        );
        let t = s.with_prefix(vec![9u8; 100], true);
        assert!(t.prefix_known() && !s.prefix_known());
        assert_eq!((t.prefix_len(), t.torrent_len()), (100, 4196));
        // A write across the boundary: 50 bytes to memory, the rest to the
        // payload's offset 0 (the held head here).
        t.write(50, &[1u8; 150]).unwrap();
        assert_eq!(t.written(), 100, "only payload bytes count");
        let mut back = [0u8; 200];
        t.read(0, &mut back).unwrap();
        assert_eq!(&back[..50], &[9u8; 50]);
        assert_eq!(&back[50..200], &[1u8; 150]);
        let mut payload = [0u8; 100];
        s.read(0, &mut payload).unwrap();
        assert_eq!(payload, [1u8; 100], "the payload at its own offsets");
        assert_eq!(&t.prefix().unwrap()[50..], &[1u8; 50]);
        // Nothing of the prefix reached the device.
        let head = s.take_head().unwrap();
        assert_eq!(&head[..100], &[1u8; 100]);
        assert_eq!(&head[100..200], &[0u8; 100]);
    }

    #[test]
    fn reader_refuses_writes() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(1024).unwrap();
        let s = DeviceStorage::reader(Arc::new(f), PayloadMap::identity(1024));
        assert!(
            s.write(0, &[1])
                .unwrap_err()
                .to_string()
                .contains("read-only")
        );
    }
}
