//! Completing the rollups after an insert that ClickHouse applied to `events` but not to its
//! views. An INSERT into `events` writes the table's part first and then, one by one, the parts of
//! the materialized views; ClickHouse crashing in between leaves rows in `events` that the
//! rollups never saw. The consumer checks whenever it finds rows of its records already stored:
//! after an insert that reported failure (the re-check), and when reconciliation skips rows after
//! a restart or rebalance (the consumer may have died with ClickHouse). For those records, each
//! rollup is compared with `events` per (org, bucket), and where a rollup lacks exactly the rows
//! of those records, it gets them, built by the view's own SELECT (taken from the migration)
//! restricted to those records.
//!
//! Exact because only the owner of a partition writes its orgs (records are keyed by org), each
//! rollup bucket (org, hour or day) either has or lacks an insert's rows as a whole (one view part
//! per month partition), and every earlier gap was completed when it was found; a bucket whose
//! counts fit neither "complete" nor "lacks exactly these rows" (e.g. rows of a complete and of an
//! interrupted insert re-read together) is left alone and reported (`inconsistent`).

use std::collections::{BTreeSet, HashMap};

use clickhouse::Row;
use serde::Deserialize;
use tally_common::ch::{bind_all, placeholders};
use tally_schemas::migrations::MIGRATIONS;

/// A rollup fed by a view on `events`: its table, the bucket column and how raw rows map to it.
struct Rollup {
    table: &'static str,
    view: &'static str,
    column: &'static str,
    raw_bucket: &'static str,
}

const ROLLUPS: [Rollup; 2] = [
    Rollup {
        table: "rollup_hourly",
        view: "rollup_hourly_mv",
        column: "hour",
        raw_bucket: "toStartOfHour(timestamp)",
    },
    Rollup { table: "rollup_daily", view: "rollup_daily_mv", column: "day", raw_bucket: "toDate(timestamp)" },
];

/// What a repair found, summed over the rollups.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Repair {
    /// Buckets that already held the insert's rows.
    pub complete: usize,
    /// Buckets that lacked them and were completed.
    pub repaired: usize,
    /// Buckets whose counts fit neither (left alone, logged).
    pub inconsistent: usize,
}

impl std::ops::Add for Repair {
    type Output = Repair;

    fn add(self, other: Repair) -> Repair {
        Repair {
            complete: self.complete + other.complete,
            repaired: self.repaired + other.repaired,
            inconsistent: self.inconsistent + other.inconsistent,
        }
    }
}

#[derive(Row, Deserialize)]
struct BucketCount {
    org_id: String,
    bucket: u32,
    rows: u64,
    ours: u64,
}

#[derive(Row, Deserialize)]
struct RollupCount {
    org_id: String,
    bucket: u32,
    rows: u64,
}

/// The SELECT of a view as the migration defines it, split before `FROM` and at `GROUP BY`.
fn view_select(view: &str, database: &str) -> Option<(String, String)> {
    let prefix = format!("CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.{view} ");
    let statement =
        MIGRATIONS.iter().flat_map(|m| m.statements(database)).find(|s| s.starts_with(&prefix))?;
    let select = &statement[statement.find("SELECT")?..];
    let from = select.find("\nFROM ")?;
    let group = select.rfind("GROUP BY ")?;
    Some((select[..from].to_owned(), select[group + "GROUP BY ".len()..].trim().to_owned()))
}

#[derive(Row, Deserialize)]
struct Span {
    org_id: String,
    first: u32,
}

/// Completes the rollups for `records` ((partition, offset) of records whose rows are in
/// `events` but whose insert may have stopped before the views), on the server of `client`.
/// The caller first waits until no insert of those partitions still runs
/// (`EventStore::repair_views`).
pub async fn repair(
    client: &clickhouse::Client,
    events_table: &str,
    records: &BTreeSet<(i32, i64)>,
) -> Result<Repair, clickhouse::error::Error> {
    let mut outcome = Repair::default();
    if records.is_empty() {
        return Ok(outcome);
    }
    let positions = records
        .iter()
        .map(|(partition, offset)| format!("({partition}, {offset})"))
        .collect::<Vec<_>>()
        .join(", ");
    let ours = format!("(kafka_partition, kafka_offset) IN ({positions})");
    // The records' orgs and earliest event time bound what ClickHouse reads below.
    let spans: Vec<Span> = client
        .query(&format!(
            "SELECT org_id, toUInt32(min(timestamp)) AS first FROM {events_table} WHERE {ours} GROUP BY org_id"
        ))
        .fetch_all()
        .await?;
    if spans.is_empty() {
        // None of the records' rows is on this server (another shard's).
        return Ok(outcome);
    }
    let records = Records {
        client,
        events_table,
        database: events_table.split('.').next().unwrap_or_default(),
        orgs: spans.iter().map(|s| s.org_id.as_str()).collect::<BTreeSet<_>>().into_iter().collect(),
        min_ts: spans.iter().map(|s| s.first).min().unwrap_or(0),
        ours,
    };
    for rollup in &ROLLUPS {
        records.repair_rollup(rollup, &mut outcome).await?;
    }
    Ok(outcome)
}

/// The records being checked: their orgs, their earliest event time, and the condition that
/// selects their rows of `events`.
struct Records<'a> {
    client: &'a clickhouse::Client,
    events_table: &'a str,
    database: &'a str,
    orgs: Vec<&'a str>,
    min_ts: u32,
    ours: String,
}

