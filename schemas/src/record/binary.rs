//! The RowBinary events record: each event as its row of `tally.events` in ClickHouse's RowBinary,
//! one after another, less the three `kafka_*` columns (a row's place in the topic is known only
//! once the record is in it). A record says it is in this format with `HEADER_FORMAT: RowBinary`;
//! without the header a record is JSONEachRow.
//!
//! Why: the consumer reads a JSONEachRow record by parsing every line and writing its RowBinary
//! row (about half of its CPU, `loadtest/RESULTS.md`); a RowBinary record's rows are checked and
//! copied instead, with their Kafka position appended. ClickHouse's Kafka engine reads the format
//! too (`kafka_format = 'RowBinary'`, on a table of the columns before `kafka_partition`).
//!
//! The reader trusts nothing: every length is bounded by the record, every string must be UTF-8
//! (the query API reads them into Rust strings), every enum code known, the milliseconds below
//! 1000 and the metadata arrays of equal length. A record that fails is refused whole, with the
//! row and the column that failed.

use uuid::Uuid;

use super::{EventRef, RecordError};
use crate::event::{CostSource, Status};
use crate::row::{write_event_columns, Enum8};

/// The `tally-format` header's value for this format: ClickHouse's name for it.
pub const FORMAT_NAME: &str = "RowBinary";

/// Appends `event` to a RowBinary record.
pub fn encode_row(event: &EventRef<'_>, out: &mut Vec<u8>) {
    write_event_columns(event, out);
}

/// What the consumer needs of a row to check it (dedup, reconciliation), and the row itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowRef<'a> {
    pub org_id: &'a str,
    pub event_id: Uuid,
    /// Event time and arrival, epoch seconds, as stored.
    pub timestamp: u32,
    pub received_at: u32,
    /// The row's bytes in the record (every column but the `kafka_*` ones).
    pub bytes: &'a [u8],
}

/// A cursor over a record, each read bounded by what is left of it.
struct Reader<'a> {
    data: &'a [u8],
    at: usize,
    /// The row being read (0-based), for the error.
    row: u32,
}

impl<'a> Reader<'a> {
    #[cold]
    #[inline(never)]
    fn fail(&self, column: &str, what: &str) -> RecordError {
        RecordError::Invalid(format!(
            "RowBinary record: row {}, column {column}: {what} (at byte {})",
            self.row, self.at
        ))
    }

    #[inline]
    fn take(&mut self, column: &'static str, len: usize) -> Result<&'a [u8], RecordError> {
        match self.data.get(self.at..).and_then(|rest| rest.get(..len)) {
            Some(bytes) => {
                self.at += len;
                Ok(bytes)
            }
            None => Err(self.fail(column, &format!("{len} bytes past the end of the record"))),
        }
    }

    #[inline]
    fn fixed<const N: usize>(&mut self, column: &'static str) -> Result<[u8; N], RecordError> {
        let bytes = self.take(column, N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, column: &'static str) -> Result<u32, RecordError> {
        self.fixed(column).map(u32::from_le_bytes)
    }

    fn skip(&mut self, column: &'static str, len: usize) -> Result<(), RecordError> {
        self.take(column, len).map(|_| ())
    }

    /// ClickHouse's unsigned LEB128 length, at most what fits in the record.
    #[inline]
    fn length(&mut self, column: &'static str) -> Result<usize, RecordError> {
        // Nearly every length fits in one byte.
        if let Some(&byte) = self.data.get(self.at).filter(|b| **b < 0x80) {
            self.at += 1;
            return Ok(usize::from(byte));
        }
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let [byte] = self.fixed(column)?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return usize::try_from(value)
                    .ok()
                    .filter(|len| *len <= self.data.len() - self.at)
                    .ok_or_else(|| self.fail(column, &format!("length {value} exceeds the record")));
            }
        }
        Err(self.fail(column, "length of more than ten bytes"))
    }

