//! The Kafka record formats. A record of `tally.events.v1` holds one or more events as JSONEachRow
//! lines whose keys are the columns of `tally.events`, so ClickHouse's own Kafka table engine can
//! read it (`kafka_format = 'JSONEachRow'`). A record of `tally.events.dlq.v1` is one JSON object.

use serde::{Deserialize, Serialize};

use uuid::Uuid;

use crate::event::{CostSource, Event, Status};
pub use crate::event::{EventRef, Items, Metadata};
pub use crate::time::{datetime_text, DateTimeText};

pub const EVENTS_TOPIC: &str = "tally.events.v1";
pub const DLQ_TOPIC: &str = "tally.events.dlq.v1";

/// Version of the record format, sent in the `HEADER_SCHEMA_VERSION` header.
pub const SCHEMA_VERSION: &str = "1";
pub const HEADER_SCHEMA_VERSION: &str = "tally-schema-version";
pub const HEADER_REQUEST_ID: &str = "tally-request-id";
/// How many events (JSONEachRow lines) an events record holds, in ASCII decimal. The consumer
/// bounds its batches by rows with it instead of scanning each payload for line ends between two
/// inserts; a record without it (an older ingest, another producer) is counted by its lines.
pub const HEADER_EVENTS: &str = "tally-events";
/// How an events record's events are written, by ClickHouse's name of the format: `RowBinary`
/// (`binary`), or JSONEachRow lines when the header is absent or says `JSONEachRow`.
pub const HEADER_FORMAT: &str = "tally-format";

/// The formats of an events record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecordFormat {
    #[default]
    JsonEachRow,
    RowBinary,
}

impl RecordFormat {
    /// The `HEADER_FORMAT` value naming it.
    pub fn name(self) -> &'static str {
        match self {
            RecordFormat::JsonEachRow => "JSONEachRow",
            RecordFormat::RowBinary => binary::FORMAT_NAME,
        }
    }

    /// Appends `event` to a record in this format.
    pub fn encode<S: AsRef<str>>(self, event: &Event<S>, out: &mut Vec<u8>) {
        match self {
            RecordFormat::JsonEachRow => encode_event(event, out),
            RecordFormat::RowBinary => binary::encode_row(&event.borrowed(), out),
        }
    }

    /// The bytes of the first `rows` events of a record `encode` wrote (all of it if it holds
    /// fewer).
    pub fn prefix_len(self, payload: &[u8], rows: usize) -> Result<usize, RecordError> {
        match self {
            RecordFormat::JsonEachRow => Ok(if rows == 0 {
                0
            } else {
                memchr::memchr_iter(b'\n', payload).nth(rows - 1).map_or(payload.len(), |end| end + 1)
            }),
            RecordFormat::RowBinary => binary::prefix_len(payload, rows),
        }
    }

    /// The format a record's `HEADER_FORMAT` value names (JSONEachRow without one); None for a
    /// value naming no format Tally reads.
    pub fn of_header(value: Option<&[u8]>) -> Option<RecordFormat> {
        match value {
            None => Some(RecordFormat::JsonEachRow),
            Some(name) => [RecordFormat::JsonEachRow, RecordFormat::RowBinary]
                .into_iter()
                .find(|format| format.name().as_bytes() == name),
        }
    }
}

/// The event count of a `HEADER_EVENTS` value: a positive decimal of at most 9 digits, else None.
pub fn event_count(value: &[u8]) -> Option<usize> {
    if value.is_empty() || value.len() > 9 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let count = value.iter().fold(0usize, |n, digit| n * 10 + usize::from(digit - b'0'));
    (count > 0).then_some(count)
}

/// A JSONEachRow line as decoded; field names are `tally.events` column names.
#[derive(Deserialize)]
struct OwnedRow<'a> {
    org_id: String,
    event_id: Uuid,
    #[serde(borrow)]
    timestamp: std::borrow::Cow<'a, str>,
    timestamp_ms: u16,
    #[serde(borrow)]
    received_at: std::borrow::Cow<'a, str>,
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

fn parse_datetime_text(text: &str, millis: u16) -> Result<i64, RecordError> {
    if let Some(seconds) = crate::time::fast_datetime_text_seconds(text) {
        return Ok(seconds * 1000 + i64::from(millis));
    }
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

/// Appends `text` as a JSON string. Most strings need no escaping and are copied whole (the check
/// runs eight bytes at a time).
fn json_str(out: &mut Vec<u8>, text: &str) {
    if crate::cursor::special_byte(text.as_bytes()).is_some() {
        // Writing a str into a Vec cannot fail.
        serde_json::to_writer(&mut *out, text).expect("strings always serialize");
    } else {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    }
}

fn json_int(out: &mut Vec<u8>, value: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

fn json_str_array<'a>(out: &mut Vec<u8>, items: impl Iterator<Item = &'a str>) {
    out.push(b'[');
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json_str(out, item);
    }
    out.push(b']');
}

