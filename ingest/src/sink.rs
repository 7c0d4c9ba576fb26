//! Where accepted events and dead letters go. `KafkaSink` produces with acks=all and idempotence,
//! and resolves only when the broker acknowledged, so the handler never answers 2xx early.
//! `DiscardSink` does everything but produce; it is what the ingest benchmark measures against.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use tally_common::config::KafkaSecurity;
use tally_common::kafka::BootstrapGuard;
use tally_common::server::RequestId;
use tally_schemas::record::{
    RecordFormat, HEADER_EVENTS, HEADER_FORMAT, HEADER_REQUEST_ID, HEADER_SCHEMA_VERSION, SCHEMA_VERSION,
};
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
    /// `events`: how many events (lines) `payload` holds, sent in the `tally-events` header of an
    /// events record.
    fn produce(
        &self,
        topic: Topic,
        key: Arc<str>,
        payload: Vec<u8>,
        events: usize,
        request_id: RequestId,
    ) -> BoxFuture<'static, Result<(), SinkError>>;
    /// Is the event store reachable right now?
    fn is_available(&self) -> bool;
    /// Sends everything still queued, waiting at most `timeout`.
    fn flush(&self, timeout: Duration);
}

pub struct KafkaSink {
    /// Replaced whole by the supervisor when librdkafka reports a fatal error or the producer
    /// stalls (see `supervise`); every send clones the current one.
    producer: RwLock<FutureProducer>,
    /// Replaced producers, and when: kept until every send holding one has ended, so that its
    /// last clone (whose drop purges what it still holds and joins librdkafka's threads) is
    /// dropped by the supervisor, not on a request's worker.
    retired: Mutex<VecDeque<(Instant, FutureProducer)>>,
    /// Since when the brokers have answered every probe (None: the last probe failed, or none
    /// ran yet): readiness, and how long Kafka has been there for the supervisor.
    reachable_since: Mutex<Option<Instant>>,
    /// Gives the producer its bootstrap servers again when no broker answered for a while.
    bootstrap: Mutex<BootstrapGuard>,
    client_config: ClientConfig,
    events_topic: Arc<str>,
    dlq_topic: Arc<str>,
    produce_timeout: Duration,
    stall_after: Duration,
    /// Named in each events record's `tally-format` header unless JSONEachRow.
    record_format: RecordFormat,
    acks: Arc<Acks>,
    metrics: IngestMetrics,
}

/// What the supervisor needs to tell a stalled producer: when the current producer last had a
/// record acknowledged (or was created), and whether a send ran out of time since.
struct Acks {
    epoch: Instant,
    /// Milliseconds from `epoch` of the last acknowledgement or of the producer's creation.
    last: AtomicU64,
    timed_out_since: AtomicBool,
}

impl Acks {
    fn new() -> Self {
        Acks { epoch: Instant::now(), last: AtomicU64::new(0), timed_out_since: AtomicBool::new(false) }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn acknowledged(&self) {
        self.last.fetch_max(self.now_ms(), Ordering::Relaxed);
        if self.timed_out_since.load(Ordering::Relaxed) {
            self.timed_out_since.store(false, Ordering::Relaxed);
        }
    }

    fn timed_out(&self) {
        self.timed_out_since.store(true, Ordering::Relaxed);
    }

    /// A fresh producer: it gets a whole stall period before it can be judged.
    fn restart(&self) {
        self.last.store(self.now_ms(), Ordering::Relaxed);
        self.timed_out_since.store(false, Ordering::Relaxed);
    }

    fn since_last(&self) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(self.last.load(Ordering::Relaxed)))
    }
}

/// Why the supervisor replaced the producer (the metric's `reason` label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replacement {
    /// librdkafka's fatal error (e.g. the idempotent producer's sequence lost): the instance can
    /// never produce again, so it must be replaced (librdkafka's documented remedy).
    Fatal(String),
    /// For `stall_after` the brokers answered metadata requests and nothing was acknowledged,
    /// while records waited (or a send ran out of time): the producer is stuck although Kafka is
    /// there.
    Stalled(Duration),
}

impl Replacement {
    fn reason(&self) -> &'static str {
        match self {
            Replacement::Fatal(_) => "fatal",
            Replacement::Stalled(_) => "stalled",
        }
    }
}

