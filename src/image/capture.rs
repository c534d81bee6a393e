//! `capture`: a disk's used blocks become an image directory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use tracing::{info, warn};

use super::extent::{DevSlice, Extent};
use super::fs;
use super::manifest::{self, Disk, Manifest, Payload, Region};
use super::table::{self, TableKind};
use super::torrent;
use crate::blockdev;
use crate::util::human_bytes;

pub const PAYLOAD_FILE: &str = "payload.bin";

#[derive(Debug, Clone)]
pub struct CaptureOptions {
    pub source: PathBuf,
    pub out: PathBuf,
    /// Also write the payload as a plain file in the image directory.
    pub store: bool,
    pub piece_length: Option<u32>,
    pub name: Option<String>,
    pub trackers: Vec<String>,
    /// Capture even when the source is mounted read-write.
    pub force: bool,
}

/// Maps the used blocks of a disk: partition table, then each file system.
pub fn map_disk(dev: &blockdev::Dev) -> Result<(table::PartitionTable, Vec<Region>)> {
    let t = table::read(&dev.file, dev.size, dev.sector_size)
        .with_context(|| format!("reading the partition table of {}", dev.path.display()))?;
    let disk = DevSlice::new(&dev.file, 0, dev.size);
    let mut regions = Vec::new();
    let whole = |name: String, start: u64, len: u64| Region {
        name,
        start,
        len,
        partition: None,
        fs: None,
        warning: None,
        used_bytes: len,
        extents: vec![Extent::new(start, len)],
    };
    if t.kind == TableKind::None {
        regions.push(fs_region("disk".into(), None, &disk)?);
    } else {
        let boot = t.boot_area_end().min(dev.size);
        regions.push(whole("boot".into(), 0, boot));
        for p in &t.partitions {
            if let Some(ebr) = p.ebr {
                regions.push(whole(format!("ebr{}", p.number), ebr, t.sector_size));
            }
            let part = disk.sub(p.start, p.size)?;
            let r = fs_region(format!("p{}", p.number), Some(p.number), &part)
                .with_context(|| format!("partition {}", p.number))?;
            regions.push(r);
        }
    }
    regions.sort_by_key(|r| r.start);
    Ok((t, regions))
}

fn fs_region(name: String, partition: Option<u32>, dev: &DevSlice) -> Result<Region> {
    let map = fs::used_map(dev)?;
    if let Some(w) = &map.warning {
        warn!("{name}: {w}");
    }
    let extents: Vec<Extent> = map
        .extents
        .iter()
        .map(|e| Extent::new(e.start + dev.start(), e.len))
        .collect();
    if let Some(e) = map.extents.last()
        && e.end() > dev.len()
    {
        bail!(
            "{name}: the {} map reaches byte {}, past the region's {} bytes",
            map.kind,
            e.end(),
            dev.len()
        );
    }
    Ok(Region {
        name,
        start: dev.start(),
        len: dev.len(),
        partition,
        fs: Some(map.kind),
        warning: map.warning,
        used_bytes: super::extent::total_len(&extents),
        extents,
    })
}

pub fn capture(opts: &CaptureOptions) -> Result<Manifest> {
    let t0 = Instant::now();
    let dev = blockdev::open_source(&opts.source)?;
    for m in blockdev::mounts(&dev)? {
        if m.read_write && !opts.force {
            bail!(
                "{} is mounted read-write at {}: its blocks may change while they are read; \
                 unmount it or remount it read-only (or pass --force)",
                opts.source.display(),
                m.mountpoint
            );
        }
    }
    let manifest_path = opts.out.join(manifest::MANIFEST_FILE);
    if manifest_path.exists() {
        bail!(
            "{} already holds an image; remove it or choose another --out",
            opts.out.display()
        );
    }
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;

    let store_tmp = opts.out.join(format!("{PAYLOAD_FILE}.partial"));
    let store = if opts.store {
        Some(
            std::fs::File::create(&store_tmp)
                .with_context(|| format!("creating {}", store_tmp.display()))?,
        )
    } else {
        None
    };
    let name = opts.name.clone().unwrap_or_else(|| default_name(&opts.out));
    let (m, torrent) = map_and_hash(
        &dev,
        &MapOptions {
            name,
            source: opts.source.display().to_string(),
            piece_length: opts.piece_length,
            trackers: opts.trackers.clone(),
        },
        store.as_ref(),
    )?;
    if let Some(f) = store {
        f.sync_all()?;
        std::fs::rename(&store_tmp, opts.out.join(PAYLOAD_FILE))?;
    }
    crate::util::write_atomic(&opts.out.join(manifest::TORRENT_FILE), &torrent)?;
    // The manifest last: its presence marks a complete image.
    m.save(&manifest_path)?;
    info!(
        "captured {} into {}: payload {}, {} pieces of {}, info hash {}, {:.1?}",
        opts.source.display(),
        opts.out.display(),
        human_bytes(m.payload.size),
        m.payload.piece_count,
        human_bytes(m.payload.piece_length.into()),
        m.payload.info_hash,
        t0.elapsed()
    );
    Ok(m)
}