/// Appends one event as a JSONEachRow line (with its trailing newline) to `out`. Written by hand,
/// not with serde: it runs once per event on the ingest's hot path and serde wrote every column
/// name through the string escaper. `tests/parse.rs` decodes what this writes with serde.
pub fn encode_event<S: AsRef<str>>(event: &Event<S>, out: &mut Vec<u8>) {
    let timestamp = DateTimeText::from_epoch_ms(event.timestamp_ms);
    let received_at = DateTimeText::from_epoch_ms(event.received_at_ms);
    let mut uuid = [0u8; uuid::fmt::Hyphenated::LENGTH];
    out.extend_from_slice(b"{\"org_id\":");
    json_str(out, event.org_id.as_ref());
    out.extend_from_slice(b",\"event_id\":\"");
    out.extend_from_slice(event.event_id.hyphenated().encode_lower(&mut uuid).as_bytes());
    out.extend_from_slice(b"\",\"timestamp\":\"");
    out.extend_from_slice(timestamp.as_str().as_bytes());
    out.extend_from_slice(b"\",\"timestamp_ms\":");
    json_int(out, event.timestamp_ms.rem_euclid(1000));
    out.extend_from_slice(b",\"received_at\":\"");
    out.extend_from_slice(received_at.as_str().as_bytes());
    out.extend_from_slice(b"\",\"provider\":");
    json_str(out, event.provider.as_ref());
    out.extend_from_slice(b",\"model\":");
    json_str(out, event.model.as_ref());
    out.extend_from_slice(b",\"prompt_tokens\":");
    json_int(out, event.prompt_tokens);
    out.extend_from_slice(b",\"completion_tokens\":");
    json_int(out, event.completion_tokens);
    out.extend_from_slice(b",\"total_tokens\":");
    json_int(out, event.total_tokens);
    out.extend_from_slice(b",\"cost_nanos\":");
    json_int(out, event.cost_nanos);
    out.extend_from_slice(b",\"cost_source\":\"");
    out.extend_from_slice(event.cost_source.as_str().as_bytes());
    out.extend_from_slice(b"\",\"latency_ms\":");
    json_int(out, event.latency_ms);
    out.extend_from_slice(b",\"status\":\"");
    out.extend_from_slice(event.status.as_str().as_bytes());
    out.extend_from_slice(b"\",\"http_status\":");
    json_int(out, event.http_status);
    for (key, value) in [
        (&b",\"error\":"[..], &event.error),
        (b",\"execution_id\":", &event.execution_id),
        (b",\"agent_id\":", &event.agent_id),
        (b",\"user_id\":", &event.user_id),
        (b",\"service\":", &event.service),
        (b",\"action\":", &event.action),
        (b",\"request_id\":", &event.request_id),
    ] {
        let value = value.as_ref();
        out.extend_from_slice(key);
        json_str(out, value);
    }
    out.extend_from_slice(b",\"input_bytes\":");
    json_int(out, event.input_bytes);
    out.extend_from_slice(b",\"output_bytes\":");
    json_int(out, event.output_bytes);
    out.extend_from_slice(b",\"metadata_keys\":");
    json_str_array(out, event.metadata.iter().map(|(k, _)| k.as_str()));
    out.extend_from_slice(b",\"metadata_values\":");
    json_str_array(out, event.metadata.iter().map(|(_, v)| v.as_str()));
    out.extend_from_slice(b"}\n");
}

/// Decodes every JSONEachRow line of a record payload. Fails on the first bad line: a record is
/// produced whole by one ingest call, so a bad line means the record is not Tally's.
pub fn decode_events(payload: &[u8]) -> Result<Vec<Event>, RecordError> {
    let mut events = Vec::new();
    read_events(payload, |_, event| events.push(event.to_event()))?;
    Ok(events)
}

