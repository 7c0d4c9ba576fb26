//! The dead-letter topic's daily archive against the real local Kafka and a local directory:
//! closed days archived with every record once, the open day left, a re-run adding nothing.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::io::BufRead;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tally_archiver::config::ArchiverConfig;
use tally_archiver::dead_letters::{self, DayManifest, DayOutcome};
use tally_archiver::store::Archive;
use tally_common::config::Env;
use tally_testkit::{create_topic, delete_topics, kafka_brokers, unique_name};

fn ms(text: &str) -> i64 {
    DateTime::parse_from_rfc3339(text).unwrap().timestamp_millis()
}

#[tokio::test]
async fn closed_days_of_the_dead_letter_topic_are_archived_once_each() {
    let topic = unique_name("dlq");
    create_topic(&topic, 3).await;
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", kafka_brokers()).create().unwrap();
    // Dead letters on 27, 28 and 29 November (by their Kafka timestamp), one not JSON, and two on
    // the 30th, which is not closed at "now" (30 November 00:30 with a one-hour margin).
    let letters = [
        ("2026-11-27T10:00:00Z", r#"{"stage":"ingest","reason":"invalid_timestamp","org_id":"org-a"}"#),
        (
            "2026-11-28T23:59:59.999Z",
            r#"{"stage":"consumer","reason":"undecodable_record","org_id":"org-b"}"#,
        ),
        ("2026-11-28T00:00:00Z", r#"{"stage":"ingest","reason":"invalid_timestamp","org_id":"org-a"}"#),
        ("2026-11-28T12:00:00Z", "not json \u{1F4A5}"),
        ("2026-11-29T23:30:00Z", r#"{"stage":"ingest","reason":"cost_mismatch","org_id":"org-c"}"#),
        ("2026-11-30T00:10:00Z", r#"{"stage":"ingest","reason":"invalid_timestamp","org_id":"org-a"}"#),
        ("2026-11-30T00:20:00Z", r#"{"stage":"ingest","reason":"invalid_timestamp","org_id":"org-b"}"#),
    ];
    for (i, (at, value)) in letters.iter().enumerate() {
        let key = format!("org-{i}");
        let record =
            FutureRecord::to(&topic).key(&key).payload(*value).partition((i % 3) as i32).timestamp(ms(at));
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    }
    let dir = std::env::temp_dir().join(unique_name("dlq-archive"));
    let config = ArchiverConfig::from_env(&Env::from_pairs([
        ("TALLY_ARCHIVE_URL", format!("file://{}", dir.display())),
        ("TALLY_KAFKA_BROKERS", kafka_brokers()),
        ("TALLY_DLQ_TOPIC", topic.clone()),
        ("TALLY_ARCHIVE_DLQ_DAYS", "4".to_owned()),
        ("TALLY_ARCHIVE_DLQ_MARGIN_MINUTES", "60".to_owned()),
    ]))
    .unwrap();
    let store = Archive::open(&config).unwrap();
    let now = DateTime::parse_from_rfc3339("2026-11-30T00:30:00Z").unwrap().with_timezone(&Utc);

    let reports = dead_letters::run(&config, &store, now).await;
    let got: Vec<(String, DayOutcome)> = reports.into_iter().map(|r| (r.dead_letters, r.outcome)).collect();
    let records: Vec<(&str, u64)> = got
        .iter()
        .map(|(day, outcome)| match outcome {
            DayOutcome::Archived { records, .. } => (day.as_str(), *records),
            other => panic!("{day}: {other:?}"),
        })
        .collect();
    // 29 November ended 30 minutes before "now": not closed yet.
    assert_eq!(records, [("2026-11-26", 0), ("2026-11-27", 1), ("2026-11-28", 3)]);

    let manifest: DayManifest = serde_json::from_slice(
        &std::fs::read(dir.join("dead-letters/date=2026-11-28/manifest-v0001.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest.records, 3);
    assert_eq!(manifest.reasons.get("invalid_timestamp"), Some(&1));
    assert_eq!(manifest.reasons.get("undecodable_record"), Some(&1));
    assert_eq!(manifest.reasons.get("not_json"), Some(&1));
    let file = manifest.file.unwrap();
    let bytes = std::fs::read(dir.join(&file.path)).unwrap();
    assert_eq!(bytes.len() as u64, file.bytes);
    let lines: Vec<serde_json::Value> = std::io::BufReader::new(zstd::Decoder::new(&bytes[..]).unwrap())
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().any(|l| l["record_text"] == "not json \u{1F4A5}"), "kept as it was: {lines:?}");
    assert!(lines.iter().any(|l| l["record"]["reason"] == "undecodable_record"
        && l["timestamp_ms"] == ms("2026-11-28T23:59:59.999Z")));

    // Later the same day: the 29th is closed now; the others are up to date, nothing rewritten.
    let later = now + chrono::Duration::hours(2);
    let again: Vec<(String, DayOutcome)> = dead_letters::run(&config, &store, later)
        .await
        .into_iter()
        .map(|r| (r.dead_letters, r.outcome))
        .collect();
    assert_eq!(again[2], ("2026-11-28".to_owned(), DayOutcome::UpToDate { records: 3 }));
    assert!(
        matches!(again[3], (ref day, DayOutcome::Archived { records: 1, .. }) if day == "2026-11-29"),
        "{again:?}"
    );
    delete_topics(&[&topic]).await;
    let _ = std::fs::remove_dir_all(dir);
}
