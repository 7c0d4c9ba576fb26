//! Exactly-once recovery. Offsets are committed only after ClickHouse confirmed an insert, so a
//! crash (or a revoke) between the two leaves records that are in ClickHouse but will be read
//! again. Every row carries its Kafka partition, offset and index in the record, which makes the
//! re-read detectable:
//!
//! 1. the first time a partition shows up after an assignment, find `high`, the largest offset of
//!    that partition already stored. Rows of records not yet committed were received after the
//!    first record read now, so their event time is at most 35 days (the validation bound) before
//!    that record's Kafka timestamp: the query prunes every older monthly partition;
//! 2. for records at offsets `<= high`, look up which (offset, index) rows exist, filtered by the
//!    records' orgs first (the table's sort key), and keep only the missing rows.
//!
//! The check is per row, not per record, so even an insert that ClickHouse applied partly (a
//! block spanning two months is two parts) is completed without a duplicate. Records above `high`
//! cost nothing. This assumes one events topic per database (partition numbers are not
//! qualified by topic).

use std::collections::{BTreeSet, HashMap, HashSet};

use tally_schemas::limits::{MAX_EVENT_AGE_MS, MAX_EVENT_FUTURE_MS};

use crate::batch::{BatchContext, Pending, Stage};
use crate::store::{ClickHouseError, EventStore};

/// The records of one partition checked, and which of their (offset, index) rows are stored.
struct Found {
    partition: i32,
    suspects: Vec<usize>,
    stored: HashSet<(i64, u32)>,
}

pub struct Reconciler {
    store: EventStore,
    /// Per partition: the largest offset already stored when the partition was (re)assigned, or
    /// -1 when none was.
    high: HashMap<i32, i64>,
    /// Per partition being read again after a ClickHouse restart (`restart`): the offset where
    /// the re-read meets what was read before it. Kept across rebalances.
    reread: HashMap<i32, i64>,
    /// The re-read partitions whose last re-read record has not come yet.
    reread_open: HashSet<i32>,
    /// Per partition: one past the last record whose insert this worker saw confirmed (kept
    /// across rebalances; its commit may still be on its way).
    confirmed: HashMap<i32, i64>,
}

/// What one reconciliation pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub checked_records: usize,
    pub skipped_rows: usize,
    pub duplicate_records: usize,
    /// (partition, offset) of the records that had rows already stored.
    pub stored_records: BTreeSet<(i32, i64)>,
    /// The (org, hour) buckets of the rows of records read again after a ClickHouse restart: once
    /// the re-read is over they are compared with `events` (`views::settle`), which finds the rows
    /// the restart took from `events` and stored again now (still counted by the rollups), and
    /// those it took from a rollup only.
    pub reread_hours: BTreeSet<(String, u32)>,
}

impl Reconciler {
    pub fn new(store: EventStore) -> Self {
        Reconciler {
            store,
            high: HashMap::new(),
            reread: HashMap::new(),
            reread_open: HashSet::new(),
            confirmed: HashMap::new(),
        }
    }

    /// `partition` is read again from an earlier offset up to `until` (exclusive): the (org, hour)
    /// of every row of those records is reported in `Outcome::reread_hours`.
    pub fn reread(&mut self, partition: i32, until: i64) {
        let until = self.reread.get(&partition).map_or(until, |&known| known.max(until));
        self.reread.insert(partition, until);
        self.reread_open.insert(partition);
    }

    /// Whether a re-read partition has not reached its last re-read record yet.
    pub fn rereading_any(&self) -> bool {
        !self.reread_open.is_empty()
    }

    /// Forgets what was known: called after every rebalance, as another replica may have written.
    pub fn reset(&mut self) {
        self.high.clear();
    }

    async fn high_offset(&self, partition: i32, first_kafka_ts_ms: i64) -> Result<i64, ClickHouseError> {
        let floor_s = (first_kafka_ts_ms - MAX_EVENT_AGE_MS - MAX_EVENT_FUTURE_MS).div_euclid(1000);
        let high = self.store.high_offset(partition, floor_s).await?;
        Ok(high.map_or(-1, |h| i64::try_from(h).unwrap_or(i64::MAX)))
    }

    /// After a successful insert: what this worker stored counts as stored, so a re-delivery of it
    /// (an eager rebalance restarts fetching from the committed offset) is checked row by row.
    pub fn record_stored(&mut self, batch: &[Pending]) {
        for pending in batch {
            let high = self.high.entry(pending.partition).or_insert(-1);
            *high = (*high).max(pending.offset);
        }
    }

    /// After an insert ClickHouse confirmed (and before its asynchronous commit).
    pub fn record_confirmed(&mut self, batch: &[Pending]) {
        self.record_stored(batch);
        for (partition, next) in crate::batch::next_offsets(batch) {
            let known = self.confirmed.entry(partition).or_insert(next);
            *known = (*known).max(next);
        }
    }

    /// Whether this worker saw the insert of the record at `offset` of `partition` confirmed
    /// (it is read again).
    pub fn confirmed_before(&self, partition: i32, offset: i64) -> bool {
        self.confirmed.get(&partition).is_some_and(|&next| offset < next)
    }

