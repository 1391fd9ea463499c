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

/// An error and its whole `source()` chain as one line (`outer: inner: root`), for messages
/// and logs that must say why without a Debug dump.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
