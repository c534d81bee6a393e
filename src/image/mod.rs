//! Images: partition tables, used-block maps, the manifest and the torrent.

pub mod capture;
pub mod extent;
pub mod fs;
pub mod grow;
pub mod manifest;
pub mod map;
pub mod table;
pub mod torrent;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// An image directory: manifest and torrent, checked against each other.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
    pub manifest: manifest::Manifest,
    pub torrent: Vec<u8>,
}

impl Image {
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = manifest::Manifest::load(&dir.join(manifest::MANIFEST_FILE))?;
        let tpath = dir.join(manifest::TORRENT_FILE);
        let torrent =
            std::fs::read(&tpath).with_context(|| format!("reading {}", tpath.display()))?;
        torrent::check(&torrent, &manifest)
            .with_context(|| format!("{} does not match its manifest", tpath.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
            manifest,
            torrent,
        })
    }

    /// An image received over HTTP; `origin` names it in messages.
    pub fn from_bytes(origin: &str, manifest: &[u8], torrent: Vec<u8>) -> Result<Self> {
        let manifest = manifest::Manifest::parse(manifest)
            .with_context(|| format!("manifest from {origin}"))?;
        torrent::check(&torrent, &manifest)
            .with_context(|| format!("the torrent from {origin} does not match its manifest"))?;
        Ok(Self {
            dir: PathBuf::from(origin),
            manifest,
            torrent,
        })
    }

    /// The plain payload file, when the image was captured with `--store`.
    pub fn store_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.payload.file)
    }
}

/// A human-readable summary of an image.
pub fn describe(image: &Image, out: &mut dyn std::io::Write) -> Result<()> {
    use crate::util::human_bytes;
    let m = &image.manifest;
    writeln!(out, "image       {} ({})", m.name, image.dir.display())?;
    writeln!(out, "made by     {} from {}", m.created_by, m.source)?;
    writeln!(
        out,
        "disk        {} ({:?} table, {}-byte sectors), needs a target of at least {}",
        human_bytes(m.disk.size),
        m.disk.table.kind,
        m.disk.sector_size,
        human_bytes(m.disk.min_target_size)
    )?;
    for r in &m.regions {
        writeln!(
            out,
            "  {:<8} at {:>14}  {:>10} of {:>10}  {:<8} {} extents{}",
            r.name,
            r.start,
            human_bytes(r.used_bytes),
            human_bytes(r.len),
            r.fs.as_ref().map_or("-".into(), |f| f.to_string()),
            r.extents.len(),
            r.warning
                .as_ref()
                .map_or(String::new(), |w| format!("  ({w})"))
        )?;
    }
    let p = &m.payload;
    writeln!(
        out,
        "payload     {} in {} pieces of {}{}",
        human_bytes(p.size),
        p.piece_count,
        human_bytes(p.piece_length.into()),
        if p.stored { ", stored" } else { "" }
    )?;
    writeln!(out, "info hash   {}", p.info_hash)?;
    Ok(())
}
