//! Completing the rollups after an insert that ClickHouse applied to `events` but not to its
//! views. An INSERT into `events` writes the table's part first and then, one by one, the parts of
//! the materialized views; ClickHouse crashing in between (or, on a cluster, a view's quorum insert
//! refused: "another quorum insert has been already started") leaves rows in `events` that the
//! rollups never saw. The consumer checks whenever it finds rows of its records already stored:
//! after an insert that reported failure (the re-check), and when reconciliation skips rows after
//! a restart or rebalance (the consumer may have died with ClickHouse). For those records, each
//! rollup is compared with `events` per (org, bucket) on every measure it keeps (rows, tokens,
//! cost, errors):
//! - equal: complete;
//! - the rollup equals `events` less exactly the rows of those records: it gets them, built by the
//!   view's own SELECT (taken from the migration) restricted to those records;
//! - anything else (a gap of another insert, a bucket counted twice): the bucket is rebuilt — its
//!   rollup rows deleted (`ALTER … DELETE`, waited for) and the whole bucket inserted again from
//!   `events` by the view's SELECT. Only the owner of a partition writes its orgs (records are
//!   keyed by org) and it is the one rebuilding, so no other insert of those buckets runs
//!   meanwhile; rows it inserts later reach the rollup through the view as usual.
//!
//! Comparing every measure, not just the row count, is what keeps a gap of one insert from being
//! taken for another's (a bucket lacking 3 rows of an earlier insert, checked for a later insert of
//! 3 rows that the rollup has, would otherwise get those 3 again).

use std::collections::{BTreeSet, HashMap};

use clickhouse::Row;
use serde::Deserialize;
use tally_common::ch::{bind_all, placeholders};
use tally_schemas::migrations::MIGRATIONS;

/// A rollup fed by a view on `events`: its table, the bucket column and how raw rows map to it
/// (in SQL, and from the start of an hour as `toUInt32` of the bucket gives it).
struct Rollup {
    table: &'static str,
    view: &'static str,
    column: &'static str,
    raw_bucket: &'static str,
    bucket_of_hour: fn(u32) -> u32,
}

/// `toUInt32(toStartOfHour(t))` of an hour's start: itself.
fn same_hour(hour: u32) -> u32 {
    hour
}

/// `toUInt32(toDate(t))` (UTC) of an hour's start: its day number.
fn day_of_hour(hour: u32) -> u32 {
    hour / 86_400
}

const ROLLUPS: [Rollup; 2] = [
    Rollup {
        table: "rollup_hourly",
        view: "rollup_hourly_mv",
        column: "hour",
        raw_bucket: "toStartOfHour(timestamp)",
        bucket_of_hour: same_hour,
    },
    Rollup {
        table: "rollup_daily",
        view: "rollup_daily_mv",
        column: "day",
        raw_bucket: "toDate(timestamp)",
        bucket_of_hour: day_of_hour,
    },
];

/// What a repair found, summed over the rollups.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Repair {
    /// Buckets that already held the insert's rows.
    pub complete: usize,
    /// Buckets that lacked exactly them and were completed.
    pub repaired: usize,
    /// Buckets whose measures fit neither, rebuilt from `events`.
    pub rebuilt: usize,
}

/// Field-by-field `+` for a struct of counters.
macro_rules! add_fields {
    ($type:ident { $($field:ident),* }) => {
        impl std::ops::Add for $type {
            type Output = $type;

            fn add(self, other: $type) -> $type {
                $type { $($field: self.$field + other.$field),* }
            }
        }
    };
}

add_fields!(Repair { complete, repaired, rebuilt });

/// The measures a rollup keeps that a bucket is compared on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
struct Measures {
    rows: u64,
    tokens: u64,
    cost: i64,
    errors: u64,
}

add_fields!(Measures { rows, tokens, cost, errors });

/// A bucket of `events` holding rows of the records: all its rows, and the records' rows.
#[derive(Row, Deserialize)]
struct BucketCount {
    org_id: String,
    bucket: u32,
    rows: u64,
    tokens: u64,
    cost: i64,
    errors: u64,
    ours_rows: u64,
    ours_tokens: u64,
    ours_cost: i64,
    ours_errors: u64,
}

impl BucketCount {
    fn all(&self) -> Measures {
        Measures { rows: self.rows, tokens: self.tokens, cost: self.cost, errors: self.errors }
    }

    fn ours(&self) -> Measures {
        Measures {
            rows: self.ours_rows,
            tokens: self.ours_tokens,
            cost: self.ours_cost,
            errors: self.ours_errors,
        }
    }
}

