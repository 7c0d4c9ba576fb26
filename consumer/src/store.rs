//! Every query the consumer sends to `tally.events`, as typed functions: the insert of a batch,
//! and the look-ups of the exactly-once checks (stored positions) and of the dedup window (stored
//! ids). The rollup repair's queries, derived from migration 0002's views, stay in `views.rs`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clickhouse::Row;
use serde::Deserialize;
use tally_common::ch::{self, ChConfig};
use tally_schemas::limits::MAX_EVENT_AGE_MS;

use crate::batch::{self, RowBytes};
use crate::views;

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
struct SlotCount {
    slot: u32,
    ids: u64,
}

/// The earliest event time of an event that arrived from `since` on (epoch seconds): an event's
/// time is at most MAX_EVENT_AGE before its arrival, so this prunes older months.
fn event_floor(since: u32) -> i64 {
    (i64::from(since) - MAX_EVENT_AGE_MS / 1000).max(0)
}

/// The condition on `events` of the ids of some partitions (one `?` each, after `event_floor`
/// and `since`) that arrived from `since` on: the dedup window's rebuild counts and then reads
/// the same rows.
fn arrived_since(partitions: usize) -> String {
    format!(
        "timestamp >= toDateTime(?) AND received_at >= toDateTime(?) AND kafka_partition IN ({})",
        ch::placeholders(partitions, "?")
    )
}

#[derive(Row, Deserialize)]
struct FoundId {
    org_id: String,
    #[serde(with = "clickhouse::serde::uuid")]
    event_id: uuid::Uuid,
}

/// How much of an insert is buffered before it goes to ClickHouse (the client's own chunk size).
const INSERT_CHUNK_BYTES: usize = 256 * 1024;

/// One shard of the events table: a client per replica, and the replica in use. On a single
/// server there is one shard of one replica.
struct Shard {
    urls: Vec<String>,
    replicas: Vec<clickhouse::Client>,
    active: AtomicUsize,
}

impl Shard {
    fn index(&self) -> usize {
        self.active.load(Ordering::Relaxed) % self.replicas.len()
    }

    fn client(&self) -> &clickhouse::Client {
        &self.replicas[self.index()]
    }

    fn url(&self) -> &str {
        &self.urls[self.index()]
    }

    /// After a failure that says the replica in use is unreachable, the next one is used. Any
    /// replica serves the exactly-once checks once it is caught up (`EventStore::caught_up`).
    fn fail_over(&self, error: &ClickHouseError) {
        if self.replicas.len() > 1 && is_unreachable(error) {
            let from = self.url().to_owned();
            self.active.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(from = %from, to = %self.url(), error = %error, "clickhouse replica unreachable; using the next replica of its shard");
        }
    }
}

fn is_unreachable(error: &ClickHouseError) -> bool {
    matches!(error, ClickHouseError::Network(_) | ClickHouseError::TimedOut)
}

#[derive(Row, Deserialize)]
struct Route {
    org_id: String,
    shard: u32,
}

#[derive(Row, Deserialize)]
struct Replicated {
    table: String,
    zookeeper_path: String,
}

#[derive(Row, Deserialize)]
struct ZkNode {
    name: String,
    #[serde(rename = "numChildren")]
    num_children: i32,
}

