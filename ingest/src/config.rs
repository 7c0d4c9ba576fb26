//! The ingest's configuration, from `TALLY_*` settings, validated at start.

use std::time::Duration;

use tally_common::config::{CommonConfig, ConfigError, Env};
use tally_schemas::control::CONTROL_TOPIC;
use tally_schemas::record::{RecordFormat, DLQ_TOPIC, EVENTS_TOPIC};

#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `TALLY_KAFKA_BROKERS`, comma-separated host:port.
    pub brokers: String,
    pub events_topic: String,
    pub dlq_topic: String,
    /// Longest a produce may take, queueing and delivery together, before the request gets 503.
    pub produce_timeout: Duration,
    /// Bound of the producer's in-memory queue, in KiB: beyond it requests get 503, memory stays flat.
    pub queue_max_kbytes: u32,
    /// `lz4` or `zstd`.
    pub compression: String,
    pub linger: Duration,
    /// `TALLY_PRODUCER_STALL_MS` (5 s): a producer that has had nothing acknowledged for this long
    /// while records waited and the brokers answered (for as long) is replaced.
    pub stall_after: Duration,
    /// `TALLY_RECORD_FORMAT`: how the events records are written, `JSONEachRow` or `RowBinary`
    /// (`tally_schemas::record::binary`; the record then says so in its `tally-format` header).
    pub record_format: RecordFormat,
}

/// Where accepted events go. `Discard` exists for the benchmark that measures the ingest minus Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    Kafka,
    Discard,
}

impl std::str::FromStr for SinkKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kafka" => Ok(SinkKind::Kafka),
            "discard" => Ok(SinkKind::Discard),
            other => Err(format!("expected kafka or discard, got {other:?}")),
        }
    }
}

/// Where the API keys and prices come from (`TALLY_INGEST_CONTROL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlSource {
    /// Read from ClickHouse's admin tables every `TALLY_KEY_REFRESH_MS` / `TALLY_PRICE_REFRESH_MS`
    /// (the default: one machine, nothing else to run).
    ClickHouse,
    /// Read from the control topic the consumers publish (`TALLY_CONTROL_TOPIC`): the ingest then
    /// needs Kafka only, no ClickHouse address or credentials (Kubernetes: docs/deploy.md).
    Kafka { topic: String },
}

#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub control: ControlSource,
    pub sink: SinkKind,
    /// Runtime worker threads (`TALLY_WORKER_THREADS`, 0 = one per core). Set it to the cores the
    /// process owns: on a machine shared with other busy processes, fewer workers mean fewer
    /// cross-thread wake-ups per request.
    pub worker_threads: usize,
    pub common: CommonConfig,
    pub kafka: KafkaConfig,
    /// Largest request body accepted, in bytes (after decompression).
    pub max_body_bytes: usize,
    /// Largest compressed body accepted off the wire, in bytes.
    pub max_compressed_bytes: usize,
    /// How many ingest replicas share each org's limit (each enforces 1/N of it).
    pub replicas: u32,
    /// How often the API key set and the price book are reloaded from ClickHouse.
    pub key_refresh_interval: Duration,
    pub price_refresh_interval: Duration,
}

/// `TALLY_RECORD_FORMAT`, by ClickHouse's name of the format.
fn record_format(env: &Env) -> Result<RecordFormat, ConfigError> {
    let name = env.string("TALLY_RECORD_FORMAT", DEFAULT_RECORD_FORMAT.name());
    RecordFormat::of_header(Some(name.as_bytes())).ok_or(ConfigError::Invalid {
        key: "TALLY_RECORD_FORMAT".into(),
        value: name,
        reason: "expected JSONEachRow or RowBinary".into(),
    })
}

/// The events records' format unless `TALLY_RECORD_FORMAT` says otherwise.
pub const DEFAULT_RECORD_FORMAT: RecordFormat = RecordFormat::JsonEachRow;

