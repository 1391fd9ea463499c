//! The gRPC status mapping of the internal API, both ways, in one place: the writer's
//! "answered by me" mark on its errors, what a failed writer call says about the write it
//! carried, and a writer's or reader's status turned into the client's Milvus code.

use crate::api::error::{ApiError, code};
use tonic::Status;

/// gRPC metadata key on every error this service answers with. A caller that finds it knows
/// the writer received the request and answered (relay the code and message); an error without
/// it came from the transport (connection refused or broken, deadline), where the request's
/// outcome may be unknown.
pub const ANSWERED_BY: &str = "shoal-answered-by";

/// Mark `s` as the writer's own answer (see [`ANSWERED_BY`]).
pub fn answered(mut s: Status) -> Status {
    s.metadata_mut().insert(
        ANSWERED_BY,
        tonic::metadata::MetadataValue::from_static("writer"),
    );
    s
}

/// Whether `s` is the writer's own answer rather than a transport failure.
pub fn is_answer(s: &Status) -> bool {
    s.metadata().get(ANSWERED_BY).is_some()
}

/// An internal error for the client, saying what failed.
pub(crate) fn internal(what: impl std::fmt::Display) -> ApiError {
    ApiError::new(code::INTERNAL, format!("internal error: {what}"))
}

/// The one mapping from a writer's or reader's gRPC status to the client's Milvus code.
pub fn status_to_api(from: &str, s: &tonic::Status) -> ApiError {
    use tonic::Code;
    match s.code() {
        Code::NotFound => ApiError::new(code::COLLECTION_NOT_FOUND, s.message().to_string()),
        Code::AlreadyExists => ApiError::invalid("collectionName", s.message()),
        Code::InvalidArgument | Code::OutOfRange => {
            ApiError::new(code::INVALID_PARAMETER, s.message().to_string())
        }
        Code::Ok
        | Code::Cancelled
        | Code::Unknown
        | Code::DeadlineExceeded
        | Code::PermissionDenied
        | Code::ResourceExhausted
        | Code::FailedPrecondition
        | Code::Aborted
        | Code::Unimplemented
        | Code::Internal
        | Code::Unavailable
        | Code::DataLoss
        | Code::Unauthenticated => internal(format!("{from}: {}", s.message())),
    }
}

/// What a failed writer call says about the write it carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardFailure {
    /// No connection to the writer could be made (refused, unresolvable, connect timeout):
    /// the request never left the router, so sending it again is always safe.
    NotSent,
    /// The connection broke or the deadline passed with the request in flight: the writer may
    /// or may not have applied it.
    Unknown,
    /// The writer answered with an error: retrying would get the same answer.
    Answered,
}

/// Classify a failed writer call. An error the writer service answered with carries its
/// [`ANSWERED_BY`] mark: relayed as it is, whatever its code (a WAL
/// permission error is `Unavailable` too). For the rest, tonic turns connect failures into
/// `Unavailable` with the connector's message and keeps no source, so the message is what tells
/// a request never sent from one that broke in flight.
pub fn forward_failure(s: &tonic::Status) -> ForwardFailure {
    use tonic::Code;
    if is_answer(s) {
        return ForwardFailure::Answered;
    }
    let connect = {
        let m = s.message();
        ["tcp connect error", "tcp open error", "dns error"]
            .iter()
            .any(|p| m.contains(p))
    };
    match s.code() {
        Code::Unavailable if connect => ForwardFailure::NotSent,
        Code::Unavailable
        | Code::Cancelled
        | Code::Unknown
        | Code::DeadlineExceeded
        | Code::Internal
        | Code::DataLoss
        | Code::Aborted => ForwardFailure::Unknown,
        Code::Ok
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::ResourceExhausted
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Unauthenticated => ForwardFailure::Answered,
    }
}
