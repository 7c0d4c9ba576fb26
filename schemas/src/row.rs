//! The one row type of `tally.events`: what the query API reads back, the archiver turns into
//! Parquet and the load tools generate; the consumer writes the same row's RowBinary by hand
//! (`write_row_binary`) straight from the record's bytes. Its column list is declared once, in
//! the `event_row!` invocation below (field, Rust type, ClickHouse type, in table order), and
//! both the struct and `event_columns()` come from it; a test holds `event_columns()` equal to the
//! real table on ClickHouse 18.16 and on a current ClickHouse, which is the guard the client's
//! disabled RowBinary validation gave up.

use clickhouse::Row;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::event::{CostSource, Event, EventRef, Status};

/// A column of `tally.events` as ClickHouse describes it (`system.columns`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Column {
    pub name: &'static str,
    pub clickhouse_type: String,
}

/// A Rust enum stored as a ClickHouse `Enum8`: each variant's number (`code`) and name (`as_str`,
/// the enum's own text) give both the RowBinary codec (an `Int8`) and the column's type text.
pub trait Enum8: Copy + PartialEq + Sized + 'static {
    /// Every variant, in code order.
    const VARIANTS: &'static [Self];

    fn code(self) -> i8;

    fn name(self) -> &'static str;

    fn from_code(code: i8) -> Option<Self> {
        Self::VARIANTS.iter().copied().find(|v| v.code() == code)
    }

    /// `Enum8('a' = 1, 'b' = 2)`, as `system.columns` prints it.
    fn clickhouse_type() -> String {
        let items: Vec<String> =
            Self::VARIANTS.iter().map(|v| format!("'{}' = {}", v.name(), v.code())).collect();
        format!("Enum8({})", items.join(", "))
    }
}

impl Enum8 for CostSource {
    const VARIANTS: &'static [Self] = &[CostSource::Client, CostSource::Computed, CostSource::Unknown];

    fn code(self) -> i8 {
        match self {
            CostSource::Client => 1,
            CostSource::Computed => 2,
            CostSource::Unknown => 3,
        }
    }

    fn name(self) -> &'static str {
        self.as_str()
    }
}

impl Enum8 for Status {
    const VARIANTS: &'static [Self] = &[Status::Success, Status::Error];

    fn code(self) -> i8 {
        match self {
            Status::Success => 1,
            Status::Error => 2,
        }
    }

    fn name(self) -> &'static str {
        self.as_str()
    }
}

/// `#[serde(with = "enum8")]`: an `Enum8` column in RowBinary (one signed byte).
mod enum8 {
    use super::*;

    pub fn serialize<T: Enum8, S: Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_i8(value.code())
    }

    pub fn deserialize<'de, T: Enum8, D: Deserializer<'de>>(deserializer: D) -> Result<T, D::Error> {
        let code = i8::deserialize(deserializer)?;
        T::from_code(code)
            .ok_or_else(|| serde::de::Error::custom(format!("no variant has Enum8 code {code}")))
    }
}

