//! The consumer's Kafka side: the group consumer (prefetch sized for big batches, static
//! membership), offset commits, the lag sampler, and the producer of the consumer's own dead
//! letters.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use tally_common::server;
use tally_schemas::record::{DeadLetter, RecordFormat, SourcePosition, Stage};
use tokio_util::sync::CancellationToken;

use crate::batch::{next_offsets, Pending};
use crate::config::ConsumerConfig;

/// Counts rebalances, so the worker knows when what it learnt about partitions is stale.
#[derive(Default)]
pub struct RebalanceCounter {
    generation: AtomicU64,
}

impl RebalanceCounter {
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}

impl rdkafka::client::ClientContext for RebalanceCounter {}

impl rdkafka::consumer::ConsumerContext for RebalanceCounter {
    /// The outcome of an asynchronous commit (see `commit`), delivered by a later poll.
    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(error) = result {
            // Safe: the records are read again after a restart or a rebalance and reconciled.
            tracing::warn!(error = %error, partitions = offsets.count(), "offset commit failed");
        }
    }

    fn post_rebalance(
        &self,
        _: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        tracing::info!(rebalance = ?rebalance, "rebalance");
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

pub type KafkaConsumer = StreamConsumer<RebalanceCounter>;

pub fn consumer(config: &ConsumerConfig) -> Result<KafkaConsumer, KafkaError> {
    client_config(config).create_with_context(RebalanceCounter::default())
}

/// The consumer's librdkafka settings.
fn client_config(config: &ConsumerConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    config.common.kafka_security.apply(&mut client);
    client
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", config.session_timeout.as_millis().to_string())
        // One fetch response at most 8 MiB (librdkafka's default is 50 MB): the queue's limit below
        // is checked before a fetch is sent, so a response can land on top of a full queue, and 50 MB
        // of lz4 records can be several times that once decompressed (the likely cause, measured
        // by its effect, not traced in librdkafka). At 50 MB a replica draining a
        // backlog peaked at ~800 MiB, at 8 MiB ~520 MiB, as fast (loadtest/RESULTS.md, session 26).
        .set("fetch.max.bytes", "8388608")
        // Prefetch enough to keep the loop fed: a batch of 100 000 rows is about 60 MB of JSON,
        // and with librdkafka's defaults (1 MiB per partition per fetch, a 64 MiB queue) polling
        // waited on the broker for up to 0.8 s per batch; with 8 MiB and the default 128 MiB
        // queue, polling a batch takes ~12 ms and the drain went from 200 000 to 370 000 rows/s
        // (loadtest/RESULTS.md). The queue is the replica's memory: TALLY_KAFKA_PREFETCH_MIB.
        .set("max.partition.fetch.bytes", "8388608")
        .set("queued.max.messages.kbytes", (u64::from(config.prefetch_mib) * 1024).to_string());
    // Static membership: a replica restarted with the same id takes its partitions back at once,
    // without a rebalance of the whole group.
    if let Some(instance) = &config.instance_id {
        client.set("group.instance.id", instance);
    }
    client
}

/// Commits one past the last record of each partition of `batch`, asynchronously: the outcome
/// comes back through a later poll (`commit_callback`), and closing the client waits for the
/// commits still outstanding, so the last batch before a shutdown is committed too.
///
/// Never synchronously: librdkafka's synchronous commit waits without a deadline, on the thread
/// that also serves the client's queue. `make chaos` caught the deadlock (a consumer restarted
/// just before the broker was; `dev/chaos.py --plan 10:consumer,10:kafka` replays it): the
/// group needed its events served to come back after the broker's restart, nothing served them
/// while the loop waited in the commit, and the consumer stopped for good, its lag growing.
pub fn commit(consumer: &KafkaConsumer, topic: &str, batch: &[Pending]) -> Result<(), KafkaError> {
    let mut list = TopicPartitionList::new();
    for (partition, offset) in next_offsets(batch) {
        list.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    }
    consumer.commit(&list, CommitMode::Async)
}

/// A partition moved back for a re-read: from `from` up to `until`, one past what was stored
/// before the re-read (records the loop holds past it are new).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewound {
    pub partition: i32,
    pub from: i64,
    pub until: i64,
}

