//! Storage: the WAL, sealed segment files, and the per-collection write/read sides built on
//! them. Depends on `core::{index, filter, meta}`; never on the network layers.

pub mod ann;
pub mod collection;
pub mod mapped;
pub mod segment;
pub mod wal;
