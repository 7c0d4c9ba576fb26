//! The consumer: Kafka `tally.events.v1` → ClickHouse `tally.events`. It reads a batch (rows or
//! time bound), inserts it as one INSERT, and commits the offsets only after ClickHouse confirmed;
//! a failure in between means the batch is read again, never skipped. Records that cannot be
//! decoded, or whose rows ClickHouse refuses permanently, go to the dead-letter topic.

pub mod config;
pub mod dedup;
pub mod dlq;
pub mod metrics;
pub mod reconcile;
pub mod row;
pub mod views;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use prometheus::Registry;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Message, Offset, TopicPartitionList};
use tally_common::ch::{self, ChConfig};
use tally_common::server::{self, OpsState, Readiness};
use tally_schemas::record::{decode_events, DeadLetter, SourcePosition, Stage};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::ConsumerConfig;
use crate::metrics::ConsumerMetrics;
use crate::reconcile::Reconciler;
use crate::row::EventRow;

/// Evaluates `$query` (a ClickHouse query that must eventually succeed) until it returns `Ok`,
/// waiting on `$backoff` between tries; `None` when shutdown came first.
macro_rules! until_ok {
    ($backoff:expr, $shutdown:expr, $what:expr, $query:expr) => {{
        let backoff: &mut Backoff = &mut $backoff;
        loop {
            match $query {
                Ok(value) => break Some(value),
                Err(error) if backoff.wait($shutdown, $what, &error).await => {}
                Err(_) => break None,
            }
        }
    }};
}

/// One Kafka record of the batch, decoded (or not).
pub struct Pending {
    partition: i32,
    offset: i64,
    /// The record's Kafka timestamp (set by the ingest's producer when it accepted the events).
    kafka_timestamp_ms: i64,
    original: Vec<u8>,
    decoded: Result<Vec<EventRow>, String>,
}

/// One Kafka record as polled.
struct RawRecord {
    partition: i32,
    offset: i64,
    kafka_timestamp_ms: i64,
    original: Vec<u8>,
}

impl Pending {
    fn decode(raw: RawRecord) -> Pending {
        let RawRecord { partition, offset, kafka_timestamp_ms, original } = raw;
        let decoded = decode_events(&original)
            .map(|events| {
                events
                    .into_iter()
                    .enumerate()
                    .map(|(index, event)| EventRow::new(event, partition, offset, index as u32))
                    .collect::<Vec<_>>()
            })
            .map_err(|error| error.to_string());
        Pending { partition, offset, kafka_timestamp_ms, original, decoded }
    }

    fn row_count(&self) -> usize {
        self.decoded.as_ref().map_or(0, Vec::len)
    }
}

/// Counts rebalances, so the worker knows when what it learnt about partitions is stale.
#[derive(Default)]
pub struct RebalanceCounter {
    generation: std::sync::atomic::AtomicU64,
}

impl rdkafka::client::ClientContext for RebalanceCounter {}

