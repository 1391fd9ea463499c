//! The single-writer lease and epoch fencing, expressed against the metadata store (SQLite or
//! MySQL/MariaDB through the same `sqlx::Any` code).
//!
//! One row (`shoal_writer_lease`, id 1) holds the current holder, its epoch and its expiry.
//! - Taking the lease is one compare-and-set `UPDATE` that bumps the epoch; it succeeds only
//!   when the lease is free, expired, or already ours (a restarted writer fences its previous
//!   incarnation).
//! - Every metadata commit of the writer calls [`fence`] inside its transaction: an `UPDATE`
//!   that matches only while the epoch is still ours. It also takes the lease row's write lock
//!   until the commit ends, so a takeover either happens before (and the commit fails with
//!   `Fenced`) or waits for the commit: a stale writer can never commit after a new one took
//!   over.
//! - A writer that cannot renew before its local deadline stops acknowledging writes
//!   ([`LeaseKeeper::check`]).
//!
//! The lease table is created by the metadata migrations (step 2, `crate::core::meta`), and
//! the epoch check itself lives in the core ([`crate::core::meta::fence`]) because every
//! metadata commit runs it; this module owns taking, renewing and releasing the lease.
//! Must not depend on the network layers.

use crate::core::meta::MetaError;
use sqlx::AnyConnection;
use sqlx::{AnyPool, Row};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::time::Instant;

/// Errors of the lease and fencing operations.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// A statement against the metadata store failed (network, lock timeout, schema).
    #[error("metadata store failed while trying to {action}")]
    Store {
        action: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// Another writer holds an unexpired lease.
    #[error("writer lease is held by {holder:?} until {expires_at_ms} ms since the epoch")]
    Held { holder: String, expires_at_ms: i64 },
    /// Our lease was taken over (or released) by someone else: stop acknowledging writes.
    #[error("writer lease with epoch {epoch} was lost")]
    Lost { epoch: u64 },
    /// A metadata commit carried a stale epoch and was refused (the transaction must roll back).
    #[error("metadata commit fenced: epoch {epoch} is stale, current epoch is {current}")]
    Fenced { epoch: u64, current: u64 },
    /// The lease could not be renewed before its local deadline: writes must not be acknowledged.
    #[error("writer lease with epoch {epoch} expired locally before it could be renewed")]
    Expired { epoch: u64 },
}

fn store(action: &'static str) -> impl FnOnce(sqlx::Error) -> LeaseError {
    move |source| LeaseError::Store { action, source }
}

/// A lease we hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub holder: String,
    pub epoch: u64,
    pub expires_at_ms: i64,
}

/// Milliseconds since the Unix epoch (wall clock; lease expiry is compared across processes).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Bring the metadata schema (which holds the lease row since migration step 2) up to date.
/// Idempotent and safe to race on MySQL (migrations take a named lock).
pub async fn ensure_schema(pool: &AnyPool) -> Result<(), LeaseError> {
    crate::core::meta::migrate_pool(pool)
        .await
        .map_err(|e| match e {
            MetaError::Migrate { source, .. }
            | MetaError::Connect { source, .. }
            | MetaError::Query { source, .. } => LeaseError::Store {
                action: "migrate the metadata schema",
                source,
            },
            other @ (MetaError::UnsupportedUrl(_) | MetaError::Fenced { .. }) => {
                LeaseError::Store {
                    action: "migrate the metadata schema",
                    source: sqlx::Error::Configuration(other.to_string().into()),
                }
            }
        })
}

/// Read the lease row as it is now.
pub async fn current(pool: &AnyPool) -> Result<Lease, LeaseError> {
    let row =
        sqlx::query("SELECT holder, epoch, expires_at_ms FROM shoal_writer_lease WHERE id = 1")
            .fetch_one(pool)
            .await
            .map_err(store("read the lease"))?;
    lease_from_row(&row)
}

fn lease_from_row(row: &sqlx::any::AnyRow) -> Result<Lease, LeaseError> {
    let holder: String = row.try_get(0).map_err(store("decode the lease holder"))?;
    let epoch: i64 = row.try_get(1).map_err(store("decode the lease epoch"))?;
    let expires_at_ms: i64 = row.try_get(2).map_err(store("decode the lease expiry"))?;
    Ok(Lease {
        holder,
        epoch: epoch.max(0) as u64,
        expires_at_ms,
    })
}

