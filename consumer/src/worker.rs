//! The loop: poll a batch, run it through the stages (revoked partitions, reconciliation, dedup),
//! store it, commit it. Offsets are committed only after ClickHouse confirmed, so a failure in
//! between means the batch is read again and reconciled, never skipped.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::Headers;
use rdkafka::Message;
use tally_schemas::parse::truncate_utf8;
use tally_schemas::record::{event_count, RecordFormat, HEADER_EVENTS, HEADER_FORMAT};
use tokio::task::{JoinError, JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::batch::{
    rows_of, BatchContext, DropRevoked, KafkaPayload, Payload, Pending, RawRecord, RowBytes, Stage,
};
use crate::config::ConsumerConfig;
use crate::dedup::{Deduplicator, Lent, Prechecked};
use crate::error::ConsumerError;
use crate::kafka::{self, DeadLetterReason, DeadLetters, KafkaConsumer};
use crate::metrics::ConsumerMetrics;
use crate::reconcile::Reconciler;
use crate::restart::RestartWatch;
use crate::retry::{until_ok, Backoff};
use crate::store::{is_permanent, ClickHouseError, EventStore};
use crate::views;

pub struct Worker {
    pub config: ConsumerConfig,
    pub consumer: Arc<KafkaConsumer>,
    pub dead_letters: DeadLetters,
    pub store: EventStore,
    pub metrics: ConsumerMetrics,
}

/// What the loop learns across batches, reset after every rebalance.
struct LoopState {
    reconciler: Reconciler,
    dedup: Deduplicator,
    generation_seen: u64,
    /// When the window's last eviction was logged (at most one warning in ten minutes).
    evictions_logged: Option<Instant>,
    restarts: RestartWatch,
    /// What a re-read after a ClickHouse restart went through so far: its rows' (org, hour)
    /// buckets, settled once it is over, and the rows it stored again.
    reread: Reread,
}

#[derive(Default)]
struct Reread {
    hours: BTreeSet<(String, u32)>,
    stored: usize,
}

/// A batch checked by the stages: the partitions owned, and the (org, hour) buckets of its rows
/// that a re-read reads again.
struct Checked {
    assigned: BTreeSet<i32>,
    reread_hours: BTreeSet<(String, u32)>,
}

/// A decoded batch, and its dedup check if that was made while the previous batch was inserted.
struct Ready {
    batch: Vec<Pending>,
    prechecked: Option<Prechecked>,
}

/// A batch being decoded on a blocking thread.
type Decoding = JoinHandle<Vec<Pending>>;

/// Waits for the next batch's decoding, then checks it against the dedup windows `lent` (which
/// first record the ids of the batch being inserted), on a blocking thread. Gives the windows back
/// with the batch.
fn check_ahead(
    decoding: Decoding,
    mut lent: Lent,
    assigned: BTreeSet<i32>,
) -> JoinHandle<Result<(Lent, Ready), JoinError>> {
    tokio::spawn(async move {
        let batch = decoding.await?;
        tokio::task::spawn_blocking(move || {
            let prechecked = lent.precheck(&batch, &assigned, epoch_now());
            (lent, Ready { batch, prechecked })
        })
        .await
    })
}

/// How an insert ended.
enum Attempt {
    Stored(usize),
    Refused(ClickHouseError),
    Shutdown,
}

/// When a batch whose first record was produced at `produced_ms` closes: `wait` after that
/// record reached Kafka, not after it was polled. A record that queued in the client while the
/// previous batch was being stored has already waited; counting from its production keeps an
/// event's time from 202 to stored at about `wait` plus one insert, and the batches of a busy
/// partition still at least `wait` apart (the first record of the next batch arrived after the
/// previous batch closed). Never later than `wait` from now, whatever the producer's clock says.
fn batch_deadline(produced_ms: i64, wait: Duration) -> Instant {
    let age_ms = chrono::Utc::now().timestamp_millis().saturating_sub(produced_ms).max(0);
    let waited = Duration::from_millis(u64::try_from(age_ms).unwrap_or(0));
    Instant::now() + wait.saturating_sub(waited)
}

/// Frees a stored batch on a blocking thread. A full batch is a hundred thousand rows of several
/// small allocations each; freeing them takes tens of milliseconds (measured 20-55 ms per batch of
/// 100 000 rows on two cores), during which the loop could not start the next insert and ClickHouse
/// would wait. Small batches are freed at once.
fn free_elsewhere(batch: Vec<Pending>) {
    if batch.iter().map(Pending::row_count).sum::<usize>() < 10_000 {
        return;
    }
    tokio::task::spawn_blocking(move || drop(batch));
}

/// The rows a record says it holds (the ingest's `tally-events` header), so that polling a batch
/// does not read every payload once more between two inserts; None when it does not say (then its
/// lines are counted). The count only sizes the batch: decoding reads every line whatever it says.
fn announced_rows(message: &impl Message) -> Option<usize> {
    let headers = message.headers()?;
    headers.iter().find(|header| header.key == HEADER_EVENTS).and_then(|header| event_count(header.value?))
}

/// How much of an unknown `tally-format` value a dead letter repeats (a header may be far longer).
const MAX_FORMAT_NAME: usize = 64;

/// The record's format by its `tally-format` header (JSONEachRow without one); Err names a format
/// this consumer does not read (the record is dead-lettered), cut to `MAX_FORMAT_NAME` bytes.
fn record_format(message: &impl Message) -> Result<RecordFormat, String> {
    let value = message
        .headers()
        .and_then(|headers| headers.iter().find(|header| header.key == HEADER_FORMAT))
        .map(|header| header.value.unwrap_or_default());
    RecordFormat::of_header(value).ok_or_else(|| {
        let name = String::from_utf8_lossy(value.unwrap_or_default());
        truncate_utf8(&name, MAX_FORMAT_NAME).to_owned()
    })
}

/// The rows of a record that does not announce its count, for sizing the batch only: the lines of
/// a JSONEachRow record, a RowBinary record's bytes at 200 per row (rows are rarely smaller).
fn counted_rows(format: &Result<RecordFormat, String>, payload: &[u8]) -> usize {
    match format {
        Ok(RecordFormat::RowBinary) => payload.len() / 200,
        _ => memchr::memchr_iter(b'\n', payload).count(),
    }
    .max(1)
}

fn epoch_now() -> u32 {
    u32::try_from(chrono::Utc::now().timestamp()).unwrap_or(u32::MAX)
}

impl Worker {
    /// Polling never overlaps an insert, so a revoke (delivered during a poll) is always seen by
    /// `DropRevoked` before the next insert. Under a backlog (a batch that reached the row bound),
    /// the next batch is polled first, then decoded and checked against the dedup window on other
    /// threads while this one is checked and stored: ClickHouse's insert work and the consumer's
    /// per-row work overlap, and ClickHouse waits between inserts only for the poll. A batch
    /// closed by time (light traffic) is stored at once.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ConsumerError> {
        let mut state = LoopState {
            reconciler: Reconciler::new(self.store.clone()),
            dedup: Deduplicator::new(
                self.store.clone(),
                self.config.dedup_window_hours,
                self.config.dedup_max_ids,
            ),
            evictions_logged: None,
            generation_seen: u64::MAX,
            restarts: RestartWatch::new(self.config.restart_reread),
            reread: Reread::default(),
        };
        let mut ready: Option<Ready> = None;
        loop {
            let (raw, full) = self.collect_raw(&shutdown, ready.is_none()).await;
            if let Some((code, reason)) = self.consumer.client().fatal_error() {
                return Err(ConsumerError::KafkaFatal { code, reason });
            }
            let stopping = shutdown.is_cancelled();
            let decoding =
                tokio::task::spawn_blocking(move || raw.into_iter().map(Pending::decode).collect());
            let next = match ready.take() {
                Some(current) => match self.process(current, Some(decoding), &mut state, &shutdown).await? {
                    Some(next) => next,
                    None => return Ok(()),
                },
                None => Ready { batch: decoding.await?, prechecked: None },
            };
            if full && !stopping {
                ready = Some(next);
                continue;
            }
            if !next.batch.is_empty() && self.process(next, None, &mut state, &shutdown).await?.is_none() {
                return Ok(());
            }
            if stopping {
                return Ok(());
            }
        }
    }

    /// Polls up to a batch of records, undecoded: rows are counted from each record's header (or
    /// its lines), so the bound holds before decoding. With `wait`, waits for a first record and
    /// then up to the batch wait; without, takes only what the client already fetched. Returns the
    /// records and whether the row bound was reached.
    async fn collect_raw(&self, shutdown: &CancellationToken, wait: bool) -> (Vec<RawRecord>, bool) {
        let mut batch = Vec::new();
        let mut rows = 0usize;
        let mut deadline: Option<Instant> = if wait { None } else { Some(Instant::now()) };
        while rows < self.config.batch_max_rows {
            let wait =
                deadline.map_or(Duration::from_millis(200), |d| d.saturating_duration_since(Instant::now()));
            let message = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                received = tokio::time::timeout(wait, self.consumer.recv()) => received,
            };
            let message = match message {
                // Idle: a fatal error may have been raised without an error event reaching us.
                Err(_elapsed) if batch.is_empty() && deadline.is_none() => {
                    if self.consumer.client().fatal_error().is_some() {
                        break;
                    }
                    continue;
                }
                Err(_elapsed) => break,
                Ok(Err(error)) => {
                    tracing::warn!(error = %error, "kafka receive failed");
                    if self.consumer.client().fatal_error().is_some() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Ok(Ok(message)) => message,
            };
            let kafka_timestamp_ms =
                message.timestamp().to_millis().unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
            deadline.get_or_insert_with(|| batch_deadline(kafka_timestamp_ms, self.config.batch_max_wait));
            let (partition, offset) = (message.partition(), message.offset());
            let counted = announced_rows(&message);
            let format = record_format(&message);
            let original = Payload::Kafka(KafkaPayload::new(message, &self.consumer));
            rows += counted.unwrap_or_else(|| counted_rows(&format, &original));
            batch.push(RawRecord { partition, offset, kafka_timestamp_ms, original, format });
        }
        (batch, rows >= self.config.batch_max_rows)
    }

    /// Checks and stores one batch, then commits it; meanwhile `next` (the next batch, decoding) is
    /// decoded and checked ahead against the dedup window. Returns the next batch (empty without
    /// `next`), None on shutdown.
    async fn process(
        &self,
        current: Ready,
        next: Option<Decoding>,
        state: &mut LoopState,
        shutdown: &CancellationToken,
    ) -> Result<Option<Ready>, ConsumerError> {
        let Ready { mut batch, prechecked } = current;
        self.watch_restarts(state).await;
        let Some(Checked { assigned, reread_hours }) =
            self.check(&mut batch, prechecked, state, shutdown).await
        else {
            return Ok(None);
        };
        let ahead = next.map(|decoding| check_ahead(decoding, state.dedup.lend(), assigned));
        let stored = batch.is_empty() || self.store_batch(&mut batch, &mut state.reconciler, shutdown).await;
        if !stored {
            tracing::info!("shutdown during insert retries; the uncommitted batch will be read again");
            return Ok(None);
        }
        if !self.after_reread(&batch, reread_hours, state, shutdown).await {
            return Ok(None);
        }
        let next = match ahead {
            Some(task) => {
                let (lent, next) = task.await??;
                state.dedup.give_back(lent);
                next
            }
            None => Ready { batch: Vec::new(), prechecked: None },
        };
        // Records of revoked partitions only: nothing to store or commit, the new owner reads them.
        if batch.is_empty() {
            return Ok(Some(next));
        }
        state.reconciler.record_confirmed(&batch);
        let now = epoch_now();
        state.dedup.record_stored(now);
        self.report_window(state, now);
        #[cfg(feature = "failpoints")]
        self.config.failpoints.crash_before_commit();
        // A failed commit is safe: the batch is read again and reconciled. (The commit is
        // asynchronous; its outcome is logged when a later poll delivers it.)
        if let Err(error) = kafka::commit(&self.consumer, &self.config.events_topic, &batch) {
            tracing::warn!(error = %error, "offset commit failed");
        }
        self.metrics.batches.inc();
        free_elsewhere(batch);
        Ok(Some(next))
    }

    /// The dedup window's size, and what its bound made it forget.
    fn report_window(&self, state: &mut LoopState, now: u32) {
        let dedup = &mut state.dedup;
        self.metrics.dedup_ids.set(dedup.ids() as i64);
        self.metrics.dedup_bytes.set(dedup.heap_bytes() as i64);
        let remembered = dedup.remembered_seconds(now);
        self.metrics.dedup_window_seconds.set(i64::from(remembered));
        let evicted = dedup.take_evicted();
        if evicted == 0 {
            return;
        }
        self.metrics.dedup_evicted.inc_by(evicted as u64);
        if state.evictions_logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(600)) {
            state.evictions_logged = Some(Instant::now());
            tracing::warn!(
                evicted,
                remembered_seconds = remembered,
                window_hours = self.config.dedup_window_hours,
                max_ids = self.config.dedup_max_ids,
                "the dedup window reached TALLY_DEDUP_MAX_IDS and forgot its oldest event ids: a retry \
                 arriving more than remembered_seconds after its first copy is stored again; raise \
                 TALLY_DEDUP_MAX_IDS (10-21 bytes per id), add replicas or shorten TALLY_DEDUP_WINDOW_HOURS"
            );
        }
    }

    /// Between batches, at most once a second: has ClickHouse restarted? Then every assigned
    /// partition is read again from `TALLY_RESTART_REREAD_SECONDS` before the server's start
    /// (`restart`).
    async fn watch_restarts(&self, state: &mut LoopState) {
        if !state.restarts.due() {
            return;
        }
        let started = match self.store.server_started().await {
            Ok(Some(started)) => started,
            Ok(None) => return state.restarts.turn_off(),
            Err(_) => return state.restarts.missed(),
        };
        let Some(since_ms) = state.restarts.observe(started, chrono::Utc::now().timestamp()) else { return };
        let (consumer, topic) = (self.consumer.clone(), self.config.events_topic.clone());
        let confirmed = state.reconciler.confirmed();
        let rewound =
            tokio::task::spawn_blocking(move || kafka::rewind(&consumer, &topic, since_ms, &confirmed)).await;
        let moved = match rewound.map_err(|join| join.to_string()).and_then(|r| r.map_err(|e| e.to_string()))
        {
            Ok(moved) => moved,
            Err(error) => {
                tracing::warn!(%error, "ClickHouse restarted but the partitions could not be moved back for the re-read; trying again");
                return state.restarts.failed();
            }
        };
        if moved.is_empty() {
            tracing::info!(
                server_started = started,
                "ClickHouse started recently; nothing committed since then to read again"
            );
            return;
        }
        self.metrics.clickhouse_restarts.inc();
        for rewound in &moved {
            state.reconciler.reread(rewound.partition, rewound.until);
        }
        // Reconciliation asks ClickHouse again what it holds: the restart may have lost rows.
        state.reconciler.reset();
        let shown: Vec<String> =
            moved.iter().map(|r| format!("{}:{}..{}", r.partition, r.from, r.until)).collect();
        let why = if state.restarts.first_sight() {
            "ClickHouse started less than TALLY_RESTART_REREAD_SECONDS before this consumer first saw it"
        } else {
            "ClickHouse restarted"
        };
        tracing::warn!(
            server_started = started,
            reread_seconds = self.config.restart_reread.as_secs(),
            partitions = %shown.join(" "),
            "{why}: reading what was stored shortly before its start again, to store any confirmed insert the restart lost"
        );
    }

    /// After the insert of a batch: adds what it re-read to the re-read's account, and once the
    /// re-read is over (every re-read partition reached its last re-read record, or a batch held
    /// none) compares the rollup buckets of all the re-read rows with `events` and rebuilds those
    /// that differ (`views::settle`). False on shutdown.
    async fn after_reread(
        &self,
        batch: &[Pending],
        hours: BTreeSet<(String, u32)>,
        state: &mut LoopState,
        shutdown: &CancellationToken,
    ) -> bool {
        let reconciler = &state.reconciler;
        let stored: usize = batch
            .iter()
            .filter(|p| reconciler.rereading(p.partition, p.offset))
            .map(Pending::row_count)
            .sum();
        self.metrics.reread_rows_stored.inc_by(stored as u64);
        let reread = &mut state.reread;
        let this_batch_reread = !hours.is_empty();
        reread.stored += stored;
        reread.hours.extend(hours);
        if reread.hours.is_empty() || (this_batch_reread && reconciler.rereading_any()) {
            return true;
        }
        let settled = until_ok(
            &mut Backoff::default(),
            shutdown,
            "rollup settle",
            &mut (&self.store, &reread.hours),
            |(store, hours)| Box::pin(store.settle_views(hours)),
        )
        .await;
        let Some(repair) = settled else { return false };
        tracing::warn!(
            rows_stored_again = reread.stored,
            buckets = reread.hours.len(),
            ?repair,
            "re-read after a ClickHouse restart done: the rows it had lost stored again, the rollup buckets settled"
        );
        self.metrics.rollup_buckets_repaired.inc_by((repair.repaired + repair.rebuilt) as u64);
        *reread = Reread::default();
        true
    }

    /// Runs the stages over `batch`: drops what must not be inserted (records of revoked
    /// partitions, rows already stored, event ids seen already). Returns the partitions owned and
    /// what a re-read found missing, or None on shutdown.
    async fn check(
        &self,
        batch: &mut Vec<Pending>,
        prechecked: Option<Prechecked>,
        state: &mut LoopState,
        shutdown: &CancellationToken,
    ) -> Option<Checked> {
        let LoopState { reconciler, dedup, generation_seen, .. } = state;
        let generation = self.consumer.context().generation();
        if generation != *generation_seen {
            reconciler.reset();
            dedup.reset();
            *generation_seen = generation;
        }
        let context = BatchContext {
            assigned: kafka::assigned(&self.consumer)
                .unwrap_or_else(|| batch.iter().map(|p| p.partition).collect()),
            now: epoch_now(),
        };
        let revoked = self.run_stage(&mut DropRevoked, batch, &context, shutdown).await?;
        if revoked > 0 {
            self.metrics.revoked_records_dropped.inc_by(revoked as u64);
            tracing::info!(records = revoked, "dropped records of revoked partitions before insert");
        }
        if batch.is_empty() {
            return Some(Checked { assigned: context.assigned, reread_hours: BTreeSet::new() });
        }
        // Never insert what may already be stored: the stages retry until ClickHouse answers.
        let reconciled = self.run_stage(reconciler, batch, &context, shutdown).await?;
        if reconciled.skipped_rows > 0 {
            self.metrics.reconciled_rows_skipped.inc_by(reconciled.skipped_rows as u64);
            tracing::info!(
                records = reconciled.checked_records,
                skipped_rows = reconciled.skipped_rows,
                "reconciled rows already stored"
            );
            // Their insert may have died with ClickHouse between `events` and the views. (Not the
            // records a re-read reads again: their inserts were confirmed, and their buckets are
            // settled whole once the re-read is over.)
            let mut stored = reconciled.stored_records;
            stored.retain(|&(partition, offset)| !reconciler.rereading(partition, offset));
            if !stored.is_empty() {
                self.check_views(&stored, &mut Backoff::default(), shutdown).await?;
            }
        }
        // Records this worker stored before and reads again (a re-read after a ClickHouse restart,
        // a re-delivery after a rebalance) were deduplicated the first time: rows dropped again
        // are not new duplicates.
        let seen_rows = |batch: &[Pending], reconciler: &Reconciler| -> usize {
            batch
                .iter()
                .filter(|p| reconciler.confirmed_before(p.partition, p.offset))
                .map(Pending::row_count)
                .sum()
        };
        let seen_before = seen_rows(batch, reconciler);
        let removed = match prechecked.and_then(|p| dedup.apply_prechecked(batch, p)) {
            Some(removed) => {
                self.metrics.batches_prechecked.inc();
                removed
            }
            None => self.run_stage(dedup, batch, &context, shutdown).await?,
        };
        if removed.rebuilt > 0 {
            tracing::info!(ids = removed.rebuilt, "dedup window rebuilt from clickhouse");
        }
        let dropped_again = seen_before - seen_rows(batch, reconciler);
        let duplicates = removed.duplicates.saturating_sub(dropped_again);
        if duplicates > 0 {
            self.metrics.duplicates_dropped.inc_by(duplicates as u64);
            tracing::info!(rows = duplicates, "dropped rows whose event id was already stored");
        }
        Some(Checked { assigned: context.assigned, reread_hours: reconciled.reread_hours })
    }

    /// Runs `stage` over `batch` until its queries succeed; None on shutdown.
    async fn run_stage<S: Stage + Send>(
        &self,
        stage: &mut S,
        batch: &mut Vec<Pending>,
        context: &BatchContext,
        shutdown: &CancellationToken,
    ) -> Option<S::Outcome> {
        let what = std::any::type_name::<S>().rsplit("::").next().unwrap_or("stage");
        let mut state = (stage, batch);
        until_ok(&mut Backoff::default(), shutdown, what, &mut state, |(stage, batch)| {
            Box::pin(stage.apply(batch, context))
        })
        .await
    }

    /// Stores a batch: one insert, or, when ClickHouse refuses it permanently, one insert per record
    /// so the bad records can be dead-lettered and the rest stored. Returns false on shutdown.
    async fn store_batch(
        &self,
        batch: &mut [Pending],
        reconciler: &mut Reconciler,
        shutdown: &CancellationToken,
    ) -> bool {
        for pending in batch.iter() {
            if let Err(error) = &pending.decoded {
                self.dead_letters.send(pending, DeadLetterReason::UndecodableRecord, error.to_string()).await;
            }
        }
        let batch_rows = batch.iter().map(Pending::row_count).sum::<usize>();
        if batch_rows == 0 {
            return true;
        }
        let mut inserted = 0;
        match self.insert_until_done(batch, reconciler, shutdown).await {
            Attempt::Stored(rows) => inserted += rows,
            Attempt::Shutdown => return false,
            Attempt::Refused(error) => {
                tracing::warn!(error = %error, records = batch.len(), "batch refused permanently, isolating records");
                for index in 0..batch.len() {
                    match self.insert_until_done(&mut batch[index..=index], reconciler, shutdown).await {
                        Attempt::Stored(rows) => inserted += rows,
                        Attempt::Shutdown => return false,
                        Attempt::Refused(error) => {
                            let reason = DeadLetterReason::RejectedByClickHouse;
                            self.dead_letters.send(&batch[index], reason, error.to_string()).await;
                        }
                    }
                }
            }
        }
        self.metrics.rows_inserted.inc_by(inserted as u64);
        self.metrics.batch_rows.observe(batch_rows as f64);
        true
    }

    /// Inserts the decoded rows of `records` as one INSERT, retrying transient failures with
    /// backoff. A failed insert may still have been applied (a timeout after ClickHouse committed,
    /// a connection lost before the answer), so before every retry the rows are checked again by
    /// position and only the missing ones are sent.
    async fn insert_until_done(
        &self,
        records: &mut [Pending],
        reconciler: &mut Reconciler,
        shutdown: &CancellationToken,
    ) -> Attempt {
        let mut backoff = Backoff::default();
        loop {
            let rows = rows_of(records);
            if rows.is_empty() {
                return Attempt::Stored(0);
            }
            let count = rows.len();
            let error = match self.insert(&rows).await {
                Ok(()) => return Attempt::Stored(count),
                Err(error) if is_permanent(&error) => return Attempt::Refused(error),
                Err(error) => error,
            };
            self.metrics.insert_retries.inc();
            if !backoff.wait(shutdown, "insert", &error).await {
                return Attempt::Shutdown;
            }
            reconciler.record_stored(records);
            let mut state = (&mut *reconciler, &mut *records);
            let rechecked =
                until_ok(&mut backoff, shutdown, "re-check after a failed insert", &mut state, |(r, b)| {
                    Box::pin(r.filter(b))
                })
                .await;
            let Some(outcome) = rechecked else { return Attempt::Shutdown };
            self.metrics.reconciled_rows_skipped.inc_by(outcome.skipped_rows as u64);
            // The failed insert reached `events`: make sure it reached the rollups too.
            if outcome.skipped_rows > 0
                && self.check_views(&outcome.stored_records, &mut backoff, shutdown).await.is_none()
            {
                return Attempt::Shutdown;
            }
        }
    }

    async fn insert(&self, rows: &[RowBytes<'_>]) -> Result<(), ClickHouseError> {
        let took = self.store.insert(rows).await?;
        self.metrics.insert_seconds.observe(took.as_secs_f64());
        #[cfg(feature = "failpoints")]
        self.config.failpoints.lose_insert_answer()?;
        Ok(())
    }

    /// After rows of `records` ((partition, offset)) turned out to be stored already: completes
    /// the rollups for those records if their insert stopped between `events` and the views (see
    /// `views`). None on shutdown.
    async fn check_views(
        &self,
        records: &BTreeSet<(i32, i64)>,
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) -> Option<views::Repair> {
        let repair =
            until_ok(backoff, shutdown, "rollup check", &mut (&self.store, records), |(store, records)| {
                Box::pin(store.repair_views(records))
            })
            .await?;
        tracing::info!(?repair, records = records.len(), "rows found stored; rollups checked");
        self.metrics.rollup_buckets_repaired.inc_by(repair.repaired as u64);
        Some(repair)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn left(produced_ago_ms: i64, wait_ms: u64) -> Duration {
        let produced = chrono::Utc::now().timestamp_millis() - produced_ago_ms;
        batch_deadline(produced, Duration::from_millis(wait_ms)).saturating_duration_since(Instant::now())
    }

    fn record(headers: Option<rdkafka::message::OwnedHeaders>) -> rdkafka::message::OwnedMessage {
        rdkafka::message::OwnedMessage::new(
            Some(b"{}\n{}\n".to_vec()),
            None,
            "events".into(),
            rdkafka::Timestamp::NotAvailable,
            0,
            0,
            headers,
        )
    }

    #[test]
    fn a_record_announces_its_rows_or_is_counted_by_its_lines() {
        use rdkafka::message::{Header, OwnedHeaders};
        let with = |value: &str| {
            Some(
                OwnedHeaders::new()
                    .insert(Header { key: "tally-request-id", value: Some("r") })
                    .insert(Header { key: HEADER_EVENTS, value: Some(value) }),
            )
        };
        assert_eq!(announced_rows(&record(with("2"))), Some(2));
        assert_eq!(announced_rows(&record(with("100"))), Some(100), "the header is what sizes the batch");
        for unusable in ["", "0", "two", "-2"] {
            assert_eq!(announced_rows(&record(with(unusable))), None, "{unusable:?}");
        }
        assert_eq!(announced_rows(&record(None)), None);
        let other = OwnedHeaders::new().insert(Header { key: "tally-schema-version", value: Some("1") });
        assert_eq!(announced_rows(&record(Some(other))), None);
    }

    /// A record's format from its header; an unknown one is named (cut short) for its dead letter.
    #[test]
    fn a_record_names_its_format_and_an_unknown_one_is_cut_short() {
        use rdkafka::message::{Header, OwnedHeaders};
        let with = |value: &[u8]| {
            Some(OwnedHeaders::new().insert(Header { key: HEADER_FORMAT, value: Some(value) }))
        };
        assert_eq!(record_format(&record(None)), Ok(RecordFormat::JsonEachRow));
        assert_eq!(record_format(&record(with(b"RowBinary"))), Ok(RecordFormat::RowBinary));
        assert_eq!(record_format(&record(with(b"Avro"))), Err("Avro".to_owned()));
        let long = "é".repeat(5_000);
        let named = record_format(&record(with(long.as_bytes()))).unwrap_err();
        assert_eq!(named, "é".repeat(MAX_FORMAT_NAME / 2), "cut at a character boundary");
        assert_eq!(record_format(&record(with(b"\xffAvro"))), Err("\u{fffd}Avro".to_owned()));
    }

    #[test]
    fn a_batch_closes_its_wait_after_its_first_record_was_produced() {
        let fresh = left(0, 250);
        assert!(fresh <= Duration::from_millis(250) && fresh > Duration::from_millis(200), "{fresh:?}");
        // Queued in the client for 100 ms while the previous batch was stored: 150 ms left.
        let queued = left(100, 250);
        assert!(queued <= Duration::from_millis(150) && queued > Duration::from_millis(100), "{queued:?}");
        // Older than the wait: closes at once.
        assert_eq!(left(10_000, 250), Duration::ZERO);
        // A producer clock ahead of ours never makes a batch wait longer than the wait.
        assert!(left(-60_000, 250) <= Duration::from_millis(250));
    }
}
