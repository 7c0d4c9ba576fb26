//! `tally-consumer dlq list|replay`: inspect the dead-letter topic, and store again, after a fix,
//! the records the consumer dead-lettered. A consume-stage dead letter keeps its source partition
//! and offset, so replayed rows are inserted with their original positions, and only those not
//! already in ClickHouse: replaying twice, or crashing half-way, stores nothing twice.
//! Ingest-stage dead letters are client errors (invalid events): they are listed, not replayed;
//! the client fixes and resends them.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use tally_schemas::record::{DeadLetter, RecordFormat, Stage};

use crate::batch::{rows_of, Pending, RawRecord};
use crate::config::ConsumerConfig;
use crate::error::ConsumerError;
use crate::store::EventStore;

/// One dead letter as `dlq list` prints it (the original bytes are summarised, not dumped).
#[derive(Debug, Serialize)]
pub struct Listed {
    pub partition: i32,
    pub offset: i64,
    pub stage: Stage,
    pub reason: String,
    pub detail: String,
    pub org_id: String,
    pub request_id: String,
    pub source: Option<tally_schemas::record::SourcePosition>,
    /// Index of the event in its request (ingest stage).
    pub index: Option<usize>,
    /// The event's `eventId`, when its original is a JSON object carrying one (so a client can
    /// match its rejected events, e.g. `make verify-e2e`).
    pub event_id: Option<String>,
    pub original_bytes: usize,
}

/// The `eventId` of a dead letter whose original is a JSON event object.
fn event_id_of(original: Option<&str>) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(original?).ok()?;
    value.get("eventId")?.as_str().map(str::to_owned)
}

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct ReplayReport {
    pub letters: usize,
    pub replayable: usize,
    pub rows_inserted: usize,
    pub rows_already_stored: usize,
    pub still_undecodable: usize,
}

/// Every record of the dead-letter topic, oldest first per partition (no consumer group: reading
/// it changes nothing).
fn read_letters(config: &ConsumerConfig) -> Result<Vec<(i32, i64, DeadLetter)>, ConsumerError> {
    let consumer: BaseConsumer = config
        .common
        .kafka_security
        .apply(&mut ClientConfig::new())
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", format!("{}-dlq-reader", config.group_id))
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(&config.dlq_topic), Duration::from_secs(10))?;
    let mut assignment = TopicPartitionList::new();
    let mut remaining = 0i64;
    for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (low, high) =
            consumer.fetch_watermarks(&config.dlq_topic, partition.id(), Duration::from_secs(10))?;
        remaining += high - low;
        assignment.add_partition_offset(&config.dlq_topic, partition.id(), Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let mut letters = Vec::new();
    while remaining > 0 {
        let Some(message) = consumer.poll(Duration::from_secs(10)) else { break };
        let message = message?;
        remaining -= 1;
        match serde_json::from_slice::<DeadLetter>(message.payload().unwrap_or_default()) {
            Ok(letter) => letters.push((message.partition(), message.offset(), letter)),
            Err(error) => {
                tracing::warn!(offset = message.offset(), error = %error, "not a dead letter, skipped")
            }
        }
    }
    Ok(letters)
}

pub fn list(config: &ConsumerConfig, limit: usize) -> Result<Vec<Listed>, ConsumerError> {
    Ok(read_letters(config)?
        .into_iter()
        .take(limit)
        .map(|(partition, offset, letter)| Listed {
            partition,
            offset,
            original_bytes: letter.original_bytes().map_or(0, |b| b.len()),
            index: letter.index,
            event_id: event_id_of(letter.original.as_deref()).or(letter.event_id),
            stage: letter.stage,
            reason: letter.reason,
            detail: letter.detail,
            org_id: letter.org_id,
            request_id: letter.request_id,
            source: letter.source,
        })
        .collect())
}

/// The format of a dead letter's record, as `RecordFormat::of_header` reads the header it had.
fn format_of(name: Option<&str>) -> Result<RecordFormat, String> {
    RecordFormat::of_header(name.map(str::as_bytes)).ok_or_else(|| name.unwrap_or_default().to_owned())
}

/// Stores again every consume-stage dead letter of the events topic whose record decodes now.
pub async fn replay(config: &ConsumerConfig) -> Result<ReplayReport, ConsumerError> {
    let letters = tokio::task::block_in_place(|| read_letters(config))?;
    let store = EventStore::new(&config.common.clickhouse);
    let mut report = ReplayReport { letters: letters.len(), ..ReplayReport::default() };
    for (_, _, letter) in letters {
        let Some(source) = letter.source.as_ref().filter(|s| s.topic == config.events_topic) else {
            continue;
        };
        if letter.stage != Stage::Consume {
            continue;
        }
        // Decoded as the consumer decodes a polled record, at the position it was polled from.
        let mut record = Pending::decode(RawRecord {
            partition: source.partition,
            offset: source.offset,
            kafka_timestamp_ms: letter.received_at_ms,
            original: letter.original_bytes().unwrap_or_default().into(),
            format: format_of(letter.format.as_deref()),
        });
        let Ok(rows) = &mut record.decoded else {
            report.still_undecodable += 1;
            continue;
        };
        report.replayable += 1;
        let offsets = (source.offset, source.offset);
        let stored = store.stored_positions(source.partition, offsets, rows.iter()).await?;
        let before = rows.len();
        rows.retain(|row| !stored.contains(&(source.offset, row.kafka_index)));
        report.rows_already_stored += before - rows.len();
        if rows.is_empty() {
            continue;
        }
        let missing = rows_of(std::slice::from_ref(&record));
        store.insert(&missing).await?;
        report.rows_inserted += missing.len();
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::event_id_of;

    #[test]
    fn a_rejected_event_keeps_its_event_id_in_the_listing() {
        assert_eq!(event_id_of(Some(r#"{"eventId":"abc","tokens":-1}"#)).as_deref(), Some("abc"));
        assert_eq!(event_id_of(Some(r#"{"tokens":-1}"#)), None);
        assert_eq!(event_id_of(Some("not json")), None);
        assert_eq!(event_id_of(Some(r#"{"eventId":7}"#)), None);
        assert_eq!(event_id_of(None), None);
    }
}
