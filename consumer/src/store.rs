//! Every query the consumer sends to `tally.events`, as typed functions: the insert of a batch,
//! and the look-ups of the exactly-once checks (stored positions) and of the dedup window (stored
//! ids). The rollup repair's queries, derived from migration 0002's views, stay in `views.rs`.

use std::collections::{BTreeSet, HashSet};
use std::time::Instant;

use clickhouse::Row;
use serde::Deserialize;
use tally_common::ch::{self, ChConfig};
use tally_schemas::limits::MAX_EVENT_AGE_MS;
use tally_schemas::EventRow;

pub type ClickHouseError = clickhouse::error::Error;

/// ClickHouse error codes that mean "these rows will never be accepted": retrying cannot help, so
/// the records are isolated and dead-lettered. Everything else (network, timeouts, too many
/// parts, memory) is transient and retried without committing. 6/26/27/32/33/38/41/53/69/70/72:
/// parse and conversion errors of the data; 36 BAD_ARGUMENTS; 117 INCORRECT_DATA; 130/131 array
/// size errors; 395 a `throwIf` (a guard expression, e.g. a column DEFAULT, refusing the row).
const PERMANENT_CODES: &[u32] = &[6, 26, 27, 32, 33, 36, 38, 41, 53, 69, 70, 72, 117, 130, 131, 395];

pub fn is_permanent(error: &ClickHouseError) -> bool {
    ch::error_code(error).is_some_and(|code| PERMANENT_CODES.contains(&code))
}

#[derive(Row, Deserialize)]
struct High {
    stored: u64,
    high: u64,
}

#[derive(Row, Deserialize)]
struct Position {
    kafka_offset: u64,
    kafka_index: u32,
}

/// An id stored within the dedup window, with where and when it arrived.
#[derive(Row, Deserialize)]
pub struct StoredId {
    pub kafka_partition: u16,
    pub org_id: String,
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: uuid::Uuid,
    pub received_at: u32,
}

#[derive(Row, Deserialize)]
struct FoundId {
    org_id: String,
    #[serde(with = "clickhouse::serde::uuid")]
    event_id: uuid::Uuid,
}

/// `tally.events` of one database.
#[derive(Clone)]
pub struct EventStore {
    client: clickhouse::Client,
    table: String,
}

/// The query id of an insert into `table` of rows of these Kafka partitions:
/// `tally-insert.<table>.p<a>_<b>….<uuid>`. `views::repair` reads it from `system.processes` to
/// wait for an insert of its partitions that ClickHouse is still applying.
pub fn insert_query_id(table: &str, partitions: &std::collections::BTreeSet<u16>) -> String {
    let list: Vec<String> = partitions.iter().map(u16::to_string).collect();
    format!("{}p{}.{}", insert_query_id_prefix(table), list.join("_"), uuid::Uuid::new_v4())
}

pub fn insert_query_id_prefix(table: &str) -> String {
    format!("tally-insert.{table}.")
}

/// The partitions named in an insert's query id (see `insert_query_id`).
pub fn partitions_of_insert(query_id: &str, table: &str) -> Vec<i32> {
    let Some(rest) = query_id.strip_prefix(&insert_query_id_prefix(table)) else { return Vec::new() };
    let list = rest.strip_prefix('p').and_then(|r| r.split('.').next()).unwrap_or("");
    list.split('_').filter_map(|p| p.parse().ok()).collect()
}

