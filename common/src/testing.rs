//! Helpers for integration tests against the local stack: a fresh, migrated database per test.

use rand::Rng;

use crate::ch::ChConfig;

/// The ClickHouse of the local stack, overridable with `TALLY_TEST_CLICKHOUSE_URL`.
pub fn clickhouse_url() -> String {
    std::env::var("TALLY_TEST_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into())
}

/// The Kafka of the local stack, overridable with `TALLY_TEST_KAFKA_BROKERS`.
pub fn kafka_brokers() -> String {
    std::env::var("TALLY_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// A random name with a prefix, for databases and topics (`tally_t_<prefix>_<12 hex>`).
pub fn unique_name(prefix: &str) -> String {
    format!("tally_t_{prefix}_{:012x}", rand::rng().random::<u64>() & 0xffff_ffff_ffff)
}

/// Config for a new database that does not exist yet.
pub fn new_database_config(prefix: &str) -> ChConfig {
    ChConfig { url: clickhouse_url(), database: unique_name(prefix), user: "default".into(), password: String::new() }
}

/// A new database with every migration applied.
pub async fn migrated_database(prefix: &str) -> ChConfig {
    let config = new_database_config(prefix);
    crate::migrate::migrate(&config).await.expect("migrations apply on the local ClickHouse");
    config
}

pub async fn drop_database(config: &ChConfig) {
    let _ = config.client().query(&format!("DROP DATABASE IF EXISTS {}", config.database)).execute().await;
}
