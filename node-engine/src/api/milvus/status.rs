//! The one mapping from the API's errors ([`ApiError`], Milvus REST codes) to Milvus gRPC
//! statuses: the 2.3+ `code` (merr numbering, what pymilvus's `MilvusException.code` shows) and
//! the legacy `error_code` that older SDKs still test.

use super::pb::common::{ErrorCode, Status};
use crate::api::error::{ApiError, code};

/// merr's "collection not found".
const MERR_COLLECTION_NOT_FOUND: i32 = 100;
/// merr's "collection not loaded".
const MERR_COLLECTION_NOT_LOADED: i32 = 101;
/// merr's "invalid parameter".
pub const MERR_PARAMETER_INVALID: i32 = 1100;
/// merr's "missing parameter".
const MERR_PARAMETER_MISSING: i32 = 1101;
/// merr's "index not found" (pymilvus's `describe_index` reads it as "no index").
pub const MERR_INDEX_NOT_FOUND: i32 = 700;
/// merr's "service unimplemented": the code of every "not supported by Shoal" answer.
pub const NOT_SUPPORTED_CODE: i32 = 10;
/// merr's "unexpected error".
const MERR_UNEXPECTED: i32 = 65535;

pub fn ok() -> Status {
    Status::default()
}

/// A failed status with Milvus code `code` and legacy code `legacy`.
pub fn failed(legacy: ErrorCode, code: i32, reason: impl Into<String>) -> Status {
    Status {
        error_code: legacy as i32,
        reason: reason.into(),
        code,
        ..Status::default()
    }
}

/// 1100: an argument the user can fix.
pub fn invalid(reason: impl Into<String>) -> Status {
    failed(ErrorCode::IllegalArgument, MERR_PARAMETER_INVALID, reason)
}

/// Shoal does not serve `what` (an RPC or an option of one).
pub fn not_supported(what: &str) -> Status {
    failed(
        ErrorCode::UnexpectedError,
        NOT_SUPPORTED_CODE,
        format!("{what} is not supported by Shoal (see the README's Milvus compatibility table)"),
    )
}

/// The Milvus status of an API error. Exhaustive over the codes the API produces; an unknown
/// code is reported as unexpected with its number kept in the text.
pub fn status_of(e: &ApiError) -> Status {
    let (legacy, merr) = match e.code {
        code::COLLECTION_NOT_FOUND => (ErrorCode::CollectionNotExists, MERR_COLLECTION_NOT_FOUND),
        code::COLLECTION_NOT_LOADED => (ErrorCode::UnexpectedError, MERR_COLLECTION_NOT_LOADED),
        code::INVALID_PARAMETER | code::BAD_JSON => {
            (ErrorCode::IllegalArgument, MERR_PARAMETER_INVALID)
        }
        code::MISSING_PARAMETER => (ErrorCode::IllegalArgument, MERR_PARAMETER_MISSING),
        code::BAD_INSERT_ROW => (ErrorCode::IllegalRowRecord, MERR_PARAMETER_INVALID),
        code::AUTH_FAILED => (ErrorCode::UnexpectedError, code::AUTH_FAILED),
        code::INTERNAL => (ErrorCode::UnexpectedError, MERR_UNEXPECTED),
        other => {
            return failed(
                ErrorCode::UnexpectedError,
                MERR_UNEXPECTED,
                format!("{} (Shoal code {other})", e.message),
            );
        }
    };
    failed(legacy, merr, e.message.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_map_to_milvus_codes_with_their_text() {
        let s = status_of(&ApiError::new(
            code::COLLECTION_NOT_FOUND,
            "collection not found: x",
        ));
        assert_eq!(
            (s.code, s.error_code),
            (100, ErrorCode::CollectionNotExists as i32)
        );
        assert_eq!(s.reason, "collection not found: x");
        let s = status_of(&ApiError::invalid("dim", "bad"));
        assert_eq!(
            (s.code, s.error_code),
            (1100, ErrorCode::IllegalArgument as i32)
        );
        let s = status_of(&ApiError::missing("x"));
        assert_eq!(s.code, 1101);
        assert_eq!(status_of(&ApiError::internal("disk")).code, 65535);
        let s = not_supported("CreateAlias");
        assert_eq!(s.code, NOT_SUPPORTED_CODE);
        assert!(s.reason.contains("CreateAlias is not supported by Shoal"));
        assert_eq!(ok().code, 0);
    }
}
