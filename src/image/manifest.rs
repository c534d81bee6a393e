//! The image manifest: a versioned, self-describing JSON document.
//!
//! Extents are stored as one flat array of numbers per region
//! (`[start, len, start, len, …]`), absolute device byte offsets, so that an
//! image with half a million extents stays a few MiB and loads fast.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::extent::Extent;
use super::fs::FsKind;
use super::map::PayloadMap;
use super::table::PartitionTable;

pub const FORMAT: &str = "blockswarm-image";
pub const VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";
pub const TORRENT_FILE: &str = "image.torrent";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// "blockswarm X.Y.Z".
    pub created_by: String,
    pub name: String,
    /// The path the image was captured from.
    pub source: String,
    pub disk: Disk,
    /// In device order.
    pub regions: Vec<Region>,
    pub payload: Payload,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub size: u64,
    pub sector_size: u64,
    /// A target smaller than this is refused.
    pub min_target_size: u64,
    pub table: PartitionTable,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// "boot", "ebr5", "p1", "disk".
    pub name: String,
    pub start: u64,
    pub len: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<FsKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    pub used_bytes: u64,
    #[serde(serialize_with = "ser_flat", deserialize_with = "de_flat")]
    pub extents: Vec<Extent>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Payload {
    pub size: u64,
    pub piece_length: u32,
    pub piece_count: u64,
    /// Hex SHA-1 of the torrent's info dictionary.
    pub info_hash: String,
    /// The payload's file name in the torrent, and in the store when stored.
    pub file: String,
    /// Whether `file` exists in the image directory.
    pub stored: bool,
}

fn ser_flat<S: Serializer>(v: &[Extent], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(v.len() * 2))?;
    for e in v {
        seq.serialize_element(&e.start)?;
        seq.serialize_element(&e.len)?;
    }
    seq.end()
}