impl IngestConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let compression = env.string("TALLY_KAFKA_COMPRESSION", "lz4");
        if !matches!(compression.as_str(), "lz4" | "zstd" | "none") {
            return Err(ConfigError::Invalid {
                key: "TALLY_KAFKA_COMPRESSION".into(),
                value: compression,
                reason: "expected lz4, zstd or none".into(),
            });
        }
        let control = match env.string("TALLY_INGEST_CONTROL", "clickhouse").as_str() {
            "clickhouse" => ControlSource::ClickHouse,
            "kafka" => ControlSource::Kafka { topic: env.string("TALLY_CONTROL_TOPIC", CONTROL_TOPIC) },
            other => {
                return Err(ConfigError::Invalid {
                    key: "TALLY_INGEST_CONTROL".into(),
                    value: other.into(),
                    reason: "expected clickhouse or kafka".into(),
                })
            }
        };
        let config = IngestConfig {
            control,
            sink: env.parse("TALLY_SINK", SinkKind::Kafka)?,
            worker_threads: env.parse("TALLY_WORKER_THREADS", 0)?,
            common: CommonConfig::from_env(env, "127.0.0.1:8080")?,
            kafka: KafkaConfig {
                brokers: env.string("TALLY_KAFKA_BROKERS", "127.0.0.1:9092"),
                events_topic: env.string("TALLY_EVENTS_TOPIC", EVENTS_TOPIC),
                dlq_topic: env.string("TALLY_DLQ_TOPIC", DLQ_TOPIC),
                produce_timeout: env.millis("TALLY_PRODUCE_TIMEOUT_MS", 10_000)?,
                queue_max_kbytes: env.parse("TALLY_KAFKA_QUEUE_MAX_KBYTES", 262_144)?,
                compression,
                linger: env.millis("TALLY_KAFKA_LINGER_MS", 5)?,
                stall_after: env.millis("TALLY_PRODUCER_STALL_MS", 5_000)?,
                record_format: record_format(env)?,
            },
            max_body_bytes: env.parse("TALLY_MAX_BODY_BYTES", 8 * 1024 * 1024)?,
            max_compressed_bytes: env.parse("TALLY_MAX_COMPRESSED_BYTES", 2 * 1024 * 1024)?,
            replicas: env.parse("TALLY_INGEST_REPLICAS", 1)?,
            key_refresh_interval: env.millis("TALLY_KEY_REFRESH_MS", 5_000)?,
            price_refresh_interval: env.millis("TALLY_PRICE_REFRESH_MS", 30_000)?,
        };
        if config.replicas == 0 {
            return Err(ConfigError::Invalid {
                key: "TALLY_INGEST_REPLICAS".into(),
                value: "0".into(),
                reason: "must be at least 1".into(),
            });
        }
        if config.key_refresh_interval > Duration::from_secs(30) {
            return Err(ConfigError::Invalid {
                key: "TALLY_KEY_REFRESH_MS".into(),
                value: config.key_refresh_interval.as_millis().to_string(),
                reason: "must be at most 30000 so a revoked key stops working within 30 s".into(),
            });
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_threads_default_to_one_per_core_and_refuse_garbage() {
        let default = IngestConfig::from_env(&Env::from_pairs([("TALLY_SINK", "discard")])).expect("valid");
        assert_eq!(default.worker_threads, 0, "0 = tokio's one per core");
        let one = IngestConfig::from_env(&Env::from_pairs([
            ("TALLY_SINK", "discard"),
            ("TALLY_WORKER_THREADS", "1"),
        ]))
        .expect("valid");
        assert_eq!(one.worker_threads, 1);
        let bad = IngestConfig::from_env(&Env::from_pairs([("TALLY_WORKER_THREADS", "many")]));
        assert!(matches!(bad, Err(ConfigError::Invalid { ref key, .. }) if key == "TALLY_WORKER_THREADS"));
    }

    #[test]
    fn the_record_format_is_named_as_clickhouse_names_it() {
        let format = |value: Option<&str>| {
            let mut env = Env::from_pairs([("TALLY_SINK", "discard")]);
            if let Some(value) = value {
                env = env.with("TALLY_RECORD_FORMAT", value);
            }
            IngestConfig::from_env(&env).map(|c| c.kafka.record_format)
        };
        assert_eq!(format(None).ok(), Some(DEFAULT_RECORD_FORMAT));
        assert_eq!(format(Some("RowBinary")).ok(), Some(RecordFormat::RowBinary));
        assert_eq!(format(Some("JSONEachRow")).ok(), Some(RecordFormat::JsonEachRow));
        let bad = format(Some("rowbinary"));
        assert!(matches!(bad, Err(ConfigError::Invalid { ref key, .. }) if key == "TALLY_RECORD_FORMAT"));
    }
}
