//! Test services (Redis, MariaDB, JuiceFS, Azurite and an S3 server) started on loopback ports and cleaned up on drop.
//!
//! Every helper starts the real program, waits for a readiness condition (never a fixed
//! sleep), and cleans up in `Drop` so a panicking test leaves nothing running. Errors say what
//! is missing (`make deps`) instead of hanging.

pub mod juicefs;
pub mod mariadb;
pub mod objstore;
pub mod redis;
pub mod watchdog;

pub use juicefs::{JuiceFs, JuiceFsMount, juicefs_binary, require_fuse};
pub use objstore::{ObjectStoreKind, ObjectStoreServer};
pub use redis::{RedisOptions, RedisServer, free_port};
pub use watchdog::watchdog;

/// A test service could not be started.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    /// A required program is not installed or cannot run.
    #[error("{tool} is not usable: {detail} (run `make deps`)")]
    MissingTool { tool: &'static str, detail: String },
    /// A program started but never became ready.
    #[error("{what} did not become ready: {detail}")]
    NotReady { what: &'static str, detail: String },
    /// A helper command failed.
    #[error("{what} failed: {detail}")]
    CommandFailed { what: &'static str, detail: String },
    /// A local filesystem or socket operation failed.
    #[error("failed to {action}: {source}")]
    Io {
        action: &'static str,
        source: std::io::Error,
    },
}