/// `tally.events` of one database: on one server, or on a cluster's shards (each org's rows on
/// the shard `cityHash64(org_id) % shards`, the Distributed tables' rule), where every read of
/// the exactly-once checks is asked of each shard and merged, and every insert goes to the shard
/// of its rows' orgs with `insert_quorum` (docs/architecture.md says why that keeps exactly once).
#[derive(Clone)]
pub struct EventStore {
    table: String,
    shards: Arc<Vec<Shard>>,
    cluster: bool,
    /// The shard of each org seen, as ClickHouse computes it.
    routes: Arc<Mutex<HashMap<String, usize>>>,
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
async fn wait_for_inserts_on(
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
        let shard = |urls: Vec<String>, quorum: Option<usize>| {
            let replicas = urls
                .iter()
                .map(|url| {
                    let client = config.at(url).client();
                    match quorum {
                        // Confirmed only once `quorum` replicas hold the part (and its views'
                        // parts); a replica down fails the insert fast (too few live replicas).
                        Some(quorum) => client
                            .with_setting("insert_quorum", quorum.to_string())
                            .with_setting("insert_quorum_timeout", "30000"),
                        None => client,
                    }
                })
                .collect();
            Shard { urls, replicas, active: AtomicUsize::new(0) }
        };
        let shards = match &config.cluster {
            Some(cluster) if !cluster.shards.is_empty() => {
                cluster.shards.iter().map(|urls| shard(urls.clone(), Some(cluster.insert_quorum))).collect()
            }
            _ => vec![shard(vec![config.url.clone()], None)],
        };
        EventStore {
            table: config.table("events"),
            shards: Arc::new(shards),
            cluster: config.cluster.is_some(),
            routes: Arc::default(),
        }
    }

    /// The shard index of each of `orgs`, asking ClickHouse for those not seen before.
    async fn shards_of(&self, orgs: &BTreeSet<&str>) -> Result<HashMap<String, usize>, ClickHouseError> {
        if self.shards.len() == 1 {
            return Ok(orgs.iter().map(|org| ((*org).to_owned(), 0)).collect());
        }
        let unknown: Vec<&str> = {
            let routes = self.routes.lock().expect("routes lock");
            orgs.iter().copied().filter(|org| !routes.contains_key(*org)).collect()
        };
        if !unknown.is_empty() {
            let sql = format!(
                "SELECT org_id, toUInt32({key} % {n}) AS shard FROM (SELECT arrayJoin([{list}]) AS org_id)",
                key = tally_schemas::cluster::SHARDING_KEY,
                n = self.shards.len(),
                list = ch::placeholders(unknown.len(), "?"),
            );
            let mut last = None;
            let mut found = None;
            // Any server evaluates the rule: the first replica that answers.
            for shard in self.shards.iter() {
                match ch::bind_all(shard.client().query(&sql), unknown.iter().copied())
                    .fetch_all::<Route>()
                    .await
                {
                    Ok(routes) => {
                        found = Some(routes);
                        break;
                    }
                    Err(error) => {
                        shard.fail_over(&error);
                        last = Some(error);
                    }
                }
            }
            let found = found.ok_or_else(|| last.expect("at least one shard was asked"))?;
            let mut routes = self.routes.lock().expect("routes lock");
            routes.extend(found.into_iter().map(|r| (r.org_id, r.shard as usize)));
        }
        let routes = self.routes.lock().expect("routes lock");
        Ok(orgs.iter().filter_map(|org| routes.get(*org).map(|s| ((*org).to_owned(), *s))).collect())
    }

