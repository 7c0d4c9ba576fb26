//! The consumer's configuration, from `TALLY_*` settings, validated at start.

use std::time::Duration;

use tally_common::config::{CommonConfig, ConfigError, Env};
use tally_schemas::record::{DLQ_TOPIC, EVENTS_TOPIC};

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub common: CommonConfig,
    pub brokers: String,
    pub events_topic: String,
    pub dlq_topic: String,
    pub group_id: String,
    /// A batch is inserted when it holds this many rows ...
    pub batch_max_rows: usize,
    /// ... or when its first record is this old.
    pub batch_max_wait: Duration,
    /// Apply the ClickHouse migrations at start (safe with several replicas).
    pub migrate: bool,
}

impl ConsumerConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let config = ConsumerConfig {
            common: CommonConfig::from_env(env, "127.0.0.1:8082")?,
            brokers: env.string("TALLY_KAFKA_BROKERS", "127.0.0.1:9092"),
            events_topic: env.string("TALLY_EVENTS_TOPIC", EVENTS_TOPIC),
            dlq_topic: env.string("TALLY_DLQ_TOPIC", DLQ_TOPIC),
            group_id: env.string("TALLY_CONSUMER_GROUP", "tally-consumer"),
            batch_max_rows: env.parse("TALLY_BATCH_MAX_ROWS", 100_000)?,
            batch_max_wait: env.millis("TALLY_BATCH_MAX_WAIT_MS", 500)?,
            migrate: env.parse("TALLY_MIGRATE", true)?,
        };
        if config.batch_max_rows == 0 || config.batch_max_rows > 1_000_000 {
            return Err(ConfigError::Invalid {
                key: "TALLY_BATCH_MAX_ROWS".into(),
                value: config.batch_max_rows.to_string(),
                reason: "must be 1..=1000000 so a batch stays one insert block".into(),
            });
        }
        Ok(config)
    }
}
