//! Shoal's search engine. `core` is the storage/index/WAL/metadata heart with no network
//! dependencies; the role and API adapters live beside it.

pub mod api;
pub mod config;
pub mod cluster;
pub mod core;
pub mod standalone;
pub mod bench;
pub mod gpu;
