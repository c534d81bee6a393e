//! Checking a disk against an image: every piece read back and hashed.

use anyhow::{Result, bail};

use crate::image::Image;
use crate::image::table::TableKind;
use crate::image::torrent::{PayloadReader, device_reader, hash_payload};
use crate::storage::HEAD_LEN;
use sha1w::ISha1;

/// Indices of the pieces whose bytes, read through `read`, fail their hash.
pub fn bad_pieces(image: &Image, read: PayloadReader) -> Result<Vec<usize>> {
    let m = &image.manifest;
    let got = hash_payload(read, m.payload.size, m.payload.piece_length, None, &|_| {})?;
    let want = image.payload_hashes()?;
    let want = want.as_slice();
    Ok((0..m.payload.piece_count as usize)
        .filter(|&i| got[i * 20..i * 20 + 20] != want[i * 20..i * 20 + 20])
        .collect())
}

/// Indices among `pieces` (ascending) whose bytes, read through `read`,
/// fail their hash. All of them at once are hashed on every core.
pub fn bad_pieces_among(
    image: &Image,
    read: PayloadReader,
    pieces: &[usize],
) -> Result<Vec<usize>> {
    let m = &image.manifest;
    if pieces.len() as u64 == m.payload.piece_count {
        return bad_pieces(image, read);
    }
    let want = image.payload_hashes()?;
    let want = want.as_slice();
    let plen = u64::from(m.payload.piece_length);
    let mut buf = vec![0u8; m.payload.piece_length as usize];
    let mut bad = Vec::new();
    for &i in pieces {
        let off = i as u64 * plen;
        let buf = &mut buf[..plen.min(m.payload.size - off) as usize];
        read(off, buf)?;
        let mut h = sha1w::Sha1::new();
        h.update(buf);
        if h.finish()[..] != want[i * 20..i * 20 + 20] {
            bad.push(i);
        }
    }
    Ok(bad)
}

/// Checks a finished disk (`blockswarm verify`). On a GPT disk of another
/// size the table was refitted, so pieces within the first MiB may differ.
pub fn check_disk(image: &Image, disk: &crate::blockdev::Dev) -> Result<String> {
    let m = &image.manifest;
    let map = m.payload_map()?;
    if map.device_end() > disk.size {
        bail!("{} is smaller than the image's blocks", disk.path.display());
    }
    let read = device_reader(&disk.file, &map);
    let bad = bad_pieces(image, &read)?;
    let refitted = m.disk.table.kind == TableKind::Gpt && disk.size != m.disk.size;
    let plen = u64::from(m.payload.piece_length);
    // Payload bytes that map into the first MiB of the device.
    let head_payload: u64 = m
        .extents()
        .filter(|e| e.start < HEAD_LEN)
        .map(|e| e.len.min(HEAD_LEN - e.start))
        .sum();
    let (excused, real): (Vec<usize>, Vec<usize>) = bad
        .into_iter()
        .partition(|&i| refitted && (i as u64) * plen < head_payload);
    if let Some(first) = real.first() {
        bail!(
            "{}: {} of {} pieces differ from image {} (first: piece {first}, payload offset {})",
            disk.path.display(),
            real.len(),
            m.payload.piece_count,
            m.name,
            *first as u64 * plen
        );
    }
    Ok(format!(
        "{}: all {} pieces match image {}{}",
        disk.path.display(),
        m.payload.piece_count - excused.len() as u64,
        m.name,
        if excused.is_empty() {
            String::new()
        } else {
            format!(
                " ({} in the boot area differ: GPT refitted to this disk)",
                excused.len()
            )
        }
    ))
}