impl Records<'_> {
    fn org_list(&self) -> String {
        placeholders(self.orgs.len(), "?")
    }

    /// Per (org, bucket) holding rows of the records: all its raw rows and how many are ours.
    async fn raw_counts(&self, rollup: &Rollup) -> Result<Vec<BucketCount>, clickhouse::error::Error> {
        let sql = format!(
            "SELECT org_id, toUInt32({bucket}) AS bucket, count() AS rows, countIf({ours}) AS ours FROM {events} \
             WHERE org_id IN ({orgs}) AND {bucket} >= {bucket_of_min} GROUP BY org_id, bucket HAVING ours > 0",
            bucket = rollup.raw_bucket,
            ours = self.ours,
            events = self.events_table,
            orgs = self.org_list(),
            bucket_of_min = rollup.raw_bucket.replace("timestamp", &format!("toDateTime({}, 'UTC')", self.min_ts)),
        );
        bind_all(self.client.query(&sql), self.orgs.iter().copied()).fetch_all().await
    }

    /// The rows the rollup counts per (org, bucket) from `first_bucket` on.
    async fn rollup_counts(
        &self,
        rollup: &Rollup,
        first_bucket: u32,
    ) -> Result<HashMap<(String, u32), u64>, clickhouse::error::Error> {
        let sql = format!(
            "SELECT org_id, toUInt32({column}) AS bucket, toUInt64(countMerge(events)) AS rows FROM {database}.{table} \
             WHERE org_id IN ({orgs}) AND toUInt32({column}) >= {first_bucket} GROUP BY org_id, bucket",
            column = rollup.column,
            database = self.database,
            table = rollup.table,
            orgs = self.org_list(),
        );
        let rows: Vec<RollupCount> =
            bind_all(self.client.query(&sql), self.orgs.iter().copied()).fetch_all().await?;
        Ok(rows.into_iter().map(|r| ((r.org_id, r.bucket), r.rows)).collect())
    }

    /// Compares one rollup with the raw rows and completes the buckets that lack exactly ours.
    async fn repair_rollup(
        &self,
        rollup: &Rollup,
        outcome: &mut Repair,
    ) -> Result<(), clickhouse::error::Error> {
        let raw = self.raw_counts(rollup).await?;
        let Some(first_bucket) = raw.iter().map(|b| b.bucket).min() else { return Ok(()) };
        let in_rollup = self.rollup_counts(rollup, first_bucket).await?;
        let missing: Vec<&BucketCount> =
            raw.iter().filter(|bucket| lacks_ours(rollup, bucket, &in_rollup, outcome)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let Some((select, group)) = view_select(rollup.view, self.database) else {
            tracing::error!(view = rollup.view, "view definition not found in the migrations");
            outcome.inconsistent += missing.len();
            return Ok(());
        };
        let buckets = missing.iter().map(|b| format!("(?, {})", b.bucket)).collect::<Vec<_>>().join(", ");
        let sql = format!(
            "INSERT INTO {database}.{table} {select} FROM {events} WHERE {ours} \
             AND (org_id, toUInt32({bucket})) IN ({buckets}) GROUP BY {group}",
            database = self.database,
            table = rollup.table,
            events = self.events_table,
            ours = self.ours,
            bucket = rollup.raw_bucket,
        );
        bind_all(self.client.query(&sql), missing.iter().map(|b| b.org_id.as_str())).execute().await?;
        outcome.repaired += missing.len();
        // Which buckets, with the rows added to each: what a later inconsistency is traced back to.
        let shown: Vec<String> =
            missing.iter().take(40).map(|b| format!("{}@{}+{}", b.org_id, b.bucket, b.ours)).collect();
        tracing::warn!(
            rollup = rollup.table,
            buckets = missing.len(),
            detail = %shown.join(" "),
            "completed rollup buckets an interrupted insert had left out"
        );
        Ok(())
    }
}

/// Whether the rollup lacks exactly our rows of `bucket`; counts a complete bucket, and logs and
/// counts one whose numbers fit neither.
fn lacks_ours(
    rollup: &Rollup,
    bucket: &BucketCount,
    in_rollup: &HashMap<(String, u32), u64>,
    outcome: &mut Repair,
) -> bool {
    let have = in_rollup.get(&(bucket.org_id.clone(), bucket.bucket)).copied().unwrap_or(0);
    if have == bucket.rows {
        outcome.complete += 1;
        false
    } else if have + bucket.ours == bucket.rows {
        true
    } else {
        outcome.inconsistent += 1;
        tracing::error!(
            rollup = rollup.table,
            org_id = %bucket.org_id,
            bucket = bucket.bucket,
            raw = bucket.rows,
            rollup_rows = have,
            insert_rows = bucket.ours,
            "rollup bucket disagrees with events beyond the failed insert; left as is"
        );
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_insert_names_its_partitions_in_its_query_id() {
        let id = crate::store::insert_query_id("db.events", &[0u16, 3, 12].into_iter().collect());
        assert!(id.starts_with("tally-insert.db.events.p0_3_12."), "{id}");
        assert_eq!(crate::store::partitions_of_insert(&id, "db.events"), [0, 3, 12]);
        assert!(crate::store::partitions_of_insert(&id, "other.events").is_empty());
        assert!(crate::store::partitions_of_insert("some-other-query", "db.events").is_empty());
    }

    #[test]
    fn the_views_select_comes_from_the_migration() {
        for rollup in &ROLLUPS {
            let (select, group) = view_select(rollup.view, "db1").expect(rollup.view);
            assert!(select.starts_with("SELECT") && select.contains("quantilesTimingState"), "{select}");
            assert!(!select.contains("FROM"), "{select}");
            assert!(group.starts_with("org_id,"), "{group}");
        }
    }
}
