//! Parsing and validation of request bodies into normalized events. A body is split into its
//! events first (each kept as its original JSON text), then each event is parsed and validated on
//! its own, so one malformed event rejects that event and never its batch.

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::DateTime;
use serde::Deserialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::event::{CostSource, Event, Status};
use crate::limits::*;
pub use crate::time::{fast_datetime_text_seconds, fast_rfc3339_ms};

/// Why a whole body was refused (answered 400 or 413).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    #[error("body is not valid JSON of the expected shape: {0}")]
    Malformed(String),
    #[error("a request may carry at most {max} events, this one has {count}")]
    TooManyEvents { count: usize, max: usize },
}

/// Why one event was rejected, as a stable machine-readable code (the `reason` of the response's
/// `rejected` entries, of the dead letter and of the `tally_ingest_events_rejected_total` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectionCode {
    InvalidEvent,
    MissingField,
    InvalidTimestamp,
    TimestampTooOld,
    TimestampInFuture,
    InvalidTokens,
    InvalidCost,
    InvalidLatency,
    InvalidSize,
    InvalidStatus,
    InvalidEventId,
    InvalidMetadata,
    FieldTooLong,
}

impl RejectionCode {
    pub const ALL: [RejectionCode; 13] = [
        RejectionCode::InvalidEvent,
        RejectionCode::MissingField,
        RejectionCode::InvalidTimestamp,
        RejectionCode::TimestampTooOld,
        RejectionCode::TimestampInFuture,
        RejectionCode::InvalidTokens,
        RejectionCode::InvalidCost,
        RejectionCode::InvalidLatency,
        RejectionCode::InvalidSize,
        RejectionCode::InvalidStatus,
        RejectionCode::InvalidEventId,
        RejectionCode::InvalidMetadata,
        RejectionCode::FieldTooLong,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectionCode::InvalidEvent => "invalid_event",
            RejectionCode::MissingField => "missing_field",
            RejectionCode::InvalidTimestamp => "invalid_timestamp",
            RejectionCode::TimestampTooOld => "timestamp_too_old",
            RejectionCode::TimestampInFuture => "timestamp_in_future",
            RejectionCode::InvalidTokens => "invalid_tokens",
            RejectionCode::InvalidCost => "invalid_cost",
            RejectionCode::InvalidLatency => "invalid_latency",
            RejectionCode::InvalidSize => "invalid_size",
            RejectionCode::InvalidStatus => "invalid_status",
            RejectionCode::InvalidEventId => "invalid_event_id",
            RejectionCode::InvalidMetadata => "invalid_metadata",
            RejectionCode::FieldTooLong => "field_too_long",
        }
    }
}

impl std::fmt::Display for RejectionCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why one event was rejected: the code, and a `detail` for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: RejectionCode,
    pub detail: String,
}

impl Rejection {
    fn new(code: RejectionCode, detail: impl Into<String>) -> Self {
        Rejection { code, detail: detail.into() }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.detail)
    }
}

/// What the server knows about the request an event arrived in.
#[derive(Debug, Clone, Copy)]
pub struct RequestContext<'a> {
    pub org_id: &'a str,
    pub received_at_ms: i64,
    /// The `Idempotency-Key` header, if any: event ids are derived from it and the event's index.
    pub idempotency_key: Option<&'a str>,
}

/// The accepted body shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `POST /v1/ingest`: the published SDK's `{"events":[...]}` (seed 000).
    Sdk,
    /// `POST /analytics/events`: one seed-004 event document, or an array of them.
    Analytics,
}

/// Splits a body into the original JSON text of each event.
pub fn split_events(dialect: Dialect, body: &[u8]) -> Result<Vec<&RawValue>, BodyError> {
    #[derive(Deserialize)]
    struct SdkBatch<'a> {
        #[serde(borrow)]
        events: Vec<&'a RawValue>,
    }
    let events = match dialect {
        Dialect::Sdk => {
            serde_json::from_slice::<SdkBatch>(body).map_err(|e| BodyError::Malformed(e.to_string()))?.events
        }
        Dialect::Analytics => {
            let first = body.iter().find(|b| !b.is_ascii_whitespace());
            if first == Some(&b'[') {
                serde_json::from_slice::<Vec<&RawValue>>(body)
                    .map_err(|e| BodyError::Malformed(e.to_string()))?
            } else {
                vec![serde_json::from_slice::<&RawValue>(body)
                    .map_err(|e| BodyError::Malformed(e.to_string()))?]
            }
        }
    };
    if events.len() > MAX_EVENTS_PER_REQUEST {
        return Err(BodyError::TooManyEvents { count: events.len(), max: MAX_EVENTS_PER_REQUEST });
    }
    Ok(events)
}