impl rdkafka::consumer::ConsumerContext for RebalanceCounter {
    fn post_rebalance(
        &self,
        _: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        tracing::info!(rebalance = ?rebalance, "rebalance");
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

type KafkaConsumer = StreamConsumer<RebalanceCounter>;

/// ClickHouse error codes that mean "these rows will never be accepted": retrying cannot help, so
/// the records are isolated and dead-lettered. Everything else (network, timeouts, too many
/// parts, memory) is transient and retried without committing. 6/26/27/32/33/38/41/53/69/70/72:
/// parse and conversion errors of the data; 36 BAD_ARGUMENTS; 117 INCORRECT_DATA; 130/131 array
/// size errors; 395 a `throwIf` (a guard expression, e.g. a column DEFAULT, refusing the row).
const PERMANENT_CODES: &[u32] = &[6, 26, 27, 32, 33, 36, 38, 41, 53, 69, 70, 72, 117, 130, 131, 395];

fn is_permanent(error: &clickhouse::error::Error) -> bool {
    ch::error_code(error).is_some_and(|code| PERMANENT_CODES.contains(&code))
}

struct Worker {
    config: ConsumerConfig,
    consumer: Arc<KafkaConsumer>,
    dlq: FutureProducer,
    clickhouse: clickhouse::Client,
    table: String,
    metrics: ConsumerMetrics,
}

impl Worker {
    /// Polls up to a batch of records, undecoded: rows are counted by line, so the bound holds
    /// before decoding. With `wait`, waits for a first record and then up to the batch wait;
    /// without, takes only what the client already fetched. Returns the records and whether the
    /// row bound was reached.
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
                Err(_elapsed) if batch.is_empty() && deadline.is_none() => continue,
                Err(_elapsed) => break,
                Ok(Err(error)) => {
                    tracing::warn!(error = %error, "kafka receive failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Ok(Ok(message)) => message,
            };
            deadline.get_or_insert_with(|| Instant::now() + self.config.batch_max_wait);
            let original = message.payload().unwrap_or_default().to_vec();
            rows += memchr::memchr_iter(b'\n', &original).count().max(1);
            batch.push(RawRecord {
                partition: message.partition(),
                offset: message.offset(),
                kafka_timestamp_ms: message
                    .timestamp()
                    .to_millis()
                    .unwrap_or_else(|| chrono::Utc::now().timestamp_millis()),
                original,
            });
        }
        (batch, rows >= self.config.batch_max_rows)
    }

    async fn insert(&self, rows: &[&EventRow]) -> Result<(), clickhouse::error::Error> {
        let started = Instant::now();
        // One INSERT statement; max_insert_block_size above the batch bound keeps it one block.
        let mut insert = self
            .clickhouse
            .insert_unescaped::<EventRow>(&self.table)
            .await?
            .with_setting("max_insert_block_size", "1048576");
        for row in rows {
            insert.write(row).await?;
        }
        insert.end().await?;
        self.metrics.insert_seconds.observe(started.elapsed().as_secs_f64());
        if self.config.failpoint_fail_after_insert > 0.0
            && rand::random::<f64>() < self.config.failpoint_fail_after_insert
        {
            tracing::error!("failpoint: reporting an applied insert as failed");
            return Err(clickhouse::error::Error::Custom("failpoint: answer lost after the insert".into()));
        }
        Ok(())
    }

    async fn dead_letter(&self, pending: &Pending, reason: &str, detail: String) {
        let letter = DeadLetter {
            stage: Stage::Consume,
            reason: reason.to_owned(),
            detail,
            org_id: String::new(),
            request_id: String::new(),
            index: None,
            received_at_ms: chrono::Utc::now().timestamp_millis(),
            source: Some(SourcePosition {
                topic: self.config.events_topic.clone(),
                partition: pending.partition,
                offset: pending.offset,
            }),
            original: None,
            original_hex: None,
        }
        .with_original(&pending.original);
        let payload = serde_json::to_vec(&letter).unwrap_or_default();
        // Never commit past a record whose dead letter is not durable: retry until it is.
        loop {
            let record = FutureRecord::<(), _>::to(&self.config.dlq_topic).payload(&payload);
            match self.dlq.send(record, Timeout::After(Duration::from_secs(10))).await {
                Ok(_) => break,
                Err((error, _)) => {
                    tracing::warn!(error = %error, "dead letter produce failed, retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        self.metrics.dead_letters.with_label_values(&[reason]).inc();
    }

    /// Stores a batch: one insert, or, when ClickHouse refuses it permanently, one insert per record
    /// so the bad records can be dead-lettered and the rest stored. Returns false on shutdown.
    ///
    /// A failed insert may still have been applied (a timeout after ClickHouse committed, a
    /// connection lost before the answer), so before every retry the rows are checked again by
    /// position and only the missing ones are sent.
    async fn store(
        &self,
        batch: &mut [Pending],
        reconciler: &mut Reconciler,
        shutdown: &CancellationToken,
    ) -> bool {
        for pending in batch.iter() {
            if let Err(detail) = &pending.decoded {
                self.dead_letter(pending, "undecodable_record", detail.clone()).await;
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
                            self.dead_letter(&batch[index], "rejected_by_clickhouse", error.to_string())
                                .await;
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
    /// backoff and re-checking positions before each retry.
    async fn insert_until_done(
        &self,
        records: &mut [Pending],
        reconciler: &mut Reconciler,
        shutdown: &CancellationToken,
    ) -> Attempt {
        let mut backoff = Backoff::new();
        loop {
            let rows: Vec<&EventRow> =
                records.iter().filter_map(|p| p.decoded.as_ref().ok()).flatten().collect();
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
            let rechecked = until_ok!(
                backoff,
                shutdown,
                "re-check after a failed insert",
                reconciler.filter(records).await
            );
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

    /// After rows of `records` ((partition, offset)) turned out to be stored already: completes
    /// the rollups for those records if their insert stopped between `events` and the views (see
    /// `views`). None on shutdown.
    async fn check_views(
        &self,
        records: &BTreeSet<(i32, i64)>,
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) -> Option<views::Repair> {
        let repair = until_ok!(
            *backoff,
            shutdown,
            "rollup check",
            views::repair(&self.clickhouse, &self.table, records).await
        )?;
        tracing::info!(?repair, records = records.len(), "rows found stored; rollups checked");
        self.metrics.rollup_buckets_repaired.inc_by(repair.repaired as u64);
        Some(repair)
    }

    fn commit(&self, batch: &[Pending]) -> Result<(), rdkafka::error::KafkaError> {
        let mut next: BTreeMap<i32, i64> = BTreeMap::new();
        for pending in batch {
            let entry = next.entry(pending.partition).or_insert(0);
            *entry = (*entry).max(pending.offset + 1);
        }
        let mut list = TopicPartitionList::new();
        for (partition, offset) in next {
            list.add_partition_offset(&self.config.events_topic, partition, Offset::Offset(offset))?;
        }
        self.consumer.commit(&list, CommitMode::Sync)
    }

    /// The partitions this replica owns now (None when the client cannot tell).
    fn assigned(&self) -> Option<BTreeSet<i32>> {
        let list = self.consumer.assignment().ok()?;
        Some(list.elements().iter().map(|e| e.partition()).collect())
    }

    /// Keeps only records of partitions this replica still owns: after a revoke, nothing more is
    /// written for a partition; its new owner reads those records again from the committed offset.
    fn drop_revoked(&self, batch: Vec<Pending>) -> Vec<Pending> {
        let Some(owned) = self.assigned() else { return batch };
        let (kept, dropped): (Vec<Pending>, Vec<Pending>) =
            batch.into_iter().partition(|p| owned.contains(&p.partition));
        if !dropped.is_empty() {
            self.metrics.revoked_records_dropped.inc_by(dropped.len() as u64);
            tracing::info!(records = dropped.len(), "dropped records of revoked partitions before insert");
        }
        kept
    }

    /// The loop. Polling never overlaps an insert, so a revoke (delivered during a poll) is always
    /// seen by `drop_revoked` before the next insert. Under a backlog (a batch that reached the row
    /// bound), the next batch is polled first and decoded on a blocking thread while this one is
    /// checked and stored: ClickHouse's insert work and the consumer's JSON decoding overlap. A
    /// batch closed by time (light traffic) is stored at once.
    async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut state = LoopState {
            reconciler: Reconciler::new(self.clickhouse.clone(), self.table.clone()),
            dedup: dedup::Deduplicator::new(
                self.clickhouse.clone(),
                self.table.clone(),
                self.config.dedup_window_hours,
            ),
            generation_seen: u64::MAX,
        };
        let mut ready: Vec<Pending> = Vec::new();
        loop {
            let (raw, full) = self.collect_raw(&shutdown, ready.is_empty()).await;
            let stopping = shutdown.is_cancelled();
            let decoding =
                tokio::task::spawn_blocking(move || raw.into_iter().map(Pending::decode).collect());
            if !ready.is_empty() && !self.process(std::mem::take(&mut ready), &mut state, &shutdown).await {
                return Ok(());
            }
            let batch: Vec<Pending> = decoding.await?;
            if full && !stopping {
                ready = batch;
                continue;
            }
            if !batch.is_empty() && !self.process(batch, &mut state, &shutdown).await {
                return Ok(());
            }
            if stopping {
                return Ok(());
            }
        }
    }

    /// Checks and stores one batch, then commits it. False on shutdown.
    async fn process(
        &self,
        batch: Vec<Pending>,
        state: &mut LoopState,
        shutdown: &CancellationToken,
    ) -> bool {
        let LoopState { reconciler, dedup, generation_seen } = state;
        let generation = self.consumer.context().generation.load(std::sync::atomic::Ordering::SeqCst);
        if generation != *generation_seen {
            reconciler.reset();
            dedup.reset();
            *generation_seen = generation;
        }
        let mut batch = self.drop_revoked(batch);
        if batch.is_empty() {
            return true;
        }
        // Never insert what may already be stored: retry the checks until ClickHouse answers.
        let reconciled =
            until_ok!(Backoff::new(), shutdown, "reconciliation", reconciler.filter(&mut batch).await);
        let Some(outcome) = reconciled else { return false };
        if outcome.skipped_rows > 0 {
            self.metrics.reconciled_rows_skipped.inc_by(outcome.skipped_rows as u64);
            tracing::info!(
                records = outcome.checked_records,
                skipped_rows = outcome.skipped_rows,
                "reconciled rows already stored"
            );
            // Their insert may have died with ClickHouse between `events` and the views.
            if self.check_views(&outcome.stored_records, &mut Backoff::new(), shutdown).await.is_none() {
                return false;
            }
        }
        let assigned = self.assigned().unwrap_or_default();
        let now = epoch_now();
        let deduplicated =
            until_ok!(Backoff::new(), shutdown, "dedup", dedup.filter(&mut batch, &assigned, now).await);
        let Some(removed) = deduplicated else { return false };
        if removed.rebuilt > 0 {
            tracing::info!(ids = removed.rebuilt, "dedup window rebuilt from clickhouse");
        }
        if removed.duplicates > 0 {
            self.metrics.duplicates_dropped.inc_by(removed.duplicates as u64);
            tracing::info!(rows = removed.duplicates, "dropped rows whose event id was already stored");
        }
        if !self.store(&mut batch, reconciler, shutdown).await {
            tracing::info!("shutdown during insert retries; the uncommitted batch will be read again");
            return false;
        }
        reconciler.record_stored(&batch);
        dedup.record_stored(epoch_now());
        self.metrics.dedup_ids.set(dedup.ids() as i64);
        self.metrics.dedup_bytes.set(dedup.heap_bytes() as i64);
        if self.config.failpoint_crash_after_insert > 0.0
            && rand::random::<f64>() < self.config.failpoint_crash_after_insert
        {
            tracing::error!("failpoint: crashing between insert and commit");
            std::process::abort();
        }
        // A failed commit is safe: the batch is read again and reconciled.
        if let Err(error) = self.commit(&batch) {
            tracing::warn!(error = %error, "offset commit failed");
        }
        self.metrics.batches.inc();
        true
    }
}

/// What the loop learns across batches, reset after every rebalance.
struct LoopState {
    reconciler: Reconciler,
    dedup: dedup::Deduplicator,
    generation_seen: u64,
}

fn epoch_now() -> u32 {
    u32::try_from(chrono::Utc::now().timestamp()).unwrap_or(u32::MAX)
}

/// How an insert ended.
enum Attempt {
    Stored(usize),
    Refused(clickhouse::error::Error),
    Shutdown,
}

/// Capped exponential backoff between tries of a ClickHouse query that must eventually succeed.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff { next: Duration::from_millis(100) }
    }

    /// Logs the failure and sleeps; false when shutdown came first.
    async fn wait(
        &mut self,
        shutdown: &CancellationToken,
        what: &str,
        error: &(dyn std::fmt::Display + Sync),
    ) -> bool {
        tracing::warn!(error = %error, what, backoff_ms = self.next.as_millis() as u64, "query failed, retrying");
        let slept = tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(self.next) => true,
        };
        self.next = (self.next * 2).min(Duration::from_secs(5));
        slept
    }
}

/// Samples the lag of every assigned partition (high watermark minus committed offset) every
/// `interval` until `shutdown`, on the blocking pool because librdkafka's metadata calls block.
fn spawn_lag_sampler(
    consumer: Arc<KafkaConsumer>,
    lag: prometheus::IntGaugeVec,
    interval: Duration,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    server::spawn_every(interval, shutdown, move || {
        let (consumer, lag) = (Arc::clone(&consumer), lag.clone());
        async move {
            let _ = tokio::task::spawn_blocking(move || {
                let Ok(assigned) = consumer.assignment() else { return };
                let Ok(committed) = consumer.committed_offsets(assigned, Duration::from_secs(2)) else {
                    return;
                };
                lag.reset();
                for element in committed.elements() {
                    let watermarks = consumer.fetch_watermarks(
                        element.topic(),
                        element.partition(),
                        Duration::from_secs(2),
                    );
                    let Ok((_, high)) = watermarks else { continue };
                    let committed_offset = match element.offset() {
                        Offset::Offset(offset) => offset,
                        _ => 0,
                    };
                    lag.with_label_values(&[&element.partition().to_string()])
                        .set((high - committed_offset).max(0));
                }
            })
            .await;
        }
    })
}

struct ConsumerReadiness {
    clickhouse: clickhouse::Client,
}

impl Readiness for ConsumerReadiness {
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            if ch::ping(&self.clickhouse).await {
                Ok(())
            } else {
                Err("clickhouse unreachable".into())
            }
        })
    }
}

fn kafka_consumer(config: &ConsumerConfig) -> Result<KafkaConsumer, rdkafka::error::KafkaError> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", config.session_timeout.as_millis().to_string())
        .set("fetch.max.bytes", "52428800")
        // Prefetch enough to keep the loop fed: a batch of 100 000 rows is about 60 MB of JSON,
        // and with librdkafka's defaults (1 MiB per partition per fetch, a 64 MiB queue) polling
        // waited on the broker for up to 0.8 s per batch; with these, polling a batch takes ~12 ms
        // and the drain went from 200 000 to 370 000 rows/s (loadtest/RESULTS.md). Costs up to
        // 128 MiB of queued records per replica.
        .set("max.partition.fetch.bytes", "8388608")
        .set("queued.max.messages.kbytes", "131072");
    // Static membership: a replica restarted with the same id takes its partitions back at once,
    // without a rebalance of the whole group.
    if let Some(instance) = &config.instance_id {
        client.set("group.instance.id", instance);
    }
    client.create_with_context(RebalanceCounter::default())
}

fn dlq_producer(config: &ConsumerConfig) -> Result<FutureProducer, rdkafka::error::KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("compression.type", "lz4")
        .create()
}

/// Runs the consumer until `shutdown`, serving `/healthz`, `/readyz`, `/metrics` on `listener`.
/// On shutdown the batch in hand is inserted and committed before returning.
pub async fn run(
    config: ConsumerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let clickhouse_config: ChConfig = config.common.clickhouse.clone();
    if config.migrate {
        tally_common::migrate::migrate(&clickhouse_config).await?;
    }
    let registry = Registry::new();
    let metrics = ConsumerMetrics::register(&registry)?;
    let consumer = kafka_consumer(&config)?;
    consumer.subscribe(&[&config.events_topic])?;
    let consumer = Arc::new(consumer);
    let background = CancellationToken::new();
    spawn_lag_sampler(Arc::clone(&consumer), metrics.lag.clone(), Duration::from_secs(5), background.clone());
    let worker = Worker {
        dlq: dlq_producer(&config)?,
        clickhouse: clickhouse_config.client(),
        table: clickhouse_config.table("events"),
        consumer,
        metrics,
        config,
    };
    let ops = OpsState {
        registry,
        readiness: Arc::new(ConsumerReadiness { clickhouse: clickhouse_config.client() }),
        shutdown: shutdown.clone(),
    };
    let http_shutdown = CancellationToken::new();
    let http = tokio::spawn(server::serve(listener, server::ops_routes(ops), http_shutdown.clone()));
    tracing::info!(topic = %worker.config.events_topic, group = %worker.config.group_id, "consumer started");
    let result = worker.run(shutdown).await;
    background.cancel();
    http_shutdown.cancel();
    let _ = http.await;
    result
}