    #[inline]
    fn str(&mut self, column: &'static str) -> Result<&'a str, RecordError> {
        let len = self.length(column)?;
        let bytes = self.take(column, len)?;
        std::str::from_utf8(bytes).map_err(|_| self.fail(column, "not UTF-8"))
    }

    /// A string column only checked, not kept: most are ASCII, checked eight bytes at a time
    /// without the UTF-8 decoder.
    #[inline]
    fn text(&mut self, column: &'static str) -> Result<(), RecordError> {
        let len = self.length(column)?;
        let bytes = self.take(column, len)?;
        if bytes.is_ascii() || std::str::from_utf8(bytes).is_ok() {
            Ok(())
        } else {
            Err(self.fail(column, "not UTF-8"))
        }
    }

    /// An `Array(String)`: its item count.
    fn strs(&mut self, column: &'static str) -> Result<usize, RecordError> {
        let len = self.length(column)?;
        for _ in 0..len {
            self.text(column)?;
        }
        Ok(len)
    }

    fn enum8<T: Enum8>(&mut self, column: &'static str) -> Result<(), RecordError> {
        let [code] = self.fixed(column)?;
        match T::from_code(code as i8) {
            Some(_) => Ok(()),
            None => Err(self.fail(column, &format!("no value has code {code}"))),
        }
    }

    /// One row, checked column by column in table order (`row.rs`).
    fn row(&mut self) -> Result<RowRef<'a>, RecordError> {
        let start = self.at;
        let org_id = self.str("org_id")?;
        let event_id = uuid_of(self.fixed("event_id")?);
        let timestamp = self.u32("timestamp")?;
        let millis = u16::from_le_bytes(self.fixed("timestamp_ms")?);
        if millis >= 1000 {
            return Err(self.fail("timestamp_ms", &format!("{millis} is not a millisecond")));
        }
        let received_at = self.u32("received_at")?;
        self.text("provider")?;
        self.text("model")?;
        self.skip("prompt_tokens, completion_tokens, total_tokens, cost_nanos", 4 + 4 + 4 + 8)?;
        self.enum8::<CostSource>("cost_source")?;
        self.skip("latency_ms", 4)?;
        self.enum8::<Status>("status")?;
        self.skip("http_status", 2)?;
        for column in ["error", "execution_id", "agent_id", "user_id", "service", "action", "request_id"] {
            self.text(column)?;
        }
        self.skip("input_bytes, output_bytes", 8 + 8)?;
        let keys = self.strs("metadata_keys")?;
        let values = self.strs("metadata_values")?;
        if keys != values {
            return Err(self.fail("metadata_values", &format!("{keys} metadata keys but {values} values")));
        }
        Ok(RowRef { org_id, event_id, timestamp, received_at, bytes: &self.data[start..self.at] })
    }
}

/// The UUID as ClickHouse's RowBinary holds it: its two 64-bit halves, each little-endian.
fn uuid_of(bytes: [u8; 16]) -> Uuid {
    let half = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or_default());
    Uuid::from_u64_pair(half(&bytes[..8]), half(&bytes[8..]))
}

/// The rows of a RowBinary record, each checked, with their index; stops after the first bad one.
pub struct Rows<'a> {
    reader: Reader<'a>,
    failed: bool,
}

impl<'a> Rows<'a> {
    pub fn new(payload: &'a [u8]) -> Self {
        Rows { reader: Reader { data: payload, at: 0, row: 0 }, failed: false }
    }

    /// The bytes of the rows read so far.
    pub fn bytes_read(&self) -> usize {
        self.reader.at
    }
}

impl<'a> Iterator for Rows<'a> {
    type Item = Result<(u32, RowRef<'a>), RecordError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.reader.at >= self.reader.data.len() {
            return None;
        }
        let index = self.reader.row;
        let row = self.reader.row();
        self.failed = row.is_err();
        self.reader.row += 1;
        Some(row.map(|row| (index, row)))
    }
}

/// Calls `each` with every row of a RowBinary record and its index. Fails on the first bad row
/// (`each` has then seen the rows before it) and on an empty record.
pub fn read_rows<'a>(payload: &'a [u8], mut each: impl FnMut(u32, RowRef<'a>)) -> Result<(), RecordError> {
    if payload.is_empty() {
        return Err(RecordError::Invalid("RowBinary record: no rows".into()));
    }
    for row in Rows::new(payload) {
        let (index, row) = row?;
        each(index, row);
    }
    Ok(())
}

