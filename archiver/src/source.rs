//! What the archiver reads from ClickHouse: a month's partitions, its exact per-org sums, and its
//! rows in (org, time) order, streamed chunk by chunk so neither ClickHouse nor the archiver holds
//! more than a chunk (`chunk_rows`, cut on (org, day) boundaries) whatever the month's size.

use clickhouse::Row;
use serde::Deserialize;
use tally_common::ch::ChConfig;
use tally_schemas::row::select_list;
use tally_schemas::EventRow;

use crate::error::ArchiveError;
use crate::month::Month;
use crate::totals::{OrgSums, Sums};

/// The months `tally.events` holds rows of, from its active partitions (on a cluster: of every
/// shard's local table).
pub async fn months(config: &ChConfig) -> Result<Vec<Month>, ArchiveError> {
    let sql = "SELECT DISTINCT partition_id FROM system.parts WHERE database = ? AND table = 'events' AND active ORDER BY partition_id";
    let mut ids: Vec<String> = Vec::new();
    for node in shard_nodes(config).await? {
        ids.extend(node.client().query(sql).bind(config.database.as_str()).fetch_all::<String>().await?);
    }
    ids.sort();
    ids.dedup();
    Ok(ids.iter().filter_map(|id| Month::from_partition(id)).collect())
}

/// The active parts of the month's partition (recorded in the manifest); on a cluster each name
/// is prefixed with its shard (`s1/202611_0_0_0`).
pub async fn parts(config: &ChConfig, month: Month) -> Result<Vec<String>, ArchiveError> {
    let sql = "SELECT name FROM system.parts WHERE database = ? AND table = 'events' AND active AND partition_id = ? ORDER BY name";
    let nodes = shard_nodes(config).await?;
    let mut names = Vec::new();
    for (shard, node) in nodes.iter().enumerate() {
        let found: Vec<String> = node
            .client()
            .query(sql)
            .bind(config.database.as_str())
            .bind(month.partition().to_string())
            .fetch_all()
            .await?;
        if config.cluster.is_some() {
            names.extend(found.into_iter().map(|name| format!("s{shard}/{name}")));
        } else {
            names.extend(found);
        }
    }
    Ok(names)
}

/// Where the archiver reads rows and sums from: `events`, or on a cluster the Distributed
/// `events_all` over every shard (a closed month takes no more inserts, so its replicas agree).
fn events(config: &ChConfig) -> String {
    config.table(if config.cluster.is_some() { "events_all" } else { "events" })
}

/// One answering replica of each shard (the server itself when not on a cluster). A shard none
/// of whose replicas answers fails the pass: a month is never judged on part of its shards.
async fn shard_nodes(config: &ChConfig) -> Result<Vec<ChConfig>, ArchiveError> {
    let Some(cluster) = &config.cluster else {
        return Ok(vec![config.clone()]);
    };
    let mut nodes = Vec::with_capacity(cluster.shards.len());
    for (shard, replicas) in cluster.shards.iter().enumerate() {
        let mut last_error = None;
        let mut found = None;
        for url in replicas {
            let node = ChConfig { url: url.clone(), ..config.clone() };
            match node.client().query("SELECT 1").fetch_one::<u8>().await {
                Ok(_) => {
                    found = Some(node);
                    break;
                }
                Err(e) => last_error = Some(e),
            }
        }
        match found {
            Some(node) => nodes.push(node),
            None => {
                return Err(ArchiveError::Config(format!(
                    "no replica of shard {shard} answers ({}): {}",
                    replicas.join(", "),
                    last_error.map(|e| e.to_string()).unwrap_or_default()
                )))
            }
        }
    }
    Ok(nodes)
}