/// Calls `each` with every event of a record payload and its index (blank lines skipped), its
/// strings borrowed from the payload where the line is in the shape Tally writes. Fails on the
/// first bad line; `each` has then seen the lines before it.
pub fn read_events(payload: &[u8], mut each: impl FnMut(u32, &EventRef<'_>)) -> Result<(), RecordError> {
    // Valid UTF-8 is checked once for the whole record, not string by string; a record that is
    // not valid UTF-8 still gets its error (and line) from the JSON parser.
    let Ok(text) = std::str::from_utf8(payload) else {
        for (line_number, line) in payload.split(|b| *b == b'\n').enumerate() {
            if let Err(source) = serde_json::from_slice::<serde::de::IgnoredAny>(line) {
                return Err(RecordError::Json { line: line_number + 1, source });
            }
        }
        return Err(RecordError::Invalid("record is not valid UTF-8".into()));
    };
    let mut index = 0;
    let mut rest = text;
    let mut line_number = 0;
    while !rest.is_empty() {
        let end = memchr::memchr(b'\n', rest.as_bytes()).unwrap_or(rest.len());
        let line = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or_default();
        line_number += 1;
        if line.bytes().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        // Tally's own encoder writes the columns in one order with no whitespace: read that shape
        // directly; anything else (escaped strings, another writer) goes through serde.
        match fast::decode_line(line) {
            Some(event) => each(index, &event),
            None => {
                let event = decode_line_serde(line).map_err(|error| match error {
                    RecordError::Json { source, .. } => RecordError::Json { line: line_number, source },
                    other => other,
                })?;
                each(index, &event.borrowed());
            }
        }
        index += 1;
    }
    Ok(())
}

/// One JSONEachRow line through serde (any key order, escapes, whitespace).
fn decode_line_serde(line: &str) -> Result<Event, RecordError> {
    let row: OwnedRow = serde_json::from_str(line).map_err(|source| RecordError::Json { line: 1, source })?;
    if row.metadata_keys.len() != row.metadata_values.len() {
        return Err(RecordError::Invalid("metadata_keys and metadata_values differ in length".into()));
    }
    if row.timestamp_ms >= 1000 {
        return Err(RecordError::Invalid(format!("timestamp_ms {} is not below 1000", row.timestamp_ms)));
    }
    Ok(Event {
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
    })
}

pub mod binary;
mod fast;

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
    /// The id derived for the event from its request's `Idempotency-Key` (ingest stage), so an SDK
    /// that sends no `eventId`s can still find its rejected events. An `eventId` in `original`
    /// takes precedence, as it does for accepted events.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub event_id: Option<String>,
    pub received_at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source: Option<SourcePosition>,
    /// The original bytes, as text when they are UTF-8 ...
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub original: Option<String>,
    /// ... else as hex.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub original_hex: Option<String>,
    /// The events record's `HEADER_FORMAT`, when it had one (consume stage): how to read
    /// `original` again on replay. Absent: JSONEachRow.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub format: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::event_count;

    #[test]
    fn an_event_count_is_a_positive_decimal_or_nothing() {
        assert_eq!(event_count(b"1"), Some(1));
        assert_eq!(event_count(b"1000"), Some(1000));
        assert_eq!(event_count(b"999999999"), Some(999_999_999));
        for bad in
            [&b""[..], b"0", b"000", b"-1", b"+1", b" 1", b"1 ", b"1e3", b"0x10", b"1000000000", b"\xff"]
        {
            assert_eq!(event_count(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}

#[cfg(test)]
mod json_str_tests {
    use proptest::prelude::*;

    proptest! {
        /// Whatever the string (quotes, backslashes, control characters, any Unicode), it is
        /// written as serde_json writes it.
        #[test]
        fn json_str_writes_what_serde_writes(text in "(\\PC|[\"\\\\\\x00-\\x1f]){0,80}") {
            let mut out = Vec::new();
            super::json_str(&mut out, &text);
            prop_assert_eq!(out, serde_json::to_vec(&text).unwrap());
        }
    }
}

#[cfg(test)]
mod format_tests {
    use super::RecordFormat;

    #[test]
    fn a_record_without_the_header_is_json_and_unknown_formats_are_none() {
        assert_eq!(RecordFormat::of_header(None), Some(RecordFormat::JsonEachRow));
        assert_eq!(RecordFormat::of_header(Some(b"JSONEachRow")), Some(RecordFormat::JsonEachRow));
        assert_eq!(RecordFormat::of_header(Some(b"RowBinary")), Some(RecordFormat::RowBinary));
        for unknown in [&b""[..], b"rowbinary", b"Native", b"RowBinary "] {
            assert_eq!(RecordFormat::of_header(Some(unknown)), None);
        }
    }

    #[test]
    fn a_prefix_of_rows_ends_where_the_next_row_starts() {
        let events: Vec<crate::Event> = (0..3).map(super::binary::tests::numbered).collect();
        for format in [RecordFormat::JsonEachRow, RecordFormat::RowBinary] {
            let mut payload = Vec::new();
            let mut ends = vec![0];
            for event in &events {
                format.encode(event, &mut payload);
                ends.push(payload.len());
            }
            for (rows, end) in ends.iter().enumerate() {
                assert_eq!(format.prefix_len(&payload, rows).ok(), Some(*end), "{format:?} {rows}");
            }
            assert_eq!(format.prefix_len(&payload, 7).ok(), Some(payload.len()), "{format:?}");
        }
    }
}
