//! Cluster mode: one fenced writer, many readers and a router, talking gRPC to each other
//! (`proto/shoal_internal.proto`) over a shared data directory and a SQL metadata store.
//!
//! Pure building blocks live here and are unit-tested on their own:
//! - [`hrw`]: rendezvous hashing of segments onto readers, replication, failover order;
//! - [`merge`]: the global top-k merge for every metric;
//! - [`membership`]: reader discovery (static list, headless-Service DNS) and health states;
//! - [`lease`]: the writer lease and epoch fencing on the metadata store (SQLite or MySQL);
//! - [`fanout`]: the router's parallel `SearchShard` calls with failover to the next reader;
//! - [`catalog_sync`]: catalogue versions, `NotifySegments`, and flush waiting for readers;
//! - [`reader_service`]: the reader's gRPC service over a [`reader_service::ShardBackend`];
//! - [`writer_service`]: the writer's gRPC service, acknowledging only under a valid lease;
//! - [`router_backend`]: the router's REST backend (writes forwarded, reads fanned out, cached
//!   catalogue);
//! - [`startup`]: connecting to the metadata store at start-up, with backoff up to a deadline.
//!
//! The role processes built from these live in `crate::writer` (`shoal-engine writer`) and
//! `crate::reader` (`shoal-engine reader`). The catalogue version every message carries is the
//! metadata store's `commit_seq` (`crate::core::meta::MetaStore::catalog_version`).
//!
//! The storage core (`crate::core`) must not depend on this module; this module depends on it.

pub mod catalog_sync;
pub mod fanout;
pub mod hrw;
pub mod lease;
pub mod membership;
pub mod merge;
pub mod reader_service;
pub mod router_backend;
pub mod startup;
pub mod writer_service;

/// Messages and gRPC stubs generated from `proto/shoal_internal.proto` at build time.
#[allow(clippy::all, clippy::pedantic, clippy::unwrap_used, missing_docs)]
pub mod pb {
    tonic::include_proto!("shoal.internal.v1");
}
