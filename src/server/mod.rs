//! The boot server: seeding (and, later, HTTP, tracker and dashboard).

pub mod seed;
