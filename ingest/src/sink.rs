//! Where accepted events and dead letters go. `KafkaSink` produces with acks=all and idempotence,
//! and resolves only when the broker acknowledged, so the handler never answers 2xx early.
//! `DiscardSink` does everything but produce; it is what the ingest benchmark measures against.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use tally_common::config::KafkaSecurity;
use tally_schemas::record::{HEADER_REQUEST_ID, HEADER_SCHEMA_VERSION, SCHEMA_VERSION};
use tokio_util::sync::CancellationToken;

use crate::config::KafkaConfig;
use crate::metrics::IngestMetrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Events,
    DeadLetters,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("kafka did not acknowledge in time")]
    Timeout,
    #[error("kafka: {0}")]
    Kafka(String),
}

pub trait EventSink: Send + Sync + 'static {
    /// Resolves once the record is durably stored (acks=all), or with the reason it is not.
    fn produce(
        &self,
        topic: Topic,
        key: Arc<str>,
        payload: Vec<u8>,
        request_id: Arc<str>,
    ) -> BoxFuture<'static, Result<(), SinkError>>;
    /// Is the event store reachable right now?
    fn is_available(&self) -> bool;
    /// Sends everything still queued, waiting at most `timeout`.
    fn flush(&self, timeout: Duration);
}

pub struct KafkaSink {
    producer: FutureProducer,
    events_topic: Arc<str>,
    dlq_topic: Arc<str>,
    produce_timeout: Duration,
    available: Arc<AtomicBool>,
    metrics: IngestMetrics,
}

impl KafkaSink {
    pub fn new(
        config: &KafkaConfig,
        security: &KafkaSecurity,
        metrics: IngestMetrics,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let producer: FutureProducer = security
            .apply(&mut ClientConfig::new())
            .set("bootstrap.servers", &config.brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("compression.type", &config.compression)
            .set("linger.ms", config.linger.as_millis().to_string())
            .set("message.timeout.ms", config.produce_timeout.as_millis().to_string())
            .set("queue.buffering.max.kbytes", config.queue_max_kbytes.to_string())
            .set("queue.buffering.max.messages", "100000")
            .set("message.max.bytes", "8000000")
            .set("batch.size", "1000000")
            .create()?;
        Ok(KafkaSink {
            producer,
            events_topic: Arc::from(config.events_topic.as_str()),
            dlq_topic: Arc::from(config.dlq_topic.as_str()),
            produce_timeout: config.produce_timeout,
            available: Arc::new(AtomicBool::new(false)),
            metrics,
        })
    }

    /// Probes the brokers every `interval` (a metadata request) until `shutdown`.
    pub fn spawn_health_probe(
        &self,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let producer = self.producer.clone();
        let topic = Arc::clone(&self.events_topic);
        let available = Arc::clone(&self.available);
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            loop {
                let probe_producer = producer.clone();
                let probe_topic = Arc::clone(&topic);
                let reachable = tokio::task::spawn_blocking(move || {
                    probe_producer.client().fetch_metadata(Some(&probe_topic), Duration::from_secs(2)).is_ok()
                })
                .await
                .unwrap_or(false);
                if available.swap(reachable, Ordering::Relaxed) != reachable {
                    tracing::info!(reachable, "kafka reachability changed");
                }
                metrics.kafka_up.set(i64::from(reachable));
                metrics.producer_queue_depth.set(i64::from(producer.in_flight_count()));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        })
    }
}

impl EventSink for KafkaSink {
    fn produce(
        &self,
        topic: Topic,
        key: Arc<str>,
        payload: Vec<u8>,
        request_id: Arc<str>,
    ) -> BoxFuture<'static, Result<(), SinkError>> {
        let producer = self.producer.clone();
        let topic_name = match topic {
            Topic::Events => Arc::clone(&self.events_topic),
            Topic::DeadLetters => Arc::clone(&self.dlq_topic),
        };
        let deadline = self.produce_timeout;
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let started = Instant::now();
            let headers = OwnedHeaders::new()
                .insert(Header { key: HEADER_SCHEMA_VERSION, value: Some(SCHEMA_VERSION) })
                .insert(Header { key: HEADER_REQUEST_ID, value: Some(request_id.as_ref()) });
            let record = FutureRecord::to(&topic_name).key(key.as_ref()).payload(&payload).headers(headers);
            // Waiting for queue space is part of the deadline: a full queue (Kafka slow or down)
            // turns into a 503 instead of unbounded memory.
            let send = producer.send(record, Timeout::After(deadline));
            let result = match tokio::time::timeout(deadline + Duration::from_secs(1), send).await {
                Err(_) => Err(SinkError::Timeout),
                Ok(Err((error, _message))) => Err(SinkError::Kafka(error.to_string())),
                Ok(Ok(_delivery)) => Ok(()),
            };
            metrics.produce_seconds.observe(started.elapsed().as_secs_f64());
            result
        })
    }

    fn is_available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }

    fn flush(&self, timeout: Duration) {
        if let Err(error) = self.producer.flush(Timeout::After(timeout)) {
            tracing::error!(error = %error, "producer flush failed at shutdown");
        }
    }
}

/// Accepts everything instantly and keeps nothing: the ingest minus Kafka, for benchmarks.
pub struct DiscardSink;

impl EventSink for DiscardSink {
    fn produce(
        &self,
        _: Topic,
        _: Arc<str>,
        _: Vec<u8>,
        _: Arc<str>,
    ) -> BoxFuture<'static, Result<(), SinkError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn is_available(&self) -> bool {
        true
    }

    fn flush(&self, _: Duration) {}
}
