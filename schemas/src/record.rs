//! The Kafka record formats. A record of `tally.events.v1` holds one or more events as JSONEachRow
//! lines whose keys are the columns of `tally.events`, so ClickHouse's own Kafka table engine can
//! read it (`kafka_format = 'JSONEachRow'`). A record of `tally.events.dlq.v1` is one JSON object.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::event::{CostSource, Event, Status};

pub const EVENTS_TOPIC: &str = "tally.events.v1";
pub const DLQ_TOPIC: &str = "tally.events.dlq.v1";

/// Version of the record format, sent in the `HEADER_SCHEMA_VERSION` header.
pub const SCHEMA_VERSION: &str = "1";
pub const HEADER_SCHEMA_VERSION: &str = "tally-schema-version";
pub const HEADER_REQUEST_ID: &str = "tally-request-id";

/// One JSONEachRow line, borrowed from an [`Event`]; field names are `tally.events` column names.
#[derive(Serialize, Deserialize)]
struct Row<'a> {
    org_id: &'a str,
    event_id: Uuid,
    /// `YYYY-MM-DD hh:mm:ss` in UTC: the text form every ClickHouse version parses into DateTime('UTC').
    timestamp: &'a str,
    timestamp_ms: u16,
    received_at: &'a str,
    provider: &'a str,
    model: &'a str,
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
    cost_nanos: i64,
    cost_source: CostSource,
    latency_ms: u32,
    status: Status,
    http_status: u16,
    error: &'a str,
    execution_id: &'a str,
    agent_id: &'a str,
    user_id: &'a str,
    service: &'a str,
    action: &'a str,
    request_id: &'a str,
    input_bytes: u64,
    output_bytes: u64,
    metadata_keys: Vec<&'a str>,
    metadata_values: Vec<&'a str>,
}

/// Owned version used when decoding, since JSON strings with escapes cannot be borrowed.
#[derive(Deserialize)]
struct OwnedRow {
    org_id: String,
    event_id: Uuid,
    timestamp: String,
    timestamp_ms: u16,
    received_at: String,
    provider: String,
    model: String,
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
    cost_nanos: i64,
    cost_source: CostSource,
    latency_ms: u32,
    status: Status,
    http_status: u16,
    error: String,
    execution_id: String,
    agent_id: String,
    user_id: String,
    service: String,
    action: String,
    request_id: String,
    input_bytes: u64,
    output_bytes: u64,
    metadata_keys: Vec<String>,
    metadata_values: Vec<String>,
}

/// Formats epoch milliseconds as ClickHouse DateTime text (seconds) in UTC.
pub fn datetime_text(epoch_ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(epoch_ms)
        .unwrap_or_default()
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

fn parse_datetime_text(text: &str, millis: u16) -> Result<i64, RecordError> {
    let parsed = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S")
        .map_err(|e| RecordError::Invalid(format!("datetime {text:?}: {e}")))?;
    Ok(parsed.and_utc().timestamp_millis() + i64::from(millis))
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("line {line}: {source}")]
    Json { line: usize, source: serde_json::Error },
    #[error("invalid value: {0}")]
    Invalid(String),
}