/// A parsed request body: each event's outcome, and the original JSON of any event on demand.
pub struct Batch<'a> {
    dialect: Dialect,
    body: &'a [u8],
    pub outcomes: Vec<Result<Event, Rejection>>,
    raw: std::sync::OnceLock<Vec<&'a RawValue>>,
}

impl<'a> Batch<'a> {
    /// The original JSON text of the event at `index` (split from the body on first use).
    pub fn original(&self, index: usize) -> &'a str {
        let raw = self.raw.get_or_init(|| split_events(self.dialect, self.body).unwrap_or_default());
        raw.get(index).map_or("", |r| r.get())
    }
}

/// Parses and validates every event of a body. The common case, a batch whose events are all
/// well-formed JSON of the right types, is read in one typed pass; when any event is malformed the
/// body is split into its events and each is parsed on its own, so that event alone is rejected.
pub fn parse_batch<'a>(
    dialect: Dialect,
    body: &'a [u8],
    ctx: &RequestContext,
) -> Result<Batch<'a>, BodyError> {
    #[derive(Deserialize)]
    struct TypedSdkBatch<'a> {
        #[serde(borrow)]
        events: Vec<SdkEvent<'a>>,
    }
    // Validating UTF-8 once for the whole body (an ASCII fast path) lets serde skip it per string.
    let text = std::str::from_utf8(body).ok();
    if let (Dialect::Sdk, Some(text)) = (dialect, text) {
        if let Ok(typed) = serde_json::from_str::<TypedSdkBatch>(text) {
            if typed.events.len() > MAX_EVENTS_PER_REQUEST {
                return Err(BodyError::TooManyEvents {
                    count: typed.events.len(),
                    max: MAX_EVENTS_PER_REQUEST,
                });
            }
            let outcomes = typed
                .events
                .into_iter()
                .enumerate()
                .map(|(index, event)| {
                    sdk_event_fields(event).and_then(|fields| fields.into_event(index, ctx))
                })
                .collect();
            return Ok(Batch { dialect, body, outcomes, raw: std::sync::OnceLock::new() });
        }
    }
    let raw = split_events(dialect, body)?;
    let outcomes =
        raw.iter().enumerate().map(|(index, event)| parse_event(dialect, event, index, ctx)).collect();
    Ok(Batch { dialect, body, outcomes, raw: std::sync::OnceLock::from(raw) })
}