#[derive(Row, Deserialize)]
struct RollupCount {
    org_id: String,
    bucket: u32,
    rows: u64,
    tokens: u64,
    cost: i64,
    errors: u64,
}

/// How a bucket of a rollup compares with `events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Complete,
    LacksOurs,
    Rebuild,
}

fn verdict(raw: Measures, ours: Measures, rollup: Measures) -> Verdict {
    if rollup == raw {
        Verdict::Complete
    } else if rollup + ours == raw {
        Verdict::LacksOurs
    } else {
        Verdict::Rebuild
    }
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
    // A few hundred runs of offsets per query at most (each is a few AST nodes). A bucket whose
    // checked rows fall in two chunks is seen off by the first and rebuilt from `events`.
    let mut outcome = Repair::default();
    for chunk in runs(records).chunks(RUNS_PER_QUERY) {
        outcome = outcome + repair_runs(client, events_table, chunk).await?;
    }
    Ok(outcome)
}

const RUNS_PER_QUERY: usize = 400;

/// After a re-read following a ClickHouse restart (`restart`): the rollups may still count rows
/// the restart took from `events` (stored again by the re-read, or by a retry meanwhile), or have
/// lost rows `events` kept. So each (org, hour) of `hours`, and its (org, day), is compared with
/// `events` on every measure, as a whole bucket: equal is complete, an empty rollup bucket gets the
/// bucket, anything else is rebuilt from `events`.
pub async fn settle(
    client: &clickhouse::Client,
    events_table: &str,
    hours: &BTreeSet<(String, u32)>,
) -> Result<Repair, clickhouse::error::Error> {
    let mut outcome = Repair::default();
    let hours: Vec<&(String, u32)> = hours.iter().collect();
    for chunk in hours.chunks(RUNS_PER_QUERY) {
        let orgs: BTreeSet<&str> = chunk.iter().map(|(org, _)| org.as_str()).collect();
        for rollup in &ROLLUPS {
            let buckets: BTreeSet<(&str, u32)> =
                chunk.iter().map(|(org, hour)| (org.as_str(), (rollup.bucket_of_hour)(*hour))).collect();
            let list: Vec<String> =
                buckets.iter().map(|(org, bucket)| format!("({}, {bucket})", literal(org))).collect();
            let records = Records {
                client,
                events_table,
                database: events_table.split('.').next().unwrap_or_default(),
                orgs: orgs.iter().copied().collect(),
                min_ts: chunk.iter().map(|(_, hour)| *hour).min().unwrap_or(0),
                ours: format!("((org_id, toUInt32({})) IN ({}))", rollup.raw_bucket, list.join(", ")),
            };
            records.repair_rollup(rollup, &mut outcome).await?;
        }
    }
    Ok(outcome)
}

