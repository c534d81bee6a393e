//! The deploy agent: target safety, writing, and the receive flow.

pub mod receive;
pub mod write;