/// ClickHouse finishes an INSERT whose client is gone (a consumer killed after sending its batch):
/// the `events` part first, then each view's. Judging the rollups while such an insert of these
/// partitions still runs would "complete" a bucket its view is about to complete (the rollup
/// repair), or insert again rows that are about to appear (reconciliation after a rebalance):
/// both seen in the kill -9 crash test under loaded fresh-clone CI runs. So the repair, and the
/// reconciliation of a newly assigned partition, first wait, at most a minute, until no insert
/// of these partitions (named in its query id, `insert_query_id`) runs on the server.
pub async fn wait_for_inserts(
    client: &clickhouse::Client,
    events_table: &str,
    partitions: &BTreeSet<i32>,
) -> Result<(), clickhouse::error::Error> {
    let prefix = insert_query_id_prefix(events_table);
    for _ in 0..600 {
        let running: Vec<String> = client
            .query("SELECT query_id FROM system.processes WHERE query_id LIKE ?")
            .bind(format!("{prefix}%"))
            .fetch_all()
            .await?;
        let busy = running
            .iter()
            .any(|id| partitions_of_insert(id, events_table).iter().any(|p| partitions.contains(p)));
        if !busy {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    tracing::warn!(
        table = events_table,
        "an insert of these partitions still runs after 60 s; checking the rollups anyway"
    );
    Ok(())
}

impl EventStore {
    pub fn new(config: &ChConfig) -> Self {
        EventStore { client: config.client(), table: config.table("events") }
    }

    pub fn client(&self) -> &clickhouse::Client {
        &self.client
    }

    /// `database.events`.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Inserts `rows` as one INSERT (one block: `max_insert_block_size` is above the batch bound).
    /// Returns the time ClickHouse took.
    pub async fn insert(&self, rows: &[&EventRow]) -> Result<std::time::Duration, ClickHouseError> {
        let started = Instant::now();
        let partitions: std::collections::BTreeSet<u16> = rows.iter().map(|r| r.kafka_partition).collect();
        let mut insert = self
            .client
            .insert_unescaped::<EventRow>(&self.table)
            .await?
            .with_setting("max_insert_block_size", "1048576")
            .with_setting("query_id", insert_query_id(&self.table, &partitions));
        for row in rows {
            insert.write(row).await?;
        }
        insert.end().await?;
        Ok(started.elapsed())
    }

    /// The largest offset of `partition` stored with an event time from `since_s` on (epoch
    /// seconds), or None when nothing is.
    pub async fn high_offset(&self, partition: i32, since_s: i64) -> Result<Option<u64>, ClickHouseError> {
        let sql = format!(
            "SELECT count() AS stored, max(kafka_offset) AS high FROM {} WHERE kafka_partition = ? AND timestamp >= toDateTime(?)",
            self.table
        );
        let found: High = self.client.query(&sql).bind(partition).bind(since_s.max(0)).fetch_one().await?;
        Ok((found.stored > 0).then_some(found.high))
    }

    /// Which (offset, index) positions of `partition` within `offsets` (inclusive) are stored, for
    /// records whose rows are `rows`. Filtered by the rows' orgs and earliest event time first, so
    /// ClickHouse reads only the granules of those orgs (the table's sort key) instead of scanning.
    pub async fn stored_positions<'a>(
        &self,
        partition: i32,
        offsets: (i64, i64),
        rows: impl Iterator<Item = &'a EventRow>,
    ) -> Result<HashSet<(i64, u32)>, ClickHouseError> {
        let mut orgs: BTreeSet<&str> = BTreeSet::new();
        let mut min_ts = u32::MAX;
        for row in rows {
            orgs.insert(&row.org_id);
            min_ts = min_ts.min(row.timestamp);
        }
        if orgs.is_empty() {
            return Ok(HashSet::new());
        }
        let sql = format!(
            "SELECT kafka_offset, kafka_index FROM {} WHERE org_id IN ({}) AND timestamp >= toDateTime(?) \
             AND kafka_partition = ? AND kafka_offset >= ? AND kafka_offset <= ?",
            self.table,
            ch::placeholders(orgs.len(), "?")
        );
        let query = ch::bind_all(self.client.query(&sql), orgs);
        let stored: Vec<Position> =
            query.bind(min_ts).bind(partition).bind(offsets.0).bind(offsets.1).fetch_all().await?;
        Ok(stored.into_iter().map(|p| (i64::try_from(p.kafka_offset).unwrap_or(-1), p.kafka_index)).collect())
    }

    /// Streams every id of `partitions` that arrived from `since` on (epoch seconds) to `each`.
    pub async fn for_each_id_since(
        &self,
        partitions: &[i32],
        since: u32,
        mut each: impl FnMut(StoredId),
    ) -> Result<(), ClickHouseError> {
        // An event's time is at most MAX_EVENT_AGE before its arrival: prunes older months.
        let event_floor = (i64::from(since) - MAX_EVENT_AGE_MS / 1000).max(0);
        let sql = format!(
            "SELECT kafka_partition, org_id, event_id, received_at FROM {} \
             WHERE timestamp >= toDateTime(?) AND received_at >= toDateTime(?) AND kafka_partition IN ({})",
            self.table,
            ch::placeholders(partitions.len(), "?")
        );
        let query = self.client.query(&sql).bind(event_floor).bind(since);
        let mut cursor = ch::bind_all(query, partitions.iter().copied()).fetch::<StoredId>()?;
        while let Some(stored) = cursor.next().await? {
            each(stored);
        }
        Ok(())
    }

    /// Which of the `candidates` (org, id) pairs are stored, arrived from `since` on.
    pub async fn stored_ids(
        &self,
        candidates: &HashSet<(&str, uuid::Uuid)>,
        since: u32,
    ) -> Result<HashSet<(String, uuid::Uuid)>, ClickHouseError> {
        let orgs: BTreeSet<&str> = candidates.iter().map(|(org, _)| *org).collect();
        let ids: BTreeSet<String> = candidates.iter().map(|(_, id)| id.to_string()).collect();
        let event_floor = (i64::from(since) - MAX_EVENT_AGE_MS / 1000).max(0);
        let sql = format!(
            "SELECT org_id, event_id FROM {} WHERE org_id IN ({}) AND timestamp >= toDateTime(?) \
             AND received_at >= toDateTime(?) AND event_id IN ({})",
            self.table,
            ch::placeholders(orgs.len(), "?"),
            ch::placeholders(ids.len(), "toUUID(?)"),
        );
        let query = ch::bind_all(self.client.query(&sql), orgs).bind(event_floor).bind(since);
        let found: Vec<FoundId> = ch::bind_all(query, ids).fetch_all().await?;
        Ok(found.into_iter().map(|f| (f.org_id, f.event_id)).collect())
    }
}
