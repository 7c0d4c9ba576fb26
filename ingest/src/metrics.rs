//! The ingest's Prometheus metrics, declared in one place.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct IngestMetrics {
    pub events_accepted: IntCounter,
    pub events_produced_unanswered: IntCounter,
    pub events_rejected: IntCounterVec,
    pub events_rate_limited: IntCounter,
    pub dead_letter_failures: IntCounter,
    pub produce_seconds: Histogram,
    pub producer_queue_depth: IntGauge,
    pub kafka_up: IntGauge,
    pub producers_replaced: IntCounterVec,
    pub control_snapshots: IntCounter,
}

impl IngestMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = IngestMetrics {
            events_accepted: IntCounter::new(
                "tally_ingest_events_accepted_total",
                "events accepted into Kafka",
            )?,
            events_produced_unanswered: IntCounter::new(
                "tally_ingest_events_produced_unanswered_total",
                "events Kafka acknowledged after their request had ended unanswered (the client went away \
                 first); a retry of them is dropped by the consumer as a duplicate",
            )?,
            events_rejected: IntCounterVec::new(
                Opts::new("tally_ingest_events_rejected_total", "events rejected, by reason"),
                &["reason"],
            )?,
            events_rate_limited: IntCounter::new(
                "tally_ingest_events_rate_limited_total",
                "events refused by the org's plan limit",
            )?,
            dead_letter_failures: IntCounter::new(
                "tally_ingest_dead_letter_failures_total",
                "rejected events whose dead letter could not be produced",
            )?,
            produce_seconds: Histogram::with_opts(
                HistogramOpts::new("tally_ingest_produce_seconds", "time until Kafka acknowledged a record")
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    ]),
            )?,
            producer_queue_depth: IntGauge::new(
                "tally_ingest_producer_queue_depth",
                "records queued in the producer, not yet acknowledged",
            )?,
            kafka_up: IntGauge::new("tally_ingest_kafka_up", "1 when the Kafka brokers answer")?,
            producers_replaced: IntCounterVec::new(
                Opts::new(
                    "tally_ingest_producers_replaced_total",
                    "Kafka producers replaced, by reason: fatal (librdkafka's fatal error) or stalled \
                     (nothing acknowledged for TALLY_PRODUCER_STALL_MS while sends failed and the brokers answered)",
                ),
                &["reason"],
            )?,
            control_snapshots: IntCounter::new(
                "tally_ingest_control_snapshots_applied_total",
                "API-key and price snapshots read from the control topic and applied",
            )?,
        };
        registry.register(Box::new(metrics.events_accepted.clone()))?;
        registry.register(Box::new(metrics.events_produced_unanswered.clone()))?;
        registry.register(Box::new(metrics.events_rejected.clone()))?;
        registry.register(Box::new(metrics.events_rate_limited.clone()))?;
        registry.register(Box::new(metrics.dead_letter_failures.clone()))?;
        registry.register(Box::new(metrics.produce_seconds.clone()))?;
        registry.register(Box::new(metrics.producer_queue_depth.clone()))?;
        registry.register(Box::new(metrics.kafka_up.clone()))?;
        registry.register(Box::new(metrics.producers_replaced.clone()))?;
        registry.register(Box::new(metrics.control_snapshots.clone()))?;
        Ok(metrics)
    }
}
