//! Parsing and validation of request bodies into normalized events. A body is split into its
//! events first (each kept as its original JSON text), then each event is parsed and validated on
//! its own, so one malformed event rejects that event and never its batch.

//!
//! `dialects` maps each wire format onto the same fields; `validate` checks them and builds the
//! event.

mod dialects;
mod fast;
mod validate;

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::event::Event;
use crate::limits::*;
use crate::pricing::PriceBook;
use crate::record::RecordFormat;
pub use crate::time::{fast_datetime_text_seconds, fast_rfc3339_ms};
use dialects::{analytics_fields, sdk_event_fields, sdk_fields, SdkEvent};
pub use validate::{derived_event_id, new_v7, truncate_utf8, usd_to_nanos};

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
    pub outcomes: Vec<Result<Event<Cow<'a, str>>, Rejection>>,
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
    ctx: &RequestContext<'a>,
) -> Result<Batch<'a>, BodyError> {
    #[derive(Deserialize)]
    struct TypedSdkBatch<'a> {
        #[serde(borrow)]
        events: Vec<SdkEvent<'a>>,
    }
    // Validating UTF-8 once for the whole body (an ASCII fast path) lets serde skip it per string.
    let text = std::str::from_utf8(body).ok();
    if let (Dialect::Sdk, Some(text)) = (dialect, text) {
        // The hand-written reader first (the common shape), serde's derive for everything else.
        let typed = fast::sdk_batch(text)
            .or_else(|| serde_json::from_str::<TypedSdkBatch>(text).ok().map(|batch| batch.events));
        if let Some(events) = typed {
            if events.len() > MAX_EVENTS_PER_REQUEST {
                return Err(BodyError::TooManyEvents { count: events.len(), max: MAX_EVENTS_PER_REQUEST });
            }
            let outcomes = events
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

/// The common request in one pass: an SDK batch in the shape the hand-written reader takes whose
/// events are all valid, each validated, priced and appended to `out` as its Kafka row (what
/// `parse_batch`, `PriceBook::price` and `RecordFormat::encode` make of it, byte for byte) as it is read,
/// with no list of events in between. Returns how many rows it appended; `None`, with `out` as it
/// was, for any other body (a shape it does not read, an invalid event, too many events), which
/// `parse_batch` then answers event by event.
pub fn sdk_rows(
    body: &[u8],
    ctx: &RequestContext<'_>,
    prices: &PriceBook,
    format: RecordFormat,
    out: &mut Vec<u8>,
) -> Option<usize> {
    let text = std::str::from_utf8(body).ok()?;
    let start = out.len();
    let mut rows = 0;
    let read = fast::sdk_each(text, |event| {
        if rows == MAX_EVENTS_PER_REQUEST {
            return None;
        }
        let mut event = sdk_event_fields(event).ok()?.into_event(rows, ctx).ok()?;
        prices.price(&mut event);
        format.encode(&event, out);
        rows += 1;
        Some(())
    });
    if read.is_none() {
        out.truncate(start);
        return None;
    }
    Some(rows)
}

/// Parses and validates the event at `index` of its request (its strings borrowed from `raw` where
/// they had no escapes; `into_owned` copies them).
pub fn parse_event<'a>(
    dialect: Dialect,
    raw: &'a RawValue,
    index: usize,
    ctx: &RequestContext<'a>,
) -> Result<Event<Cow<'a, str>>, Rejection> {
    let fields = match dialect {
        Dialect::Sdk => sdk_fields(raw)?,
        Dialect::Analytics => analytics_fields(raw)?,
    };
    fields.into_event(index, ctx)
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
