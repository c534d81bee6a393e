//! Byte extents of a disk, and positioned reads bounded to one region of it.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use anyhow::{Context, bail};

/// A run of bytes, `len > 0`, at `start` (relative to whatever the owner says).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Extent {
    pub start: u64,
    pub len: u64,
}

impl Extent {
    pub fn new(start: u64, len: u64) -> Self {
        Self { start, len }
    }
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Collects extents and normalizes them: sorted, merged, no empty runs.
#[derive(Debug, Default, Clone)]
pub struct ExtentSet {
    runs: Vec<Extent>,
    sorted: bool,
}

impl ExtentSet {
    pub fn new() -> Self {
        Self {
            runs: Vec::new(),
            sorted: true,
        }
    }

    /// Adds a run. Adjacent pushes in ascending order merge in place, so a
    /// bitmap walk stays compact without a later sort.
    pub fn push(&mut self, start: u64, len: u64) {
        if len == 0 {
            return;
        }
        if let Some(last) = self.runs.last_mut() {
            if last.end() == start {
                last.len += len;
                return;
            }
            if start < last.end() {
                self.sorted = false;
            }
        }
        self.runs.push(Extent { start, len });
    }

    /// Sorted, merged runs.
    pub fn into_vec(mut self) -> Vec<Extent> {
        if !self.sorted {
            self.runs.sort_unstable();
        }
        let mut out: Vec<Extent> = Vec::with_capacity(self.runs.len());
        for e in self.runs {
            match out.last_mut() {
                Some(last) if e.start <= last.end() => {
                    let end = last.end().max(e.end());
                    last.len = end - last.start;
                }
                _ => out.push(e),
            }
        }
        out
    }
}

/// Total bytes of a run list.
pub fn total_len(extents: &[Extent]) -> u64 {
    extents.iter().map(|e| e.len).sum()
}

/// A region of an open device or image file: positioned reads never leave it.
#[derive(Debug, Clone, Copy)]
pub struct DevSlice<'a> {
    file: &'a File,
    start: u64,
    len: u64,
}

impl<'a> DevSlice<'a> {
    pub fn new(file: &'a File, start: u64, len: u64) -> Self {
        Self { file, start, len }
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Offset of this region on the device.
    pub fn start(&self) -> u64 {
        self.start
    }
    pub fn file(&self) -> &'a File {
        self.file
    }

    /// Reads exactly `buf.len()` bytes at `off` within the region.
    pub fn read_at(&self, off: u64, buf: &mut [u8]) -> anyhow::Result<()> {
        let end = off.checked_add(buf.len() as u64);
        match end {
            Some(end) if end <= self.len => {}
            _ => bail!(
                "read of {} bytes at offset {off} is past the end of the region ({} bytes)",
                buf.len(),
                self.len
            ),
        }
        self.file
            .read_exact_at(buf, self.start + off)
            .with_context(|| {
                format!(
                    "reading {} bytes at device offset {}",
                    buf.len(),
                    self.start + off
                )
            })
    }

    /// Reads `len` bytes at `off` into a new buffer.
    pub fn read_vec(&self, off: u64, len: usize) -> anyhow::Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.read_at(off, &mut v)?;
        Ok(v)
    }

    /// A sub-region, checked to lie inside this one.
    pub fn sub(&self, off: u64, len: u64) -> anyhow::Result<DevSlice<'a>> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(DevSlice {
                file: self.file,
                start: self.start + off,
                len,
            }),
            _ => bail!(
                "region at {off}+{len} lies outside its parent of {} bytes",
                self.len
            ),
        }
    }

    /// A `Read + Seek` view, for parsers that want a stream.
    pub fn reader(&self) -> SliceReader<'a> {
        SliceReader {
            slice: *self,
            pos: 0,
        }
    }
}

/// A cursor over a [`DevSlice`]; reads past the end return EOF.
pub struct SliceReader<'a> {
    slice: DevSlice<'a>,
    pos: u64,
}

impl Read for SliceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.slice.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.slice
            .file
            .read_exact_at(&mut buf[..n], self.slice.start + self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for SliceReader<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.slice.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the region",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_merges_and_sorts() {
        let mut s = ExtentSet::new();
        s.push(0, 10);
        s.push(10, 5);
        s.push(100, 1);
        s.push(50, 60); // overlaps 100
        s.push(3, 0);
        assert_eq!(s.into_vec(), vec![Extent::new(0, 15), Extent::new(50, 60)]);
    }

    #[test]
    fn slice_bounds() {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &[7u8; 100]).unwrap();
        let s = DevSlice::new(&f, 10, 50);
        let mut b = [0u8; 10];
        s.read_at(40, &mut b).unwrap();
        let err = s.read_at(41, &mut b).unwrap_err().to_string();
        assert!(err.contains("past the end"), "{err}");
        assert!(s.sub(45, 10).is_err());
    }
}