/// The supervisor's rule, apart from the producer so it can be tested alone. `reachable_for`: how
/// long the brokers have answered (None: they do not now); `waiting`: records are queued or in
/// flight, or a send ran out of time since the last acknowledgement.
fn judge(
    fatal: Option<String>,
    reachable_for: Option<Duration>,
    waiting: bool,
    since_ack: Duration,
    stall_after: Duration,
) -> Option<Replacement> {
    if let Some(reason) = fatal {
        return Some(Replacement::Fatal(reason));
    }
    // Kafka down: waiting is right, a new producer would not do better. Back since less than a
    // stall period: the producer gets that long to deliver what waited.
    let stalled = reachable_for.is_some_and(|up| up >= stall_after) && waiting && since_ack >= stall_after;
    stalled.then_some(Replacement::Stalled(since_ack))
}

impl KafkaSink {
    pub fn new(
        config: &KafkaConfig,
        security: &KafkaSecurity,
        metrics: IngestMetrics,
    ) -> Result<Self, rdkafka::error::KafkaError> {
        let mut client_config = ClientConfig::new();
        security
            .apply(&mut client_config)
            .set("bootstrap.servers", &config.brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("compression.type", &config.compression)
            .set("linger.ms", config.linger.as_millis().to_string())
            .set("message.timeout.ms", config.produce_timeout.as_millis().to_string())
            .set("queue.buffering.max.kbytes", config.queue_max_kbytes.to_string())
            .set("queue.buffering.max.messages", "100000")
            .set("message.max.bytes", "8000000")
            .set("batch.size", "1000000");
        let producer: FutureProducer = client_config.create()?;
        Ok(KafkaSink {
            producer: RwLock::new(producer),
            retired: Mutex::new(VecDeque::new()),
            reachable_since: Mutex::new(None),
            bootstrap: Mutex::new(BootstrapGuard::new("ingest producer", &config.brokers)),
            client_config,
            events_topic: Arc::from(config.events_topic.as_str()),
            dlq_topic: Arc::from(config.dlq_topic.as_str()),
            produce_timeout: config.produce_timeout,
            stall_after: config.stall_after,
            record_format: config.record_format,
            acks: Arc::new(Acks::new()),
            metrics,
        })
    }

    fn producer(&self) -> FutureProducer {
        self.producer.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Every `interval` until `shutdown`: probes the brokers (a metadata request), publishes the
    /// gauges, and replaces the producer when `supervise` says so.
    pub fn spawn_health_probe(
        self: &Arc<Self>,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let sink = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let probe = Arc::clone(&sink);
                // Blocking calls (the metadata request; a replacement waits for the old producer's
                // thread) stay off the request workers.
                let _ = tokio::task::spawn_blocking(move || {
                    probe.probe();
                    probe.supervise();
                })
                .await;
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        })
    }

    /// Do the brokers answer? Updates readiness and the gauges.
    fn probe(&self) -> bool {
        let producer = self.producer();
        let reachable =
            producer.client().fetch_metadata(Some(&self.events_topic), Duration::from_secs(2)).is_ok();
        {
            let mut since = self.reachable_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if since.is_some() != reachable {
                *since = reachable.then(Instant::now);
                tracing::info!(reachable, "kafka reachability changed");
            }
        }
        // A producer that forgot every broker (see `tally_common::kafka`) gets them back.
        self.bootstrap
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .observe(producer.client(), reachable);
        self.metrics.kafka_up.set(i64::from(reachable));
        self.metrics.producer_queue_depth.set(i64::from(producer.in_flight_count()));
        reachable
    }

    /// Replaces the producer after a fatal error, or when it has stalled: for `stall_after` the
    /// brokers answered and nothing was acknowledged while records waited. What the old producer
    /// still holds keeps its chance until its deadline (then its requests answer 503 and an SDK
    /// retries them with the same event ids, which the consumer stores once). Returns what it did.
    pub fn supervise(&self) -> Option<Replacement> {
        {
            let mut retired = self.retired.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // Every send that took a retired producer has ended by its deadline (plus a second).
            while retired
                .front()
                .is_some_and(|(at, _)| at.elapsed() > self.produce_timeout + Duration::from_secs(2))
            {
                retired.pop_front();
            }
        }
        let producer = self.producer();
        let reachable_for = self
            .reachable_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .map(|at| at.elapsed());
        let waiting = producer.in_flight_count() > 0 || self.acks.timed_out_since.load(Ordering::Relaxed);
        let fatal = producer.client().fatal_error().map(|(code, reason)| format!("{code:?}: {reason}"));
        drop(producer);
        let verdict = judge(fatal, reachable_for, waiting, self.acks.since_last(), self.stall_after)?;
        let fresh: FutureProducer = match self.client_config.create() {
            Ok(fresh) => fresh,
            Err(error) => {
                tracing::error!(error = %error, ?verdict, "kafka producer needs replacing but a new one could not be created");
                return None;
            }
        };
        let old = {
            let mut current = self.producer.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            std::mem::replace(&mut *current, fresh)
        };
        self.acks.restart();
        self.metrics.producers_replaced.with_label_values(&[verdict.reason()]).inc();
        match &verdict {
            Replacement::Fatal(reason) => {
                tracing::error!(reason = %reason, "kafka producer failed fatally; replaced by a new one")
            }
            Replacement::Stalled(since) => tracing::error!(
                seconds = since.as_secs_f64(),
                "kafka producer stalled: nothing acknowledged while the brokers answer; replaced by a new one"
            ),
        }
        self.retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push_back((Instant::now(), old));
        Some(verdict)
    }
}

