//! The control topic's reader (`TALLY_INGEST_CONTROL=kafka`, `tally_schemas::control`): the
//! ingest reads the API keys and prices the consumers publish, from the topic's start, and swaps
//! each complete snapshot in. On start it applies nothing until it has read up to the end it saw
//! when it started, so it never serves with a snapshot older than the newest one (a revoked key
//! would work again for a moment); until then the ingest is not ready.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tally_common::config::KafkaSecurity;
use tally_common::keyset::KeySet;
use tally_schemas::control::{Assembler, ControlSnapshot};
use tally_schemas::pricing::PriceBook;
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::prices::Prices;

/// Where each snapshot goes.
pub struct Targets {
    pub keys: Arc<KeySet>,
    pub prices: Arc<Prices>,
    pub applied: prometheus::IntCounter,
}

impl Targets {
    fn apply(&self, snapshot: ControlSnapshot) {
        let prices = snapshot.prices.len();
        let keys = self.keys.replace(snapshot.keys);
        self.prices.replace(PriceBook::new(snapshot.prices));
        self.applied.inc();
        tracing::info!(keys, prices, "control: API keys and prices applied");
    }
}

/// Reads `topic` (one partition) from its start until `shutdown`.
pub fn spawn_reader(
    kafka: &KafkaConfig,
    security: &KafkaSecurity,
    topic: &str,
    targets: Targets,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, rdkafka::error::KafkaError> {
    let consumer: StreamConsumer = security
        .apply(&mut ClientConfig::new())
        .set("bootstrap.servers", &kafka.brokers)
        // No group is joined and nothing committed (the partition is assigned, read from the start).
        .set("group.id", "tally-ingest-control")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.max.bytes", "8388608")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Beginning)?;
    consumer.assign(&assignment)?;
    let consumer = Arc::new(consumer);
    // A reader that forgot every broker (see `tally_common::kafka`) gets them back.
    tally_common::kafka::spawn_guard(
        "ingest control reader",
        Arc::clone(&consumer),
        StreamConsumer::client,
        &kafka.brokers,
        topic,
        shutdown.clone(),
    );
    let topic = topic.to_owned();
    Ok(tokio::spawn(async move {
        let end = start_end(&consumer, &topic).await;
        let mut assembler = Assembler::default();
        // Until the reader reaches `end`, the newest complete snapshot waits here.
        let mut catching_up: Option<Option<ControlSnapshot>> = if end > 0 { Some(None) } else { None };
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return,
                message = consumer.recv() => message,
            };
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    tracing::warn!(error = %error, topic = %topic, "control: reading failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let offset = message.offset();
            match message.payload().map(|value| assembler.push(value)) {
                Some(Ok(Some(snapshot))) => match catching_up.as_mut() {
                    Some(newest) => *newest = Some(snapshot),
                    None => targets.apply(snapshot),
                },
                Some(Ok(None)) | None => {}
                Some(Err(error)) => tracing::warn!(error = %error, offset, "control: record skipped"),
            }
            if catching_up.is_some() && offset + 1 >= end {
                if let Some(Some(snapshot)) = catching_up.take() {
                    targets.apply(snapshot);
                }
                tracing::info!(offset, "control: caught up with the topic");
            }
        }
    }))
}

/// The partition's end when the reader starts (0 when empty), retried until the broker answers.
async fn start_end(consumer: &StreamConsumer, topic: &str) -> i64 {
    let mut wait = Duration::from_millis(200);
    loop {
        match consumer.fetch_watermarks(topic, 0, Duration::from_secs(5)) {
            Ok((_, high)) => return high,
            Err(error) => {
                tracing::warn!(error = %error, topic = %topic, "control: topic not readable yet; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}