/// Take the lease for `holder` when it is free, expired at `now_ms`, or already `holder`'s.
/// Taking it always bumps the epoch, which fences every commit of the previous holder.
///
/// Errors: `Held` with the current holder when someone else holds an unexpired lease.
pub async fn try_acquire(
    pool: &AnyPool,
    holder: &str,
    ttl: Duration,
    now_ms: i64,
) -> Result<Lease, LeaseError> {
    let mut tx = pool
        .begin()
        .await
        .map_err(store("begin the lease transaction"))?;
    let res = sqlx::query(
        "UPDATE shoal_writer_lease SET holder = ?, epoch = epoch + 1, expires_at_ms = ? \
         WHERE id = 1 AND (holder = ? OR holder = '' OR expires_at_ms <= ?)",
    )
    .bind(holder)
    .bind(now_ms.saturating_add(ms(ttl)))
    .bind(holder)
    .bind(now_ms)
    .execute(&mut *tx)
    .await
    .map_err(store("take the lease"))?;
    let row =
        sqlx::query("SELECT holder, epoch, expires_at_ms FROM shoal_writer_lease WHERE id = 1")
            .fetch_one(&mut *tx)
            .await
            .map_err(store("read the lease"))?;
    let lease = lease_from_row(&row)?;
    tx.commit().await.map_err(store("commit the lease"))?;
    if res.rows_affected() == 1 {
        Ok(lease)
    } else {
        Err(LeaseError::Held {
            holder: lease.holder,
            expires_at_ms: lease.expires_at_ms,
        })
    }
}

/// Extend our lease to `now_ms + ttl`.
///
/// Errors: `Lost` when the row no longer carries our holder and epoch.
pub async fn renew(
    pool: &AnyPool,
    lease: &Lease,
    ttl: Duration,
    now_ms: i64,
) -> Result<Lease, LeaseError> {
    let expires_at_ms = now_ms.saturating_add(ms(ttl));
    let res = sqlx::query(
        "UPDATE shoal_writer_lease SET expires_at_ms = ? WHERE id = 1 AND holder = ? AND epoch = ?",
    )
    .bind(expires_at_ms)
    .bind(lease.holder.as_str())
    .bind(lease.epoch as i64)
    .execute(pool)
    .await
    .map_err(store("renew the lease"))?;
    // sqlx's MySQL driver sets CLIENT_FOUND_ROWS, so this counts matched rows on both stores.
    if res.rows_affected() == 1 {
        Ok(Lease {
            expires_at_ms,
            ..lease.clone()
        })
    } else {
        Err(LeaseError::Lost { epoch: lease.epoch })
    }
}

/// Give the lease up (clean shutdown) so a successor need not wait for the expiry.
/// Releasing a lease we no longer hold is a no-op.
pub async fn release(pool: &AnyPool, lease: &Lease) -> Result<(), LeaseError> {
    sqlx::query("UPDATE shoal_writer_lease SET holder = '', expires_at_ms = 0 WHERE id = 1 AND holder = ? AND epoch = ?")
        .bind(lease.holder.as_str())
        .bind(lease.epoch as i64)
        .execute(pool)
        .await
        .map_err(store("release the lease"))?;
    Ok(())
}

/// Check our epoch inside a metadata transaction and bump the commit counter; call it in every
/// writer commit before `COMMIT`. Returns the new commit sequence number (monotonic across
/// writers: the catalogue version). The storage core does this itself for every commit once
/// the writer calls [`crate::core::meta::MetaStore::set_fence`]; this wrapper maps the core's
/// error into [`LeaseError`].
///
/// Guarantees: on success the lease row stays write-locked by this transaction until it ends,
/// so no takeover can interleave. Errors: `Fenced` when the epoch is no longer current; the
/// caller must roll back (dropping the transaction does).
pub async fn fence(conn: &mut AnyConnection, epoch: u64) -> Result<u64, LeaseError> {
    crate::core::meta::fence(conn, epoch)
        .await
        .map_err(|e| match e {
            MetaError::Fenced { epoch, current } => LeaseError::Fenced { epoch, current },
            MetaError::Query { source, .. }
            | MetaError::Migrate { source, .. }
            | MetaError::Connect { source, .. } => LeaseError::Store {
                action: "check the writer epoch",
                source,
            },
            other @ MetaError::UnsupportedUrl(_) => LeaseError::Store {
                action: "check the writer epoch",
                source: sqlx::Error::Configuration(other.to_string().into()),
            },
        })
}

