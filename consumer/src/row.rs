//! A row of `tally.events` as the consumer inserts it (RowBinary; field order is column order).

use clickhouse::Row;
use serde::Serialize;
use tally_schemas::{CostSource, Event, Status};

#[derive(Debug, Row, Serialize)]
pub struct EventRow {
    pub org_id: String,
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: uuid::Uuid,
    pub timestamp: u32,
    pub timestamp_ms: u16,
    pub received_at: u32,
    pub provider: String,
    pub model: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub cost_nanos: i64,
    pub cost_source: i8,
    pub latency_ms: u32,
    pub status: i8,
    pub http_status: u16,
    pub error: String,
    pub execution_id: String,
    pub agent_id: String,
    pub user_id: String,
    pub service: String,
    pub action: String,
    pub request_id: String,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub metadata_keys: Vec<String>,
    pub metadata_values: Vec<String>,
    pub kafka_partition: u16,
    pub kafka_offset: u64,
    pub kafka_index: u32,
}

fn epoch_seconds(ms: i64) -> u32 {
    u32::try_from(ms.div_euclid(1000)).unwrap_or(0)
}

impl EventRow {
    /// `index` is the event's line number within its Kafka record.
    pub fn new(event: Event, partition: i32, offset: i64, index: u32) -> Self {
        let (metadata_keys, metadata_values) = event.metadata.into_iter().unzip();
        EventRow {
            timestamp: epoch_seconds(event.timestamp_ms),
            timestamp_ms: event.timestamp_ms.rem_euclid(1000) as u16,
            received_at: epoch_seconds(event.received_at_ms),
            org_id: event.org_id,
            event_id: event.event_id,
            provider: event.provider,
            model: event.model,
            prompt_tokens: event.prompt_tokens,
            completion_tokens: event.completion_tokens,
            total_tokens: event.total_tokens,
            cost_nanos: event.cost_nanos,
            // Enum8 values as declared in migration 0001.
            cost_source: match event.cost_source {
                CostSource::Client => 1,
                CostSource::Computed => 2,
                CostSource::Unknown => 3,
            },
            latency_ms: event.latency_ms,
            status: match event.status {
                Status::Success => 1,
                Status::Error => 2,
            },
            http_status: event.http_status,
            error: event.error,
            execution_id: event.execution_id,
            agent_id: event.agent_id,
            user_id: event.user_id,
            service: event.service,
            action: event.action,
            request_id: event.request_id,
            input_bytes: event.input_bytes,
            output_bytes: event.output_bytes,
            metadata_keys,
            metadata_values,
            kafka_partition: u16::try_from(partition).unwrap_or(u16::MAX),
            kafka_offset: u64::try_from(offset).unwrap_or(0),
            kafka_index: index,
        }
    }
}
