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
    /// Kafka group session timeout: how long a crashed replica keeps its partitions.
    pub session_timeout: Duration,
    /// Static group membership id (e.g. the pod name), when set.
    pub instance_id: Option<String>,
    /// `TALLY_CONTROL_TOPIC`: where to publish the API keys and prices for ingests that read Kafka
    /// only (`TALLY_INGEST_CONTROL=kafka`); unset, nothing is published.
    pub control_topic: Option<String>,
    /// `TALLY_CONTROL_INTERVAL_MS`: how often the admin tables are read for changes.
    pub control_interval: Duration,
    /// How long an event id is remembered for duplicate removal, in hours of arrival time.
    pub dedup_window_hours: u16,
    /// The most event ids a replica's dedup window holds (10 to 21 bytes each); past it the
    /// oldest are forgotten and the window is shorter than `dedup_window_hours`.
    pub dedup_max_ids: usize,
    /// `TALLY_KAFKA_PREFETCH_MIB`: how many MiB of records librdkafka may fetch ahead of the loop
    /// (`queued.max.messages.kbytes`): the drain's speed under a backlog against the replica's memory.
    pub prefetch_mib: u32,
    /// `TALLY_RESTART_REREAD_SECONDS`: after ClickHouse restarted, how far before its start every
    /// assigned partition is read again, to store what the restart lost (`restart`); 0: never.
    pub restart_reread: Duration,
    /// Test-only faults (the `failpoints` feature).
    #[cfg(feature = "failpoints")]
    pub failpoints: crate::failpoints::Failpoints,
}

impl ConsumerConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let config = ConsumerConfig {
            common: CommonConfig::from_env(env, "127.0.0.1:8082")?,
            brokers: env.string("TALLY_KAFKA_BROKERS", "127.0.0.1:9092"),
            events_topic: env.string("TALLY_EVENTS_TOPIC", EVENTS_TOPIC),
            dlq_topic: env.string("TALLY_DLQ_TOPIC", DLQ_TOPIC),
            group_id: env.string("TALLY_CONSUMER_GROUP", "tally-consumer"),
            batch_max_rows: env.parse_within(
                "TALLY_BATCH_MAX_ROWS",
                100_000,
                1..=1_000_000,
                "rows per insert, so a batch stays one insert block",
            )?,
            batch_max_wait: env.millis("TALLY_BATCH_MAX_WAIT_MS", 250)?,
            migrate: env.parse("TALLY_MIGRATE", true)?,
            session_timeout: env.millis("TALLY_KAFKA_SESSION_TIMEOUT_MS", 10_000)?,
            instance_id: env.optional("TALLY_CONSUMER_INSTANCE_ID"),
            dedup_window_hours: env.parse_within(
                "TALLY_DEDUP_WINDOW_HOURS",
                24,
                1..=720,
                "hours of arrival time an event id is remembered",
            )?,
            dedup_max_ids: env.parse_within(
                "TALLY_DEDUP_MAX_IDS",
                10_000_000,
                1_000..=2_000_000_000,
                "event ids the dedup window holds, 10-21 bytes each",
            )?,
            prefetch_mib: env.parse_within(
                "TALLY_KAFKA_PREFETCH_MIB",
                128,
                8..=1024,
                "MiB of records fetched ahead; one partition's fetch is 8 MiB",
            )?,
            restart_reread: Duration::from_secs(env.parse_within(
                "TALLY_RESTART_REREAD_SECONDS",
                120,
                0..=3600,
                "seconds before a ClickHouse restart read again (0: never)",
            )?),
            control_topic: env.optional("TALLY_CONTROL_TOPIC"),
            control_interval: env.millis("TALLY_CONTROL_INTERVAL_MS", 5000)?,
            #[cfg(feature = "failpoints")]
            failpoints: crate::failpoints::Failpoints::from_env(env)?,
        };
        if !(100..=30_000).contains(&config.control_interval.as_millis()) {
            return Err(ConfigError::Invalid {
                key: "TALLY_CONTROL_INTERVAL_MS".into(),
                value: config.control_interval.as_millis().to_string(),
                reason: "must be 100..=30000: a revoked key must stop working within seconds".into(),
            });
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dedup_window_is_24_hours_by_default_and_bounded() {
        let config = ConsumerConfig::from_env(&Env::from_pairs::<&str, &str>([])).expect("valid");
        assert_eq!(config.dedup_window_hours, 24);
        for (value, ok) in [("1", true), ("720", true), ("0", false), ("721", false)] {
            let result = ConsumerConfig::from_env(&Env::from_pairs([("TALLY_DEDUP_WINDOW_HOURS", value)]));
            assert_eq!(result.is_ok(), ok, "TALLY_DEDUP_WINDOW_HOURS={value}");
        }
    }

    #[test]
    fn the_dedup_window_holds_ten_million_ids_by_default_and_is_bounded() {
        let config = ConsumerConfig::from_env(&Env::from_pairs::<&str, &str>([])).expect("valid");
        assert_eq!(config.dedup_max_ids, 10_000_000);
        for (value, ok) in
            [("1000", true), ("2000000000", true), ("999", false), ("2000000001", false), ("x", false)]
        {
            let result = ConsumerConfig::from_env(&Env::from_pairs([("TALLY_DEDUP_MAX_IDS", value)]));
            assert_eq!(result.is_ok(), ok, "TALLY_DEDUP_MAX_IDS={value}");
        }
    }

    #[test]
    fn a_clickhouse_restart_rereads_two_minutes_by_default_and_is_bounded() {
        let config = ConsumerConfig::from_env(&Env::from_pairs::<&str, &str>([])).expect("valid");
        assert_eq!(config.restart_reread, Duration::from_secs(120));
        for (value, ok) in [("0", true), ("3600", true), ("3601", false), ("-1", false), ("2m", false)] {
            let result =
                ConsumerConfig::from_env(&Env::from_pairs([("TALLY_RESTART_REREAD_SECONDS", value)]));
            assert_eq!(result.is_ok(), ok, "TALLY_RESTART_REREAD_SECONDS={value}");
        }
    }

    #[test]
    fn the_prefetch_is_128_mib_by_default_and_bounded() {
        let config = ConsumerConfig::from_env(&Env::from_pairs::<&str, &str>([])).expect("valid");
        assert_eq!(config.prefetch_mib, 128);
        for (value, ok) in [("8", true), ("1024", true), ("7", false), ("1025", false), ("lots", false)] {
            let result = ConsumerConfig::from_env(&Env::from_pairs([("TALLY_KAFKA_PREFETCH_MIB", value)]));
            assert_eq!(result.is_ok(), ok, "TALLY_KAFKA_PREFETCH_MIB={value}");
        }
    }
}
