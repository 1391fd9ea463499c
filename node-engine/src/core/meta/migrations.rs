//! Schema migrations for both dialects. A version table records what ran; each step is the same
//! logical change written once per dialect (types differ: SQLite is loose, MySQL needs lengths).

use super::{Dialect, MetaError};
use sqlx::{AnyPool, Row};

struct Step {
    version: i64,
    sqlite: &'static [&'static str],
    mysql: &'static [&'static str],
}

const STEPS: &[Step] = &[
    Step {
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
    },
    // Step 2 belongs to the writer lease (another branch); steps are applied by the set of recorded
    // versions, so the two merge in either order.
    Step {
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
    },
];

/// Apply every step newer than the recorded version, each in its own transaction where the
/// dialect allows (MySQL DDL auto-commits; the version row is written last so a crash re-runs
/// only an incomplete step, and `IF NOT EXISTS`-free DDL then fails loudly instead of guessing).
pub(super) async fn run(pool: &AnyPool, dialect: Dialect) -> Result<(), MetaError> {
    sqlx::query("CREATE TABLE IF NOT EXISTS shoal_schema_version (version BIGINT NOT NULL)")
        .execute(pool)
        .await
        .map_err(|source| MetaError::Migrate { version: 0, source })?;
    // Applied by set, not by maximum: steps written on parallel branches (2 and 3) may land in
    // either order, and a store migrated to 3 must still get 2.
    let done: Vec<i64> = sqlx::query("SELECT version FROM shoal_schema_version")
        .fetch_all(pool)
        .await
        .and_then(|rows| rows.iter().map(|r| r.try_get::<i64, _>(0)).collect())
        .map_err(|source| MetaError::Migrate { version: 0, source })?;
    for step in STEPS.iter().filter(|s| !done.contains(&s.version)) {
        let err = |source| MetaError::Migrate {
            version: step.version,
            source,
        };
        let mut tx = pool.begin().await.map_err(err)?;
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
