//! The control topic's publisher (`tally_schemas::control`): every `TALLY_CONTROL_INTERVAL_MS`
//! each consumer reads the active API keys and the model prices from ClickHouse and, when they
//! differ from what it last published (or 10 minutes have passed), publishes the snapshot, so
//! the ingests, which read Kafka only, authenticate and price with what ClickHouse holds. Every
//! consumer replica publishes: the ingest takes the snapshot that completes last, and a change
//! seen by one replica is seen by all within an interval.

use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tally_common::ch::ChConfig;
use tally_schemas::control::{encode, ControlSnapshot};
use tokio_util::sync::CancellationToken;

use crate::config::ConsumerConfig;

/// A snapshot is published again after this long even if nothing changed (a new control topic,
/// or one whose records were lost, fills up again).
const REPUBLISH_AFTER: Duration = Duration::from_secs(600);

/// Reads ClickHouse's admin tables into a snapshot.
pub async fn load(clickhouse: &ChConfig) -> Result<ControlSnapshot, clickhouse::error::Error> {
    let keys = tally_common::keyset::load_key_entries(clickhouse).await?;
    let prices = tally_common::prices::load_entries(clickhouse).await?;
    Ok(ControlSnapshot { keys, prices }.normalized())
}

/// Starts publishing when `TALLY_CONTROL_TOPIC` is set; stops at `shutdown`.
pub fn spawn_publisher(
    config: &ConsumerConfig,
    published: prometheus::IntCounter,
    shutdown: CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>, rdkafka::error::KafkaError> {
    let Some(topic) = config.control_topic.clone() else {
        return Ok(None);
    };
    let producer: FutureProducer =
        crate::kafka::durable_producer(config).set("message.timeout.ms", "30000").create()?;
    tally_common::kafka::spawn_guard(
        "consumer control publisher",
        std::sync::Arc::new(producer.clone()),
        FutureProducer::client,
        &config.brokers,
        &topic,
        shutdown.clone(),
    );
    let clickhouse = config.common.clickhouse.clone();
    let interval = config.control_interval;
    Ok(Some(tokio::spawn(async move {
        let publisher = uuid::Uuid::new_v4().simple().to_string();
        let mut last: Option<(String, Instant)> = None;
        let mut sequence = 0u64;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let snapshot = match load(&clickhouse).await {
                Ok(snapshot) => snapshot,
                Err(error) => {
                    tracing::warn!(error = %error, "control: reading the admin tables failed; will retry");
                    continue;
                }
            };
            let (document, digest) = snapshot.document();
            if last.as_ref().is_some_and(|(d, at)| *d == digest && at.elapsed() < REPUBLISH_AFTER) {
                continue;
            }
            sequence += 1;
            let id = format!("{publisher}-{sequence}");
            match publish(&producer, &topic, encode(&document, &digest, &id)).await {
                Ok(parts) => {
                    tracing::info!(
                        snapshot = %id, keys = snapshot.keys.len(), prices = snapshot.prices.len(), parts,
                        "control: snapshot published"
                    );
                    published.inc();
                    last = Some((digest, Instant::now()));
                }
                Err(error) => {
                    tracing::warn!(error = %error, topic = %topic, "control: publishing failed; will retry")
                }
            }
        }
    })))
}

/// Sends every part and waits for each acknowledgement; returns the number of parts.
async fn publish(
    producer: &FutureProducer,
    topic: &str,
    records: Vec<(String, Vec<u8>)>,
) -> Result<usize, rdkafka::error::KafkaError> {
    let sends = records.iter().map(|(key, value)| {
        producer.send(FutureRecord::to(topic).key(key).payload(value), Duration::from_secs(30))
    });
    for result in futures::future::join_all(sends).await {
        result.map_err(|(error, _)| error)?;
    }
    Ok(records.len())
}
