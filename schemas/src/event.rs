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

/// One usage event after parsing, validation and pricing. Its text fields are `String`s wherever
/// an event is kept; the ingest's parser makes them `Cow<str>` borrowed from the request body and
/// the key's org id, so a request's events are validated, priced and encoded without copying their
/// strings (`into_owned` gives the owned event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<S = String> {
    pub event_id: Uuid,
    /// From the API key that sent it, never from the body.
    pub org_id: S,
    pub received_at_ms: i64,
    pub timestamp_ms: i64,
    pub provider: S,
    pub model: S,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub cost_nanos: i64,
    pub cost_source: CostSource,
    pub latency_ms: u32,
    pub status: Status,
    /// HTTP status of the LLM call when the SDK reported one (seed 004), else 0.
    pub http_status: u16,
    pub error: S,
    pub execution_id: S,
    pub agent_id: S,
    pub user_id: S,
    pub service: S,
    pub action: S,
    pub request_id: S,
    pub input_bytes: u64,
    pub output_bytes: u64,
    /// Sorted by key, keys unique.
    pub metadata: Vec<(String, String)>,
}

impl Event<std::borrow::Cow<'_, str>> {
    /// The event with its strings copied out of the request.
    pub fn into_owned(self) -> Event {
        self.borrowed().to_event()
    }
}

/// One event as read from a record, its strings borrowed (from the record, or from an [`Event`]).
#[derive(Debug, Clone)]
pub struct EventRef<'a> {
    pub event_id: Uuid,
    pub org_id: &'a str,
    pub received_at_ms: i64,
    pub timestamp_ms: i64,
    pub provider: &'a str,
    pub model: &'a str,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub cost_nanos: i64,
    pub cost_source: CostSource,
    pub latency_ms: u32,
    pub status: Status,
    pub http_status: u16,
    pub error: &'a str,
    pub execution_id: &'a str,
    pub agent_id: &'a str,
    pub user_id: &'a str,
    pub service: &'a str,
    pub action: &'a str,
    pub request_id: &'a str,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub metadata: Metadata<'a>,
}

/// An event's metadata pairs as read.
#[derive(Debug, Clone, Copy)]
pub enum Metadata<'a> {
    /// The `metadata_keys` and `metadata_values` arrays of a line as written (brackets included;
    /// strings without escapes, so no item holds a `"`), each of `len` items.
    Json {
        keys: &'a str,
        values: &'a str,
        len: usize,
    },
    Pairs(&'a [(String, String)]),
}

impl<'a> Metadata<'a> {
    pub fn len(&self) -> usize {
        match self {
            Metadata::Json { len, .. } => *len,
            Metadata::Pairs(pairs) => pairs.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn keys(&self) -> Items<'a> {
        self.side(true)
    }

    pub fn values(&self) -> Items<'a> {
        self.side(false)
    }

    fn side(&self, keys: bool) -> Items<'a> {
        match *self {
            Metadata::Json { keys: k, values: v, len } => {
                let array = if keys { k } else { v };
                // `["a","b"]`: from just after `["`, each item ends at the next `"`.
                Items::Json { rest: if len > 0 { &array[2..] } else { "" } }
            }
            Metadata::Pairs(pairs) => Items::Pairs { pairs: pairs.iter(), keys },
        }
    }
}

/// The keys or the values of [`Metadata`], in order.
pub enum Items<'a> {
    Json { rest: &'a str },
    Pairs { pairs: std::slice::Iter<'a, (String, String)>, keys: bool },
}

impl<'a> Iterator for Items<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        match self {
            Items::Json { rest } => {
                let end = memchr::memchr(b'"', rest.as_bytes())?;
                let item = &rest[..end];
                // Past the closing `"` and the `,"` before the next item (or the `]` at the end).
                *rest = rest.get(end + 3..).unwrap_or_default();
                Some(item)
            }
            Items::Pairs { pairs, keys } => {
                pairs.next().map(|(k, v)| if *keys { k.as_str() } else { v.as_str() })
            }
        }
    }
}

impl EventRef<'_> {
    pub fn to_event(&self) -> Event {
        Event {
            event_id: self.event_id,
            org_id: self.org_id.to_owned(),
            received_at_ms: self.received_at_ms,
            timestamp_ms: self.timestamp_ms,
            provider: self.provider.to_owned(),
            model: self.model.to_owned(),
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.total_tokens,
            cost_nanos: self.cost_nanos,
            cost_source: self.cost_source,
            latency_ms: self.latency_ms,
            status: self.status,
            http_status: self.http_status,
            error: self.error.to_owned(),
            execution_id: self.execution_id.to_owned(),
            agent_id: self.agent_id.to_owned(),
            user_id: self.user_id.to_owned(),
            service: self.service.to_owned(),
            action: self.action.to_owned(),
            request_id: self.request_id.to_owned(),
            input_bytes: self.input_bytes,
            output_bytes: self.output_bytes,
            metadata: self
                .metadata
                .keys()
                .map(str::to_owned)
                .zip(self.metadata.values().map(str::to_owned))
                .collect(),
        }
    }
}

impl<S: AsRef<str>> Event<S> {
    pub fn borrowed(&self) -> EventRef<'_> {
        EventRef {
            event_id: self.event_id,
            org_id: self.org_id.as_ref(),
            received_at_ms: self.received_at_ms,
            timestamp_ms: self.timestamp_ms,
            provider: self.provider.as_ref(),
            model: self.model.as_ref(),
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.total_tokens,
            cost_nanos: self.cost_nanos,
            cost_source: self.cost_source,
            latency_ms: self.latency_ms,
            status: self.status,
            http_status: self.http_status,
            error: self.error.as_ref(),
            execution_id: self.execution_id.as_ref(),
            agent_id: self.agent_id.as_ref(),
            user_id: self.user_id.as_ref(),
            service: self.service.as_ref(),
            action: self.action.as_ref(),
            request_id: self.request_id.as_ref(),
            input_bytes: self.input_bytes,
            output_bytes: self.output_bytes,
            metadata: Metadata::Pairs(&self.metadata),
        }
    }
}
