//! The dead-letter topic's daily archive, so nothing rejected is lost when the topic's retention
//! expires: every record of a closed UTC day (by its Kafka timestamp) as JSON lines, zstd, under
//! `dead-letters/date=2026-11-29/`, with a manifest written last as the commit point (the months'
//! convention). A day is closed at its end + `dlq_margin`. It is read by offsets: per partition,
//! from the first offset whose timestamp is at or after the day's start to the first at or after
//! its end (Kafka's offsets-for-times), so a re-run reads exactly the same records, and a
//! second archiver writes the same objects. The topic's retention must outlast the margin (Kafka's
//! default, 7 days, against one hour).
//!
//! A line: `{"partition":0,"offset":41,"timestamp_ms":…,"key":"org-1","record":{…}}`, `record`
//! being the dead letter as the ingest or the consumer wrote it (JSON; a value that is not JSON
//! is kept as a string in `record_text`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::config::ArchiverConfig;
use crate::error::ArchiveError;
use crate::store::Archive;

pub const FORMAT: &str = "tally-dead-letters-manifest";
const TIMEOUT: Duration = Duration::from_secs(10);

/// The offsets of one partition a day spans: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub partition: i32,
    pub start: i64,
    pub end: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayFile {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayManifest {
    pub format: String,
    pub day: String,
    pub topic: String,
    pub created_at: String,
    pub spans: Vec<Span>,
    pub records: u64,
    /// Records per reason code (`invalid_timestamp`, `undecodable_record`, …).
    pub reasons: BTreeMap<String, u64>,
    /// None for a day without dead letters.
    pub file: Option<DayFile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum DayOutcome {
    Archived { records: u64, bytes: u64 },
    UpToDate { records: u64 },
    Failed { reason: String },
}

#[derive(Debug, Serialize)]
pub struct DayReport {
    pub dead_letters: String,
    #[serde(flatten)]
    pub outcome: DayOutcome,
}

fn prefix(day: NaiveDate) -> String {
    format!("dead-letters/date={}/", day.format("%Y-%m-%d"))
}

pub fn manifest_key(day: NaiveDate) -> String {
    format!("{}manifest-v0001.json", prefix(day))
}

fn start_ms(day: NaiveDate) -> i64 {
    day.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc().timestamp_millis()
}

/// The closed days of the look-back window, oldest first: a day is closed once its end plus the
/// margin has passed.
pub fn closed_days(now: DateTime<Utc>, look_back_days: u32, margin: chrono::Duration) -> Vec<NaiveDate> {
    let today = now.date_naive();
    (1..=i64::from(look_back_days))
        .rev()
        .map(|back| today - chrono::Duration::days(back))
        .filter(|day| {
            let end = day.succ_opt().map_or(i64::MAX, start_ms);
            chrono::Duration::milliseconds(now.timestamp_millis() - end) >= margin
        })
        .collect()
}

fn kafka_error(day: NaiveDate, e: impl std::fmt::Display) -> ArchiveError {
    ArchiveError::Mismatch { month: format!("dead letters of {day}"), reason: format!("kafka: {e}") }
}

fn consumer(config: &ArchiverConfig) -> Result<BaseConsumer, rdkafka::error::KafkaError> {
    config
        .common
        .kafka_security
        .apply(&mut ClientConfig::new())
        .set("bootstrap.servers", &config.kafka_brokers)
        .set("group.id", "tally-archiver-dead-letters")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()
}

/// Archives every closed day of the look-back window that has no manifest yet.
pub async fn run(config: &ArchiverConfig, archive: &Archive, now: DateTime<Utc>) -> Vec<DayReport> {
    let mut reports = Vec::new();
    for day in closed_days(now, config.dlq_days, config.dlq_margin) {
        let outcome = match archive_day(config, archive, day).await {
            Ok(outcome) => outcome,
            Err(error) => {
                tracing::error!(day = %day, error = %error, "dead letters of a day failed");
                DayOutcome::Failed { reason: error.to_string() }
            }
        };
        reports.push(DayReport { dead_letters: day.to_string(), outcome });
    }
    reports
}

async fn archive_day(
    config: &ArchiverConfig,
    archive: &Archive,
    day: NaiveDate,
) -> Result<DayOutcome, ArchiveError> {
    if let Some(bytes) = archive.get(&manifest_key(day)).await? {
        let manifest: DayManifest = serde_json::from_slice(&bytes).map_err(|e| ArchiveError::Manifest {
            key: manifest_key(day),
            reason: format!("not a dead-letter manifest: {e}"),
        })?;
        return Ok(DayOutcome::UpToDate { records: manifest.records });
    }
    let spool =
        std::env::temp_dir().join(format!("tally-dlq-{}-{}", std::process::id(), uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&spool).map_err(ArchiveError::Spool)?;
    let local = spool.join("dead-letters.jsonl.zst");
    let (config2, local2) = (config.clone(), local.clone());
    let read = tokio::task::spawn_blocking(move || read_day(&config2, day, &local2))
        .await
        .map_err(|e| kafka_error(day, e))?;
    let result = match read {
        Ok(read) => publish(config, archive, day, read, &local).await,
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_dir_all(&spool);
    result
}

struct DayRead {
    spans: Vec<Span>,
    records: u64,
    reasons: BTreeMap<String, u64>,
}

/// Reads the day's records of every partition into a zstd JSON-lines file (blocking: librdkafka).
fn read_day(config: &ArchiverConfig, day: NaiveDate, local: &Path) -> Result<DayRead, ArchiveError> {
    let topic = config.dlq_topic.as_str();
    let consumer = consumer(config).map_err(|e| kafka_error(day, e))?;
    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT).map_err(|e| kafka_error(day, e))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let (start, end) = (start_ms(day), day.succ_opt().map_or(i64::MAX, start_ms));
    let at = |ms: i64| -> Result<BTreeMap<i32, i64>, ArchiveError> {
        let mut list = TopicPartitionList::new();
        for &p in &partitions {
            list.add_partition_offset(topic, p, Offset::Offset(ms)).map_err(|e| kafka_error(day, e))?;
        }
        let found = consumer.offsets_for_times(list, TIMEOUT).map_err(|e| kafka_error(day, e))?;
        let mut offsets = BTreeMap::new();
        for element in found.elements() {
            let offset = match element.offset() {
                Offset::Offset(o) => o,
                // No record at or after the time: the partition's end.
                _ => {
                    consumer
                        .fetch_watermarks(topic, element.partition(), TIMEOUT)
                        .map_err(|e| kafka_error(day, e))?
                        .1
                }
            };
            offsets.insert(element.partition(), offset);
        }
        Ok(offsets)
    };
    let (starts, ends) = (at(start)?, at(end)?);
    let spans: Vec<Span> = partitions
        .iter()
        .map(|&p| Span { partition: p, start: starts[&p], end: ends[&p].max(starts[&p]) })
        .collect();
    let file = std::fs::File::create(local).map_err(ArchiveError::Spool)?;
    let mut out = zstd::Encoder::new(file, 3).map_err(ArchiveError::Spool)?;
    let mut read = DayRead { spans: spans.clone(), records: 0, reasons: BTreeMap::new() };
    for span in spans.iter().filter(|s| s.end > s.start) {
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, span.partition, Offset::Offset(span.start))
            .map_err(|e| kafka_error(day, e))?;
        consumer.assign(&list).map_err(|e| kafka_error(day, e))?;
        let mut next = span.start;
        while next < span.end {
            let message = match consumer.poll(TIMEOUT) {
                Some(message) => message.map_err(|e| kafka_error(day, e))?,
                None => {
                    return Err(kafka_error(
                        day,
                        format!(
                            "no record at offset {next} of partition {} within {TIMEOUT:?}",
                            span.partition
                        ),
                    ))
                }
            };
            next = message.offset() + 1;
            if message.offset() >= span.end {
                break;
            }
            let payload = message.payload().unwrap_or_default();
            let mut line = serde_json::json!({
                "partition": span.partition,
                "offset": message.offset(),
                "timestamp_ms": message.timestamp().to_millis(),
                "key": message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            });
            match serde_json::from_slice::<serde_json::Value>(payload) {
                Ok(record) => {
                    let reason =
                        record.get("reason").and_then(|r| r.as_str()).unwrap_or("unknown").to_owned();
                    *read.reasons.entry(reason).or_default() += 1;
                    line["record"] = record;
                }
                Err(_) => {
                    *read.reasons.entry("not_json".into()).or_default() += 1;
                    line["record_text"] = String::from_utf8_lossy(payload).into_owned().into();
                }
            }
            serde_json::to_writer(&mut out, &line).map_err(|e| ArchiveError::Spool(e.into()))?;
            out.write_all(b"\n").map_err(ArchiveError::Spool)?;
            read.records += 1;
        }
    }
    out.finish().map_err(ArchiveError::Spool)?.sync_all().map_err(ArchiveError::Spool)?;
    Ok(read)
}

/// Uploads the day's file, reads it back (size, SHA-256, line count), then writes the manifest.
async fn publish(
    config: &ArchiverConfig,
    archive: &Archive,
    day: NaiveDate,
    read: DayRead,
    local: &Path,
) -> Result<DayOutcome, ArchiveError> {
    let file = if read.records == 0 {
        None
    } else {
        let key = format!("{}part-00000.jsonl.zst", prefix(day));
        let (bytes, sha256) = archive.upload_file(&key, local).await?;
        let back = local.with_extension("back");
        let (back_bytes, back_sha) = archive.download(&key, &back).await?;
        let lines = count_lines(&back)?;
        if (back_bytes, &back_sha, lines) != (bytes, &sha256, read.records) {
            return Err(ArchiveError::Manifest {
                key,
                reason: format!(
                    "read back as {back_bytes} bytes, {lines} records; wrote {bytes} bytes, {} records",
                    read.records
                ),
            });
        }
        Some(DayFile { path: key, bytes, sha256 })
    };
    let bytes = file.as_ref().map_or(0, |f| f.bytes);
    let manifest = DayManifest {
        format: FORMAT.into(),
        day: day.to_string(),
        topic: config.dlq_topic.clone(),
        created_at: Utc::now().to_rfc3339(),
        spans: read.spans,
        records: read.records,
        reasons: read.reasons,
        file,
    };
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| ArchiveError::Manifest { key: manifest_key(day), reason: e.to_string() })?;
    archive.put(&manifest_key(day), json).await?;
    Ok(DayOutcome::Archived { records: manifest.records, bytes })
}

fn count_lines(path: &Path) -> Result<u64, ArchiveError> {
    use std::io::BufRead;
    let decoder = zstd::Decoder::new(std::fs::File::open(path).map_err(ArchiveError::Spool)?)
        .map_err(ArchiveError::Spool)?;
    let mut lines = 0u64;
    for line in std::io::BufReader::new(decoder).lines() {
        line.map_err(ArchiveError::Spool)?;
        lines += 1;
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_is_closed_once_its_end_and_the_margin_have_passed() {
        let now =
            DateTime::parse_from_rfc3339("2026-11-30T00:30:00Z").unwrap_or_default().with_timezone(&Utc);
        let hour = chrono::Duration::hours(1);
        let days = closed_days(now, 3, hour);
        let names: Vec<String> = days.iter().map(ToString::to_string).collect();
        // 29 November ended 30 minutes ago: not closed with a one-hour margin.
        assert_eq!(names, ["2026-11-27", "2026-11-28"]);
        assert_eq!(closed_days(now, 3, chrono::Duration::zero()).len(), 3);
        assert!(closed_days(now, 0, hour).is_empty());
    }
}
