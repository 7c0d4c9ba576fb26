//! The consumer's Prometheus metrics, declared in one place.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct ConsumerMetrics {
    pub rows_inserted: IntCounter,
    pub batches: IntCounter,
    pub batches_prechecked: IntCounter,
    pub batch_rows: Histogram,
    pub insert_seconds: Histogram,
    pub insert_retries: IntCounter,
    pub dead_letters: IntCounterVec,
    pub reconciled_rows_skipped: IntCounter,
    pub rollup_buckets_repaired: IntCounter,
    pub revoked_records_dropped: IntCounter,
    pub kafka_clients_replaced: IntCounter,
    pub control_snapshots_published: IntCounter,
    pub lag: IntGaugeVec,
    pub duplicates_dropped: IntCounter,
    pub dedup_ids: IntGauge,
    pub dedup_bytes: IntGauge,
    pub dedup_window_seconds: IntGauge,
    pub dedup_evicted: IntCounter,
    pub clickhouse_restarts: IntCounter,
    pub reread_rows_stored: IntCounter,
}

impl ConsumerMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = ConsumerMetrics {
            rows_inserted: IntCounter::new(
                "tally_consumer_rows_inserted_total",
                "rows inserted into tally.events",
            )?,
            batches: IntCounter::new("tally_consumer_batches_total", "batches inserted and committed")?,
            batches_prechecked: IntCounter::new(
                "tally_consumer_batches_prechecked_total",
                "batches checked against the dedup window while the previous batch was inserted",
            )?,
            batch_rows: Histogram::with_opts(
                HistogramOpts::new("tally_consumer_batch_rows", "rows per inserted batch")
                    .buckets(prometheus::exponential_buckets(1.0, 4.0, 10)?),
            )?,
            insert_seconds: Histogram::with_opts(
                HistogramOpts::new("tally_consumer_insert_seconds", "ClickHouse insert latency per batch")
                    .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            )?,
            insert_retries: IntCounter::new(
                "tally_consumer_insert_retries_total",
                "inserts retried after a transient failure",
            )?,
            dead_letters: IntCounterVec::new(
                Opts::new(
                    "tally_consumer_dead_letters_total",
                    "records sent to the dead-letter topic, by reason",
                ),
                &["reason"],
            )?,
            reconciled_rows_skipped: IntCounter::new(
                "tally_consumer_reconciled_rows_skipped_total",
                "rows read again after a crash or rebalance and skipped because ClickHouse already had them",
            )?,
            rollup_buckets_repaired: IntCounter::new(
                "tally_consumer_rollup_buckets_repaired_total",
                "rollup buckets completed after an insert reached events but not its views (ClickHouse died in between)",
            )?,
            revoked_records_dropped: IntCounter::new(
                "tally_consumer_revoked_records_dropped_total",
                "records of partitions revoked before their insert, left to the new owner",
            )?,
            control_snapshots_published: IntCounter::new(
                "tally_consumer_control_snapshots_published_total",
                "API-key and price snapshots published to the control topic (on change, and every 10 min)",
            )?,
            kafka_clients_replaced: IntCounter::new(
                "tally_consumer_kafka_clients_replaced_total",
                "Kafka clients replaced after a fatal error (e.g. a static member fenced after a broker restart)",
            )?,
            lag: IntGaugeVec::new(
                Opts::new(
                    "tally_consumer_lag_records",
                    "records between the committed offset and the end, per assigned partition",
                ),
                &["partition"],
            )?,
            duplicates_dropped: IntCounter::new(
                "tally_consumer_duplicates_dropped_total",
                "rows dropped because their (org, event id) was stored within the dedup window",
            )?,
            dedup_ids: IntGauge::new("tally_consumer_dedup_ids", "event ids held in the dedup window")?,
            dedup_bytes: IntGauge::new(
                "tally_consumer_dedup_bytes",
                "heap bytes of the dedup window tables",
            )?,
            dedup_window_seconds: IntGauge::new(
                "tally_consumer_dedup_window_seconds",
                "how far back every event id is remembered: TALLY_DEDUP_WINDOW_HOURS, less once \
                 TALLY_DEDUP_MAX_IDS made the window forget its oldest ids",
            )?,
            dedup_evicted: IntCounter::new(
                "tally_consumer_dedup_evicted_total",
                "event ids forgotten before their window ended, to keep within TALLY_DEDUP_MAX_IDS",
            )?,
            clickhouse_restarts: IntCounter::new(
                "tally_consumer_clickhouse_restarts_total",
                "ClickHouse restarts seen, each followed by a re-read of TALLY_RESTART_REREAD_SECONDS of every assigned partition",
            )?,
            reread_rows_stored: IntCounter::new(
                "tally_consumer_reread_rows_stored_total",
                "rows the re-read after a ClickHouse restart stored again: confirmed inserts the restart had lost",
            )?,
        };
        registry.register(Box::new(metrics.clickhouse_restarts.clone()))?;
        registry.register(Box::new(metrics.reread_rows_stored.clone()))?;
        registry.register(Box::new(metrics.duplicates_dropped.clone()))?;
        registry.register(Box::new(metrics.dedup_ids.clone()))?;
        registry.register(Box::new(metrics.dedup_bytes.clone()))?;
        registry.register(Box::new(metrics.dedup_window_seconds.clone()))?;
        registry.register(Box::new(metrics.dedup_evicted.clone()))?;
        registry.register(Box::new(metrics.lag.clone()))?;
        registry.register(Box::new(metrics.reconciled_rows_skipped.clone()))?;
        registry.register(Box::new(metrics.rollup_buckets_repaired.clone()))?;
        registry.register(Box::new(metrics.revoked_records_dropped.clone()))?;
        registry.register(Box::new(metrics.kafka_clients_replaced.clone()))?;
        registry.register(Box::new(metrics.control_snapshots_published.clone()))?;
        registry.register(Box::new(metrics.rows_inserted.clone()))?;
        registry.register(Box::new(metrics.batches.clone()))?;
        registry.register(Box::new(metrics.batches_prechecked.clone()))?;
        registry.register(Box::new(metrics.batch_rows.clone()))?;
        registry.register(Box::new(metrics.insert_seconds.clone()))?;
        registry.register(Box::new(metrics.insert_retries.clone()))?;
        registry.register(Box::new(metrics.dead_letters.clone()))?;
        Ok(metrics)
    }
}