/// Appends one event as a JSONEachRow line (with its trailing newline) to `out`.
pub fn encode_event(event: &Event, out: &mut Vec<u8>) {
    let timestamp = datetime_text(event.timestamp_ms);
    let received_at = datetime_text(event.received_at_ms);
    let row = Row {
        org_id: &event.org_id,
        event_id: event.event_id,
        timestamp: &timestamp,
        timestamp_ms: event.timestamp_ms.rem_euclid(1000) as u16,
        received_at: &received_at,
        provider: &event.provider,
        model: &event.model,
        prompt_tokens: event.prompt_tokens,
        completion_tokens: event.completion_tokens,
        total_tokens: event.total_tokens,
        cost_nanos: event.cost_nanos,
        cost_source: event.cost_source,
        latency_ms: event.latency_ms,
        status: event.status,
        http_status: event.http_status,
        error: &event.error,
        execution_id: &event.execution_id,
        agent_id: &event.agent_id,
        user_id: &event.user_id,
        service: &event.service,
        action: &event.action,
        request_id: &event.request_id,
        input_bytes: event.input_bytes,
        output_bytes: event.output_bytes,
        metadata_keys: event.metadata.iter().map(|(k, _)| k.as_str()).collect(),
        metadata_values: event.metadata.iter().map(|(_, v)| v.as_str()).collect(),
    };
    // Serializing plain strings and integers into a Vec cannot fail.
    serde_json::to_writer(&mut *out, &row).expect("event rows always serialize");
    out.push(b'\n');
}

/// Decodes every JSONEachRow line of a record payload. Fails on the first bad line: a record is
/// produced whole by one ingest call, so a bad line means the record is not Tally's.
pub fn decode_events(payload: &[u8]) -> Result<Vec<Event>, RecordError> {
    let mut events = Vec::new();
    for (line_number, line) in payload.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let row: OwnedRow = serde_json::from_slice(line)
            .map_err(|source| RecordError::Json { line: line_number + 1, source })?;
        if row.metadata_keys.len() != row.metadata_values.len() {
            return Err(RecordError::Invalid("metadata_keys and metadata_values differ in length".into()));
        }
        if row.timestamp_ms >= 1000 {
            return Err(RecordError::Invalid(format!("timestamp_ms {} is not below 1000", row.timestamp_ms)));
        }
        events.push(Event {
            timestamp_ms: parse_datetime_text(&row.timestamp, row.timestamp_ms)?,
            received_at_ms: parse_datetime_text(&row.received_at, 0)?,
            org_id: row.org_id,
            event_id: row.event_id,
            provider: row.provider,
            model: row.model,
            prompt_tokens: row.prompt_tokens,
            completion_tokens: row.completion_tokens,
            total_tokens: row.total_tokens,
            cost_nanos: row.cost_nanos,
            cost_source: row.cost_source,
            latency_ms: row.latency_ms,
            status: row.status,
            http_status: row.http_status,
            error: row.error,
            execution_id: row.execution_id,
            agent_id: row.agent_id,
            user_id: row.user_id,
            service: row.service,
            action: row.action,
            request_id: row.request_id,
            input_bytes: row.input_bytes,
            output_bytes: row.output_bytes,
            metadata: row.metadata_keys.into_iter().zip(row.metadata_values).collect(),
        });
    }
    Ok(events)
}

/// Which stage refused the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Ingest,
    Consume,
}

/// Where a consumed record came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePosition {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// A record of `tally.events.dlq.v1`: what could not be accepted or stored, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub stage: Stage,
    /// Machine-readable reason code (e.g. `invalid_timestamp`, `undecodable_record`).
    pub reason: String,
    /// Human-readable detail.
    pub detail: String,
    pub org_id: String,
    pub request_id: String,
    /// Index of the event in its request (ingest stage).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub index: Option<usize>,
    pub received_at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source: Option<SourcePosition>,
    /// The original bytes, as text when they are UTF-8 ...
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub original: Option<String>,
    /// ... else as hex.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub original_hex: Option<String>,
}

impl DeadLetter {
    /// Keeps `bytes` as text when they are UTF-8, else as hex.
    pub fn with_original(mut self, bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(text) => self.original = Some(text.to_owned()),
            Err(_) => self.original_hex = Some(hex::encode(bytes)),
        }
        self
    }

    pub fn original_bytes(&self) -> Option<Vec<u8>> {
        match (&self.original, &self.original_hex) {
            (Some(text), _) => Some(text.as_bytes().to_vec()),
            (None, Some(hex_text)) => hex::decode(hex_text).ok(),
            (None, None) => None,
        }
    }
}