/// The bytes of the first `rows` rows of a RowBinary record (all of it if it holds fewer).
pub fn prefix_len(payload: &[u8], rows: usize) -> Result<usize, RecordError> {
    let mut walk = Rows::new(payload);
    for row in walk.by_ref().take(rows) {
        row?;
    }
    Ok(walk.bytes_read())
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::record::fast::tests::event;
    use crate::row::write_row_binary;
    use crate::Event;

    /// Event `n`: a few strings and numbers that differ with `n`.
    pub(crate) fn numbered(n: u32) -> Event {
        let mut event = blank();
        event.event_id = Uuid::from_u128(u128::from(n) + 1);
        event.org_id = format!("org-{n}");
        event.model = "m".repeat(n as usize);
        event.prompt_tokens = n;
        event.metadata = (0..n).map(|i| (format!("k{i}"), format!("v{i}"))).collect();
        event
    }

    /// An event whose strings are all empty.
    fn blank() -> Event {
        Event {
            event_id: Uuid::nil(),
            org_id: String::new(),
            received_at_ms: 0,
            timestamp_ms: 0,
            provider: String::new(),
            model: String::new(),
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
            cost_nanos: 0,
            cost_source: CostSource::Client,
            latency_ms: 0,
            status: Status::Success,
            http_status: 0,
            error: String::new(),
            execution_id: String::new(),
            agent_id: String::new(),
            user_id: String::new(),
            service: String::new(),
            action: String::new(),
            request_id: String::new(),
            input_bytes: 0,
            output_bytes: 0,
            metadata: Vec::new(),
        }
    }

    fn record_of(events: &[Event]) -> Vec<u8> {
        let mut out = Vec::new();
        for event in events {
            encode_row(&event.borrowed(), &mut out);
        }
        out
    }

    fn rows_of(payload: &[u8]) -> Result<Vec<RowRef<'_>>, RecordError> {
        let mut rows = Vec::new();
        read_rows(payload, |index, row| {
            assert_eq!(index as usize, rows.len());
            rows.push(row);
        })?;
        Ok(rows)
    }

    #[test]
    fn an_empty_record_is_refused() {
        assert!(rows_of(b"").is_err());
    }

    #[test]
    fn errors_name_the_row_and_the_column() {
        let mut payload = record_of(&[blank(), blank()]);
        let second = payload.len() / 2;
        // The second row's org_id says it is longer than the record.
        payload[second] = 0x7f;
        let error = rows_of(&payload).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("row 1, column org_id: 127 bytes past the end of the record"), "{error}");
        let mut payload = record_of(&[blank()]);
        let status_at = 1 + 16 + 4 + 2 + 4 + 1 + 1 + 20 + 1 + 4;
        payload[status_at] = 9;
        let error = rows_of(&payload).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("row 0, column status: no value has code 9"), "{error}");
    }

    proptest! {
        // Each row read back is, with its Kafka position appended, byte for byte the row the
        // consumer writes for the same event read from a JSONEachRow record; its checked
        // columns are the event's.
        #[test]
        fn rows_with_their_position_are_the_rows_the_consumer_writes(
            events in proptest::collection::vec(event(), 1..4), partition in 0i32..64, offset in any::<i64>(),
        ) {
            let payload = record_of(&events);
            let rows = rows_of(&payload);
            prop_assert!(rows.is_ok(), "{:?}", rows.err());
            let rows = rows.unwrap_or_default();
            prop_assert_eq!(rows.len(), events.len());
            for (index, (row, event)) in rows.iter().zip(&events).enumerate() {
                let index = index as u32;
                let mut passed = row.bytes.to_vec();
                crate::row::write_kafka_columns((partition, offset, index), &mut passed);
                let mut written = Vec::new();
                write_row_binary(&event.borrowed(), (partition, offset, index), &mut written);
                prop_assert_eq!(passed, written);
                prop_assert_eq!(row.org_id, event.org_id.as_str());
                prop_assert_eq!(row.event_id, event.event_id);
                prop_assert_eq!(i64::from(row.timestamp), event.timestamp_ms.div_euclid(1000));
                prop_assert_eq!(i64::from(row.received_at), event.received_at_ms.div_euclid(1000));
            }
        }

        // A damaged or cut record never panics or reads past its end: it is refused, or every
        // row read lies within it and is well formed.
        #[test]
        fn a_damaged_record_is_refused_or_read_within_bounds(
            events in proptest::collection::vec(event(), 1..3), at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<bool>(),
        ) {
            let mut payload = record_of(&events);
            let at = at.index(payload.len());
            if cut { payload.truncate(at); } else { payload[at] = byte; }
            if let Ok(rows) = rows_of(&payload) {
                prop_assert_eq!(rows.iter().map(|r| r.bytes.len()).sum::<usize>(), payload.len());
                for row in rows {
                    prop_assert!(rows_of(row.bytes).is_ok());
                }
            }
        }
    }
}