    /// Runs `read` on each shard (in turn) after checking that its replica in use holds every
    /// part written on the shard; a failure moves the shard to its next replica and is returned.
    async fn on_each_shard<'s, T>(
        &'s self,
        shards: impl IntoIterator<Item = usize>,
        mut read: impl FnMut(
            usize,
            &'s clickhouse::Client,
        ) -> futures::future::BoxFuture<'s, Result<T, ClickHouseError>>,
    ) -> Result<Vec<T>, ClickHouseError> {
        let mut out = Vec::new();
        for index in shards {
            let shard = &self.shards[index];
            let result = match self.caught_up(shard).await {
                Ok(()) => read(index, shard.client()).await,
                Err(error) => Err(error),
            };
            match result {
                Ok(value) => out.push(value),
                Err(error) => {
                    shard.fail_over(&error);
                    return Err(error);
                }
            }
        }
        Ok(out)
    }

    /// On a cluster: fails (to be retried) unless every row the replica in use holds is held by
    /// the quorum, and it holds every row any replica holds. Three conditions, per table (`events`
    /// and the rollups):
    /// - no part still to fetch (`system.replicas`: the log copied, no insert queued): a replica that lacks a
    ///   part confirmed (or half-written) elsewhere would make the checks see rows as missing and
    ///   send them again as a different block, which replication would then double; the queue
    ///   lists such a part from the moment its writer registers it in ZooKeeper, before any answer;
    /// - no quorum pending (`<zookeeper_path>/quorum/status` on 18.16, children of
    ///   `quorum/parallel` on a current ClickHouse): a part whose quorum insert ended in
    ///   "unknown status" lives on its writer only until the other replicas fetch it; counting its
    ///   rows as stored before then would commit offsets for rows one disk holds;
    /// - no part whose quorum failed still active on the replica (`quorum/failed_parts`):
    ///   ClickHouse detaches it when the table next starts, so the consumer restarts the table
    ///   and waits; its rows then count as missing and are sent again.
    async fn caught_up(&self, shard: &Shard) -> Result<(), ClickHouseError> {
        if !self.cluster {
            return Ok(());
        }
        let database = self.table.split('.').next().unwrap_or_default();
        let tables = "('events', 'rollup_hourly', 'rollup_daily')";
        let client = shard.client();
        let not_yet = |what: String| {
            Err(ClickHouseError::Custom(format!(
                "replica {} {what}; the exactly-once checks wait for it",
                shard.url()
            )))
        };
        // `inserts_in_queue`: parts written elsewhere still to fetch; `log_pointer`: the replica
        // has copied every entry of the shard's log into its queue (a replica just restarted has
        // not, and its empty queue would say nothing yet); read-only or expired: it cannot know.
        let behind: u64 = client
            .query(&format!(
                "SELECT count() FROM system.replicas WHERE database = ? AND table IN {tables} \
                 AND (is_readonly OR is_session_expired OR inserts_in_queue > 0 \
                 OR (log_max_index > 0 AND log_pointer <= log_max_index))"
            ))
            .bind(database)
            .fetch_one()
            .await?;
        if behind > 0 {
            return not_yet(format!(
                "is still fetching parts written on another replica ({behind} tables behind)"
            ));
        }
        let replicated: Vec<Replicated> = client
            .query(&format!(
                "SELECT table, zookeeper_path FROM system.replicas WHERE database = ? AND table IN {tables}"
            ))
            .bind(database)
            .fetch_all()
            .await?;
        for Replicated { table, zookeeper_path: path } in replicated {
            // 18.16 keeps one `quorum/status` while a quorum insert is pending; a current
            // ClickHouse (`insert_quorum_parallel`) keeps a child of `quorum/parallel` per part.
            let nodes: Vec<ZkNode> = client
                .query("SELECT name, numChildren FROM system.zookeeper WHERE path = ?")
                .bind(format!("{path}/quorum"))
                .fetch_all()
                .await?;
            if nodes.iter().any(|n| n.name == "status" || (n.name == "parallel" && n.num_children > 0)) {
                return not_yet(format!("has a quorum insert into {path} not yet on every replica"));
            }
            // A part whose quorum failed (no replica could fetch it from its writer in time) is
            // forgotten by ClickHouse: its writer detaches it (`noquorum_…`) when it next starts
            // the table. Until then its rows are visible on the writer only, and counting them
            // as stored would lose them: seen on the cluster, a rollup part of an insert whose
            // `events` part made its quorum, checked "complete" on the writer, then detached.
            let doomed: Vec<String> = client
                .query(
                    "SELECT name FROM system.parts WHERE database = ? AND table = ? AND active \
                     AND name IN (SELECT name FROM system.zookeeper WHERE path = ?)",
                )
                .bind(database)
                .bind(&table)
                .bind(format!("{path}/quorum/failed_parts"))
                .fetch_all()
                .await?;
            if !doomed.is_empty() {
                tracing::warn!(
                    replica = shard.url(),
                    table = %table,
                    parts = %doomed.join(" "),
                    "parts whose quorum failed are still active here; restarting the replica's table so ClickHouse detaches them"
                );
                client.query(&format!("SYSTEM RESTART REPLICA {database}.{table}")).execute().await?;
                return not_yet(format!(
                    "held parts of {table} whose quorum failed ({}), detached now by restarting the table",
                    doomed.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// Inserts `rows`, on a cluster one INSERT per shard holding some (each one block:
    /// `max_insert_block_size` is above the batch bound). Returns the time ClickHouse took. When a
    /// shard fails the others' inserts still complete; the error is returned and the caller
    /// re-checks which rows are stored before trying again.
    pub async fn insert(&self, rows: &[RowBytes<'_>]) -> Result<std::time::Duration, ClickHouseError> {
        let started = Instant::now();
        if self.shards.len() == 1 {
            let shard = &self.shards[0];
            return match self.insert_into(shard, rows).await {
                Ok(()) => Ok(started.elapsed()),
                Err(error) => {
                    shard.fail_over(&error);
                    Err(error)
                }
            };
        }
        let orgs: BTreeSet<&str> = rows.iter().map(|r| r.org_id).collect();
        let routes = self.shards_of(&orgs).await?;
        let mut per_shard: Vec<Vec<RowBytes>> = vec![Vec::new(); self.shards.len()];
        for row in rows {
            per_shard[routes[row.org_id]].push(*row);
        }
        let inserts =
            per_shard.iter().enumerate().filter(|(_, rows)| !rows.is_empty()).map(
                |(index, rows)| async move { (index, self.insert_into(&self.shards[index], rows).await) },
            );
        let mut first_error = None;
        for (index, result) in futures::future::join_all(inserts).await {
            if let Err(error) = result {
                self.shards[index].fail_over(&error);
                first_error.get_or_insert(error);
            }
        }
        match first_error {
            None => Ok(started.elapsed()),
            Some(error) => Err(error),
        }
    }

    async fn insert_into(&self, shard: &Shard, rows: &[RowBytes<'_>]) -> Result<(), ClickHouseError> {
        let partitions: std::collections::BTreeSet<u16> = rows.iter().map(|r| r.kafka_partition).collect();
        let sql =
            format!("INSERT INTO {}({}) FORMAT RowBinary", self.table, tally_schemas::row::select_list());
        let mut insert = shard
            .client()
            .insert_formatted_with(sql)
            .with_setting("max_insert_block_size", "1048576")
            .with_setting("query_id", insert_query_id(&self.table, &partitions))
            .buffered_with_capacity(INSERT_CHUNK_BYTES);
        for row in rows {
            insert.write_buffered(row.bytes);
            if insert.buf_len() >= INSERT_CHUNK_BYTES {
                insert.flush().await?;
            }
        }
        insert.end().await
    }

    /// Waits until no insert of `partitions` runs on any server (`wait_for_inserts_on`). On a
    /// cluster a replica that cannot be reached runs no insert that could still land.
    pub async fn wait_for_inserts(&self, partitions: &BTreeSet<i32>) -> Result<(), ClickHouseError> {
        for shard in self.shards.iter() {
            for (url, client) in shard.urls.iter().zip(&shard.replicas) {
                match wait_for_inserts_on(client, &self.table, partitions).await {
                    Ok(()) => {}
                    Err(error) if self.cluster && is_unreachable(&error) => {
                        tracing::info!(replica = %url, "replica unreachable while waiting for running inserts; none of it can land");
                    }
                    Err(error) => return Err(error),
                }
            }
        }
        Ok(())
    }

    /// Completes the rollups for `records` ((partition, offset)) whose rows are stored but whose
    /// insert may have stopped before the views (`views::repair`), on every shard.
    pub async fn repair_views(
        &self,
        records: &BTreeSet<(i32, i64)>,
    ) -> Result<views::Repair, ClickHouseError> {
        if records.is_empty() {
            return Ok(views::Repair::default());
        }
        self.wait_for_inserts(&records.iter().map(|(p, _)| *p).collect()).await?;
        let table = &self.table;
        self.repair_on_every_shard(|client| Box::pin(views::repair(client, table, records))).await
    }

    /// A repair of the views on every shard, summed.
    async fn repair_on_every_shard<'s>(
        &'s self,
        mut repair: impl FnMut(
            &'s clickhouse::Client,
        ) -> futures::future::BoxFuture<'s, Result<views::Repair, ClickHouseError>>,
    ) -> Result<views::Repair, ClickHouseError> {
        let outcomes = self.on_each_shard(0..self.shards.len(), |_, client| repair(client)).await?;
        Ok(outcomes.into_iter().fold(views::Repair::default(), |sum, r| sum + r))
    }

    /// When the server started (epoch seconds, `now() - uptime()`), for `restart`; None on a
    /// cluster, whose replicas fetch a lost part again from each other.
    pub async fn server_started(&self) -> Result<Option<i64>, ClickHouseError> {
        if self.cluster {
            return Ok(None);
        }
        let sql = "SELECT toInt64(now()) - toInt64(uptime())";
        let started = self.shards[0].client().query(sql).fetch_one::<i64>().await?;
        Ok(Some(started))
    }

    /// Compares the rollups with `events` in the (org, hour) buckets of `hours` and their days,
    /// rebuilding those that differ (`views::settle`).
    pub async fn settle_views(
        &self,
        hours: &BTreeSet<(String, u32)>,
    ) -> Result<views::Repair, ClickHouseError> {
        if hours.is_empty() {
            return Ok(views::Repair::default());
        }
        let table = &self.table;
        self.repair_on_every_shard(|client| Box::pin(views::settle(client, table, hours))).await
    }

    /// The largest offset of `partition` stored with an event time from `since_s` on (epoch
    /// seconds), or None when nothing is.
    pub async fn high_offset(&self, partition: i32, since_s: i64) -> Result<Option<u64>, ClickHouseError> {
        let sql = format!(
            "SELECT count() AS stored, max(kafka_offset) AS high FROM {} WHERE kafka_partition = ? AND timestamp >= toDateTime(?)",
            self.table
        );
        let sql = &sql;
        let found = self
            .on_each_shard(0..self.shards.len(), |_, client| {
                Box::pin(client.query(sql).bind(partition).bind(since_s.max(0)).fetch_one::<High>())
            })
            .await?;
        Ok(found.iter().filter(|f| f.stored > 0).map(|f| f.high).max())
    }

    /// The orgs of `orgs` per shard index, for the shards holding any.
    async fn orgs_by_shard<'o>(
        &self,
        orgs: BTreeSet<&'o str>,
    ) -> Result<BTreeMap<usize, BTreeSet<&'o str>>, ClickHouseError> {
        let routes = self.shards_of(&orgs).await?;
        let mut by_shard: BTreeMap<usize, BTreeSet<&str>> = BTreeMap::new();
        for org in orgs {
            by_shard.entry(routes[org]).or_default().insert(org);
        }
        Ok(by_shard)
    }

    /// Which (offset, index) positions of `partition` within `offsets` (inclusive) are stored, for
    /// records whose rows are `rows`. Filtered by the rows' orgs and earliest event time first, so
    /// ClickHouse reads only the granules of those orgs (the table's sort key) instead of scanning.
    pub async fn stored_positions<'a>(
        &self,
        partition: i32,
        offsets: (i64, i64),
        rows: impl Iterator<Item = &'a batch::Row>,
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
        let by_shard = self.orgs_by_shard(orgs).await?;
        let by_shard = &by_shard;
        let found = self
            .on_each_shard(by_shard.keys().copied(), |index, client| {
                let orgs = &by_shard[&index];
                let sql = format!(
                    "SELECT kafka_offset, kafka_index FROM {} WHERE org_id IN ({}) AND timestamp >= toDateTime(?) \
                     AND kafka_partition = ? AND kafka_offset >= ? AND kafka_offset <= ?",
                    self.table,
                    ch::placeholders(orgs.len(), "?")
                );
                let query = ch::bind_all(client.query(&sql), orgs.iter().copied())
                    .bind(min_ts)
                    .bind(partition)
                    .bind(offsets.0)
                    .bind(offsets.1);
                Box::pin(query.fetch_all::<Position>())
            })
            .await?;
        Ok(found
            .into_iter()
            .flatten()
            .map(|p| (i64::try_from(p.kafka_offset).unwrap_or(-1), p.kafka_index))
            .collect())
    }

    /// The ids of `partitions` that arrived from `since` on (epoch seconds), counted by slot of
    /// `slot_seconds` (the slot's start, epoch seconds), over every shard.
    pub async fn ids_by_slot(
        &self,
        partitions: &[i32],
        since: u32,
        slot_seconds: u32,
    ) -> Result<BTreeMap<u32, u64>, ClickHouseError> {
        let sql = format!(
            "SELECT toUInt32(intDiv(toUInt32(received_at), ?) * ?) AS slot, count() AS ids FROM {} \
             WHERE {} GROUP BY slot",
            self.table,
            arrived_since(partitions.len())
        );
        let sql = &sql;
        let counted = self
            .on_each_shard(0..self.shards.len(), |_, client| {
                let query = client
                    .query(sql)
                    .bind(slot_seconds)
                    .bind(slot_seconds)
                    .bind(event_floor(since))
                    .bind(since);
                Box::pin(ch::bind_all(query, partitions.iter().copied()).fetch_all::<SlotCount>())
            })
            .await?;
        let mut slots = BTreeMap::new();
        for count in counted.into_iter().flatten() {
            *slots.entry(count.slot).or_insert(0) += count.ids;
        }
        Ok(slots)
    }

    /// Streams every id of `partitions` that arrived from `since` on (epoch seconds) to `each`.
    pub async fn for_each_id_since(
        &self,
        partitions: &[i32],
        since: u32,
        mut each: impl FnMut(StoredId),
    ) -> Result<(), ClickHouseError> {
        let sql = format!(
            "SELECT kafka_partition, org_id, event_id, received_at FROM {} WHERE {}",
            self.table,
            arrived_since(partitions.len())
        );
        for shard in self.shards.iter() {
            let streamed = async {
                self.caught_up(shard).await?;
                let query = shard.client().query(&sql).bind(event_floor(since)).bind(since);
                let mut cursor = ch::bind_all(query, partitions.iter().copied()).fetch::<StoredId>()?;
                while let Some(stored) = cursor.next().await? {
                    each(stored);
                }
                Ok(())
            };
            if let Err(error) = streamed.await {
                shard.fail_over(&error);
                return Err(error);
            }
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
        let by_shard = self.orgs_by_shard(orgs).await?;
        let by_shard = &by_shard;
        let event_floor = event_floor(since);
        let found = self
            .on_each_shard(by_shard.keys().copied(), |index, client| {
                let orgs = &by_shard[&index];
                let ids: BTreeSet<String> = candidates
                    .iter()
                    .filter(|(org, _)| orgs.contains(org))
                    .map(|(_, id)| id.to_string())
                    .collect();
                let sql = format!(
                    "SELECT org_id, event_id FROM {} WHERE org_id IN ({}) AND timestamp >= toDateTime(?) \
                     AND received_at >= toDateTime(?) AND event_id IN ({})",
                    self.table,
                    ch::placeholders(orgs.len(), "?"),
                    ch::placeholders(ids.len(), "toUUID(?)"),
                );
                let query =
                    ch::bind_all(client.query(&sql), orgs.iter().copied()).bind(event_floor).bind(since);
                Box::pin(ch::bind_all(query, ids).fetch_all::<FoundId>())
            })
            .await?;
        Ok(found.into_iter().flatten().map(|f| (f.org_id, f.event_id)).collect())
    }
}
