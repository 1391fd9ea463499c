//! Shoal's search engine. `core` (the `shoal-core` crate, re-exported here under its old path)
//! is the storage/index/WAL/metadata heart with no network dependencies; the role and API
//! adapters live beside it.

pub use shoal_core as core;

pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod gpu;
pub mod memory;
pub mod probes;
pub mod roles;
pub mod rpc;
pub mod server;