/// A ClickHouse string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// `repair` for the records of `runs`.
async fn repair_runs(
    client: &clickhouse::Client,
    events_table: &str,
    runs: &[Run],
) -> Result<Repair, clickhouse::error::Error> {
    let mut outcome = Repair::default();
    let ours = records_condition(runs);
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

    /// Per (org, bucket) holding rows of the records: the measures of all its raw rows and of ours.
    async fn raw_counts(&self, rollup: &Rollup) -> Result<Vec<BucketCount>, clickhouse::error::Error> {
        let sql = format!(
            "SELECT org_id, toUInt32({bucket}) AS bucket, count() AS rows, sum(toUInt64(total_tokens)) AS tokens, \
             sum(cost_nanos) AS cost, sum(toUInt64(status = 'error')) AS errors, countIf({ours}) AS ours_rows, \
             sumIf(toUInt64(total_tokens), {ours}) AS ours_tokens, sumIf(cost_nanos, {ours}) AS ours_cost, \
             sumIf(toUInt64(status = 'error'), {ours}) AS ours_errors FROM {events} \
             WHERE org_id IN ({orgs}) AND {bucket} >= {bucket_of_min} GROUP BY org_id, bucket HAVING ours_rows > 0",
            bucket = rollup.raw_bucket,
            ours = self.ours,
            events = self.events_table,
            orgs = self.org_list(),
            bucket_of_min = rollup.raw_bucket.replace("timestamp", &format!("toDateTime({}, 'UTC')", self.min_ts)),
        );
        bind_all(self.client.query(&sql), self.orgs.iter().copied()).fetch_all().await
    }

    /// The measures the rollup holds per (org, bucket) from `first_bucket` on.
    async fn rollup_counts(
        &self,
        rollup: &Rollup,
        first_bucket: u32,
    ) -> Result<HashMap<(String, u32), Measures>, clickhouse::error::Error> {
        let sql = format!(
            "SELECT org_id, toUInt32({column}) AS bucket, toUInt64(countMerge(events)) AS rows, \
             sumMerge(total_tokens_sum) AS tokens, sumMerge(cost_nanos_sum) AS cost, sumMerge(errors) AS errors \
             FROM {database}.{table} \
             WHERE org_id IN ({orgs}) AND toUInt32({column}) >= {first_bucket} GROUP BY org_id, bucket",
            column = rollup.column,
            database = self.database,
            table = rollup.table,
            orgs = self.org_list(),
        );
        let rows: Vec<RollupCount> =
            bind_all(self.client.query(&sql), self.orgs.iter().copied()).fetch_all().await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    (r.org_id, r.bucket),
                    Measures { rows: r.rows, tokens: r.tokens, cost: r.cost, errors: r.errors },
                )
            })
            .collect())
    }

    /// Compares one rollup with the raw rows: completes the buckets that lack exactly ours and
    /// rebuilds those whose measures fit neither.
    async fn repair_rollup(
        &self,
        rollup: &Rollup,
        outcome: &mut Repair,
    ) -> Result<(), clickhouse::error::Error> {
        let raw = self.raw_counts(rollup).await?;
        let Some(first_bucket) = raw.iter().map(|b| b.bucket).min() else { return Ok(()) };
        let in_rollup = self.rollup_counts(rollup, first_bucket).await?;
        let (mut missing, mut rebuild) = (Vec::new(), Vec::new());
        for bucket in &raw {
            let have = in_rollup.get(&(bucket.org_id.clone(), bucket.bucket)).copied().unwrap_or_default();
            match verdict(bucket.all(), bucket.ours(), have) {
                Verdict::Complete => outcome.complete += 1,
                Verdict::LacksOurs => missing.push(bucket),
                Verdict::Rebuild => {
                    tracing::warn!(
                        rollup = rollup.table,
                        org_id = %bucket.org_id,
                        bucket = bucket.bucket,
                        raw = ?bucket.all(),
                        insert = ?bucket.ours(),
                        rollup_has = ?have,
                        "rollup bucket disagrees with events beyond the records checked; rebuilding it from events"
                    );
                    rebuild.push(bucket);
                }
            }
        }
        if missing.is_empty() && rebuild.is_empty() {
            return Ok(());
        }
        let Some((select, group)) = view_select(rollup.view, self.database) else {
            tracing::error!(view = rollup.view, "view definition not found in the migrations");
            return Ok(());
        };
        if !missing.is_empty() {
            let buckets = bucket_list(&missing);
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
            let shown: Vec<String> = missing
                .iter()
                .take(40)
                .map(|b| format!("{}@{}+{}", b.org_id, b.bucket, b.ours_rows))
                .collect();
            tracing::warn!(
                rollup = rollup.table,
                buckets = missing.len(),
                detail = %shown.join(" "),
                "completed rollup buckets an interrupted insert had left out"
            );
        }
        if !rebuild.is_empty() {
            self.rebuild(rollup, &rebuild, &select, &group).await?;
            outcome.rebuilt += rebuild.len();
        }
        Ok(())
    }

    /// Deletes the rollup's rows of `buckets` and inserts the buckets again from every raw row.
    /// A deletion (a mutation) only touches the parts older than itself, so the insert that
    /// follows is never deleted by it, here or on another replica, whenever the mutation runs.
    /// It is waited for a while, so reads see the rebuilt buckets at once; on a cluster 18.16
    /// holds back the latest quorum part of a partition from mutations until a newer quorum
    /// insert arrives, so the wait is bounded, not required: a check that runs before the
    /// deletion is applied sees the bucket off again and rebuilds it again, which converges to
    /// the last rebuild.
    async fn rebuild(
        &self,
        rollup: &Rollup,
        buckets: &[&BucketCount],
        select: &str,
        group: &str,
    ) -> Result<(), clickhouse::error::Error> {
        let list = bucket_list(buckets);
        let orgs = buckets.iter().map(|b| b.org_id.as_str());
        let delete = format!(
            "ALTER TABLE {database}.{table} DELETE WHERE (org_id, toUInt32({column})) IN ({list})",
            database = self.database,
            table = rollup.table,
            column = rollup.column,
        );
        bind_all(self.client.query(&delete), orgs.clone()).execute().await?;
        let insert = format!(
            "INSERT INTO {database}.{table} {select} FROM {events} \
             WHERE (org_id, toUInt32({bucket})) IN ({list}) GROUP BY {group}",
            database = self.database,
            table = rollup.table,
            events = self.events_table,
            bucket = rollup.raw_bucket,
        );
        bind_all(self.client.query(&insert), orgs).execute().await?;
        let pending = "SELECT count() FROM system.mutations WHERE database = ? AND table = ? AND NOT is_done";
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut left: u64 = 1;
        while left > 0 && std::time::Instant::now() < deadline {
            left = self.client.query(pending).bind(self.database).bind(rollup.table).fetch_one().await?;
            if left > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        let shown: Vec<String> =
            buckets.iter().take(40).map(|b| format!("{}@{}={}", b.org_id, b.bucket, b.rows)).collect();
        tracing::warn!(
            rollup = rollup.table,
            buckets = buckets.len(),
            deletion_applied = left == 0,
            detail = %shown.join(" "),
            "rebuilt rollup buckets from events"
        );
        Ok(())
    }
}

