//! The engine core: types, distance kernels, indexes, filters, storage and metadata.
//! Must not depend on tonic, axum or kube: every role and API adapter builds on this.

pub mod bitset;
pub mod distance;
pub mod engine;
pub mod filter;
pub mod index;
pub mod indexer;
pub mod meta;
pub mod storage;
pub mod types;
