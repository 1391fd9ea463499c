//! Every way a CSI call can fail, and the one exhaustive mapping to the CSI spec's gRPC codes.
//!
//! Owns the [`CsiError`] enum and [`CsiError::code`]. Must not carry secret values: variants
//! that hold text from `juicefs` get it through a [`crate::secrets::Scrubber`] first, and
//! [`CsiError::into_status`] scrubs once more at the boundary.

use std::path::PathBuf;

use tonic::{Code, Status};

use crate::secrets::{ReadSecrets, Scrubber};

/// A failed CSI call.
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    /// A REQUIRED request field is absent or empty.
    #[error("{field} is required")]
    MissingField { field: &'static str },
    /// A field is present but its value is not acceptable.
    #[error("invalid {field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    /// The volume capability asks for something this driver cannot provide.
    #[error("unsupported volume capability: {reason}")]
    UnsupportedCapability { reason: String },
    /// The secrets are incomplete or malformed.
    #[error("invalid secrets: {0}")]
    Secrets(#[from] ReadSecrets),
    /// The requested capacity range cannot be honoured.
    #[error("capacity range not allowed: {reason}")]
    CapacityOutOfRange { reason: String },
    /// No volume with this id exists.
    #[error("volume {volume_id:?} not found")]
    VolumeNotFound { volume_id: String },
    /// A path named in the request does not exist (or holds no volume).
    #[error("path {path:?} not found")]
    PathNotFound { path: PathBuf },
    /// CreateVolume with a known name but different capacity or parameters.
    #[error("volume {name:?} already exists with a different capacity or parameters")]
    VolumeExistsIncompatible { name: String },
    /// The target is already published with a different read-only flag or source.
    #[error("target {target:?} is already published with incompatible settings")]
    TargetPublishedIncompatible { target: PathBuf },
    /// NodeUnstage while targets are still published.
    #[error("volume {volume_id:?} still has {published} published target(s); unpublish first")]
    StillPublished { volume_id: String, published: usize },
    /// NodePublish before NodeStage.
    #[error("volume {volume_id:?} is not staged at {staging:?}; call NodeStageVolume first")]
    NotStaged { volume_id: String, staging: PathBuf },
    /// The same staging path is in use by another volume.
    #[error("staging path {staging:?} is in use by volume {other:?}")]
    StagingPathInUse { staging: PathBuf, other: String },
    /// Another call on the same volume is in flight.
    #[error("an operation on volume {volume_id:?} is already in progress")]
    OperationInProgress { volume_id: String },
    /// The plugin cannot serve yet (no usable `juicefs`, unusable state dir).
    #[error("plugin not ready: {reason}")]
    NotReady { reason: String },
    /// `juicefs format` failed.
    #[error("juicefs format of {fs:?} failed: {detail}")]
    Format { fs: String, detail: String },
    /// `juicefs mount` failed or did not become ready.
    #[error("juicefs mount of {fs:?} at {path:?} failed: {detail}")]
    Mount {
        fs: String,
        path: PathBuf,
        detail: String,
    },
    /// `juicefs quota` failed.
    #[error("setting the quota of {path:?} failed: {detail}")]
    Quota { path: String, detail: String },
    /// A bind mount failed.
    #[error("bind mount {source_path:?} -> {target:?} failed: {source}")]
    Bind {
        source_path: PathBuf,
        target: PathBuf,
        source: std::io::Error,
    },
    /// An unmount failed.
    #[error("unmount of {path:?} failed: {source}")]
    Unmount {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A filesystem operation on a path failed.
    #[error("{action} {path:?} failed: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Reading or writing the state directory failed.
    #[error("state dir {path:?}: {detail}")]
    State { path: PathBuf, detail: String },
    /// A Kubernetes call of pod mount mode failed (Secret or mount pod).
    #[error(transparent)]
    MountPod(#[from] crate::mountpod::MountPodError),
}

impl CsiError {
    /// The CSI spec's gRPC code for this error. Exhaustive on purpose: a new variant must
    /// decide its code here.
    pub fn code(&self) -> Code {
        match self {
            CsiError::MissingField { .. }
            | CsiError::InvalidField { .. }
            | CsiError::UnsupportedCapability { .. }
            | CsiError::Secrets(_) => Code::InvalidArgument,
            CsiError::CapacityOutOfRange { .. } => Code::OutOfRange,
            CsiError::VolumeNotFound { .. } | CsiError::PathNotFound { .. } => Code::NotFound,
            CsiError::VolumeExistsIncompatible { .. }
            | CsiError::TargetPublishedIncompatible { .. } => Code::AlreadyExists,
            CsiError::StillPublished { .. }
            | CsiError::NotStaged { .. }
            | CsiError::StagingPathInUse { .. } => Code::FailedPrecondition,
            CsiError::OperationInProgress { .. } => Code::Aborted,
            CsiError::NotReady { .. } => Code::Unavailable,
            CsiError::Format { .. }
            | CsiError::Mount { .. }
            | CsiError::Quota { .. }
            | CsiError::Bind { .. }
            | CsiError::Unmount { .. }
            | CsiError::Io { .. }
            | CsiError::State { .. }
            | CsiError::MountPod(_) => Code::Internal,
        }
    }

    /// A short, stable label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            CsiError::MissingField { .. } => "missing_field",
            CsiError::InvalidField { .. } => "invalid_field",
            CsiError::UnsupportedCapability { .. } => "unsupported_capability",
            CsiError::Secrets(_) => "secrets",
            CsiError::CapacityOutOfRange { .. } => "capacity_out_of_range",
            CsiError::VolumeNotFound { .. } => "volume_not_found",
            CsiError::PathNotFound { .. } => "path_not_found",
            CsiError::VolumeExistsIncompatible { .. } => "volume_exists_incompatible",
            CsiError::TargetPublishedIncompatible { .. } => "target_incompatible",
            CsiError::StillPublished { .. } => "still_published",
            CsiError::NotStaged { .. } => "not_staged",
            CsiError::StagingPathInUse { .. } => "staging_in_use",
            CsiError::OperationInProgress { .. } => "in_progress",
            CsiError::NotReady { .. } => "not_ready",
            CsiError::Format { .. } => "format",
            CsiError::Mount { .. } => "mount",
            CsiError::Quota { .. } => "quota",
            CsiError::Bind { .. } => "bind",
            CsiError::Unmount { .. } => "unmount",
            CsiError::Io { .. } => "io",
            CsiError::State { .. } => "state",
            CsiError::MountPod(_) => "mount_pod",
        }
    }

    /// The gRPC status, message scrubbed of every secret value the call carried.
    pub fn into_status(self, scrubber: &Scrubber) -> Status {
        Status::new(self.code(), scrubber.scrub(&self.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_errors_and_service_errors_get_distinct_spec_codes() {
        let cases = [
            (
                CsiError::MissingField { field: "volume_id" },
                Code::InvalidArgument,
            ),
            (
                CsiError::CapacityOutOfRange { reason: "x".into() },
                Code::OutOfRange,
            ),
            (
                CsiError::VolumeNotFound {
                    volume_id: "v".into(),
                },
                Code::NotFound,
            ),
            (
                CsiError::VolumeExistsIncompatible { name: "v".into() },
                Code::AlreadyExists,
            ),
            (
                CsiError::StillPublished {
                    volume_id: "v".into(),
                    published: 1,
                },
                Code::FailedPrecondition,
            ),
            (
                CsiError::OperationInProgress {
                    volume_id: "v".into(),
                },
                Code::Aborted,
            ),
            (
                CsiError::Mount {
                    fs: "f".into(),
                    path: "/p".into(),
                    detail: "d".into(),
                },
                Code::Internal,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(e.code(), code, "{e}");
        }
    }

    #[test]
    fn status_message_is_scrubbed() {
        let s = Scrubber::new(["hunter2".to_string()]);
        let st = CsiError::Format {
            fs: "f".into(),
            detail: "auth hunter2 rejected".into(),
        }
        .into_status(&s);
        assert!(!st.message().contains("hunter2"));
        assert_eq!(st.code(), Code::Internal);
    }
}
