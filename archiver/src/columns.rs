//! The Parquet schema of the archive, derived from the one event row type (`EventRow`,
//! `event_columns()`): each ClickHouse column becomes the Arrow type a reader expects, with two
//! deliberate changes — `timestamp` + `timestamp_ms` become one `timestamp` column,
//! TIMESTAMP(MILLIS, UTC), and `cost_nanos` becomes `cost`, DECIMAL(18, 9) USD (the same integer,
//! exact). Ids: `event_id` is FIXED_LEN_BYTE_ARRAY(16) (the UUID's bytes, big-endian, as
//! ClickHouse and DuckDB order them); every other id is a string, as the SDK sent it. Enums are
//! their names (strings; Parquet dictionary-encodes them).

use std::sync::Arc;

use arrow_array::builder::{
    Decimal128Builder, FixedSizeBinaryBuilder, ListBuilder, StringBuilder, TimestampMillisecondBuilder,
    UInt16Builder, UInt32Builder, UInt64Builder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use tally_schemas::row::{event_columns, Enum8};
use tally_schemas::EventRow;

use crate::error::ArchiveError;

/// Bumped when the file layout changes; written into every manifest.
pub const SCHEMA_VERSION: u32 = 1;
pub const COST_PRECISION: u8 = 18;
pub const COST_SCALE: i8 = 9;

/// The Arrow type of a ClickHouse column type (the ones `tally.events` uses).
fn arrow_type(clickhouse_type: &str) -> Option<DataType> {
    Some(match clickhouse_type {
        "String" => DataType::Utf8,
        "UUID" => DataType::FixedSizeBinary(16),
        "UInt16" => DataType::UInt16,
        "UInt32" => DataType::UInt32,
        "UInt64" => DataType::UInt64,
        "DateTime('UTC')" => DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        "Array(String)" => DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
        enum8 if enum8.starts_with("Enum8(") => DataType::Utf8,
        _ => return None,
    })
}

/// The archive's schema: the columns of `tally.events` in order, mapped by `arrow_type`, with the
/// two changes above. Fails (at start, and in a test) on a column type it does not know.
pub fn schema() -> Result<SchemaRef, ArchiveError> {
    let mut fields = Vec::new();
    for column in event_columns() {
        let field = match column.name {
            "timestamp_ms" => continue,
            "cost_nanos" => Field::new("cost", DataType::Decimal128(COST_PRECISION, COST_SCALE), false),
            name => {
                let data_type = arrow_type(&column.clickhouse_type).ok_or_else(|| {
                    ArchiveError::Config(format!(
                        "the archive has no Parquet type for column {name} {}: add it to archiver/src/columns.rs",
                        column.clickhouse_type
                    ))
                })?;
                Field::new(name, data_type, false)
            }
        };
        fields.push(field);
    }
    Ok(Arc::new(Schema::new(fields)))
}

/// Column builders for a batch of rows, in schema order.
pub struct Columns {
    schema: SchemaRef,
    org_id: StringBuilder,
    event_id: FixedSizeBinaryBuilder,
    timestamp: TimestampMillisecondBuilder,
    received_at: TimestampMillisecondBuilder,
    provider: StringBuilder,
    model: StringBuilder,
    prompt_tokens: UInt32Builder,
    completion_tokens: UInt32Builder,
    total_tokens: UInt32Builder,
    cost: Decimal128Builder,
    cost_source: StringBuilder,
    latency_ms: UInt32Builder,
    status: StringBuilder,
    http_status: UInt16Builder,
    texts: [StringBuilder; 7],
    input_bytes: UInt64Builder,
    output_bytes: UInt64Builder,
    metadata_keys: ListBuilder<StringBuilder>,
    metadata_values: ListBuilder<StringBuilder>,
    kafka_partition: UInt16Builder,
    kafka_offset: UInt64Builder,
    kafka_index: UInt32Builder,
    pub rows: usize,
}

impl Columns {
    pub fn new(schema: SchemaRef) -> Columns {
        Columns {
            schema,
            org_id: StringBuilder::new(),
            event_id: FixedSizeBinaryBuilder::new(16),
            timestamp: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            received_at: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            provider: StringBuilder::new(),
            model: StringBuilder::new(),
            prompt_tokens: UInt32Builder::new(),
            completion_tokens: UInt32Builder::new(),
            total_tokens: UInt32Builder::new(),
            cost: Decimal128Builder::new().with_data_type(DataType::Decimal128(COST_PRECISION, COST_SCALE)),
            cost_source: StringBuilder::new(),
            latency_ms: UInt32Builder::new(),
            status: StringBuilder::new(),
            http_status: UInt16Builder::new(),
            texts: std::array::from_fn(|_| StringBuilder::new()),
            input_bytes: UInt64Builder::new(),
            output_bytes: UInt64Builder::new(),
            metadata_keys: ListBuilder::new(StringBuilder::new()),
            metadata_values: ListBuilder::new(StringBuilder::new()),
            kafka_partition: UInt16Builder::new(),
            kafka_offset: UInt64Builder::new(),
            kafka_index: UInt32Builder::new(),
            rows: 0,
        }
    }

    /// Appends a row. The destructuring names every field: a column added to `EventRow` does not
    /// compile here until the archive stores it.
    pub fn append(&mut self, row: EventRow) -> Result<(), ArchiveError> {
        let EventRow {
            org_id,
            event_id,
            timestamp,
            timestamp_ms,
            received_at,
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
            metadata_keys,
            metadata_values,
            kafka_partition,
            kafka_offset,
            kafka_index,
        } = row;
        self.org_id.append_value(org_id);
        self.event_id.append_value(event_id.as_bytes())?;
        self.timestamp.append_value(i64::from(timestamp) * 1000 + i64::from(timestamp_ms));
        self.received_at.append_value(i64::from(received_at) * 1000);
        self.provider.append_value(provider);
        self.model.append_value(model);
        self.prompt_tokens.append_value(prompt_tokens);
        self.completion_tokens.append_value(completion_tokens);
        self.total_tokens.append_value(total_tokens);
        self.cost.append_value(i128::from(cost_nanos));
        self.cost_source.append_value(cost_source.name());
        self.latency_ms.append_value(latency_ms);
        self.status.append_value(status.name());
        self.http_status.append_value(http_status);
        for (builder, text) in
            self.texts.iter_mut().zip([error, execution_id, agent_id, user_id, service, action, request_id])
        {
            builder.append_value(text);
        }
        self.input_bytes.append_value(input_bytes);
        self.output_bytes.append_value(output_bytes);
        for (builder, items) in
            [(&mut self.metadata_keys, metadata_keys), (&mut self.metadata_values, metadata_values)]
        {
            for item in items {
                builder.values().append_value(item);
            }
            builder.append(true);
        }
        self.kafka_partition.append_value(kafka_partition);
        self.kafka_offset.append_value(kafka_offset);
        self.kafka_index.append_value(kafka_index);
        self.rows += 1;
        Ok(())
    }

    /// The rows appended so far as a batch; the builders start over.
    pub fn finish(&mut self) -> Result<RecordBatch, ArchiveError> {
        let mut arrays: Vec<ArrayRef> = vec![
            Arc::new(self.org_id.finish()),
            Arc::new(self.event_id.finish()),
            Arc::new(self.timestamp.finish()),
            Arc::new(self.received_at.finish()),
            Arc::new(self.provider.finish()),
            Arc::new(self.model.finish()),
            Arc::new(self.prompt_tokens.finish()),
            Arc::new(self.completion_tokens.finish()),
            Arc::new(self.total_tokens.finish()),
            Arc::new(self.cost.finish()),
            Arc::new(self.cost_source.finish()),
            Arc::new(self.latency_ms.finish()),
            Arc::new(self.status.finish()),
            Arc::new(self.http_status.finish()),
        ];
        arrays.extend(self.texts.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
        arrays.extend([
            Arc::new(self.input_bytes.finish()) as ArrayRef,
            Arc::new(self.output_bytes.finish()),
            Arc::new(self.metadata_keys.finish()),
            Arc::new(self.metadata_values.finish()),
            Arc::new(self.kafka_partition.finish()),
            Arc::new(self.kafka_offset.finish()),
            Arc::new(self.kafka_index.finish()),
        ]);
        self.rows = 0;
        Ok(RecordBatch::try_new(Arc::clone(&self.schema), arrays)?)
    }
}