impl EventSink for KafkaSink {
    fn produce(
        &self,
        topic: Topic,
        key: Arc<str>,
        payload: Vec<u8>,
        events: usize,
        request_id: RequestId,
    ) -> BoxFuture<'static, Result<(), SinkError>> {
        let producer = self.producer();
        let topic_name = match topic {
            Topic::Events => Arc::clone(&self.events_topic),
            Topic::DeadLetters => Arc::clone(&self.dlq_topic),
        };
        let deadline = self.produce_timeout;
        let metrics = self.metrics.clone();
        let acks = Arc::clone(&self.acks);
        let format = self.record_format;
        Box::pin(async move {
            let started = Instant::now();
            let mut headers = OwnedHeaders::new()
                .insert(Header { key: HEADER_SCHEMA_VERSION, value: Some(SCHEMA_VERSION) })
                .insert(Header { key: HEADER_REQUEST_ID, value: Some(request_id.as_str()) });
            if topic == Topic::Events {
                let count = events.to_string();
                headers = headers.insert(Header { key: HEADER_EVENTS, value: Some(count.as_str()) });
                if format != RecordFormat::JsonEachRow {
                    headers = headers.insert(Header { key: HEADER_FORMAT, value: Some(format.name()) });
                }
            }
            let record = FutureRecord::to(&topic_name).key(key.as_ref()).payload(&payload).headers(headers);
            // Waiting for queue space is part of the deadline: a full queue (Kafka slow or down)
            // turns into a 503 instead of unbounded memory.
            let send = producer.send(record, Timeout::After(deadline));
            let result = match tokio::time::timeout(deadline + Duration::from_secs(1), send).await {
                Err(_) | Ok(Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut), _))) => {
                    Err(SinkError::Timeout)
                }
                Ok(Err((error, _message))) => Err(SinkError::Kafka(error.to_string())),
                Ok(Ok(_delivery)) => Ok(()),
            };
            metrics.produce_seconds.observe(started.elapsed().as_secs_f64());
            // Only a send that ran out of time says the producer may be stuck; a refusal (a record
            // too large, a fatal error) is an answer.
            match result {
                Ok(()) => acks.acknowledged(),
                Err(SinkError::Timeout) => acks.timed_out(),
                Err(SinkError::Kafka(_)) => {}
            }
            result
        })
    }

    fn is_available(&self) -> bool {
        self.reachable_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some()
    }

    fn flush(&self, timeout: Duration) {
        if let Err(error) = self.producer().flush(Timeout::After(timeout)) {
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
        _: usize,
        _: RequestId,
    ) -> BoxFuture<'static, Result<(), SinkError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn is_available(&self) -> bool {
        true
    }

    fn flush(&self, _: Duration) {}
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    use super::*;

    fn config(brokers: &str, topic: &str, produce_timeout: Duration, stall_after: Duration) -> KafkaConfig {
        KafkaConfig {
            brokers: brokers.to_owned(),
            events_topic: topic.to_owned(),
            dlq_topic: topic.to_owned(),
            produce_timeout,
            queue_max_kbytes: 1024,
            compression: "lz4".into(),
            linger: Duration::from_millis(1),
            stall_after,
            record_format: RecordFormat::JsonEachRow,
        }
    }

    fn sink(config: &KafkaConfig) -> (KafkaSink, IngestMetrics) {
        let metrics = IngestMetrics::register(&prometheus::Registry::new()).unwrap();
        (KafkaSink::new(config, &KafkaSecurity::default(), metrics.clone()).unwrap(), metrics)
    }

    async fn send(sink: &KafkaSink) -> Result<(), SinkError> {
        sink.produce(Topic::Events, Arc::from("org"), b"{}".to_vec(), 1, RequestId::from_static("request"))
            .await
    }

    #[test]
    fn the_rule_replaces_a_fatal_producer_at_once_and_a_stalled_one_only_while_kafka_answers() {
        let stall = Duration::from_secs(5);
        let (long, short) = (Duration::from_secs(6), Duration::from_secs(4));
        let fatal = judge(Some("fenced".into()), None, false, Duration::ZERO, stall);
        assert_eq!(fatal, Some(Replacement::Fatal("fenced".into())));
        assert_eq!(judge(None, Some(long), true, long, stall), Some(Replacement::Stalled(long)));
        // Kafka down: waiting is right, a new producer would not do better.
        assert_eq!(judge(None, None, true, long, stall), None);
        // Kafka back for less than a stall period: the producer gets that long to deliver.
        assert_eq!(judge(None, Some(short), true, long, stall), None);
        // Nothing waits (an idle ingest), or an acknowledgement came recently.
        assert_eq!(judge(None, Some(long), false, long, stall), None);
        assert_eq!(judge(None, Some(long), true, short, stall), None);
    }

    /// A fatal error of the idempotent producer cannot be provoked on demand on a healthy broker
    /// (it takes a fenced epoch or a missing cluster authorisation), so this one test runs on
    /// librdkafka's own mock cluster, which answers `InitProducerId` with
    /// CLUSTER_AUTHORIZATION_FAILED once: without the supervisor every later send would fail.
    #[tokio::test]
    async fn a_producer_failed_fatally_is_replaced_and_sends_succeed_again() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("events", 1, 1).unwrap();
        cluster.request_errors(
            RDKafkaApiKey::InitProducerId,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED],
        );
        let config =
            config(&cluster.bootstrap_servers(), "events", Duration::from_secs(5), Duration::from_secs(60));
        let (sink, metrics) = sink(&config);
        assert!(matches!(send(&sink).await, Err(SinkError::Kafka(_))), "the fatal error fails the send");
        assert!(send(&sink).await.is_err(), "and every send after it");
        let verdict = sink.supervise();
        assert!(
            matches!(verdict, Some(Replacement::Fatal(ref reason)) if reason.contains("authori")),
            "{verdict:?}"
        );
        assert_eq!(metrics.producers_replaced.with_label_values(&["fatal"]).get(), 1);
        send(&sink).await.unwrap();
        assert_eq!(sink.supervise(), None, "a healthy producer is left alone");
        assert_eq!(metrics.producers_replaced.with_label_values(&["fatal"]).get(), 1);
    }

    /// A broker that answers metadata but refuses every write with a retriable error
    /// (NOT_ENOUGH_REPLICAS: the producer retries until the record's deadline) is the stall the
    /// supervisor looks for. One broker cannot be made to do that (Kafka 4 caps the in-sync
    /// replicas it demands at the replication factor), so this runs on librdkafka's mock cluster.
    /// The producer is replaced once per stall period, never before, never while Kafka is
    /// unreachable; once writes are accepted, sends succeed and the stall is cleared.
    #[tokio::test]
    async fn a_producer_that_acknowledges_nothing_while_kafka_answers_is_replaced_once_per_stall_period() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("events", 1, 1).unwrap();
        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 10_000],
        );
        let config = config(
            &cluster.bootstrap_servers(),
            "events",
            Duration::from_millis(1500),
            Duration::from_secs(3),
        );
        let (sink, metrics) = sink(&config);
        assert!(sink.probe(), "the broker answers metadata requests");
        assert!(matches!(send(&sink).await, Err(SinkError::Timeout)), "refused until the produce deadline");
        assert!(sink.probe());
        assert_eq!(sink.supervise(), None, "not before the stall period");
        tokio::time::sleep(Duration::from_millis(1700)).await;
        assert!(sink.probe());
        assert!(matches!(sink.supervise(), Some(Replacement::Stalled(_))));
        assert_eq!(metrics.producers_replaced.with_label_values(&["stalled"]).get(), 1);
        assert_eq!(sink.supervise(), None, "the new producer gets a whole stall period");
        assert!(send(&sink).await.is_err(), "the broker still refuses writes");

        // Kafka unreachable past the stall period: nothing to gain from a new producer.
        cluster.broker_down(1).unwrap();
        tokio::time::sleep(Duration::from_millis(1600)).await;
        assert!(!sink.probe());
        assert_eq!(sink.supervise(), None, "Kafka is down");
        cluster.broker_up(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sink.probe() {
            assert!(Instant::now() < deadline, "the mock broker did not come back");
        }
        assert_eq!(sink.supervise(), None, "Kafka back for less than a stall period");

        cluster.clear_request_errors(RDKafkaApiKey::Produce);
        send(&sink).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3100)).await;
        assert!(sink.probe());
        assert_eq!(sink.supervise(), None, "an acknowledgement clears the stall");
        assert_eq!(metrics.producers_replaced.with_label_values(&["stalled"]).get(), 1);
    }
}