/// Moves every assigned partition of `topic` back to its first record produced at or after
/// `since_ms` (epoch milliseconds), where that is before what was stored: its committed offset, or
/// `confirmed` (one past the last record whose insert the loop saw confirmed, its commit perhaps
/// still on its way), the later. A partition with neither has stored nothing reconciliation would
/// not find: it is left as it is. Records fetched before the move are not delivered again by the client
/// (librdkafka drops them at the seek), but the ones the loop already holds are still stored: the
/// re-read reaches them again and reconciliation skips them. Blocking (broker round trips): call
/// it on a blocking thread.
pub fn rewind(
    consumer: &KafkaConsumer,
    topic: &str,
    since_ms: i64,
    confirmed: &std::collections::HashMap<i32, i64>,
) -> Result<Vec<Rewound>, KafkaError> {
    let timeout = Duration::from_secs(10);
    let mut wanted = TopicPartitionList::new();
    for element in consumer.assignment()?.elements_for_topic(topic) {
        wanted.add_partition_offset(topic, element.partition(), Offset::Offset(since_ms))?;
    }
    if wanted.count() == 0 {
        return Ok(Vec::new());
    }
    let targets = consumer.offsets_for_times(wanted, timeout)?;
    let committed = consumer.committed(timeout)?;
    let until = |partition: i32| {
        let committed = match committed.find_partition(topic, partition).map(|e| e.offset()) {
            Some(Offset::Offset(offset)) => Some(offset),
            _ => None,
        };
        committed.max(confirmed.get(&partition).copied())
    };
    let mut seek = TopicPartitionList::new();
    let mut moved = Vec::new();
    for element in targets.elements() {
        let (Offset::Offset(from), Some(until)) = (element.offset(), until(element.partition())) else {
            continue;
        };
        if from < until {
            seek.add_partition_offset(topic, element.partition(), Offset::Offset(from))?;
            moved.push(Rewound { partition: element.partition(), from, until });
        }
    }
    if moved.is_empty() {
        return Ok(moved);
    }
    let sought = consumer.seek_partitions(seek, timeout)?;
    let failed: Vec<i32> =
        sought.elements().iter().filter(|e| e.error().is_err()).map(|e| e.partition()).collect();
    if !failed.is_empty() {
        tracing::warn!(
            ?failed,
            "these partitions could not be moved back for the re-read; they are not read again"
        );
        moved.retain(|r| !failed.contains(&r.partition));
    }
    Ok(moved)
}

/// The partitions this replica owns now (None when the client cannot tell).
pub fn assigned(consumer: &KafkaConsumer) -> Option<BTreeSet<i32>> {
    let list = consumer.assignment().ok()?;
    Some(list.elements().iter().map(|e| e.partition()).collect())
}

/// Samples the lag of every assigned partition (high watermark minus committed offset) every
/// `interval` until `shutdown`, on the blocking pool because librdkafka's metadata calls block.
pub fn spawn_lag_sampler(
    consumer: Arc<KafkaConsumer>,
    lag: prometheus::IntGaugeVec,
    interval: Duration,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    server::spawn_every(interval, shutdown, move || {
        let (consumer, lag) = (Arc::clone(&consumer), lag.clone());
        async move {
            let _ = tokio::task::spawn_blocking(move || sample_lag(&consumer, &lag)).await;
        }
    })
}

fn sample_lag(consumer: &KafkaConsumer, lag: &prometheus::IntGaugeVec) {
    let Ok(assigned) = consumer.assignment() else { return };
    let Ok(committed) = consumer.committed_offsets(assigned, Duration::from_secs(2)) else { return };
    lag.reset();
    for element in committed.elements() {
        let watermarks =
            consumer.fetch_watermarks(element.topic(), element.partition(), Duration::from_secs(2));
        let Ok((_, high)) = watermarks else { continue };
        let committed_offset = match element.offset() {
            Offset::Offset(offset) => offset,
            _ => 0,
        };
        lag.with_label_values(&[&element.partition().to_string()]).set((high - committed_offset).max(0));
    }
}

