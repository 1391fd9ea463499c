//! The one classification of the core's errors: what a boundary (REST code, gRPC status, the
//! writer's and reader's answers) needs to know about a failure, so each boundary maps a kind
//! once instead of re-deciding per error type, and nothing is ever classified by matching its
//! message text.
//!
//! User errors (the request is at fault: the same request fails the same way; nothing
//! changed) and service errors (disk, WAL, metadata store, a newer writer: the request may
//! succeed later or on another process) are different kinds.

/// What kind of failure an error is. Every core error type says which with [`Classify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// User: the request is invalid (a parameter, a row, a dimension, a filter).
    InvalidRequest,
    /// User: the named collection does not exist.
    NotFound,
    /// User: the named collection already exists.
    AlreadyExists,
    /// User: the collection is released; load it first.
    NotLoaded,
    /// Service: a newer writer took over; this process must stop writing (nothing committed).
    Fenced,
    /// Service: storage, WAL, metadata store or a background task failed.
    Unavailable,
}

impl ErrorKind {
    /// Whether the request is at fault (the user can fix it), not the service.
    pub fn is_user(self) -> bool {
        match self {
            ErrorKind::InvalidRequest
            | ErrorKind::NotFound
            | ErrorKind::AlreadyExists
            | ErrorKind::NotLoaded => true,
            ErrorKind::Fenced | ErrorKind::Unavailable => false,
        }
    }
}

/// An error that knows its [`ErrorKind`]. Implementations match every variant (no catch-all),
/// so a new variant must be classified where it is declared.
pub trait Classify: std::error::Error {
    fn kind(&self) -> ErrorKind;
}
