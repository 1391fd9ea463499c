//! Start-up of the cluster roles (writer, reader, router) against the metadata store: on a fresh
//! Kubernetes cluster the managed MariaDB's Service name may not resolve yet, or the server may
//! not accept its user yet, when the engine pods start. Every role retries with backoff until a
//! start-up deadline (`--meta-startup-timeout`), logs each failed attempt once with its cause,
//! and reports it as the `/readyz` reason meanwhile; only then does it exit with the last cause.
//!
//! Owns the retry policy; the connection itself is [`MetaStore`]'s.

use crate::core::error_chain as chain;
use crate::core::meta::{MetaError, MetaStore, redact};
use crate::server::lifecycle::Lifecycle;
use std::time::Duration;
use tokio::time::Instant;

/// First and longest pause between two connection attempts.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The least time one attempt gets, also when the deadline is (nearly) reached.
const LAST_ATTEMPT: Duration = Duration::from_secs(1);

/// What a role does to the store when it connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaAccess {
    /// Connect only (reader, router: they never change the schema).
    ReadOnly,
    /// Connect and migrate the schema (the writer).
    Migrate,
}

/// The metadata store could not be reached before the start-up deadline.
#[derive(Debug, thiserror::Error)]
#[error(
    "metadata store {url} unreachable: gave up after {attempts} attempts in {waited:?} (start-up deadline {deadline:?})"
)]
pub struct MetaStartupError {
    pub url: String,
    pub attempts: u32,
    pub waited: Duration,
    pub deadline: Duration,
    #[source]
    pub source: MetaError,
}

/// Whether another attempt can succeed: a bad URL never will; connection, migration and query
/// failures are what a store that is still starting (or not resolvable yet) answers.
fn retryable(e: &MetaError) -> bool {
    match e {
        MetaError::UnsupportedUrl(_) => false,
        MetaError::Connect { .. }
        | MetaError::Migrate { .. }
        | MetaError::Query { .. }
        | MetaError::Fenced { .. } => true,
    }
}

/// Connect to the store at `url`, retrying with backoff for at most `deadline` (each attempt
/// is cut at the deadline too). While it waits, `life`'s `/readyz` says why.
///
/// Errors: [`MetaStartupError`] with the last attempt's cause, at once for a URL no attempt
/// can succeed with.
pub async fn connect_meta(
    url: &str,
    access: MetaAccess,
    deadline: Duration,
    life: &Lifecycle,
) -> Result<MetaStore, MetaStartupError> {
    let started = Instant::now();
    let give_up = started + deadline;
    let mut backoff = FIRST_BACKOFF;
    let mut attempts = 0;
    life.set_starting(format!("connecting to the metadata store {}", redact(url)));
    let mut last: Option<MetaError> = None;
    loop {
        attempts += 1;
        let attempt = async {
            match access {
                MetaAccess::ReadOnly => MetaStore::connect_read_only(url).await,
                MetaAccess::Migrate => MetaStore::connect(url).await,
            }
        };
        // Bounded, also against a resolver that hangs; the last attempt may run a little past
        // the deadline so that its real cause is what gets reported.
        let budget = give_up
            .saturating_duration_since(Instant::now())
            .max(LAST_ATTEMPT);
        let cause = match tokio::time::timeout(budget, attempt).await {
            Ok(Ok(store)) => {
                if attempts > 1 {
                    tracing::info!(attempts, waited = ?started.elapsed(), "metadata store reachable");
                }
                return Ok(store);
            }
            Ok(Err(e)) => {
                let cause = chain(&e);
                let stop = !retryable(&e);
                last = Some(e);
                if stop {
                    break;
                }
                cause
            }
            Err(_) => format!("no answer within {budget:?}"),
        };
        let now = Instant::now();
        if now >= give_up {
            break;
        }
        let pause = backoff.min(give_up - now);
        tracing::warn!(attempt = attempts, error = %cause, retry_in = ?pause,
            left = ?(give_up - now), "metadata store not reachable yet; retrying");
        life.set_starting(format!(
            "metadata store not reachable yet (attempt {attempts}): {cause}"
        ));
        tokio::time::sleep(pause).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    Err(MetaStartupError {
        url: redact(url),
        attempts,
        waited: started.elapsed(),
        deadline,
        // Every attempt timed out: say so as a connection failure.
        source: last.unwrap_or_else(|| MetaError::Connect {
            url: redact(url),
            source: sqlx::Error::PoolTimedOut,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_metadata_url_no_attempt_can_succeed_with_fails_at_once() {
        let life = Lifecycle::default();
        let t = Instant::now();
        let e = connect_meta(
            "postgres://x/y",
            MetaAccess::ReadOnly,
            Duration::from_secs(30),
            &life,
        )
        .await
        .expect_err("an unsupported URL");
        assert_eq!(e.attempts, 1);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn an_unreachable_store_is_retried_until_the_deadline_with_the_cause_in_readyz() {
        // A loopback port nothing listens on (sqlx itself retries a refused connection, so one
        // attempt may take the whole deadline).
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("probe socket");
            l.local_addr().expect("addr").port()
        };
        let url = format!("mysql://u:secret@127.0.0.1:{port}/shoal");
        let life = Lifecycle::starting("booting");
        let e = connect_meta(&url, MetaAccess::ReadOnly, Duration::from_secs(2), &life)
            .await
            .expect_err("nothing listens");
        assert!(e.attempts >= 1, "{e}");
        assert!(
            e.waited >= Duration::from_millis(1500) && e.waited <= Duration::from_secs(3),
            "{e}"
        );
        let msg = chain(&e);
        assert!(msg.contains("gave up after"), "{msg}");
        assert!(!msg.contains("secret"), "{msg}");
        assert!(
            life.starting_reason().contains("metadata store"),
            "{}",
            life.starting_reason()
        );
        assert!(!life.starting_reason().contains("secret"));
    }
}