/// Parses and validates the event at `index` of its request.
pub fn parse_event(
    dialect: Dialect,
    raw: &RawValue,
    index: usize,
    ctx: &RequestContext,
) -> Result<Event, Rejection> {
    let fields = match dialect {
        Dialect::Sdk => sdk_fields(raw)?,
        Dialect::Analytics => analytics_fields(raw)?,
    };
    fields.into_event(index, ctx)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SdkTokens {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    total_tokens: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SdkEvent<'a> {
    #[serde(borrow)]
    timestamp: Cow<'a, str>,
    #[serde(borrow)]
    provider: Cow<'a, str>,
    #[serde(borrow)]
    model: Cow<'a, str>,
    tokens: SdkTokens,
    cost: Option<f64>,
    #[serde(default)]
    latency: f64,
    #[serde(borrow)]
    status: Cow<'a, str>,
    #[serde(borrow, default)]
    error: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    event_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    execution_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    agent_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    service: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    action: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    request_id: Option<Cow<'a, str>>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct AnalyticsTokens {
    #[serde(default, rename = "in")]
    input: u64,
    #[serde(default, rename = "out")]
    output: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnalyticsSize {
    #[serde(default)]
    input_bytes: u64,
    #[serde(default)]
    output_bytes: u64,
}

#[derive(Deserialize)]
struct AnalyticsCost {
    usd: Option<f64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnalyticsEvent<'a> {
    #[serde(borrow)]
    ts: Cow<'a, str>,
    #[serde(borrow, default)]
    user_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    service: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    action: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    request_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    provider: Cow<'a, str>,
    #[serde(borrow)]
    model: Cow<'a, str>,
    #[serde(default)]
    latency_ms: f64,
    status: u16,
    tokens: Option<AnalyticsTokens>,
    size: Option<AnalyticsSize>,
    cost: Option<AnalyticsCost>,
    #[serde(borrow, default)]
    event_id: Option<Cow<'a, str>>,
    #[serde(default)]
    meta: Option<BTreeMap<String, serde_json::Value>>,
}

/// The fields both dialects map onto, before validation.
struct Fields<'a> {
    timestamp: Cow<'a, str>,
    provider: Cow<'a, str>,
    model: Cow<'a, str>,
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: Option<u64>,
    cost_usd: Option<f64>,
    latency_ms: f64,
    status: Status,
    http_status: u16,
    error: Option<Cow<'a, str>>,
    event_id: Option<Cow<'a, str>>,
    execution_id: Option<Cow<'a, str>>,
    agent_id: Option<Cow<'a, str>>,
    user_id: Option<Cow<'a, str>>,
    service: Option<Cow<'a, str>>,
    action: Option<Cow<'a, str>>,
    request_id: Option<Cow<'a, str>>,
    input_bytes: u64,
    output_bytes: u64,
    metadata: BTreeMap<String, String>,
}

fn invalid(e: serde_json::Error) -> Rejection {
    Rejection::new(RejectionCode::InvalidEvent, e.to_string())
}

fn sdk_fields(raw: &RawValue) -> Result<Fields<'_>, Rejection> {
    sdk_event_fields(serde_json::from_str(raw.get()).map_err(invalid)?)
}

fn sdk_event_fields(e: SdkEvent<'_>) -> Result<Fields<'_>, Rejection> {
    let status = match e.status.as_ref() {
        "success" => Status::Success,
        "error" => Status::Error,
        other => {
            return Err(Rejection::new(
                RejectionCode::InvalidStatus,
                format!("status must be \"success\" or \"error\", got {other:?}"),
            ))
        }
    };
    Ok(Fields {
        timestamp: e.timestamp,
        provider: e.provider,
        model: e.model,
        prompt_tokens: e.tokens.prompt_tokens,
        completion_tokens: e.tokens.completion_tokens,
        total_tokens: e.tokens.total_tokens,
        cost_usd: e.cost,
        latency_ms: e.latency,
        status,
        http_status: 0,
        error: e.error,
        event_id: e.event_id,
        execution_id: e.execution_id,
        agent_id: e.agent_id,
        user_id: e.user_id,
        service: e.service,
        action: e.action,
        request_id: e.request_id,
        input_bytes: 0,
        output_bytes: 0,
        metadata: e.metadata.unwrap_or_default(),
    })
}

fn analytics_fields(raw: &RawValue) -> Result<Fields<'_>, Rejection> {
    let e: AnalyticsEvent = serde_json::from_str(raw.get()).map_err(invalid)?;
    if !(100..=599).contains(&e.status) {
        return Err(Rejection::new(
            RejectionCode::InvalidStatus,
            format!("status must be an HTTP status code, got {}", e.status),
        ));
    }
    let tokens = e.tokens.unwrap_or(AnalyticsTokens { input: 0, output: 0 });
    let size = e.size.unwrap_or(AnalyticsSize { input_bytes: 0, output_bytes: 0 });
    // `meta` may nest; string values are kept as they are, anything else as its JSON text.
    let metadata = e
        .meta
        .unwrap_or_default()
        .into_iter()
        .map(|(key, value)| match value {
            serde_json::Value::String(text) => (key, text),
            other => (key, other.to_string()),
        })
        .collect();
    Ok(Fields {
        timestamp: e.ts,
        provider: e.provider,
        model: e.model,
        prompt_tokens: tokens.input,
        completion_tokens: tokens.output,
        total_tokens: None,
        cost_usd: e.cost.and_then(|c| c.usd),
        latency_ms: e.latency_ms,
        status: if e.status >= 400 { Status::Error } else { Status::Success },
        http_status: e.status,
        error: None,
        event_id: e.event_id,
        execution_id: None,
        agent_id: None,
        user_id: e.user_id,
        service: e.service,
        action: e.action,
        request_id: e.request_id,
        input_bytes: size.input_bytes,
        output_bytes: size.output_bytes,
        metadata,
    })
}

