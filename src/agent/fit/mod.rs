//! Fitting the imaged disk to this PC, once it is written and read back.
//! The steps run in this order; each logs what it did (the log reaches the
//! server with the status reports).
//! - bootentry: the UEFI firmware boot entry for the deployed ESP's loader.

use std::path::Path;

use tracing::warn;

use crate::image::Image;
use crate::protocol::JobResponse;

pub mod bootentry;

/// Runs the fitting steps on `disk`, just imaged with `image`.
pub fn run(job: &JobResponse, image: &Image, disk: &Path) -> anyhow::Result<()> {
    // Not a failure: the disk still boots through the firmware's fallback
    // path (\EFI\BOOT\BOOTX64.EFI) or its own entry for the disk.
    if let Err(e) = bootentry::run(&job.job, &image.manifest.disk.table, disk) {
        warn!("no UEFI boot entry for the deployed disk: {e:#}");
    }
    Ok(())
}
