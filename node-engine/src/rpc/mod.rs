//! The internal gRPC API between router, writer and readers (`proto/shoal_internal.proto`):
//! the generated messages and stubs ([`pb`]) and the status mapping both ways ([`status`]).
//! Shared by every role; imports no role. The catalogue version every message carries is the
//! metadata store's `commit_seq` (`crate::core::meta::MetaStore::catalog_version`).

pub mod status;

/// Messages and gRPC stubs generated from `proto/shoal_internal.proto` at build time.
#[allow(clippy::all, clippy::pedantic, clippy::unwrap_used, missing_docs)]
pub mod pb {
    tonic::include_proto!("shoal.internal.v1");
}

/// Reader hits rank by the core's one ranking rule ([`crate::core::merge`]).
impl crate::core::merge::Ranked for pb::Hit {
    fn id(&self) -> i64 {
        self.id
    }
    fn dist(&self) -> f32 {
        self.distance
    }
}