/// Namespace of the UUIDv5 event ids derived from an `Idempotency-Key`.
const IDEMPOTENCY_NAMESPACE: Uuid = Uuid::from_u128(0x7a11_e5d0_4f1c_4b7e_9c3a_1d2e_3f40_5a6b);

/// The event id of the event at `index` of a request sent with `Idempotency-Key: key` by `org_id`:
/// stable across retries of that request.
pub fn derived_event_id(org_id: &str, key: &str, index: usize) -> Uuid {
    let name = format!("{org_id}\n{key}\n{index}");
    Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, name.as_bytes())
}

/// A UUIDv7 for `epoch_ms` with 74 random bits from the thread-local generator: no system call
/// and no shared lock per event (uuid's `now_v7` takes a global mutex and reads the OS RNG).
pub fn new_v7(epoch_ms: i64) -> Uuid {
    let random: [u8; 10] = rand::random();
    uuid::Builder::from_unix_timestamp_millis(u64::try_from(epoch_ms).unwrap_or(0), &random).into_uuid()
}

fn bounded(name: &'static str, value: Option<Cow<'_, str>>, max: usize) -> Result<String, Rejection> {
    let text = value.map(Cow::into_owned).unwrap_or_default();
    if text.len() > max {
        return Err(Rejection::new(
            RejectionCode::FieldTooLong,
            format!("{name} is {} bytes, at most {max}", text.len()),
        ));
    }
    Ok(text)
}

fn required_name(name: &'static str, value: Cow<'_, str>) -> Result<String, Rejection> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(Rejection::new(RejectionCode::MissingField, format!("{name} must not be empty")));
    }
    bounded(name, Some(Cow::Borrowed(trimmed)), MAX_NAME_LEN)
}

fn count(name: &'static str, value: u64) -> Result<u32, Rejection> {
    if value > MAX_TOKENS {
        return Err(Rejection::new(
            RejectionCode::InvalidTokens,
            format!("{name} is {value}, at most {MAX_TOKENS}"),
        ));
    }
    Ok(value as u32)
}

/// Converts a USD amount to nano-dollars. Amounts are bounded below 2^53 nano-dollars, where an f64
/// holds every integer exactly, so rounding to the nearest nano-dollar is exact for any decimal
/// the client wrote with nine or fewer fractional digits.
pub fn usd_to_nanos(usd: f64) -> Option<i64> {
    if !usd.is_finite() || usd < 0.0 {
        return None;
    }
    let nanos = (usd * NANOS_PER_USD as f64).round();
    if nanos > MAX_COST_NANOS as f64 {
        return None;
    }
    Some(nanos as i64)
}