#[derive(Row, Deserialize)]
struct OrgRow {
    org_id: String,
    rows: u64,
    cost_nanos: i64,
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

impl OrgRow {
    fn into_entry(self) -> (String, Sums) {
        let sums = Sums {
            rows: self.rows,
            cost_nanos: self.cost_nanos,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.total_tokens,
        };
        (self.org_id, sums)
    }
}

/// The month's rows per org with their exact sums.
pub async fn sums(config: &ChConfig, month: Month) -> Result<OrgSums, ArchiveError> {
    let sql = format!(
        "SELECT org_id, count() AS rows, sum(cost_nanos) AS cost_nanos, sum(toUInt64(prompt_tokens)) AS prompt_tokens, \
         sum(toUInt64(completion_tokens)) AS completion_tokens, sum(toUInt64(total_tokens)) AS total_tokens \
         FROM {} WHERE toYYYYMM(timestamp) = ? GROUP BY org_id ORDER BY org_id",
        events(config)
    );
    let rows: Vec<OrgRow> = config.client().query(&sql).bind(month.partition()).fetch_all().await?;
    Ok(rows.into_iter().map(OrgRow::into_entry).collect())
}

/// A contiguous run of (org, day) in sort order: `[first, last]` inclusive, days since 1970.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub first: (String, u32),
    pub last: (String, u32),
    pub rows: u64,
}

#[derive(Row, Deserialize)]
struct DayCount {
    org_id: String,
    day: u32,
    rows: u64,
}

/// Cuts `(org, day, rows)` in sort order into chunks of at most `chunk_rows` rows (one (org, day)
/// larger than that is a chunk of its own).
pub fn chunks(counts: impl IntoIterator<Item = (String, u32, u64)>, chunk_rows: u64) -> Vec<Chunk> {
    let mut chunks: Vec<Chunk> = Vec::new();
    for (org, day, rows) in counts {
        match chunks.last_mut() {
            Some(chunk) if chunk.rows + rows <= chunk_rows => {
                chunk.last = (org, day);
                chunk.rows += rows;
            }
            _ => chunks.push(Chunk { first: (org.clone(), day), last: (org, day), rows }),
        }
    }
    chunks
}

/// The month's chunks, from its row counts per (org, day).
pub async fn plan(config: &ChConfig, month: Month, chunk_rows: u64) -> Result<Vec<Chunk>, ArchiveError> {
    let sql = format!(
        "SELECT org_id, toUInt32(toDate(timestamp)) AS day, count() AS rows FROM {} \
         WHERE toYYYYMM(timestamp) = ? GROUP BY org_id, day ORDER BY org_id, day",
        events(config)
    );
    let counts: Vec<DayCount> = config.client().query(&sql).bind(month.partition()).fetch_all().await?;
    Ok(chunks(counts.into_iter().map(|c| (c.org_id, c.day, c.rows)), chunk_rows))
}

/// The rows of one chunk, in (org, time, event id) order.
pub fn rows(
    config: &ChConfig,
    month: Month,
    chunk: &Chunk,
) -> Result<clickhouse::query::RowCursor<EventRow>, ArchiveError> {
    let day = "toUInt32(toDate(timestamp))";
    let sql = format!(
        "SELECT {} FROM {} WHERE toYYYYMM(timestamp) = ? \
         AND (org_id > ? OR (org_id = ? AND {day} >= ?)) AND (org_id < ? OR (org_id = ? AND {day} <= ?)) \
         ORDER BY org_id, timestamp, timestamp_ms, event_id",
        select_list(),
        events(config)
    );
    let (first_org, first_day) = &chunk.first;
    let (last_org, last_day) = &chunk.last;
    Ok(config
        .client()
        .query(&sql)
        .bind(month.partition())
        .bind(first_org.as_str())
        .bind(first_org.as_str())
        .bind(*first_day)
        .bind(last_org.as_str())
        .bind(last_org.as_str())
        .bind(*last_day)
        .fetch::<EventRow>()?)
}