macro_rules! event_row {
    ($( $(#[$attr:meta])* $field:ident : $rust:ty = $clickhouse:expr ),+ $(,)?) => {
        /// One row of `tally.events`; field order is column order (RowBinary has no names).
        #[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
        pub struct EventRow {
            $( $(#[$attr])* pub $field: $rust, )+
        }

        /// The columns of `tally.events`, in order, with their ClickHouse types.
        pub fn event_columns() -> Vec<Column> {
            vec![ $( Column { name: stringify!($field), clickhouse_type: String::from($clickhouse) }, )+ ]
        }
    };
}

event_row! {
    org_id: String = "String",
    #[serde(with = "clickhouse::serde::uuid")]
    event_id: Uuid = "UUID",
    /// Event time, epoch seconds (the millisecond part is `timestamp_ms`).
    timestamp: u32 = "DateTime('UTC')",
    timestamp_ms: u16 = "UInt16",
    /// When the ingest accepted it, epoch seconds.
    received_at: u32 = "DateTime('UTC')",
    provider: String = "String",
    model: String = "String",
    prompt_tokens: u32 = "UInt32",
    completion_tokens: u32 = "UInt32",
    total_tokens: u32 = "UInt32",
    /// Nano-dollars (1e-9 USD).
    cost_nanos: i64 = "Int64",
    #[serde(with = "enum8")]
    cost_source: CostSource = CostSource::clickhouse_type(),
    latency_ms: u32 = "UInt32",
    #[serde(with = "enum8")]
    status: Status = Status::clickhouse_type(),
    http_status: u16 = "UInt16",
    error: String = "String",
    execution_id: String = "String",
    agent_id: String = "String",
    user_id: String = "String",
    service: String = "String",
    action: String = "String",
    request_id: String = "String",
    input_bytes: u64 = "UInt64",
    output_bytes: u64 = "UInt64",
    metadata_keys: Vec<String> = "Array(String)",
    metadata_values: Vec<String> = "Array(String)",
    /// Where the row came from in `tally.events.v1`: the exactly-once recovery reads it back.
    kafka_partition: u16 = "UInt16",
    kafka_offset: u64 = "UInt64",
    /// The event's line within its Kafka record.
    kafka_index: u32 = "UInt32",
}

/// `org_id, event_id, …`: every column, for a SELECT that reads whole rows into `EventRow`.
pub fn select_list() -> String {
    event_columns().iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
}

/// A `DateTime` column's value for a time in epoch milliseconds (its millisecond part dropped).
pub fn epoch_seconds(ms: i64) -> u32 {
    u32::try_from(ms.div_euclid(1000)).unwrap_or(0)
}

/// Where a row came from: (partition, offset, index of the line in its record), as the
/// `kafka_partition`, `kafka_offset` and `kafka_index` columns store it.
fn kafka_columns((partition, offset, index): (i32, i64, u32)) -> (u16, u64, u32) {
    (u16::try_from(partition).unwrap_or(u16::MAX), u64::try_from(offset).unwrap_or(0), index)
}

fn put_leb128(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    put_leb128(out, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}

fn put_strs<'a>(out: &mut Vec<u8>, len: usize, items: impl Iterator<Item = &'a str>) {
    put_leb128(out, len as u64);
    for item in items {
        put_str(out, item);
    }
}

/// Appends `event`'s row of `tally.events` in RowBinary (the columns of [`EventRow`], in order,
/// with the values [`EventRow::new`] gives them), read from `position` (partition, offset, line) of
/// the events topic. Written by hand: the consumer writes every row it inserts this way, straight
/// from the record's bytes, with no `EventRow` (and its dozen strings) in between.
pub fn write_row_binary(event: &EventRef<'_>, position: (i32, i64, u32), out: &mut Vec<u8>) {
    write_event_columns(event, out);
    write_kafka_columns(position, out);
}

/// Appends the columns of `event`'s row before `kafka_partition` (those a RowBinary events record
/// holds: `record::binary`).
pub fn write_event_columns(event: &EventRef<'_>, out: &mut Vec<u8>) {
    // Every field by name: a field added to the event does not compile here until it is written
    // (its column's place: `consumer/tests/consumer_clickhouse.rs` reads every column back).
    let EventRef {
        event_id,
        org_id,
        received_at_ms,
        timestamp_ms,
        provider,
        model,
        prompt_tokens,
        completion_tokens,
        total_tokens,
        cost_nanos,
        cost_source,
        latency_ms,
        status,
        http_status,
        error,
        execution_id,
        agent_id,
        user_id,
        service,
        action,
        request_id,
        input_bytes,
        output_bytes,
        metadata,
    } = event;
    put_str(out, org_id);
    let (high, low) = event_id.as_u64_pair();
    out.extend_from_slice(&high.to_le_bytes());
    out.extend_from_slice(&low.to_le_bytes());
    out.extend_from_slice(&epoch_seconds(*timestamp_ms).to_le_bytes());
    out.extend_from_slice(&(timestamp_ms.rem_euclid(1000) as u16).to_le_bytes());
    out.extend_from_slice(&epoch_seconds(*received_at_ms).to_le_bytes());
    put_str(out, provider);
    put_str(out, model);
    out.extend_from_slice(&prompt_tokens.to_le_bytes());
    out.extend_from_slice(&completion_tokens.to_le_bytes());
    out.extend_from_slice(&total_tokens.to_le_bytes());
    out.extend_from_slice(&cost_nanos.to_le_bytes());
    out.push(cost_source.code() as u8);
    out.extend_from_slice(&latency_ms.to_le_bytes());
    out.push(status.code() as u8);
    out.extend_from_slice(&http_status.to_le_bytes());
    for text in [error, execution_id, agent_id, user_id, service, action, request_id] {
        put_str(out, text);
    }
    out.extend_from_slice(&input_bytes.to_le_bytes());
    out.extend_from_slice(&output_bytes.to_le_bytes());
    put_strs(out, metadata.len(), metadata.keys());
    put_strs(out, metadata.len(), metadata.values());
}

/// Appends the `kafka_partition`, `kafka_offset` and `kafka_index` columns: where the row came
/// from in the events topic (partition, offset, line or row of its record).
pub fn write_kafka_columns(position: (i32, i64, u32), out: &mut Vec<u8>) {
    let (partition, offset, index) = kafka_columns(position);
    out.extend_from_slice(&partition.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&index.to_le_bytes());
}

impl EventRow {
    /// The row of `event`, read from `partition`/`offset` of the events topic, line `index` of its
    /// record.
    pub fn new(event: Event, partition: i32, offset: i64, index: u32) -> Self {
        let (metadata_keys, metadata_values) = event.metadata.into_iter().unzip();
        let (kafka_partition, kafka_offset, kafka_index) = kafka_columns((partition, offset, index));
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
            cost_source: event.cost_source,
            latency_ms: event.latency_ms,
            status: event.status,
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
            kafka_partition,
            kafka_offset,
            kafka_index,
        }
    }

    /// Event time in epoch milliseconds.
    pub fn timestamp_epoch_ms(&self) -> i64 {
        i64::from(self.timestamp) * 1000 + i64::from(self.timestamp_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum8_types_read_as_clickhouse_prints_them() {
        assert_eq!(CostSource::clickhouse_type(), "Enum8('client' = 1, 'computed' = 2, 'unknown' = 3)");
        assert_eq!(Status::clickhouse_type(), "Enum8('success' = 1, 'error' = 2)");
        for variant in CostSource::VARIANTS {
            assert_eq!(CostSource::from_code(variant.code()), Some(*variant));
        }
        for variant in Status::VARIANTS {
            assert_eq!(Status::from_code(variant.code()), Some(*variant));
        }
        assert_eq!(Status::from_code(0), None);
    }

    #[test]
    fn the_struct_and_the_column_list_are_one_declaration() {
        let names: Vec<&str> = event_columns().iter().map(|c| c.name).collect();
        assert_eq!(names, <EventRow as Row>::COLUMN_NAMES);
    }

    /// The migration that creates the table declares the same columns in the same order (the
    /// real tables on both ClickHouse versions are compared in `common/tests/clickhouse.rs` and
    /// `dev/compat.py`).
    #[test]
    fn migration_0001_declares_the_row_columns() {
        let statements = crate::migrations::MIGRATIONS[0].statements("db");
        let sql = &statements[0];
        let body = &sql[sql.find('(').unwrap_or(0) + 1..sql.find("\n)").unwrap_or(sql.len())];
        let declared: Vec<(String, String)> = body
            .lines()
            .map(|line| line.trim().trim_end_matches(','))
            .filter(|line| !line.is_empty())
            .map(|line| {
                let (name, ty) = line.split_once(' ').unwrap_or((line, ""));
                (name.to_owned(), ty.to_owned())
            })
            .collect();
        let expected: Vec<(String, String)> =
            event_columns().into_iter().map(|c| (c.name.to_owned(), c.clickhouse_type)).collect();
        assert_eq!(declared, expected);
    }
}
