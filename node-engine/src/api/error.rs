//! Milvus REST error codes and the one exhaustive mapping from engine errors to them. Every
//! [`ApiError`] keeps the core's [`ErrorKind`] of what caused it, so a layer that relays it (the
//! writer answering a shared REST handler's error over gRPC) classifies by kind, never by text.

use crate::core::engine::EngineError;
use crate::core::error::{Classify, ErrorKind};
use crate::core::error_chain as chain;
use crate::core::meta::MetaError;
use crate::core::storage::collection::CollectionError;
use axum::http::StatusCode;

/// Milvus codes used by the REST layer.
pub mod code {
    pub const COLLECTION_NOT_FOUND: i32 = 100;
    pub const COLLECTION_NOT_LOADED: i32 = 101;
    pub const INVALID_PARAMETER: i32 = 1100;
    pub const AUTH_FAILED: i32 = 1800;
    pub const BAD_JSON: i32 = 1801;
    pub const MISSING_PARAMETER: i32 = 1802;
    pub const BAD_INSERT_ROW: i32 = 1804;
    pub const INTERNAL: i32 = 65535;
}

/// An error as the client sees it: `{"code": N, "message": "..."}` with an HTTP status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: i32,
    pub message: String,
    /// What kind of failure this is: the core error's own kind when one caused it, else the
    /// kind the code stands for ([`kind_of_code`]).
    pub kind: ErrorKind,
}

/// The kind a Milvus code stands for when no core error says more.
pub fn kind_of_code(c: i32) -> ErrorKind {
    match c {
        code::COLLECTION_NOT_FOUND => ErrorKind::NotFound,
        code::COLLECTION_NOT_LOADED => ErrorKind::NotLoaded,
        code::INTERNAL => ErrorKind::Unavailable,
        // Every other code (1100, 1800-1804) is a request the user must fix.
        _ => ErrorKind::InvalidRequest,
    }
}

impl ApiError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::OK,
            code,
            message: message.into(),
            kind: kind_of_code(code),
        }
    }
    pub fn invalid(field: &str, reason: impl std::fmt::Display) -> Self {
        Self::new(
            code::INVALID_PARAMETER,
            format!("invalid parameter {field}: {reason}"),
        )
    }
    pub fn missing(field: &str) -> Self {
        Self::new(
            code::MISSING_PARAMETER,
            format!("missing required parameter {field}"),
        )
    }
    pub fn bad_row(row: usize, reason: impl std::fmt::Display) -> Self {
        Self::new(code::BAD_INSERT_ROW, format!("invalid row {row}: {reason}"))
    }
    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: code::AUTH_FAILED,
            message: "authentication failed: missing or wrong token".into(),
            kind: ErrorKind::InvalidRequest,
        }
    }
    pub(crate) fn internal(what: impl std::fmt::Display) -> Self {
        Self::new(code::INTERNAL, format!("internal error: {what}"))
    }
    /// Label for metrics (never a Debug string).
    /// The same error, classified as `kind` (the core error that caused it).
    pub fn with_kind(mut self, kind: ErrorKind) -> Self {
        self.kind = kind;
        self
    }
    pub fn category(&self) -> &'static str {
        match self.code {
            code::COLLECTION_NOT_FOUND => "collection_not_found",
            code::COLLECTION_NOT_LOADED => "collection_not_loaded",
            code::INVALID_PARAMETER => "invalid_parameter",
            code::AUTH_FAILED => "auth_failed",
            code::BAD_JSON => "bad_json",
            code::MISSING_PARAMETER => "missing_parameter",
            code::BAD_INSERT_ROW => "bad_insert_row",
            _ => "internal",
        }
    }
}

impl From<CollectionError> for ApiError {
    fn from(e: CollectionError) -> Self {
        let kind = e.kind();
        let api = match &e {
            CollectionError::InvalidRow { row, reason } => ApiError::bad_row(*row, reason),
            CollectionError::InvalidParam { name, reason } => ApiError::invalid(name, reason),
            CollectionError::NotLoaded(name) => ApiError::new(
                code::COLLECTION_NOT_LOADED,
                format!("collection {name:?} is not loaded; call collections/load"),
            ),
            CollectionError::Index(crate::core::index::IndexError::InvalidParam {
                name,
                reason,
            }) => ApiError::invalid(name, reason),
            CollectionError::Index(crate::core::index::IndexError::DimensionMismatch {
                expected,
                got,
            }) => ApiError::invalid(
                "data",
                format!("query length {got} is not a multiple of dimension {expected}"),
            ),
            CollectionError::Index(
                crate::core::index::IndexError::Corrupt { .. }
                | crate::core::index::IndexError::Io { .. },
            )
            | CollectionError::Wal(_)
            | CollectionError::Segment(_)
            | CollectionError::Meta(_)
            | CollectionError::WriterStopped
            | CollectionError::Task(_) => ApiError::internal(chain(&e)),
        };
        api.with_kind(kind)
    }
}

impl From<MetaError> for ApiError {
    fn from(e: MetaError) -> Self {
        let kind = e.kind();
        let api = match &e {
            MetaError::Connect { .. }
            | MetaError::Migrate { .. }
            | MetaError::Query { .. }
            | MetaError::UnsupportedUrl(_)
            | MetaError::Fenced { .. } => ApiError::internal(chain(&e)),
        };
        api.with_kind(kind)
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let kind = e.kind();
        let api = match e {
            EngineError::CollectionNotFound(name) => ApiError::new(
                code::COLLECTION_NOT_FOUND,
                format!("collection not found: {name}"),
            ),
            EngineError::CollectionExists(name) => ApiError::invalid(
                "collectionName",
                format!("collection {name:?} already exists"),
            ),
            EngineError::InvalidParam { name, reason } => ApiError::invalid(&name, reason),
            EngineError::Io { .. } => ApiError::internal(chain(&e)),
            EngineError::Meta(m) => m.into(),
            EngineError::Collection(c) => c.into(),
        };
        api.with_kind(kind)
    }
}
