//! What can stop the consumer (or one of its commands): each variant names the dependency that
//! failed, so `main` can say what to check.

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// librdkafka's fatal error: this client instance can no longer consume (e.g. a static member
    /// fenced after a broker restart) and must be replaced; `run` does so.
    #[error("kafka client failed fatally ({code:?}): {reason}")]
    KafkaFatal { code: rdkafka::types::RDKafkaErrorCode, reason: String },
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] tally_common::migrate::MigrateError),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("decoding worker panicked: {0}")]
    Join(#[from] tokio::task::JoinError),
}
