//! The unit the consumer works on: the Kafka records of one batch, each decoded into its rows (or
//! not), and the stages that take out of a batch what must not be inserted.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::Arc;

use rdkafka::consumer::{ConsumerContext, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::Message;
use tally_schemas::record::{binary, read_events, RecordError, RecordFormat};
use tally_schemas::row::{epoch_seconds, write_kafka_columns, write_row_binary};
use uuid::Uuid;

/// A record's payload: where librdkafka holds it (as polled), or owned bytes.
pub enum Payload {
    Kafka(KafkaPayload),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Payload {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Payload::Kafka(kafka) => kafka.bytes(),
            Payload::Owned(bytes) => bytes,
        }
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Self {
        Payload::Owned(bytes)
    }
}

/// A polled record's payload, left where librdkafka put it and read in place (decoded on another
/// thread, dead-lettered) instead of copied out during the poll: copying a batch's ~30 MB held
/// ClickHouse waiting ~20 ms per batch of 100 000 rows (`perf`: `memmove` the loop's largest cost).
pub struct KafkaPayload {
    // Fields drop in order: the message before the client it was polled from.
    message: BorrowedMessage<'static>,
    _client: Arc<dyn std::any::Any + Send + Sync>,
}

impl KafkaPayload {
    /// Keeps `message` with the client it was polled from.
    #[allow(unsafe_code)]
    pub fn new<'a, C: ConsumerContext + 'static>(
        message: BorrowedMessage<'a>,
        client: &'a Arc<StreamConsumer<C>>,
    ) -> Self {
        // SAFETY: a `BorrowedMessage` owns (by an `Arc`) the librdkafka event holding its bytes;
        // its lifetime stands for the client handle, which must outlive the event. The struct
        // keeps a strong reference to that client and, by field order, drops the message first;
        // the message is never handed out, only its bytes for as long as the struct is borrowed.
        let message =
            unsafe { std::mem::transmute::<BorrowedMessage<'a>, BorrowedMessage<'static>>(message) };
        KafkaPayload { message, _client: Arc::clone(client) as Arc<dyn std::any::Any + Send + Sync> }
    }

    pub fn bytes(&self) -> &[u8] {
        self.message.payload().unwrap_or_default()
    }
}

/// One Kafka record as polled, not decoded yet.
pub struct RawRecord {
    pub partition: i32,
    pub offset: i64,
    /// The record's Kafka timestamp (set by the ingest's producer when it accepted the events).
    pub kafka_timestamp_ms: i64,
    pub original: Payload,
    /// How its events are written (`tally-format` header); Err: a format Tally does not read,
    /// named by the header's value.
    pub format: Result<RecordFormat, String>,
}

/// One Kafka record of the batch, decoded (or not).
pub struct Pending {
    pub partition: i32,
    pub offset: i64,
    pub kafka_timestamp_ms: i64,
    pub original: Payload,
    pub format: Result<RecordFormat, String>,
    /// The rows still to insert (stages remove those that must not be).
    pub decoded: Result<Vec<Row>, RecordError>,
    /// Every row the record decoded into, as inserted: RowBinary, one after another.
    encoded: Vec<u8>,
}

/// What the stages look at of a decoded row; the row itself is its RowBinary bytes.
#[derive(Debug, Clone)]
pub struct Row {
    /// Shared by the rows of a record with one org (a record is one ingest call: one API key).
    pub org_id: Arc<str>,
    pub event_id: Uuid,
    /// Event time and arrival, epoch seconds, as stored.
    pub timestamp: u32,
    pub received_at: u32,
    /// The event's line within its record.
    pub kafka_index: u32,
    bytes: Range<usize>,
}

/// Reads a JSONEachRow record's events and writes each straight into its RowBinary row: no owned
/// event (a dozen strings each) in between (`perf` had decoding at half the consumer's CPU).
fn decode_json(
    original: &[u8],
    (partition, offset): (i32, i64),
    encoded: &mut Vec<u8>,
) -> Result<Vec<Row>, RecordError> {
    encoded.reserve(original.len() / 2);
    let mut rows = Vec::new();
    let mut org: Option<Arc<str>> = None;
    read_events(original, |index, event| {
        let start = encoded.len();
        write_row_binary(event, (partition, offset, index), encoded);
        rows.push(Row {
            org_id: org_of(&mut org, event.org_id),
            event_id: event.event_id,
            timestamp: epoch_seconds(event.timestamp_ms),
            received_at: epoch_seconds(event.received_at_ms),
            kafka_index: index,
            bytes: start..encoded.len(),
        });
    })?;
    Ok(rows)
}

/// A RowBinary record's rows are checked (`binary::read_rows`) and copied, each followed by its
/// Kafka position: nothing is parsed from text or re-encoded.
fn decode_row_binary(
    original: &[u8],
    (partition, offset): (i32, i64),
    encoded: &mut Vec<u8>,
) -> Result<Vec<Row>, RecordError> {
    // 14 bytes of position per row; rows are rarely under 100 bytes.
    encoded.reserve(original.len() + original.len() / 7);
    let mut rows = Vec::new();
    let mut org: Option<Arc<str>> = None;
    binary::read_rows(original, |index, row| {
        let start = encoded.len();
        encoded.extend_from_slice(row.bytes);
        write_kafka_columns((partition, offset, index), encoded);
        rows.push(Row {
            org_id: org_of(&mut org, row.org_id),
            event_id: row.event_id,
            timestamp: row.timestamp,
            received_at: row.received_at,
            kafka_index: index,
            bytes: start..encoded.len(),
        });
    })?;
    Ok(rows)
}

/// The `Arc` of a record's org, shared by its rows while it stays the same.
fn org_of(org: &mut Option<Arc<str>>, org_id: &str) -> Arc<str> {
    match org {
        Some(same) if **same == *org_id => Arc::clone(same),
        _ => Arc::clone(org.insert(Arc::from(org_id))),
    }
}

impl Pending {
    /// Decodes the record in its format into the RowBinary rows the insert sends.
    pub fn decode(raw: RawRecord) -> Pending {
        let RawRecord { partition, offset, kafka_timestamp_ms, original, format } = raw;
        let mut encoded = Vec::new();
        let decoded = match &format {
            Ok(RecordFormat::JsonEachRow) => decode_json(&original, (partition, offset), &mut encoded),
            Ok(RecordFormat::RowBinary) => decode_row_binary(&original, (partition, offset), &mut encoded),
            Err(name) => Err(RecordError::Invalid(format!(
                "the record's {} header names {name:?}, a format this consumer does not read (JSONEachRow, RowBinary)",
                tally_schemas::record::HEADER_FORMAT
            ))),
        };
        if decoded.is_err() {
            encoded = Vec::new();
        }
        Pending { partition, offset, kafka_timestamp_ms, original, format, decoded, encoded }
    }

    pub fn row_count(&self) -> usize {
        self.decoded.as_ref().map_or(0, Vec::len)
    }

    /// The rows still to insert, as the insert sends them.
    pub fn row_bytes(&self) -> impl Iterator<Item = RowBytes<'_>> {
        let rows = self.decoded.as_ref().map_or(&[][..], Vec::as_slice);
        let kafka_partition = u16::try_from(self.partition).unwrap_or(u16::MAX);
        rows.iter().map(move |row| RowBytes {
            org_id: &row.org_id,
            kafka_partition,
            bytes: &self.encoded[row.bytes.clone()],
        })
    }
}

