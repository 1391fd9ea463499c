//! The four roles of `shoal-engine`, siblings: each builds its process from the shared pieces
//! (`crate::server`, `crate::config`, `crate::rpc`, `crate::api`, `crate::gpu`) and the core,
//! and never imports another role.
//! - [`standalone`]: writer, reader and router in one process over SQLite and a local directory;
//! - [`writer`]: the cluster's single, fenced writer (its gRPC service and lease);
//! - [`reader`]: a read-only replica of the sealed segments answering `SearchShard`;
//! - [`router`]: the public API of a cluster, forwarding writes and fanning searches out.

pub mod reader;
pub mod router;
pub mod standalone;
pub mod writer;