/// Why the consumer dead-letters a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// The record is not Tally's JSONEachRow or RowBinary (or names a format Tally does not read).
    UndecodableRecord,
    /// ClickHouse refused its rows with a permanent error.
    RejectedByClickHouse,
}

impl DeadLetterReason {
    pub fn code(self) -> &'static str {
        match self {
            DeadLetterReason::UndecodableRecord => "undecodable_record",
            DeadLetterReason::RejectedByClickHouse => "rejected_by_clickhouse",
        }
    }
}

/// The consumer's producer of dead letters (acks=all, idempotent).
pub struct DeadLetters {
    producer: FutureProducer,
    dlq_topic: String,
    events_topic: String,
    counter: prometheus::IntCounterVec,
}

/// The consumer's producers (dead letters, control snapshots): acknowledged by every in-sync
/// replica, idempotent, lz4.
pub fn durable_producer(config: &ConsumerConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    config
        .common
        .kafka_security
        .apply(&mut client)
        .set("bootstrap.servers", &config.brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("compression.type", "lz4");
    client
}

impl DeadLetters {
    pub fn new(config: &ConsumerConfig, counter: prometheus::IntCounterVec) -> Result<Self, KafkaError> {
        let producer = durable_producer(config).create()?;
        Ok(DeadLetters {
            producer,
            dlq_topic: config.dlq_topic.clone(),
            events_topic: config.events_topic.clone(),
            counter,
        })
    }

    /// Keeps the producer's brokers (see `tally_common::kafka`) until `shutdown`.
    pub fn spawn_guard(&self, config: &ConsumerConfig, shutdown: CancellationToken) {
        tally_common::kafka::spawn_guard(
            "consumer dead-letter producer",
            Arc::new(self.producer.clone()),
            FutureProducer::client,
            &config.brokers,
            &self.dlq_topic,
            shutdown,
        );
    }

    /// Sends `pending` with the reason. Never returns before the letter is durable: the offset of
    /// a record is not committed before its dead letter is.
    pub async fn send(&self, pending: &Pending, reason: DeadLetterReason, detail: String) {
        let letter = DeadLetter {
            stage: Stage::Consume,
            reason: reason.code().to_owned(),
            detail,
            org_id: String::new(),
            request_id: String::new(),
            index: None,
            event_id: None,
            received_at_ms: chrono::Utc::now().timestamp_millis(),
            source: Some(SourcePosition {
                topic: self.events_topic.clone(),
                partition: pending.partition,
                offset: pending.offset,
            }),
            original: None,
            original_hex: None,
            format: match &pending.format {
                Ok(RecordFormat::JsonEachRow) => None,
                Ok(format) => Some(format.name().to_owned()),
                Err(name) => Some(name.clone()),
            },
        }
        .with_original(&pending.original);
        let payload = serde_json::to_vec(&letter).unwrap_or_default();
        loop {
            let record = FutureRecord::<(), _>::to(&self.dlq_topic).payload(&payload);
            match self.producer.send(record, Timeout::After(Duration::from_secs(10))).await {
                Ok(_) => break,
                Err((error, _)) => {
                    tracing::warn!(error = %error, "dead letter produce failed, retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        self.counter.with_label_values(&[reason.code()]).inc();
    }
}

#[cfg(test)]
mod tests {
    use tally_common::config::Env;

    use super::*;

    #[test]
    fn the_prefetch_setting_sizes_librdkafkas_queue() {
        let queue = |pairs: &[(&str, &str)]| {
            let config = ConsumerConfig::from_env(&Env::from_pairs(pairs.iter().copied())).expect("valid");
            client_config(&config).get("queued.max.messages.kbytes").map(str::to_owned)
        };
        assert_eq!(queue(&[]).as_deref(), Some("131072"));
        assert_eq!(queue(&[("TALLY_KAFKA_PREFETCH_MIB", "32")]).as_deref(), Some("32768"));
    }
}
