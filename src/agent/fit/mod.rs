//! Steps after imaging that fit the written disk to this PC, in order:
//! grow (then identity, hooks and the UEFI boot entry).
//!
//! They run once the image is written, read back and no longer seeded:
//! they change blocks of the image, which would then fail their hashes in
//! the swarm.

use anyhow::Result;

use super::target::Target;
use crate::protocol::{Grow, Job};

pub mod grow;

/// Whether `job` asks for any step here.
pub fn needed(job: &Job) -> bool {
    job.grow != Grow::None
}

pub fn run(target: &Target, job: &Job) -> Result<()> {
    grow::run(target, job.grow)?;
    Ok(())
}