/// What names an image made by [`map_and_hash`].
#[derive(Debug, Clone)]
pub struct MapOptions {
    pub name: String,
    /// Where it was captured from, as the manifest records it.
    pub source: String,
    pub piece_length: Option<u32>,
    pub trackers: Vec<String>,
}

/// Refuses a disk whose file systems are not safe to capture as they lie
/// (see [`fs::dirty`]), naming the partition and the reason.
pub fn check_clean(dev: &blockdev::Dev) -> Result<()> {
    let t = table::read(&dev.file, dev.size, dev.sector_size)
        .with_context(|| format!("reading the partition table of {}", dev.path.display()))?;
    let disk = DevSlice::new(&dev.file, 0, dev.size);
    let mut parts = Vec::new();
    if t.kind == TableKind::None {
        parts.push(("the disk".to_string(), disk.sub(0, dev.size)?));
    }
    for p in &t.partitions {
        parts.push((
            format!("partition {}", p.number),
            disk.sub(p.start, p.size)?,
        ));
    }
    for (what, slice) in parts {
        if let Some(why) = fs::dirty::why_dirty(&slice).with_context(|| what.clone())? {
            bail!(
                "{} cannot be captured as it is: {what}: {why}",
                dev.path.display()
            );
        }
    }
    Ok(())
}

/// The one way a disk becomes an image (`capture`, and the agent of a
/// network-booted master): refuses a dirty disk, maps its used blocks, and
/// hashes them into the torrent, also writing them to `store` when given.
/// Returns the manifest (`stored` as `store` says) and the torrent.
pub fn map_and_hash(
    dev: &blockdev::Dev,
    opts: &MapOptions,
    store: Option<&std::fs::File>,
) -> Result<(Manifest, Vec<u8>)> {
    let t0 = Instant::now();
    check_clean(dev)?;
    let (table, regions) = map_disk(dev)?;
    let map_time = t0.elapsed();
    let extents: Vec<Extent> = regions
        .iter()
        .flat_map(|r| r.extents.iter().copied())
        .collect();
    let map = super::map::PayloadMap::new(extents)?;
    let piece_length = opts
        .piece_length
        .unwrap_or_else(|| torrent::default_piece_length(map.len()));
    if piece_length < 16384 || !piece_length.is_power_of_two() {
        bail!("--piece-length {piece_length} must be a power of two of at least 16384");
    }
    info!(
        "{}: {} table, {} regions, {} used of {} (mapped in {:.2?})",
        dev.path.display(),
        format!("{:?}", table.kind).to_lowercase(),
        regions.len(),
        human_bytes(map.len()),
        human_bytes(dev.size),
        map_time
    );
    if let Some(f) = store {
        f.set_len(map.len())?;
    }
    let read = torrent::device_reader(&dev.file, &map);
    let progress = Progress::new(map.len());
    let pieces = torrent::hash_payload(&read, map.len(), piece_length, store, &|n| {
        progress.update(n)
    })
    .with_context(|| format!("reading the used blocks of {}", dev.path.display()))?;
    let mut m = Manifest {
        format: manifest::FORMAT.into(),
        version: manifest::VERSION,
        created_by: concat!("blockswarm ", env!("CARGO_PKG_VERSION")).into(),
        name: opts.name.clone(),
        source: opts.source.clone(),
        disk: Disk {
            size: dev.size,
            sector_size: dev.sector_size,
            min_target_size: table.min_disk_size(dev.size),
            table,
        },
        regions,
        payload: Payload {
            size: map.len(),
            piece_length,
            piece_count: map.len().div_ceil(u64::from(piece_length)),
            info_hash: String::new(),
            file: PAYLOAD_FILE.into(),
            stored: store.is_some(),
        },
    };
    let built = torrent::build(&m, pieces, &opts.trackers)?;
    m.payload.info_hash = torrent::hex(&built.info_hash);
    m.validate()
        .context("the new manifest is inconsistent (a bug)")?;
    Ok((m, built.bytes))
}

fn default_name(out: &Path) -> String {
    out.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into())
}

/// Logs reading progress about once a second.
struct Progress {
    total: u64,
    start: Instant,
    last_ms: std::sync::atomic::AtomicU64,
}

impl Progress {
    fn new(total: u64) -> Self {
        Self {
            total,
            start: Instant::now(),
            last_ms: Default::default(),
        }
    }

    fn update(&self, done: u64) {
        use std::sync::atomic::Ordering;
        let ms = self.start.elapsed().as_millis() as u64;
        let last = self.last_ms.load(Ordering::Relaxed);
        if ms < last + 1000
            || self
                .last_ms
                .compare_exchange(last, ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let rate = done as f64 / self.start.elapsed().as_secs_f64();
        info!(
            "read {} of {} ({:.0}%, {}/s, {:.0} s left)",
            human_bytes(done),
            human_bytes(self.total),
            100.0 * done as f64 / self.total.max(1) as f64,
            human_bytes(rate as u64),
            self.total.saturating_sub(done) as f64 / rate.max(1.0)
        );
    }
}
