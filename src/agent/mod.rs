//! The deploy agent: target safety, writing, and the receive flow.

pub mod client;
pub mod disks;
pub mod receive;
pub mod safety;
pub mod write;
