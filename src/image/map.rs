//! The payload map: payload byte offsets to device byte offsets.
//!
//! The payload is the concatenation of the used extents in device order.
//! Lookups are a binary search over the extents' payload starts.

use anyhow::{Result, bail};

use super::extent::Extent;

#[derive(Debug, Clone)]
pub struct PayloadMap {
    extents: Vec<Extent>,
    /// `payload_starts[i]` is where `extents[i]` begins in the payload.
    payload_starts: Vec<u64>,
    len: u64,
}

/// One contiguous piece of a payload range on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub dev_offset: u64,
    /// Offset into the caller's buffer.
    pub buf_offset: usize,
    pub len: usize,
}

impl PayloadMap {
    /// Extents must be sorted and not overlap.
    pub fn new(extents: Vec<Extent>) -> Result<Self> {
        let mut payload_starts = Vec::with_capacity(extents.len());
        let mut len = 0u64;
        let mut prev_end = 0u64;
        for (i, e) in extents.iter().enumerate() {
            if e.len == 0 {
                bail!("extent {i} is empty");
            }
            if i > 0 && e.start < prev_end {
                bail!(
                    "extent {i} at byte {} overlaps or precedes the one before it",
                    e.start
                );
            }
            let Some(end) = e.start.checked_add(e.len) else {
                bail!("extent {i} overflows");
            };
            prev_end = end;
            payload_starts.push(len);
            len += e.len;
        }
        Ok(Self {
            extents,
            payload_starts,
            len,
        })
    }

    /// The identity map of a plain payload file.
    pub fn identity(len: u64) -> Self {
        let extents = if len > 0 {
            vec![Extent::new(0, len)]
        } else {
            vec![]
        };
        Self::new(extents).expect("one extent is always valid")
    }

    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }
    /// One past the last mapped device byte.
    pub fn device_end(&self) -> u64 {
        self.extents.last().map(Extent::end).unwrap_or(0)
    }

    /// The payload ranges `(offset, len)` whose device bytes lie in
    /// `[dev_start, dev_end)`, in payload order.
    pub fn payload_ranges(&self, dev_start: u64, dev_end: u64) -> Vec<(u64, u64)> {
        let first = self.extents.partition_point(|e| e.end() <= dev_start);
        self.extents[first..]
            .iter()
            .zip(&self.payload_starts[first..])
            .take_while(|(e, _)| e.start < dev_end)
            .map(|(e, &p)| {
                let lo = e.start.max(dev_start);
                let hi = e.end().min(dev_end);
                (p + (lo - e.start), hi - lo)
            })
            .collect()
    }

    /// Splits the payload range `[offset, offset+len)` into device segments.
    pub fn segments(&self, offset: u64, len: usize) -> Result<Segments<'_>> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len => {}
            _ => bail!(
                "payload range {offset}+{len} is past the end of the payload ({} bytes)",
                self.len
            ),
        }
        let idx = self.payload_starts.partition_point(|&s| s <= offset);
        Ok(Segments {
            map: self,
            idx: idx.saturating_sub(1),
            offset,
            done: 0,
            len,
        })
    }
}

pub struct Segments<'a> {
    map: &'a PayloadMap,
    idx: usize,
    offset: u64,
    done: usize,
    len: usize,
}

impl Iterator for Segments<'_> {
    type Item = Segment;
    fn next(&mut self) -> Option<Segment> {
        if self.done >= self.len {
            return None;
        }
        let e = self.map.extents[self.idx];
        let pos = self.offset + self.done as u64;
        let within = pos - self.map.payload_starts[self.idx];
        let n = ((e.len - within) as usize).min(self.len - self.done);
        let seg = Segment {
            dev_offset: e.start + within,
            buf_offset: self.done,
            len: n,
        };
        self.done += n;
        self.idx += 1;
        Some(seg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_across_extents() {
        let m = PayloadMap::new(vec![
            Extent::new(100, 10),
            Extent::new(200, 5),
            Extent::new(300, 20),
        ])
        .unwrap();
        assert_eq!(m.len(), 35);
        let s: Vec<_> = m.segments(8, 10).unwrap().collect();
        assert_eq!(
            s,
            vec![
                Segment {
                    dev_offset: 108,
                    buf_offset: 0,
                    len: 2
                },
                Segment {
                    dev_offset: 200,
                    buf_offset: 2,
                    len: 5
                },
                Segment {
                    dev_offset: 300,
                    buf_offset: 7,
                    len: 3
                },
            ]
        );
        assert!(m.segments(30, 6).is_err());
        assert_eq!(m.segments(35, 0).unwrap().count(), 0);
    }

    #[test]
    fn device_ranges_back_to_payload() {
        let m = PayloadMap::new(vec![
            Extent::new(100, 10),
            Extent::new(200, 5),
            Extent::new(300, 20),
        ])
        .unwrap();
        assert_eq!(m.payload_ranges(0, 100), vec![]);
        assert_eq!(m.payload_ranges(105, 202), vec![(5, 5), (10, 2)]);
        assert_eq!(m.payload_ranges(310, 1000), vec![(25, 10)]);
        assert_eq!(m.payload_ranges(320, 1000), vec![]);
    }

    #[test]
    fn rejects_overlap() {
        assert!(PayloadMap::new(vec![Extent::new(0, 10), Extent::new(5, 10)]).is_err());
    }
}
