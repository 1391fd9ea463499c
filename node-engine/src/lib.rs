//! Shoal's search engine. `core` is the storage/index/WAL/metadata heart with no network
//! dependencies; the role and API adapters live beside it.

pub mod core;
pub mod bench;
pub mod gpu;