    /// Per partition, one past the last record whose insert this worker saw confirmed.
    pub fn confirmed(&self) -> HashMap<i32, i64> {
        self.confirmed.clone()
    }

    /// Removes from `batch` every row ClickHouse already holds, and records delivered twice.
    pub async fn filter(&mut self, batch: &mut [Pending]) -> Result<Outcome, ClickHouseError> {
        let mut outcome = Outcome::default();
        // A rebalance during collection can deliver the same record twice into one batch: the
        // second copy keeps its place (it is committed like the first) but loses its rows.
        let mut seen = HashSet::new();
        for pending in batch.iter_mut() {
            if !seen.insert((pending.partition, pending.offset)) {
                pending.decoded = Ok(Vec::new());
                outcome.duplicate_records += 1;
            }
        }
        let partitions: BTreeSet<i32> = batch.iter().map(|p| p.partition).collect();
        // A killed owner's insert of a newly assigned partition may still be running on the
        // server: one wait for all of them, before their stored rows are looked at.
        let new: BTreeSet<i32> = partitions.iter().copied().filter(|p| !self.high.contains_key(p)).collect();
        if !new.is_empty() {
            self.store.wait_for_inserts(&new).await?;
        }
        // First every query, then every change to the batch: a call that fails half way (one
        // shard not caught up yet) leaves the batch as it was, so the call that is retried
        // reports every stored record — the rollup check runs on exactly those. (Removing rows
        // as each partition was answered lost the records of the answered partitions from the
        // retried call's outcome, and their rollups were never checked.)
        let mut found: Vec<Found> = Vec::new();
        for partition in partitions {
            if !self.high.contains_key(&partition) {
                let first = batch.iter().filter(|p| p.partition == partition).min_by_key(|p| p.offset);
                let first_ts = first.map_or(0, |p| p.kafka_timestamp_ms);
                let high = self.high_offset(partition, first_ts).await?;
                if high >= 0 {
                    tracing::info!(
                        partition,
                        high,
                        "partition assigned with rows already stored; reconciling up to there"
                    );
                }
                self.high.insert(partition, high);
            }
            let high = self.high[&partition];
            let suspects: Vec<usize> = (0..batch.len())
                .filter(|&i| {
                    batch[i].partition == partition && batch[i].offset <= high && batch[i].decoded.is_ok()
                })
                .collect();
            if suspects.is_empty() {
                continue;
            }
            let stored = self.stored_positions(batch, partition, &suspects).await?;
            found.push(Found { partition, suspects, stored });
        }
        self.note_reread(batch, &mut outcome);
        for Found { partition, suspects, stored } in found {
            outcome.checked_records += suspects.len();
            for &i in &suspects {
                let offset = batch[i].offset;
                if let Ok(rows) = &mut batch[i].decoded {
                    let before = rows.len();
                    rows.retain(|row| !stored.contains(&(offset, row.kafka_index)));
                    if rows.len() < before {
                        outcome.skipped_rows += before - rows.len();
                        outcome.stored_records.insert((partition, offset));
                    }
                }
            }
        }
        Ok(outcome)
    }

    /// Whether the record at `offset` of `partition` is one a re-read reads again.
    pub fn rereading(&self, partition: i32, offset: i64) -> bool {
        self.reread.get(&partition).is_some_and(|&until| offset < until)
    }

    /// The (org, hour) of every row of the re-read records of `batch`; closes the re-read of a
    /// partition at its last re-read record.
    fn note_reread(&mut self, batch: &[Pending], outcome: &mut Outcome) {
        if self.reread.is_empty() {
            return;
        }
        for pending in batch {
            let Some(&until) = self.reread.get(&pending.partition) else { continue };
            if pending.offset >= until {
                continue;
            }
            if pending.offset + 1 == until {
                self.reread_open.remove(&pending.partition);
            }
            for row in pending.decoded.iter().flatten() {
                outcome.reread_hours.insert((row.org_id.to_string(), row.timestamp - row.timestamp % 3600));
            }
        }
    }

    /// The (offset, index) pairs of the `suspects` records that are already stored.
    async fn stored_positions(
        &self,
        batch: &[Pending],
        partition: i32,
        suspects: &[usize],
    ) -> Result<HashSet<(i64, u32)>, ClickHouseError> {
        let (mut min_offset, mut max_offset) = (i64::MAX, i64::MIN);
        for &i in suspects {
            min_offset = min_offset.min(batch[i].offset);
            max_offset = max_offset.max(batch[i].offset);
        }
        let rows = suspects.iter().flat_map(|&i| batch[i].decoded.iter().flatten());
        self.store.stored_positions(partition, (min_offset, max_offset), rows).await
    }
}

impl Stage for Reconciler {
    type Outcome = Outcome;

    async fn apply(
        &mut self,
        batch: &mut Vec<Pending>,
        _: &BatchContext,
    ) -> Result<Outcome, ClickHouseError> {
        self.filter(batch).await
    }
}
