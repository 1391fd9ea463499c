//! Schema migrations for both dialects. A version table records what ran; each step is the same
//! logical change written once per dialect (types differ: SQLite is loose, MySQL needs lengths).
//!
//! Steps: 1 = collections, segments, indexes, id sequence; 2 = the writer lease row
//! (`shoal_writer_lease`: holder, epoch, expiry and `commit_seq`, the catalogue version bumped by
//! every metadata commit; see [`super::fence`]).
//!
//! On MySQL the migration runs under a named lock (`GET_LOCK`), so a writer and readers starting
//! together against an empty database do not race on the DDL.

use super::{Dialect, MetaError};
use sqlx::{AnyConnection, AnyPool, Connection, Row};

struct Step {
    version: i64,
    sqlite: &'static [&'static str],
    mysql: &'static [&'static str],
}

const STEPS: &[Step] = &[STEP_1, STEP_2, STEP_3];

const STEP_1: Step = Step {
    version: 1,
    sqlite: &[
        "CREATE TABLE shoal_collections (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, dim INTEGER NOT NULL, \
         metric TEXT NOT NULL, auto_id INTEGER NOT NULL, pk_field TEXT NOT NULL, vector_field TEXT NOT NULL, \
         dynamic_field INTEGER NOT NULL, loaded INTEGER NOT NULL, flushed_seq INTEGER NOT NULL, created_ms INTEGER NOT NULL)",
        "CREATE TABLE shoal_segments (collection_id INTEGER NOT NULL, id INTEGER NOT NULL, row_count INTEGER NOT NULL, \
         manifest_crc INTEGER NOT NULL, tomb_seq INTEGER NOT NULL, tomb_crc INTEGER NOT NULL, PRIMARY KEY (collection_id, id))",
        "CREATE TABLE shoal_indexes (collection_id INTEGER NOT NULL, index_name TEXT NOT NULL, field_name TEXT NOT NULL, \
         index_type TEXT NOT NULL, metric TEXT NOT NULL, params TEXT NOT NULL, PRIMARY KEY (collection_id, index_name))",
        "CREATE TABLE shoal_sequences (last_id INTEGER NOT NULL)",
    ],
    mysql: &[
        "CREATE TABLE shoal_collections (id BIGINT PRIMARY KEY, name VARCHAR(255) NOT NULL UNIQUE, dim BIGINT NOT NULL, \
         metric VARCHAR(16) NOT NULL, auto_id BIGINT NOT NULL, pk_field VARCHAR(255) NOT NULL, vector_field VARCHAR(255) NOT NULL, \
         dynamic_field BIGINT NOT NULL, loaded BIGINT NOT NULL, flushed_seq BIGINT NOT NULL, created_ms BIGINT NOT NULL)",
        "CREATE TABLE shoal_segments (collection_id BIGINT NOT NULL, id BIGINT NOT NULL, row_count BIGINT NOT NULL, \
         manifest_crc BIGINT NOT NULL, tomb_seq BIGINT NOT NULL, tomb_crc BIGINT NOT NULL, PRIMARY KEY (collection_id, id))",
        "CREATE TABLE shoal_indexes (collection_id BIGINT NOT NULL, index_name VARCHAR(255) NOT NULL, field_name VARCHAR(255) NOT NULL, \
         index_type VARCHAR(32) NOT NULL, metric VARCHAR(16) NOT NULL, params TEXT NOT NULL, PRIMARY KEY (collection_id, index_name))",
        "CREATE TABLE shoal_sequences (last_id BIGINT NOT NULL)",
    ],
};

/// The single-writer lease and the catalogue version (one row, id 1).
const STEP_2: Step = Step {
    version: 2,
    sqlite: &[
        "CREATE TABLE shoal_writer_lease (id INTEGER NOT NULL PRIMARY KEY, holder TEXT NOT NULL, \
         epoch INTEGER NOT NULL, expires_at_ms INTEGER NOT NULL, commit_seq INTEGER NOT NULL)",
        "INSERT INTO shoal_writer_lease (id, holder, epoch, expires_at_ms, commit_seq) VALUES (1, '', 0, 0, 0)",
    ],
    mysql: &[
        "CREATE TABLE shoal_writer_lease (id BIGINT NOT NULL PRIMARY KEY, holder VARCHAR(255) NOT NULL, \
         epoch BIGINT NOT NULL, expires_at_ms BIGINT NOT NULL, commit_seq BIGINT NOT NULL)",
        "INSERT INTO shoal_writer_lease (id, holder, epoch, expires_at_ms, commit_seq) VALUES (1, '', 0, 0, 0)",
    ],
};