/// Local view of our lease, updated by [`LeaseKeeper::run`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeeperState {
    /// Writes may be acknowledged until this instant.
    Valid { epoch: u64, until: Instant },
    /// Someone else took the lease: never acknowledge again.
    Lost { epoch: u64 },
}

/// Keeps a held lease renewed and answers "may I acknowledge a write now?".
///
/// The local deadline is `renewal start + ttl - margin`, measured on the monotonic clock from
/// before the renewal statement was sent, so it is never later than the store's expiry.
#[derive(Debug, Clone)]
pub struct LeaseKeeper {
    state: Arc<watch::Sender<KeeperState>>,
    ttl: Duration,
    margin: Duration,
}

impl LeaseKeeper {
    /// Start from a lease just taken at `taken_at` (an instant from before `try_acquire`).
    pub fn new(lease: &Lease, ttl: Duration, margin: Duration, taken_at: Instant) -> Self {
        let until = taken_at + ttl.saturating_sub(margin);
        let (tx, _rx) = watch::channel(KeeperState::Valid {
            epoch: lease.epoch,
            until,
        });
        Self {
            state: Arc::new(tx),
            ttl,
            margin,
        }
    }

    /// The epoch to stamp on a write when it may be acknowledged now.
    ///
    /// Errors: `Lost` after a takeover, `Expired` when renewals failed past the deadline.
    pub fn check(&self) -> Result<u64, LeaseError> {
        match *self.state.borrow() {
            KeeperState::Valid { epoch, until } if Instant::now() < until => Ok(epoch),
            KeeperState::Valid { epoch, .. } => Err(LeaseError::Expired { epoch }),
            KeeperState::Lost { epoch } => Err(LeaseError::Lost { epoch }),
        }
    }

