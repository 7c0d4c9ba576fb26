//! Applies the schema migrations of `tally_schemas::migrations` to a database, recording each in
//! `schema_migrations`. Safe to run from several processes at once: ClickHouse has no
//! transactions, so a runner takes a lock by creating the table `schema_migrations_lock` (creation
//! fails for everyone but one), and every statement is idempotent (`IF NOT EXISTS`, seeds into
//! ReplacingMergeTree), so even a lock broken after a crash cannot corrupt the schema.
//!
//! On a cluster (`ChConfig::cluster`), every statement is the cluster form of the same migration
//! (`tally_schemas::cluster::for_cluster`: `ON CLUSTER`, replicated engines, Distributed tables),
//! `schema_migrations` is replicated to every node, and the lock is taken on the node of
//! `TALLY_CLICKHOUSE_URL`, which every runner of a deployment names alike.

use std::time::{Duration, Instant};

use clickhouse::Row;
use serde::Deserialize;
use tally_schemas::migrations::{Migration, MIGRATIONS};

use crate::ch::{error_code, ChConfig, CODE_TABLE_ALREADY_EXISTS, CODE_UNKNOWN_TABLE};

/// A lock older than this is considered left behind by a crashed runner and broken.
const STALE_LOCK_AFTER_S: u32 = 120;
const LOCK_WAIT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error(
        "migration {version} ({name}) was changed after it was applied (checksum {applied} != {current})"
    )]
    Changed { version: u32, name: &'static str, applied: String, current: String },
    #[error("migration {version} ({name}) failed on statement {statement}: {source}")]
    Statement { version: u32, name: &'static str, statement: usize, source: clickhouse::error::Error },
    #[error("timed out after {0:?} waiting for the migration lock")]
    LockTimeout(Duration),
}

#[derive(Row, Deserialize)]
struct Applied {
    version: u32,
    checksum: String,
}

/// Applies what is missing and returns the versions this call applied.
pub async fn migrate(config: &ChConfig) -> Result<Vec<u32>, MigrateError> {
    let client = config.client();
    let db = &config.database;
    for statement in cluster_form(config, &format!("CREATE DATABASE IF NOT EXISTS {db}")) {
        client.query(&statement).execute().await?;
    }
    acquire_lock(config).await?;
    let result = apply_missing(config).await;
    let released = drop_lock(config).await;
    let applied = result?;
    released?;
    Ok(applied)
}

/// Drops the lock table. 18.16 can answer UNKNOWN_TABLE even to `DROP TABLE IF EXISTS` when it
/// races another runner's failing `CREATE` of the same table (seen once in a CI run); the drop is
/// then tried again, so the lock is never left behind for the stale-lock timeout to clear.
async fn drop_lock(config: &ChConfig) -> Result<(), MigrateError> {
    let drop = format!("DROP TABLE IF EXISTS {}.schema_migrations_lock", config.database);
    let mut attempts = 0;
    loop {
        match config.client().query(&drop).execute().await {
            Ok(()) => return Ok(()),
            Err(e) if error_code(&e) == Some(CODE_UNKNOWN_TABLE) && attempts < 20 => attempts += 1,
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn acquire_lock(config: &ChConfig) -> Result<(), MigrateError> {
    let client = config.client();
    let db = &config.database;
    let started = Instant::now();
    loop {
        let create = format!("CREATE TABLE {db}.schema_migrations_lock (owner String) ENGINE = Log");
        match client.query(&create).execute().await {
            Ok(()) => return Ok(()),
            Err(e) if error_code(&e) == Some(CODE_TABLE_ALREADY_EXISTS) => {}
            // 18.16 answers UNKNOWN_TABLE to a CREATE that races another runner's DROP of the lock
            // (seen under a loaded test run): the lock is contended, try again.
            Err(e) if error_code(&e) == Some(CODE_UNKNOWN_TABLE) => {}
            Err(e) => return Err(e.into()),
        }
        let age: Option<u32> = match client
            .query("SELECT toUInt32(now() - metadata_modification_time) FROM system.tables WHERE database = ? AND name = 'schema_migrations_lock'")
            .bind(db.as_str())
            .fetch_optional()
            .await
        {
            Ok(age) => age,
            // 18.16 answers UNKNOWN_TABLE to this read of system.tables when the lock is dropped
            // while it runs (seen in a fresh-clone CI run): the lock is being released, try again.
            Err(e) if error_code(&e) == Some(CODE_UNKNOWN_TABLE) => None,
            Err(e) => return Err(e.into()),
        };
        if age.is_some_and(|seconds| seconds > STALE_LOCK_AFTER_S) {
            tracing::warn!(database = %db, "breaking a stale migration lock");
            drop_lock(config).await?;
            continue;
        }
        if started.elapsed() > LOCK_WAIT {
            return Err(MigrateError::LockTimeout(LOCK_WAIT));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn apply_missing(config: &ChConfig) -> Result<Vec<u32>, MigrateError> {
    let client = config.client();
    let db = &config.database;
    let create = format!(
        "CREATE TABLE IF NOT EXISTS {db}.schema_migrations (version UInt32, name String, checksum String, applied_at DateTime('UTC')) ENGINE = MergeTree() ORDER BY version"
    );
    for statement in cluster_form(config, &create) {
        client.query(&statement).execute().await?;
    }
    let applied: Vec<Applied> =
        client.query(&format!("SELECT version, checksum FROM {db}.schema_migrations")).fetch_all().await?;
    let mut newly_applied = Vec::new();
    for migration in MIGRATIONS {
        let current = migration.checksum();
        let records: Vec<&Applied> = applied.iter().filter(|a| a.version == migration.version).collect();
        if let Some(changed) = records.iter().find(|a| !migration.accepts(&a.checksum)) {
            return Err(MigrateError::Changed {
                version: migration.version,
                name: migration.name,
                applied: changed.checksum.clone(),
                current,
            });
        }
        if !records.is_empty() {
            continue;
        }
        apply(config, migration).await?;
        newly_applied.push(migration.version);
    }
    Ok(newly_applied)
}

/// Whether `statement` is a `RENAME TABLE a TO b` that an earlier run already did (`b` exists,
/// `a` does not): ClickHouse has no `RENAME … IF EXISTS`, and a runner that died between the
/// rename and recording its migration must be able to finish it.
async fn already_renamed(client: &clickhouse::Client, statement: &str) -> Result<bool, MigrateError> {
    let Some(tables) = statement.strip_prefix("RENAME TABLE ") else { return Ok(false) };
    let tables = tables.split(" ON CLUSTER ").next().unwrap_or(tables);
    let Some((from, to)) = tables.split_once(" TO ") else { return Ok(false) };
    let exists = |name: &str| {
        let (database, table) = name.trim().split_once('.').unwrap_or(("", name.trim()));
        client
            .query("SELECT count() FROM system.tables WHERE database = ? AND name = ?")
            .bind(database.to_owned())
            .bind(table.to_owned())
            .fetch_one::<u64>()
    };
    Ok(exists(from).await? == 0 && exists(to).await? == 1)
}

/// `statement` as this deployment runs it: itself on one server, its cluster form on a cluster.
fn cluster_form(config: &ChConfig, statement: &str) -> Vec<String> {
    match &config.cluster {
        None => vec![statement.to_owned()],
        Some(cluster) => tally_schemas::cluster::for_cluster(statement, &cluster.name),
    }
}

async fn apply(config: &ChConfig, migration: &Migration) -> Result<(), MigrateError> {
    let client = config.client();
    let statements: Vec<String> =
        migration.statements(&config.database).iter().flat_map(|s| cluster_form(config, s)).collect();
    for (index, statement) in statements.iter().enumerate() {
        let Err(source) = client.query_raw(statement).execute().await else { continue };
        if already_renamed(&client, statement).await? {
            continue;
        }
        return Err(MigrateError::Statement {
            version: migration.version,
            name: migration.name,
            statement: index + 1,
            source,
        });
    }
    let record = format!(
        "INSERT INTO {}.schema_migrations (version, name, checksum, applied_at) VALUES (?, ?, ?, now())",
        config.database
    );
    client
        .query(&record)
        .bind(migration.version)
        .bind(migration.name)
        .bind(migration.checksum())
        .execute()
        .await?;
    tracing::info!(version = migration.version, name = migration.name, database = %config.database, "applied migration");
    Ok(())
}
