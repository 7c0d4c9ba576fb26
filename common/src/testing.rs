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
    ChConfig {
        url: clickhouse_url(),
        database: unique_name(prefix),
        user: "default".into(),
        password: String::new(),
    }
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

/// Creates a topic on the local Kafka (waits until it exists).
pub async fn create_topic(name: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", kafka_brokers()).create().expect("kafka admin client");
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics(
            [&topic],
            &AdminOptions::new().operation_timeout(Some(std::time::Duration::from_secs(10))),
        )
        .await
        .expect("create_topics request");
    for result in results {
        if let Err((topic, code)) = result {
            assert_eq!(code, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists, "creating topic {topic}");
        }
    }
}

pub async fn delete_topics(names: &[&str]) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", kafka_brokers()).create().expect("kafka admin client");
    let _ = admin.delete_topics(names, &AdminOptions::new()).await;
}

/// Inserts an org and an active key for it straight into the admin tables; returns the key.
pub async fn create_org_with_key(
    config: &ChConfig,
    org_id: &str,
    plan: &str,
    events_per_minute: u32,
) -> String {
    let key = tally_schemas::keys::generate();
    config
        .client()
        .query(&format!(
            "INSERT INTO {} (org_id, name, plan, rate_limit_per_min, rate_limit_burst, created_at, deleted, version) VALUES (?, ?, ?, ?, 0, now(), 0, 1)",
            config.table("orgs")
        ))
        .bind(org_id)
        .bind(org_id)
        .bind(plan)
        .bind(events_per_minute)
        .execute()
        .await
        .expect("insert org");
    config
        .client()
        .query(&format!(
            "INSERT INTO {} (key_hash, key_prefix, org_id, name, created_at, revoked, version) VALUES (?, ?, ?, 'test', now(), 0, 1)",
            config.table("api_keys")
        ))
        .bind(&key.hash)
        .bind(&key.display_prefix)
        .bind(org_id)
        .execute()
        .await
        .expect("insert key");
    key.secret
}