    /// Renew every `ttl / 3` until the lease is lost; store errors are logged and retried
    /// (the local deadline makes the writer stop acknowledging if they last too long).
    pub async fn run(self, pool: AnyPool, mut lease: Lease) {
        let every = (self.ttl / 3).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(every).await;
            let started = Instant::now();
            match renew(&pool, &lease, self.ttl, now_ms()).await {
                Ok(l) => {
                    lease = l;
                    let until = started + self.ttl.saturating_sub(self.margin);
                    self.state.send_replace(KeeperState::Valid {
                        epoch: lease.epoch,
                        until,
                    });
                }
                Err(LeaseError::Lost { epoch }) => {
                    tracing::error!(epoch, "writer lease lost; no longer acknowledging writes");
                    self.state.send_replace(KeeperState::Lost { epoch });
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "renewing the writer lease failed; retrying"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::any::AnyPoolOptions;

    async fn sqlite_pool(dir: &tempfile::TempDir) -> AnyPool {
        sqlx::any::install_default_drivers();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("meta.db").display());
        AnyPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .unwrap()
    }

    async fn mariadb_pool(db: &shoal_testkit::mariadb::MariaDb) -> AnyPool {
        sqlx::any::install_default_drivers();
        AnyPoolOptions::new()
            .max_connections(4)
            .connect(&db.url())
            .await
            .unwrap()
    }

    const TTL: Duration = Duration::from_secs(10);

    async fn second_writer_waits_then_takes_over_and_fences_the_first(pool: AnyPool) {
        ensure_schema(&pool).await.unwrap();
        ensure_schema(&pool).await.unwrap();
        let t0 = 1_000_000;
        let a = try_acquire(&pool, "writer-a", TTL, t0).await.unwrap();
        assert_eq!(a.epoch, 1);
        match try_acquire(&pool, "writer-b", TTL, t0 + 5_000).await {
            Err(LeaseError::Held { holder, .. }) => assert_eq!(holder, "writer-a"),
            other => panic!("expected Held, got {other:?}"),
        }
        let a = renew(&pool, &a, TTL, t0 + 5_000).await.unwrap();
        // Still held at t0 + 10s thanks to the renewal.
        assert!(matches!(
            try_acquire(&pool, "writer-b", TTL, t0 + 10_000).await,
            Err(LeaseError::Held { .. })
        ));
        let b = try_acquire(&pool, "writer-b", TTL, t0 + 15_001)
            .await
            .unwrap();
        assert_eq!(b.epoch, 2);
        assert!(matches!(
            renew(&pool, &a, TTL, t0 + 15_002).await,
            Err(LeaseError::Lost { epoch: 1 })
        ));

        let mut conn = pool.acquire().await.unwrap();
        match fence(&mut conn, a.epoch).await {
            Err(LeaseError::Fenced {
                epoch: 1,
                current: 2,
            }) => {}
            other => panic!("expected Fenced, got {other:?}"),
        }
        let s1 = fence(&mut conn, b.epoch).await.unwrap();
        let s2 = fence(&mut conn, b.epoch).await.unwrap();
        assert!(s2 > s1);
        assert_eq!(current(&pool).await.unwrap().holder, "writer-b");

        // Releasing lets a successor in at once; releasing a lost lease changes nothing.
        release(&pool, &a).await.unwrap();
        assert_eq!(current(&pool).await.unwrap().holder, "writer-b");
        release(&pool, &b).await.unwrap();
        let c = try_acquire(&pool, "writer-c", TTL, t0 + 15_003)
            .await
            .unwrap();
        assert_eq!(c.epoch, 3);
        // A restarted writer with the same name takes over immediately and fences its old self.
        let c2 = try_acquire(&pool, "writer-c", TTL, t0 + 15_004)
            .await
            .unwrap();
        assert_eq!(c2.epoch, 4);
        let mut conn = pool.acquire().await.unwrap();
        assert!(matches!(
            fence(&mut conn, c.epoch).await,
            Err(LeaseError::Fenced { .. })
        ));
    }

    async fn a_fenced_commit_rolls_back_everything_it_wrote(pool: AnyPool) {
        ensure_schema(&pool).await.unwrap();
        sqlx::query("CREATE TABLE IF NOT EXISTS fence_probe (id BIGINT NOT NULL PRIMARY KEY)")
            .execute(&pool)
            .await
            .unwrap();
        let t0 = now_ms();
        let old = try_acquire(&pool, "old", Duration::from_millis(1), t0)
            .await
            .unwrap();
        let new = try_acquire(&pool, "new", TTL, t0 + 10).await.unwrap();
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO fence_probe (id) VALUES (1)")
            .execute(&mut *tx)
            .await
            .unwrap();
        assert!(matches!(
            fence(&mut tx, old.epoch).await,
            Err(LeaseError::Fenced { .. })
        ));
        drop(tx);
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM fence_probe")
            .fetch_one(&pool)
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("INSERT INTO fence_probe (id) VALUES (2)")
            .execute(&mut *tx)
            .await
            .unwrap();
        fence(&mut tx, new.epoch).await.unwrap();
        tx.commit().await.unwrap();
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM fence_probe")
            .fetch_one(&pool)
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
    }

    /// A takeover that starts while the old writer's commit is open must wait for that commit,
    /// and the old writer's next commit must fail.
    async fn a_takeover_waits_for_an_open_fenced_commit(pool: AnyPool) {
        ensure_schema(&pool).await.unwrap();
        let t0 = now_ms();
        let old = try_acquire(&pool, "old", Duration::from_millis(1), t0)
            .await
            .unwrap();
        let mut tx = pool.begin().await.unwrap();
        fence(&mut tx, old.epoch).await.unwrap();
        let p2 = pool.clone();
        let takeover = tokio::spawn(async move { try_acquire(&p2, "new", TTL, t0 + 10).await });
        // The takeover cannot finish while our transaction holds the row lock.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !takeover.is_finished(),
            "takeover did not wait for the open commit"
        );
        tx.commit().await.unwrap();
        let new = takeover.await.unwrap().unwrap();
        assert_eq!(new.epoch, old.epoch + 1);
        let mut conn = pool.acquire().await.unwrap();
        assert!(matches!(
            fence(&mut conn, old.epoch).await,
            Err(LeaseError::Fenced { .. })
        ));
    }

    #[tokio::test]
    async fn sqlite_second_writer_waits_then_takes_over_and_fences_the_first() {
        let dir = tempfile::tempdir().unwrap();
        second_writer_waits_then_takes_over_and_fences_the_first(sqlite_pool(&dir).await).await;
    }

    #[tokio::test]
    async fn sqlite_fenced_commit_rolls_back_everything_it_wrote() {
        let dir = tempfile::tempdir().unwrap();
        a_fenced_commit_rolls_back_everything_it_wrote(sqlite_pool(&dir).await).await;
    }

    #[tokio::test]
    async fn sqlite_takeover_waits_for_an_open_fenced_commit() {
        let dir = tempfile::tempdir().unwrap();
        a_takeover_waits_for_an_open_fenced_commit(sqlite_pool(&dir).await).await;
    }

    #[tokio::test]
    async fn mariadb_second_writer_waits_then_takes_over_and_fences_the_first() {
        let db = shoal_testkit::mariadb::MariaDb::start().unwrap();
        second_writer_waits_then_takes_over_and_fences_the_first(mariadb_pool(&db).await).await;
    }

    #[tokio::test]
    async fn mariadb_fenced_commit_rolls_back_everything_it_wrote() {
        let db = shoal_testkit::mariadb::MariaDb::start().unwrap();
        a_fenced_commit_rolls_back_everything_it_wrote(mariadb_pool(&db).await).await;
    }

    #[tokio::test]
    async fn mariadb_takeover_waits_for_an_open_fenced_commit() {
        let db = shoal_testkit::mariadb::MariaDb::start().unwrap();
        a_takeover_waits_for_an_open_fenced_commit(mariadb_pool(&db).await).await;
    }

    /// "MySQL restarted under load": renewals fail while the server is down, the pool
    /// reconnects by itself, and the writer acknowledges again with the same epoch.
    #[tokio::test]
    async fn mariadb_restart_under_a_running_keeper_recovers_without_manual_steps() {
        let mut db = shoal_testkit::mariadb::MariaDb::start().unwrap();
        let pool = mariadb_pool(&db).await;
        ensure_schema(&pool).await.unwrap();
        let ttl = Duration::from_secs(2);
        let started = Instant::now();
        let l = try_acquire(&pool, "w", ttl, now_ms()).await.unwrap();
        let keeper = LeaseKeeper::new(&l, ttl, Duration::from_millis(500), started);
        let task = tokio::spawn(keeper.clone().run(pool.clone(), l.clone()));
        db.kill_and_restart().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // Wait for a renewal after the restart (the keeper retries on store errors).
            if let Ok(cur) = current(&pool).await
                && cur.expires_at_ms > l.expires_at_ms
                && keeper.check().is_ok()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "writer did not recover after the MariaDB restart"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(keeper.check().unwrap(), l.epoch);
        let mut conn = pool.acquire().await.unwrap();
        fence(&mut conn, l.epoch).await.unwrap();
        task.abort();
    }

    #[tokio::test]
    async fn keeper_stops_acknowledging_after_a_takeover() {
        let dir = tempfile::tempdir().unwrap();
        let pool = sqlite_pool(&dir).await;
        ensure_schema(&pool).await.unwrap();
        let ttl = Duration::from_millis(1500);
        let started = Instant::now();
        let a = try_acquire(&pool, "a", ttl, now_ms()).await.unwrap();
        let keeper = LeaseKeeper::new(&a, ttl, Duration::from_millis(50), started);
        assert_eq!(keeper.check().unwrap(), a.epoch);
        let task = tokio::spawn(keeper.clone().run(pool.clone(), a.clone()));
        // Steal the lease as if our renewals had stalled past expiry.
        sqlx::query("UPDATE shoal_writer_lease SET holder = 'b', epoch = epoch + 1 WHERE id = 1")
            .execute(&pool)
            .await
            .unwrap();
        task.await.unwrap();
        assert!(matches!(keeper.check(), Err(LeaseError::Lost { epoch: 1 })));
    }

    #[tokio::test]
    async fn keeper_refuses_acknowledgements_once_the_local_deadline_passes() {
        let lease = Lease {
            holder: "a".into(),
            epoch: 7,
            expires_at_ms: 0,
        };
        let keeper = LeaseKeeper::new(
            &lease,
            Duration::from_millis(1000),
            Duration::from_millis(500),
            Instant::now(),
        );
        assert_eq!(keeper.check().unwrap(), 7);
        // No renewal runs: once ttl - margin has passed, nothing may be acknowledged.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(matches!(
            keeper.check(),
            Err(LeaseError::Expired { epoch: 7 })
        ));
    }
}