/// The staging table of a restore of `month`: `events_restore_<YYYYMM>`, empty, shaped like
/// `events` (no views read it).
pub async fn create_staging(config: &ChConfig, month: Month) -> Result<String, ArchiveError> {
    if config.cluster.is_some() {
        return Err(ArchiveError::Config(
            "restoring a month on a ClickHouse cluster is not supported yet: restore it on a single server, \
             or read it from the archive (the query API does)"
                .into(),
        ));
    }
    let staging = config.table(&format!("events_restore_{}", month.partition()));
    config.client().query(&format!("DROP TABLE IF EXISTS {staging}")).execute().await?;
    config.client().query(&format!("CREATE TABLE {staging} AS {}", config.table("events"))).execute().await?;
    Ok(staging)
}

/// Inserts rows into `table` (one INSERT).
pub async fn insert(config: &ChConfig, table: &str, rows: Vec<EventRow>) -> Result<(), ArchiveError> {
    let mut insert = config.client().insert_unescaped::<EventRow>(table).await?;
    for row in &rows {
        insert.write(row).await?;
    }
    insert.end().await?;
    Ok(())
}

/// Per-org sums of any table shaped like `events` (a staging table).
pub async fn sums_of(config: &ChConfig, table: &str) -> Result<OrgSums, ArchiveError> {
    let sql = format!(
        "SELECT org_id, count() AS rows, sum(cost_nanos) AS cost_nanos, sum(toUInt64(prompt_tokens)) AS prompt_tokens, \
         sum(toUInt64(completion_tokens)) AS completion_tokens, sum(toUInt64(total_tokens)) AS total_tokens \
         FROM {table} GROUP BY org_id ORDER BY org_id"
    );
    let rows: Vec<OrgRow> = config.client().query(&sql).fetch_all().await?;
    Ok(rows.into_iter().map(OrgRow::into_entry).collect())
}

/// Moves the staged month into `events` in one step (`ATTACH PARTITION … FROM` copies the parts
/// atomically and, unlike an INSERT, does not run the rollup views: the rollups still hold the
/// month), then drops the staging table.
pub async fn attach_staging(config: &ChConfig, month: Month, staging: &str) -> Result<(), ArchiveError> {
    let sql = format!(
        "ALTER TABLE {} ATTACH PARTITION {} FROM {staging}",
        config.table("events"),
        month.partition()
    );
    config.client().query(&sql).execute().await?;
    config.client().query(&format!("DROP TABLE IF EXISTS {staging}")).execute().await?;
    Ok(())
}

/// Drops the month's partition of `tally.events` (the rollups keep their rows); on a cluster on
/// one replica of every shard, which replicates the drop to the shard's other replicas.
pub async fn drop_partition(config: &ChConfig, month: Month) -> Result<(), ArchiveError> {
    let sql = format!("ALTER TABLE {} DROP PARTITION {}", config.table("events"), month.partition());
    for node in shard_nodes(config).await? {
        node.client().query(&sql).execute().await?;
    }
    Ok(())
}

/// A lock on archiving `month`, across archivers sharing the ClickHouse: the table
/// `archiver_lock_<YYYYMM>`, created with its owner's first heartbeat in one statement, so its
/// creation succeeds for one archiver only. The holder adds a heartbeat row every quarter of
/// `stale_after`; a lock without a heartbeat for `stale_after` (its archiver was killed) is taken
/// over: renamed away atomically (one taker wins the rename), checked still stale, dropped.
pub struct Lock {
    config: ChConfig,
    table: String,
    heartbeat: tokio::task::JoinHandle<()>,
}

#[derive(Row, Deserialize)]
struct LockAge {
    last: u32,
    now: u32,
}

