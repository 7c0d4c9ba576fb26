//! The normalized event: what every accepted SDK event becomes, what travels through Kafka and
//! what a row of `tally.events` holds. Money is fixed point (nano-dollars), times are epoch ms.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Where an event's cost came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CostSource {
    /// The SDK sent `cost`; Tally kept it.
    Client,
    /// Tally priced the event from the model-price registry.
    Computed,
    /// No cost was sent and the registry has no price for the model at that time: cost is 0.
    Unknown,
}

impl CostSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CostSource::Client => "client",
            CostSource::Computed => "computed",
            CostSource::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Success,
    Error,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Success => "success",
            Status::Error => "error",
        }
    }
}

/// One usage event after parsing, validation and pricing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub event_id: Uuid,
    /// From the API key that sent it, never from the body.
    pub org_id: String,
    pub received_at_ms: i64,
    pub timestamp_ms: i64,
    pub provider: String,
    pub model: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub cost_nanos: i64,
    pub cost_source: CostSource,
    pub latency_ms: u32,
    pub status: Status,
    /// HTTP status of the LLM call when the SDK reported one (seed 004), else 0.
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
    /// Sorted by key, keys unique.
    pub metadata: Vec<(String, String)>,
}