fn de_flat<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Extent>, D::Error> {
    let flat = Vec::<u64>::deserialize(d)?;
    if flat.len() % 2 != 0 {
        return Err(serde::de::Error::custom(
            "extents must be pairs of start and length",
        ));
    }
    Ok(flat
        .chunks_exact(2)
        .map(|c| Extent::new(c[0], c[1]))
        .collect())
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&bytes).with_context(|| format!("{}", path.display()))
    }

    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let m: Manifest = serde_json::from_slice(bytes).context("not a valid manifest")?;
        m.validate().context("inconsistent manifest")?;
        Ok(m)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec(self)?;
        crate::util::write_atomic(path, &bytes)
    }

    /// All used extents, in device order.
    pub fn extents(&self) -> impl Iterator<Item = &Extent> {
        self.regions.iter().flat_map(|r| r.extents.iter())
    }

    pub fn payload_map(&self) -> Result<PayloadMap> {
        PayloadMap::new(self.extents().copied().collect())
    }

    /// Checks every invariant a reader relies on.
    pub fn validate(&self) -> Result<()> {
        if self.format != FORMAT {
            bail!("format is {:?}, expected {FORMAT:?}", self.format);
        }
        if self.version != VERSION {
            bail!(
                "manifest version {} is not supported (this build reads version {VERSION})",
                self.version
            );
        }
        let disk = &self.disk;
        if disk.sector_size < 512 || !disk.sector_size.is_power_of_two() {
            bail!("sector size {} is invalid", disk.sector_size);
        }
        if disk.min_target_size > disk.size {
            bail!(
                "min_target_size {} exceeds the disk size {}",
                disk.min_target_size,
                disk.size
            );
        }
        let mut prev_end = 0u64;
        let mut total = 0u64;
        for r in &self.regions {
            let Some(rend) = r.start.checked_add(r.len) else {
                bail!("region {} overflows", r.name);
            };
            if rend > disk.size {
                bail!(
                    "region {} ends at {rend}, past the disk's {} bytes",
                    r.name,
                    disk.size
                );
            }
            let mut used = 0u64;
            for e in &r.extents {
                let end = e.start.checked_add(e.len);
                if e.len == 0 || e.start < r.start || end.is_none_or(|end| end > rend) {
                    bail!(
                        "region {}: extent {}+{} lies outside the region",
                        r.name,
                        e.start,
                        e.len
                    );
                }
                if e.start < prev_end {
                    bail!(
                        "region {}: extent at {} is out of order or overlaps",
                        r.name,
                        e.start
                    );
                }
                prev_end = e.start + e.len;
                used += e.len;
            }
            if used != r.used_bytes {
                bail!(
                    "region {}: extents add up to {used} bytes, not {}",
                    r.name,
                    r.used_bytes
                );
            }
            total += used;
        }
        let p = &self.payload;
        if total != p.size {
            bail!(
                "extents add up to {total} bytes but the payload is {} bytes",
                p.size
            );
        }
        if p.piece_length < 16384 || !p.piece_length.is_power_of_two() {
            bail!(
                "piece length {} is not a power of two of at least 16 KiB",
                p.piece_length
            );
        }
        if p.piece_count != p.size.div_ceil(u64::from(p.piece_length)) {
            bail!(
                "piece count {} does not match the payload size",
                p.piece_count
            );
        }
        if p.file.is_empty() || p.file.contains('/') || p.file.starts_with('.') {
            bail!("payload file name {:?} is not a plain file name", p.file);
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::image::table::TableKind;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            created_by: "test".into(),
            name: "t".into(),
            source: "/dev/null".into(),
            disk: Disk {
                size: 1 << 20,
                sector_size: 512,
                min_target_size: 1 << 20,
                table: PartitionTable {
                    kind: TableKind::None,
                    sector_size: 512,
                    partitions: vec![],
                },
            },
            regions: vec![Region {
                name: "disk".into(),
                start: 0,
                len: 1 << 20,
                partition: None,
                fs: Some(FsKind::Ext4),
                warning: None,
                used_bytes: 8192,
                extents: vec![Extent::new(0, 4096), Extent::new(65536, 4096)],
            }],
            payload: Payload {
                size: 8192,
                piece_length: 16384,
                piece_count: 1,
                info_hash: "00".repeat(20),
                file: "payload.bin".into(),
                stored: false,
            },
        }
    }

    #[test]
    fn roundtrip_and_flat_extents() {
        let m = sample();
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"extents\":[0,4096,65536,4096]"), "{json}");
        let back: Manifest = serde_json::from_str(&json).unwrap();
        back.validate().unwrap();
        assert_eq!(back.regions[0].extents, m.regions[0].extents);
    }

    #[test]
    fn rejects_inconsistencies() {
        let mut m = sample();
        m.payload.size = 4096;
        assert!(m.validate().unwrap_err().to_string().contains("add up"));
        let mut m = sample();
        m.regions[0].extents[1].start = 2048;
        assert!(m.validate().unwrap_err().to_string().contains("overlaps"));
        let mut m = sample();
        m.version = 99;
        assert!(
            m.validate()
                .unwrap_err()
                .to_string()
                .contains("not supported")
        );
        let mut m = sample();
        m.payload.file = "../etc/passwd".into();
        assert!(m.validate().is_err());
    }

    #[test]
    fn loads_500k_extents_fast() {
        let mut m = sample();
        m.disk.size = 1 << 40;
        m.disk.min_target_size = 1 << 40;
        m.regions[0].len = 1 << 40;
        m.regions[0].extents = (0..500_000u64)
            .map(|i| Extent::new(i * 1_048_576, 4096))
            .collect();
        m.regions[0].used_bytes = 500_000 * 4096;
        m.payload.size = 500_000 * 4096;
        m.payload.piece_count = m.payload.size.div_ceil(16384);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(MANIFEST_FILE);
        m.save(&p).unwrap();
        let t = std::time::Instant::now();
        let back = Manifest::load(&p).unwrap();
        back.payload_map().unwrap();
        let took = t.elapsed();
        // Debug builds are ~10x slower than release; the bar is 1 s in release.
        assert!(
            took.as_secs_f64() < if cfg!(debug_assertions) { 5.0 } else { 1.0 },
            "{took:?}"
        );
    }
}