impl Lock {
    pub async fn take(
        config: &ChConfig,
        month: Month,
        stale_after: std::time::Duration,
    ) -> Result<Lock, ArchiveError> {
        let table = config.table(&format!("archiver_lock_{}", month.partition()));
        for _ in 0..2 {
            match Lock::create(config, &table).await {
                Ok(()) => {
                    let heartbeat = tokio::spawn(heartbeat(config.clone(), table.clone(), stale_after / 4));
                    return Ok(Lock { config: config.clone(), table, heartbeat });
                }
                Err(e)
                    if tally_common::ch::error_code(&e)
                        == Some(tally_common::ch::CODE_TABLE_ALREADY_EXISTS) =>
                {
                    if !take_over_if_stale(config, &table, stale_after).await? {
                        break;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ArchiveError::Locked(month.to_string(), table))
    }

    async fn create(config: &ChConfig, table: &str) -> Result<(), clickhouse::error::Error> {
        let owner = format!("{}:{}", std::process::id(), uuid::Uuid::new_v4());
        let create = format!("CREATE TABLE {table} ENGINE = Log AS SELECT toString(?) AS owner, now() AS at");
        config.client().query(&create).bind(owner).execute().await
    }

    pub async fn release(self) -> Result<(), ArchiveError> {
        self.heartbeat.abort();
        self.config.client().query(&format!("DROP TABLE IF EXISTS {}", self.table)).execute().await?;
        Ok(())
    }
}

async fn heartbeat(config: ChConfig, table: String, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every.max(std::time::Duration::from_millis(100)));
    tick.tick().await;
    loop {
        tick.tick().await;
        let beat = format!("INSERT INTO {table} SELECT 'heartbeat', now()");
        if let Err(e) = config.client().query(&beat).execute().await {
            tracing::warn!(table = %table, error = %e, "lock heartbeat failed");
        }
    }
}

/// Seconds since the lock table's last heartbeat (ClickHouse's clock for both ends).
async fn lock_age(config: &ChConfig, table: &str) -> Result<Option<u32>, ArchiveError> {
    let sql = format!("SELECT toUInt32(max(at)) AS last, toUInt32(now()) AS now FROM {table}");
    match config.client().query(&sql).fetch_one::<LockAge>().await {
        Ok(age) => Ok(Some(age.now.saturating_sub(age.last))),
        Err(e) if tally_common::ch::error_code(&e) == Some(tally_common::ch::CODE_UNKNOWN_TABLE) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Removes a lock whose holder stopped beating; true when the caller may try to take it again.
async fn take_over_if_stale(
    config: &ChConfig,
    table: &str,
    stale_after: std::time::Duration,
) -> Result<bool, ArchiveError> {
    let stale = u32::try_from(stale_after.as_secs()).unwrap_or(u32::MAX);
    match lock_age(config, table).await? {
        None => return Ok(true),
        Some(age) if age < stale.max(1) => return Ok(false),
        Some(_) => {}
    }
    let aside = format!("{table}_stale_{}", uuid::Uuid::new_v4().simple());
    if let Err(e) = config.client().query(&format!("RENAME TABLE {table} TO {aside}")).execute().await {
        // Another archiver took it over first.
        tracing::info!(table = %table, error = %e, "stale lock: another archiver took it over");
        return Ok(false);
    }
    if lock_age(config, &aside).await?.is_some_and(|age| age < stale.max(1)) {
        // A fresh lock was renamed (another taker created it meanwhile): give it back.
        let _ = config.client().query(&format!("RENAME TABLE {aside} TO {table}")).execute().await;
        return Ok(false);
    }
    tracing::warn!(table = %table, "took over a lock whose archiver stopped (no heartbeat)");
    config.client().query(&format!("DROP TABLE IF EXISTS {aside}")).execute().await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cut_on_org_day_boundaries_within_the_bound() {
        let counts = [("a", 1, 40), ("a", 2, 50), ("b", 1, 20), ("c", 1, 150), ("d", 3, 10)]
            .map(|(o, d, n)| (o.to_string(), d, n));
        let cut = chunks(counts, 100);
        let spans: Vec<_> = cut.iter().map(|c| (c.first.0.as_str(), c.last.0.as_str(), c.rows)).collect();
        assert_eq!(spans, [("a", "a", 90), ("b", "b", 20), ("c", "c", 150), ("d", "d", 10)]);
        assert_eq!(cut.iter().map(|c| c.rows).sum::<u64>(), 270, "every row in exactly one chunk");
        assert!(chunks(Vec::new(), 100).is_empty());
    }
}
