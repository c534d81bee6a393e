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
    /// The torrent's bytes before the payload: the manifest as it carries
    /// it, padded to a piece boundary ([`torrent::prefix`]), proved by the
    /// torrent's piece hashes. Served from memory, never written to a disk.
    pub prefix: std::sync::Arc<[u8]>,
}

impl Image {
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = manifest::Manifest::load(&dir.join(manifest::MANIFEST_FILE))?;
        let tpath = dir.join(manifest::TORRENT_FILE);
        let torrent =
            std::fs::read(&tpath).with_context(|| format!("reading {}", tpath.display()))?;
        let prefix = torrent::check(&torrent, &manifest)
            .with_context(|| format!("{} does not match its manifest", tpath.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
            manifest,
            torrent,
            prefix: prefix.into(),
        })
    }

    /// An image made here (a capture): checked all the same.
    pub fn new(dir: PathBuf, manifest: manifest::Manifest, torrent: Vec<u8>) -> Result<Self> {
        let prefix = torrent::check(&torrent, &manifest)
            .context("the new torrent does not match its manifest (a bug)")?;
        Ok(Self {
            dir,
            manifest,
            torrent,
            prefix: prefix.into(),
        })
    }

    /// An image received over HTTP; `origin` names it in messages.
    pub fn from_bytes(origin: &str, manifest: &[u8], torrent: Vec<u8>) -> Result<Self> {
        let manifest = manifest::Manifest::parse(manifest)
            .with_context(|| format!("manifest from {origin}"))?;
        let prefix = torrent::check(&torrent, &manifest)
            .with_context(|| format!("the torrent from {origin} does not match its manifest"))?;
        Ok(Self {
            dir: PathBuf::from(origin),
            manifest,
            torrent,
            prefix: prefix.into(),
        })
    }

    /// The payload's piece hashes (the torrent's after the manifest's),
    /// indexed by payload piece.
    pub fn payload_hashes(&self) -> Result<Vec<u8>> {
        Ok(torrent::layout(&self.torrent)?.payload_pieces().to_vec())
    }

    /// The plain payload file, when the image was captured with `--store`.
    pub fn store_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.payload.file)
    }
}

/// Turns an image directory made before the torrent carried the manifest
/// (a single-file torrent) into the self-contained layout, once: the
/// payload's piece hashes are kept (nothing is read again), the torrent and
/// the manifest's info hash are rewritten. Returns the old and new info
/// hashes when it converted something.
pub fn upgrade(dir: &Path) -> Result<Option<(String, String)>> {
    let tpath = dir.join(manifest::TORRENT_FILE);
    let Ok(old) = std::fs::read(&tpath) else {
        return Ok(None);
    };
    let mpath = dir.join(manifest::MANIFEST_FILE);
    if !torrent::is_single_file(&old) {
        return finish_upgrade(&old, &mpath);
    }
    let m = manifest::Manifest::load(&mpath)?;
    let (new_m, built) =
        torrent::convert(&old, &m).with_context(|| format!("converting {}", tpath.display()))?;
    // The torrent first; a crash before the manifest is written is finished
    // by the next call ([`finish_upgrade`]).
    crate::util::write_atomic(&tpath, &built.bytes)?;
    new_m.save(&mpath)?;
    Ok(Some((m.payload.info_hash, new_m.payload.info_hash)))
}

/// A conversion cut short after the new torrent was written: the torrent
/// carries exactly this manifest (its piece hashes say so) but the manifest
/// still names the old info hash. Writes the torrent's into it.
fn finish_upgrade(torrent_bytes: &[u8], mpath: &Path) -> Result<Option<(String, String)>> {
    let Ok(m) = manifest::Manifest::load(mpath) else {
        return Ok(None);
    };
    let Ok(l) = torrent::layout(torrent_bytes) else {
        return Ok(None);
    };
    let new = torrent::hex(&l.info_hash);
    if m.payload.info_hash == new {
        return Ok(None);
    }
    let mut fixed = m.clone();
    fixed.payload.info_hash = new.clone();
    if torrent::check(torrent_bytes, &fixed).is_err() {
        return Ok(None);
    }
    fixed.save(mpath)?;
    Ok(Some((m.payload.info_hash, new)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_image_directory_is_converted_once_even_if_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, _, pieces) = torrent::tests::sample(40000);
        let old = torrent::tests::old_single_file(&mut m, &pieces);
        let (mpath, tpath) = (
            dir.path().join(manifest::MANIFEST_FILE),
            dir.path().join(manifest::TORRENT_FILE),
        );
        m.save(&mpath).unwrap();
        std::fs::write(&tpath, &old).unwrap();
        let e = format!("{:#}", Image::open(dir.path()).unwrap_err());
        assert!(e.contains("single-file"), "{e}");
        let (was, now) = upgrade(dir.path()).unwrap().unwrap();
        assert_eq!(was, m.payload.info_hash);
        let img = Image::open(dir.path()).unwrap();
        assert_eq!(img.manifest.payload.info_hash, now);
        assert_eq!(img.payload_hashes().unwrap(), pieces);
        assert!(upgrade(dir.path()).unwrap().is_none(), "converted twice");
        // Cut short after the torrent was written: the next call finishes.
        m.save(&mpath).unwrap();
        assert!(Image::open(dir.path()).is_err());
        assert_eq!(upgrade(dir.path()).unwrap(), Some((was, now.clone())));
        assert_eq!(
            Image::open(dir.path()).unwrap().manifest.payload.info_hash,
            now
        );
    }
}