/// Truncates to at most `max` bytes at a character boundary.
pub fn truncate_utf8(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn timestamp_ms(text: &str) -> Result<i64, Rejection> {
    if let Some(ms) = fast_rfc3339_ms(text) {
        return Ok(ms);
    }
    DateTime::parse_from_rfc3339(text).map(|t| t.timestamp_millis()).map_err(|e| {
        Rejection::new(RejectionCode::InvalidTimestamp, format!("timestamp {text:?} is not RFC 3339: {e}"))
    })
}

impl Fields<'_> {
    fn into_event(self, index: usize, ctx: &RequestContext) -> Result<Event, Rejection> {
        let timestamp_ms = timestamp_ms(&self.timestamp)?;
        if timestamp_ms < ctx.received_at_ms - MAX_EVENT_AGE_MS {
            return Err(Rejection::new(
                RejectionCode::TimestampTooOld,
                format!("timestamp is more than {} days in the past", MAX_EVENT_AGE_MS / 86_400_000),
            ));
        }
        if timestamp_ms > ctx.received_at_ms + MAX_EVENT_FUTURE_MS {
            return Err(Rejection::new(
                RejectionCode::TimestampInFuture,
                format!("timestamp is more than {} minutes in the future", MAX_EVENT_FUTURE_MS / 60_000),
            ));
        }
        let prompt_tokens = count("promptTokens", self.prompt_tokens)?;
        let completion_tokens = count("completionTokens", self.completion_tokens)?;
        let sum = u64::from(prompt_tokens) + u64::from(completion_tokens);
        let total_tokens = count("totalTokens", self.total_tokens.unwrap_or(sum))?;
        if u64::from(total_tokens) < sum {
            return Err(Rejection::new(
                RejectionCode::InvalidTokens,
                format!("totalTokens {total_tokens} is less than promptTokens + completionTokens ({sum})"),
            ));
        }
        let (cost_nanos, cost_source) = match self.cost_usd {
            Some(usd) => match usd_to_nanos(usd) {
                Some(nanos) => (nanos, CostSource::Client),
                None => {
                    return Err(Rejection::new(
                        RejectionCode::InvalidCost,
                        format!(
                            "cost must be between 0 and {} USD, got {usd}",
                            MAX_COST_NANOS / NANOS_PER_USD
                        ),
                    ))
                }
            },
            None => (0, CostSource::Unknown),
        };
        if !self.latency_ms.is_finite() || self.latency_ms < 0.0 || self.latency_ms > MAX_LATENCY_MS as f64 {
            return Err(Rejection::new(
                RejectionCode::InvalidLatency,
                format!("latency must be between 0 and {MAX_LATENCY_MS} ms, got {}", self.latency_ms),
            ));
        }
        for (name, value) in [("inputBytes", self.input_bytes), ("outputBytes", self.output_bytes)] {
            if value > MAX_PAYLOAD_BYTES {
                return Err(Rejection::new(
                    RejectionCode::InvalidSize,
                    format!("{name} is {value}, at most {MAX_PAYLOAD_BYTES}"),
                ));
            }
        }
        let event_id = match (&self.event_id, ctx.idempotency_key) {
            (Some(text), _) => Uuid::parse_str(text).map_err(|_| {
                Rejection::new(RejectionCode::InvalidEventId, format!("eventId {text:?} is not a UUID"))
            })?,
            (None, Some(key)) => derived_event_id(ctx.org_id, key, index),
            (None, None) => new_v7(ctx.received_at_ms),
        };
        if self.metadata.len() > MAX_METADATA_ENTRIES {
            return Err(Rejection::new(
                RejectionCode::InvalidMetadata,
                format!("metadata has {} entries, at most {MAX_METADATA_ENTRIES}", self.metadata.len()),
            ));
        }
        for (key, value) in &self.metadata {
            if key.is_empty() || key.len() > MAX_METADATA_KEY_LEN || value.len() > MAX_METADATA_VALUE_LEN {
                return Err(Rejection::new(
                    RejectionCode::InvalidMetadata,
                    format!(
                        "metadata keys must be 1..={MAX_METADATA_KEY_LEN} bytes and values at most {MAX_METADATA_VALUE_LEN} bytes (key {:?})",
                        truncate_utf8(key, MAX_METADATA_KEY_LEN)
                    ),
                ));
            }
        }
        let error = truncate_utf8(self.error.as_deref().unwrap_or(""), MAX_ERROR_LEN).to_owned();
        Ok(Event {
            event_id,
            org_id: ctx.org_id.to_owned(),
            received_at_ms: ctx.received_at_ms,
            timestamp_ms,
            provider: required_name("provider", self.provider)?,
            model: required_name("model", self.model)?,
            prompt_tokens,
            completion_tokens,
            total_tokens,
            cost_nanos,
            cost_source,
            latency_ms: self.latency_ms.round() as u32,
            status: self.status,
            http_status: self.http_status,
            error,
            execution_id: bounded("executionId", self.execution_id, MAX_ID_LEN)?,
            agent_id: bounded("agentId", self.agent_id, MAX_ID_LEN)?,
            user_id: bounded("userId", self.user_id, MAX_ID_LEN)?,
            service: bounded("service", self.service, MAX_ID_LEN)?,
            action: bounded("action", self.action, MAX_ID_LEN)?,
            request_id: bounded("requestId", self.request_id, MAX_ID_LEN)?,
            input_bytes: self.input_bytes,
            output_bytes: self.output_bytes,
            metadata: self.metadata.into_iter().collect(),
        })
    }
}

#[cfg(test)]
mod rejection_code_tests {
    use super::RejectionCode;

    #[test]
    fn codes_are_distinct_snake_case_words() {
        let mut seen = std::collections::BTreeSet::new();
        for code in RejectionCode::ALL {
            let text = code.as_str();
            assert!(text.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{text}");
            assert!(seen.insert(text), "{text} used twice");
            assert_eq!(code.to_string(), text);
        }
    }
}