/// ANN index files per sealed segment, committed like segments.
const STEP_3: Step = Step {
    version: 3,
    sqlite: &[
        "CREATE TABLE shoal_segment_indexes (collection_id INTEGER NOT NULL, segment_id INTEGER NOT NULL, \
         index_name TEXT NOT NULL, index_type TEXT NOT NULL, params TEXT NOT NULL, file TEXT NOT NULL, \
         crc INTEGER NOT NULL, bytes INTEGER NOT NULL, row_count INTEGER NOT NULL, built_ms INTEGER NOT NULL, \
         PRIMARY KEY (collection_id, segment_id, index_name))",
    ],
    mysql: &[
        "CREATE TABLE shoal_segment_indexes (collection_id BIGINT NOT NULL, segment_id BIGINT NOT NULL, \
         index_name VARCHAR(255) NOT NULL, index_type VARCHAR(32) NOT NULL, params TEXT NOT NULL, \
         file VARCHAR(1024) NOT NULL, crc BIGINT NOT NULL, bytes BIGINT NOT NULL, row_count BIGINT NOT NULL, \
         built_ms BIGINT NOT NULL, PRIMARY KEY (collection_id, segment_id, index_name))",
    ],
};

/// The newest schema version this build knows (readers wait for a writer to reach it).
pub(super) fn latest() -> i64 {
    STEPS.iter().map(|s| s.version).max().unwrap_or(0)
}

/// The schema version recorded in the store (0 = empty database).
pub(super) async fn current(conn: &mut AnyConnection) -> Result<i64, MetaError> {
    sqlx::query("CREATE TABLE IF NOT EXISTS shoal_schema_version (version BIGINT NOT NULL)")
        .execute(&mut *conn)
        .await
        .map_err(|source| MetaError::Migrate { version: 0, source })?;
    let current: Option<i64> = sqlx::query("SELECT MAX(version) FROM shoal_schema_version")
        .fetch_one(&mut *conn)
        .await
        .and_then(|r| r.try_get::<Option<i64>, _>(0))
        .map_err(|source| MetaError::Migrate { version: 0, source })?;
    Ok(current.unwrap_or(0))
}

const LOCK_NAME: &str = "shoal_schema_migration";
/// Seconds a process waits for another one's migration.
const LOCK_WAIT_S: i64 = 60;

/// Apply every step newer than the recorded version, each in its own transaction where the
/// dialect allows (MySQL DDL auto-commits; the version row is written last so a crash re-runs
/// only an incomplete step, and `IF NOT EXISTS`-free DDL then fails loudly instead of guessing).
pub(super) async fn run(pool: &AnyPool, dialect: Dialect) -> Result<(), MetaError> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(|source| MetaError::Migrate { version: 0, source })?;
    if dialect == Dialect::Mysql {
        let got: Option<i64> = sqlx::query("SELECT GET_LOCK(?, ?)")
            .bind(LOCK_NAME)
            .bind(LOCK_WAIT_S)
            .fetch_one(&mut *conn)
            .await
            .and_then(|r| r.try_get::<Option<i64>, _>(0))
            .map_err(|source| MetaError::Migrate { version: 0, source })?;
        if got != Some(1) {
            return Err(MetaError::Migrate {
                version: 0,
                source: sqlx::Error::Protocol(format!(
                    "another process held the migration lock for more than {LOCK_WAIT_S} s"
                )),
            });
        }
    }
    let res = run_steps(&mut conn, dialect).await;
    if dialect == Dialect::Mysql {
        // Also released when the connection closes; a failure here only delays others.
        let _ = sqlx::query("SELECT RELEASE_LOCK(?)")
            .bind(LOCK_NAME)
            .execute(&mut *conn)
            .await;
    }
    res
}

async fn run_steps(conn: &mut AnyConnection, dialect: Dialect) -> Result<(), MetaError> {
    let current = current(conn).await?;
    for step in STEPS.iter().filter(|s| s.version > current) {
        let err = |source| MetaError::Migrate {
            version: step.version,
            source,
        };
        let mut tx = conn.begin().await.map_err(err)?;
        let stmts = match dialect {
            Dialect::Sqlite => step.sqlite,
            Dialect::Mysql => step.mysql,
        };
        for s in stmts {
            sqlx::query(s).execute(&mut *tx).await.map_err(err)?;
        }
        sqlx::query("INSERT INTO shoal_schema_version (version) VALUES (?)")
            .bind(step.version)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        tx.commit().await.map_err(err)?;
    }
    Ok(())
}
