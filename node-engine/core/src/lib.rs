//! `shoal-core`: the engine's types, distance kernels, indexes, filters, storage, WAL and
//! metadata. Its own crate so that the compiler holds the line: `Cargo.toml` lists no tonic,
//! axum, clap, kube or tower, so nothing network- or CLI-shaped can creep in. Every role and API
//! adapter of `shoal-engine` builds on this; this crate knows none of them.

pub mod bitset;
pub mod distance;
pub mod engine;
pub mod error;
pub mod filter;
pub mod index;
pub mod indexer;
pub mod merge;
pub mod meta;
pub mod storage;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod topk;
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