/// Consecutive offsets of one partition: (partition, first, last).
type Run = (i32, i64, i64);

/// `records` as runs of consecutive offsets, in order.
fn runs(records: &BTreeSet<(i32, i64)>) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for &(partition, offset) in records {
        match runs.last_mut() {
            Some((p, _, last)) if *p == partition && *last + 1 == offset => *last = offset,
            _ => runs.push((partition, offset, offset)),
        }
    }
    runs
}

/// The condition selecting the rows of the records of `runs`: one `BETWEEN` per run. Exact (the
/// runs hold only the records), and short: records found stored are mostly consecutive, where a
/// list of (partition, offset) pairs for a reconciled batch of thousands of records passed
/// ClickHouse's limit ("AST is too big") and stalled the check.
fn records_condition(runs: &[Run]) -> String {
    let runs: Vec<String> = runs
        .iter()
        .map(|(p, first, last)| {
            format!("(kafka_partition = {p} AND kafka_offset BETWEEN {first} AND {last})")
        })
        .collect();
    format!("({})", runs.join(" OR "))
}

/// `(?, bucket), …` for the buckets, their orgs bound in order.
fn bucket_list(buckets: &[&BucketCount]) -> String {
    buckets.iter().map(|b| format!("(?, {})", b.bucket)).collect::<Vec<_>>().join(", ")
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

    fn m(rows: u64, tokens: u64, cost: i64, errors: u64) -> Measures {
        Measures { rows, tokens, cost, errors }
    }

    #[test]
    fn a_bucket_is_judged_on_every_measure_not_the_row_count_alone() {
        let raw = m(10, 1_000, 5_000, 1);
        let ours = m(3, 300, 1_200, 0);
        assert_eq!(verdict(raw, ours, raw), Verdict::Complete);
        assert_eq!(verdict(raw, ours, m(7, 700, 3_800, 1)), Verdict::LacksOurs);
        // Lacks 3 rows of another insert (same count as ours, other tokens): not ours to add.
        assert_eq!(verdict(raw, ours, m(7, 650, 3_900, 1)), Verdict::Rebuild);
        // Ours counted twice somewhere, or any other mix.
        assert_eq!(verdict(raw, ours, m(13, 1_300, 6_200, 1)), Verdict::Rebuild);
        assert_eq!(verdict(raw, ours, Measures::default()), Verdict::Rebuild);
        // A bucket made only of our rows that the rollup lacks entirely.
        assert_eq!(verdict(ours, ours, Measures::default()), Verdict::LacksOurs);
    }

    #[test]
    fn the_records_condition_is_one_range_per_run_of_consecutive_offsets() {
        let records: BTreeSet<(i32, i64)> = [(1, 10), (1, 11), (1, 12), (1, 14), (2, 15), (2, 16)]
            .into_iter()
            .chain((100..5100).map(|o| (3, o)))
            .collect();
        assert_eq!(
            records_condition(&runs(&records)),
            "((kafka_partition = 1 AND kafka_offset BETWEEN 10 AND 12) OR (kafka_partition = 1 AND kafka_offset BETWEEN 14 AND 14) \
             OR (kafka_partition = 2 AND kafka_offset BETWEEN 15 AND 16) OR (kafka_partition = 3 AND kafka_offset BETWEEN 100 AND 5099))"
        );
    }

    #[test]
    fn a_bucket_of_an_hour_is_what_clickhouse_gives_for_its_rows() {
        // 2026-12-03 10:00:00 UTC.
        let hour = 1_796_292_000;
        assert_eq!((ROLLUPS[0].bucket_of_hour)(hour), hour);
        assert_eq!((ROLLUPS[1].bucket_of_hour)(hour), 20_790, "days since 1970-01-01");
        assert_eq!(literal("o'r\\g"), "'o\\'r\\\\g'");
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
