//! Exactly once through crashes: the real `tally-consumer` binary is killed again and again while
//! records flow — by the failpoint that aborts between an insert and its offset commit (the
//! window recovery exists for) and by `kill -9` at random moments — and restarted each time.
//! Afterwards: raw rows == events produced, distinct event ids == rows, and the hourly and daily
//! rollups equal the same aggregates over the raw table.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clickhouse::Row;
use rand::Rng;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;
use tally_common::ch::ChConfig;
use tally_common::testing::{
    create_topic, delete_topics, drop_database, kafka_brokers, migrated_database, unique_name,
};
use tally_schemas::record::encode_event;
use tally_schemas::{CostSource, Event, Status};

const ORGS: [&str; 3] = ["org-a", "org-b", "org-c"];

fn event(n: u64) -> Event {
    let now = chrono::Utc::now().timestamp_millis();
    Event {
        event_id: uuid::Uuid::now_v7(),
        org_id: ORGS[(n % 3) as usize].into(),
        received_at_ms: now,
        timestamp_ms: now - (n as i64 % 50) * 3_600_000 - 17,
        provider: "openai".into(),
        model: ["gpt-4o", "gpt-4o-mini", "o1-mini"][(n % 3) as usize].into(),
        prompt_tokens: (n % 1000) as u32,
        completion_tokens: (n % 300) as u32,
        total_tokens: (n % 1000 + n % 300) as u32,
        cost_nanos: 1_000_000_001 + n as i64,
        cost_source: CostSource::Computed,
        latency_ms: (n % 4000) as u32,
        status: if n.is_multiple_of(7) { Status::Error } else { Status::Success },
        http_status: 0,
        error: String::new(),
        execution_id: String::new(),
        agent_id: String::new(),
        user_id: format!("u{}", n % 11),
        service: String::new(),
        action: String::new(),
        request_id: String::new(),
        input_bytes: 0,
        output_bytes: 0,
        metadata: Vec::new(),
    }
}

/// Produces `records` records of `per_record` events, keyed by org; returns the events produced.
async fn produce(topic: &str, first: u64, records: u64, per_record: u64) -> u64 {
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", kafka_brokers()).set("acks", "all").create().unwrap();
    for r in 0..records {
        let mut payload = Vec::new();
        for i in 0..per_record {
            encode_event(&event(first + r * per_record + i), &mut payload);
        }
        let key = ORGS[(r % 3) as usize];
        producer
            .send(FutureRecord::to(topic).key(key).payload(&payload), Duration::from_secs(10))
            .await
            .unwrap();
    }
    records * per_record
}