/// A row as an insert sends it: its org (which shard stores it), its Kafka partition (named in
/// the insert's query id) and its bytes, in RowBinary (`write_row_binary`).
#[derive(Debug, Clone, Copy)]
pub struct RowBytes<'a> {
    pub org_id: &'a str,
    pub kafka_partition: u16,
    pub bytes: &'a [u8],
}

/// Every decoded row of `records`, in order, as the insert sends them.
pub fn rows_of(records: &[Pending]) -> Vec<RowBytes<'_>> {
    records.iter().flat_map(Pending::row_bytes).collect()
}

/// The offset to commit per partition once `records` are stored: one past the last record.
pub fn next_offsets(records: &[Pending]) -> BTreeMap<i32, i64> {
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    for pending in records {
        let entry = next.entry(pending.partition).or_insert(0);
        *entry = (*entry).max(pending.offset + 1);
    }
    next
}

/// What every stage sees of the moment a batch is checked.
pub struct BatchContext {
    /// The partitions this replica owns now.
    pub assigned: BTreeSet<i32>,
    /// Epoch seconds.
    pub now: u32,
}

/// A step between polling and inserting that removes from the batch what must not be inserted
/// (records of partitions no longer owned, rows stored already, event ids seen already) and says
/// what it removed. The worker runs them in order, retrying a stage whose query failed.
pub trait Stage {
    type Outcome;

    fn apply(
        &mut self,
        batch: &mut Vec<Pending>,
        context: &BatchContext,
    ) -> impl std::future::Future<Output = Result<Self::Outcome, clickhouse::error::Error>> + Send;
}

/// Keeps only records of partitions this replica still owns: after a revoke, nothing more is
/// written for a partition; its new owner reads those records again from the committed offset.
pub struct DropRevoked;

impl Stage for DropRevoked {
    /// Records dropped.
    type Outcome = usize;

    async fn apply(
        &mut self,
        batch: &mut Vec<Pending>,
        context: &BatchContext,
    ) -> Result<usize, clickhouse::error::Error> {
        let before = batch.len();
        batch.retain(|p| context.assigned.contains(&p.partition));
        Ok(before - batch.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(partition: i32, offset: i64, payload: &str) -> Pending {
        Pending::decode(RawRecord {
            partition,
            offset,
            kafka_timestamp_ms: 0,
            original: payload.as_bytes().to_vec().into(),
            format: Ok(RecordFormat::JsonEachRow),
        })
    }

    #[test]
    fn commits_one_past_the_last_record_of_each_partition() {
        let batch = [record(0, 5, "x"), record(1, 2, "x"), record(0, 7, "x"), record(0, 6, "x")];
        assert_eq!(next_offsets(&batch), BTreeMap::from([(0, 8), (1, 3)]));
    }

    #[test]
    fn undecodable_records_have_no_rows() {
        let batch = [record(0, 1, "not json")];
        assert!(batch[0].decoded.is_err());
        assert_eq!(batch[0].row_count(), 0);
        assert!(rows_of(&batch).is_empty());
    }

    #[tokio::test]
    async fn revoked_partitions_are_dropped_whole() {
        let mut batch = vec![record(0, 1, "x"), record(1, 1, "x"), record(2, 1, "x")];
        let context = BatchContext { assigned: BTreeSet::from([0, 2]), now: 0 };
        assert_eq!(DropRevoked.apply(&mut batch, &context).await.ok(), Some(1));
        assert_eq!(batch.iter().map(|p| p.partition).collect::<Vec<_>>(), [0, 2]);
    }
}