fn spawn_consumer(
    clickhouse: &ChConfig,
    topic: &str,
    dlq: &str,
    group: &str,
    crash_probability: f64,
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tally-consumer"))
        .env("TALLY_KAFKA_BROKERS", kafka_brokers())
        .env("TALLY_CLICKHOUSE_URL", &clickhouse.url)
        .env("TALLY_CLICKHOUSE_DATABASE", &clickhouse.database)
        .env("TALLY_EVENTS_TOPIC", topic)
        .env("TALLY_DLQ_TOPIC", dlq)
        .env("TALLY_CONSUMER_GROUP", group)
        .env("TALLY_CONSUMER_INSTANCE_ID", format!("{group}-0"))
        .env("TALLY_LISTEN_ADDR", "127.0.0.1:0")
        .env("TALLY_BATCH_MAX_ROWS", "300")
        .env("TALLY_BATCH_MAX_WAIT_MS", "100")
        .env("TALLY_FAILPOINT_CRASH_AFTER_INSERT", crash_probability.to_string())
        .env("TALLY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[derive(Row, Deserialize, Debug)]
struct Raw {
    rows: u64,
    ids: u64,
}

#[derive(Row, Deserialize, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Bucket {
    bucket: u32,
    model: String,
    events: u64,
    errors: u64,
    tokens: u64,
    cost: i64,
}

async fn raw(clickhouse: &ChConfig) -> Raw {
    let sql =
        format!("SELECT count() AS rows, uniqExact(event_id) AS ids FROM {}", clickhouse.table("events"));
    clickhouse.client().query(&sql).fetch_one().await.unwrap()
}

async fn buckets(clickhouse: &ChConfig, sql: String) -> Vec<Bucket> {
    let mut rows: Vec<Bucket> = clickhouse.client().query(&sql).fetch_all().await.unwrap();
    rows.sort();
    rows
}

#[tokio::test]
async fn crashes_between_insert_and_commit_and_kill_9_neither_lose_nor_duplicate() {
    let clickhouse = migrated_database("exactly").await;
    let (topic, dlq, group) = (unique_name("events"), unique_name("dlq"), unique_name("group"));
    create_topic(&topic, 4).await;
    create_topic(&dlq, 1).await;
    let mut expected = produce(&topic, 0, 600, 50).await;
    // More records arrive while the consumer is being crashed.
    let late_topic = topic.clone();
    let late = tokio::spawn(async move {
        let mut produced = 0;
        for wave in 0..6u64 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            produced += produce(&late_topic, 1_000_000 + wave * 10_000, 10, 40).await;
        }
        produced
    });

    let (mut failpoint_crashes, mut kills) = (0, 0);
    let started = Instant::now();
    // Alternate: the failpoint (abort between insert and commit), then kill -9 at a random moment.
    for round in 0..10 {
        if started.elapsed() > Duration::from_secs(120) {
            break;
        }
        let use_failpoint = round % 2 == 0;
        let mut child =
            spawn_consumer(&clickhouse, &topic, &dlq, &group, if use_failpoint { 0.3 } else { 0.0 });
        let wait_ms = if use_failpoint { 5000 } else { rand::rng().random_range(200..1200) };
        let deadline = Instant::now() + Duration::from_millis(wait_ms);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(!status.success(), "the consumer only stops here by crashing");
                failpoint_crashes += 1;
                break;
            }
            if Instant::now() >= deadline {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    expected += late.await.unwrap();
    assert!(
        failpoint_crashes >= 3 && kills >= 3,
        "crashed {failpoint_crashes} times by failpoint, killed {kills} times"
    );

    // A last consumer without the failpoint drains the rest.
    let mut child = spawn_consumer(&clickhouse, &topic, &dlq, &group, 0.0);
    let drained = Instant::now();
    while raw(&clickhouse).await.rows < expected && drained.elapsed() < Duration::from_secs(90) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // anything extra would show up now
    child.kill().unwrap();
    child.wait().unwrap();

    let totals = raw(&clickhouse).await;
    assert_eq!(
        totals.rows, expected,
        "every event stored exactly once (failpoint {failpoint_crashes}, kill -9 {kills})"
    );
    assert_eq!(totals.ids, totals.rows, "no event id twice");
    let raw_hourly = buckets(
        &clickhouse,
        format!(
            "SELECT toUInt32(toStartOfHour(timestamp)) AS bucket, model, count() AS events, toUInt64(countIf(status = 'error')) AS errors, \
             sum(toUInt64(total_tokens)) AS tokens, sum(cost_nanos) AS cost FROM {} GROUP BY bucket, model",
            clickhouse.table("events")
        ),
    )
    .await;
    let rollup_hourly = buckets(
        &clickhouse,
        format!(
            "SELECT toUInt32(hour) AS bucket, model, toUInt64(countMerge(events)) AS events, sumMerge(errors) AS errors, \
             sumMerge(total_tokens_sum) AS tokens, sumMerge(cost_nanos_sum) AS cost FROM {} GROUP BY bucket, model",
            clickhouse.table("rollup_hourly")
        ),
    )
    .await;
    assert_eq!(rollup_hourly, raw_hourly, "hourly rollup == raw");
    let raw_daily = buckets(
        &clickhouse,
        format!(
            "SELECT toUInt32(toDate(timestamp)) AS bucket, model, count() AS events, toUInt64(countIf(status = 'error')) AS errors, \
             sum(toUInt64(total_tokens)) AS tokens, sum(cost_nanos) AS cost FROM {} GROUP BY bucket, model",
            clickhouse.table("events")
        ),
    )
    .await;
    let rollup_daily = buckets(
        &clickhouse,
        format!(
            "SELECT toUInt32(day) AS bucket, model, toUInt64(countMerge(events)) AS events, sumMerge(errors) AS errors, \
             sumMerge(total_tokens_sum) AS tokens, sumMerge(cost_nanos_sum) AS cost FROM {} GROUP BY bucket, model",
            clickhouse.table("rollup_daily")
        ),
    )
    .await;
    assert_eq!(rollup_daily, raw_daily, "daily rollup == raw");
    delete_topics(&[&topic, &dlq]).await;
    drop_database(&clickhouse).await;
}
