//! The consumer against the real local Kafka and ClickHouse, each test in its own topics,
//! consumer group and database.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::Duration;

use clickhouse::Row;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use serde::Deserialize;
use tally_common::ch::ChConfig;
use tally_common::config::Env;
use tally_consumer::config::ConsumerConfig;
use tally_schemas::record::{
    binary, encode_event, DeadLetter, RecordFormat, Stage, HEADER_EVENTS, HEADER_FORMAT,
};
use tally_schemas::{CostSource, Event, Status};
use tally_testkit::{
    create_topic, delete_topics, drop_database, kafka_brokers, migrated_database, unique_name,
};
use tokio_util::sync::CancellationToken;

fn sample_event(org: &str, n: u32) -> Event {
    let now = chrono::Utc::now().timestamp_millis();
    Event {
        event_id: uuid::Uuid::now_v7(),
        org_id: org.into(),
        received_at_ms: now,
        timestamp_ms: now - i64::from(n) * 61_000 - 7,
        provider: "openai".into(),
        model: if n.is_multiple_of(2) { "gpt-4o".into() } else { "gpt-4o-mini".into() },
        prompt_tokens: 100 + n,
        completion_tokens: 50 + n,
        total_tokens: 150 + 2 * n,
        cost_nanos: 1_000_000_007 + i64::from(n),
        cost_source: CostSource::Client,
        latency_ms: 100 * n,
        status: if n.is_multiple_of(3) { Status::Error } else { Status::Success },
        http_status: 0,
        error: String::new(),
        execution_id: format!("exec-{n}"),
        agent_id: String::new(),
        user_id: format!("user-{}", n % 2),
        service: "chat".into(),
        action: String::new(),
        request_id: String::new(),
        input_bytes: 0,
        output_bytes: 0,
        metadata: vec![("k".into(), format!("v{n}"))],
    }
}

/// The first dead letter of `dlq` (waits up to 20 s for it).
async fn first_dead_letter(dlq: &str) -> DeadLetter {
    dead_letters(dlq, 1).await.remove(0)
}

/// The first `count` dead letters of `dlq` (waits up to 20 s for each).
async fn dead_letters(dlq: &str, count: usize) -> Vec<DeadLetter> {
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", unique_name("reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    reader.subscribe(&[dlq]).unwrap();
    let mut letters = Vec::new();
    while letters.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(20), reader.recv()).await.unwrap().unwrap();
        letters.push(serde_json::from_slice(message.payload().unwrap()).unwrap());
    }
    letters
}

async fn produce(topic: &str, key: &str, payload: &[u8]) {
    produce_all(topic, key, &[payload.to_vec()]).await;
}

/// Produces `payloads` in order, one record each, all with `key` (one partition).
async fn produce_all(topic: &str, key: &str, payloads: &[Vec<u8>]) {
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", kafka_brokers()).set("acks", "all").create().unwrap();
    for payload in payloads {
        producer
            .send(FutureRecord::to(topic).key(key).payload(payload), Duration::from_secs(10))
            .await
            .unwrap();
    }
}

/// Produces `payload` to `topic` under `key` with `headers` (name, value), acknowledged by the broker.
async fn produce_with_headers(topic: &str, key: &str, payload: &[u8], headers: &[(&str, &str)]) {
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", kafka_brokers()).set("acks", "all").create().unwrap();
    let mut owned = OwnedHeaders::new();
    for (name, value) in headers {
        owned = owned.insert(Header { key: name, value: Some(*value) });
    }
    producer
        .send(FutureRecord::to(topic).key(key).payload(payload).headers(owned), Duration::from_secs(10))
        .await
        .unwrap();
}

/// A migrated database of its own, an events topic of `partitions`, a dead-letter topic and a
/// consumer group name, all fresh.
async fn fresh_pipeline(name: &str, partitions: i32) -> (ChConfig, String, String, String) {
    let clickhouse = migrated_database(name).await;
    let (topic, dlq, group) = (unique_name("events"), unique_name("dlq"), unique_name("group"));
    create_topic(&topic, partitions).await;
    create_topic(&dlq, 1).await;
    (clickhouse, topic, dlq, group)
}

struct Consumer_ {
    metrics_url: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), tally_consumer::error::ConsumerError>>,
}

async fn start_consumer(clickhouse: &ChConfig, topic: &str, dlq: &str, group: &str) -> Consumer_ {
    start_consumer_with(clickhouse, topic, dlq, group, &[]).await
}

async fn start_consumer_with(
    clickhouse: &ChConfig,
    topic: &str,
    dlq: &str,
    group: &str,
    extra: &[(&str, &str)],
) -> Consumer_ {
    let mut env = Env::from_pairs([
        ("TALLY_KAFKA_BROKERS", kafka_brokers()),
        ("TALLY_CLICKHOUSE_URL", clickhouse.url.clone()),
        ("TALLY_CLICKHOUSE_DATABASE", clickhouse.database.clone()),
        ("TALLY_EVENTS_TOPIC", topic.to_owned()),
        ("TALLY_DLQ_TOPIC", dlq.to_owned()),
        ("TALLY_CONSUMER_GROUP", group.to_owned()),
        ("TALLY_BATCH_MAX_WAIT_MS", "200".to_owned()),
    ]);
    for (key, value) in extra {
        env = env.with(*key, *value);
    }
    let config = ConsumerConfig::from_env(&env).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_url = format!("http://{}/metrics", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(tally_consumer::run(config, listener, shutdown.clone()));
    Consumer_ { metrics_url, shutdown, task }
}

impl Consumer_ {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

#[derive(Row, Deserialize, Debug, PartialEq)]
struct Totals {
    rows: u64,
    ids: u64,
    positions: u64,
    tokens: u64,
    cost: i64,
    errors: u64,
}

async fn raw_totals(clickhouse: &ChConfig) -> Totals {
    clickhouse
        .client()
        .query(&format!(
            "SELECT count() AS rows, uniqExact(event_id) AS ids, uniqExact(kafka_partition, kafka_offset, kafka_index) AS positions, \
             sum(toUInt64(total_tokens)) AS tokens, sum(cost_nanos) AS cost, toUInt64(countIf(status = 'error')) AS errors FROM {}",
            clickhouse.table("events")
        ))
        .fetch_one()
        .await
        .unwrap()
}

async fn rollup_totals(clickhouse: &ChConfig, table: &str) -> (u64, u64, i64, u64) {
    #[derive(Row, Deserialize)]
    struct R {
        rows: u64,
        tokens: u64,
        cost: i64,
        errors: u64,
    }
    let r: R = clickhouse
        .client()
        .query(&format!(
            "SELECT toUInt64(countMerge(events)) AS rows, sumMerge(total_tokens_sum) AS tokens, sumMerge(cost_nanos_sum) AS cost, sumMerge(errors) AS errors FROM {}",
            clickhouse.table(table)
        ))
        .fetch_one()
        .await
        .unwrap();
    (r.rows, r.tokens, r.cost, r.errors)
}

/// The rollup's totals once it holds `rows` events: an INSERT makes its rows visible in `events`
/// before its materialized views have written the rollups, so a reader can see raw rows whose
/// rollup rows are a moment away.
async fn settled_rollup_totals(clickhouse: &ChConfig, table: &str, rows: u64) -> (u64, u64, i64, u64) {
    let mut totals = rollup_totals(clickhouse, table).await;
    for _ in 0..100 {
        if totals.0 >= rows {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        totals = rollup_totals(clickhouse, table).await;
    }
    totals
}

/// Both rollups hold exactly the stored rows' count, tokens and cost (once the views caught up).
async fn rollups_match_raw(clickhouse: &ChConfig, totals: &Totals) {
    for rollup in ["rollup_hourly", "rollup_daily"] {
        let (rows, tokens, cost, _) = settled_rollup_totals(clickhouse, rollup, totals.rows).await;
        assert_eq!((rows, tokens, cost), (totals.rows, totals.tokens, totals.cost), "{rollup}");
    }
}

async fn wait_for_rows(clickhouse: &ChConfig, expected: u64) {
    for _ in 0..150 {
        if raw_totals(clickhouse).await.rows >= expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("rows never reached {expected}: {:?}", raw_totals(clickhouse).await);
}

#[tokio::test]
async fn stores_records_once_dead_letters_poison_and_commits_after_insert() {
    let (clickhouse, topic, dlq, group) = fresh_pipeline("consumer", 2).await;
    for (record, org) in ["org-a", "org-b", "org-c"].iter().enumerate() {
        let mut payload = Vec::new();
        for n in 0..5 {
            encode_event(&sample_event(org, record as u32 * 5 + n), &mut payload);
        }
        produce(&topic, org, &payload).await;
    }
    produce(&topic, "org-a", b"\xff\x00 this is not json").await;

    let consumer = start_consumer(&clickhouse, &topic, &dlq, &group).await;
    wait_for_rows(&clickhouse, 15).await;
    let totals = raw_totals(&clickhouse).await;
    assert_eq!((totals.rows, totals.ids, totals.positions), (15, 15, 15));
    let expected_tokens: u64 = (0..15).map(|n| 150 + 2 * n).sum();
    let expected_cost: i64 = (0..15).map(|n| 1_000_000_007 + n).sum();
    assert_eq!((totals.tokens, totals.cost, totals.errors), (expected_tokens, expected_cost, 5));
    for rollup in ["rollup_hourly", "rollup_daily"] {
        assert_eq!(
            settled_rollup_totals(&clickhouse, rollup, 15).await,
            (15, expected_tokens, expected_cost, 5),
            "{rollup} equals raw"
        );
    }

    // The poison record is in the dead-letter topic with its position and original bytes.
    let letter = first_dead_letter(&dlq).await;
    assert_eq!(letter.stage, Stage::Consume);
    assert_eq!(letter.reason, "undecodable_record");
    assert_eq!(letter.source.as_ref().unwrap().topic, topic);
    assert_eq!(letter.original_bytes().unwrap(), b"\xff\x00 this is not json");

    // Once drained, the lag of every assigned partition reads 0 (sampled every 5 s).
    let mut lags = Vec::new();
    for _ in 0..40 {
        let metrics = reqwest::get(&consumer.metrics_url).await.unwrap().text().await.unwrap();
        lags = metrics
            .lines()
            .filter(|l| l.starts_with("tally_consumer_lag_records{"))
            .map(str::to_owned)
            .collect();
        if lags.len() == 2 && lags.iter().all(|l| l.ends_with(" 0")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(lags.len(), 2, "a lag gauge per assigned partition: {lags:?}");
    assert!(lags.iter().all(|l| l.ends_with(" 0")), "{lags:?}");
    consumer.stop().await;

    // Offsets were committed after the insert: the same group resumes after them, storing nothing twice.
    let again = start_consumer(&clickhouse, &topic, &dlq, &group).await;
    let mut payload = Vec::new();
    encode_event(&sample_event("org-d", 99), &mut payload);
    produce(&topic, "org-d", &payload).await;
    wait_for_rows(&clickhouse, 16).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let totals = raw_totals(&clickhouse).await;
    assert_eq!((totals.rows, totals.ids), (16, 16), "nothing re-inserted after restart");
    again.stop().await;
    delete_topics(&[&topic, &dlq]).await;
    drop_database(&clickhouse).await;
}

async fn metric(url: &str, name: &str) -> f64 {
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.parse().unwrap())
}

async fn count_where(clickhouse: &ChConfig, condition: &str) -> u64 {
    clickhouse
        .client()
        .query(&format!("SELECT count() FROM {} WHERE {condition}", clickhouse.table("events")))
        .fetch_one()
        .await
        .unwrap()
}

fn record(events: &[&Event]) -> Vec<u8> {
    let mut payload = Vec::new();
    for event in events {
        encode_event(event, &mut payload);
    }
    payload
}

/// `events` as a RowBinary record (`tally-format: RowBinary`).
fn binary_record(events: &[&Event]) -> Vec<u8> {
    let mut payload = Vec::new();
    for event in events {
        binary::encode_row(&event.borrowed(), &mut payload);
    }
    payload
}

#[tokio::test]
async fn retried_event_ids_are_stored_once_within_the_window_even_after_a_restart() {
    let (clickhouse, topic, dlq, group) = fresh_pipeline("dedup", 2).await;
    let now = chrono::Utc::now().timestamp_millis();
    let [a, b, c, d, e] = [0, 1, 2, 3, 4].map(|n| sample_event("org-x", n));
    // The same id in another org is another event.
    let mut a_other_org = sample_event("org-y", 0);
    a_other_org.event_id = a.event_id;
    // Stored 25 h ago: outside the default 24 h window, so a retry of it now is stored again.
    let mut old = sample_event("org-x", 5);
    old.received_at_ms = now - 25 * 3600 * 1000;
    old.timestamp_ms = old.received_at_ms - 1000;

    produce(&topic, "org-x", &record(&[&a, &b, &c, &old])).await;
    produce(&topic, "org-y", &record(&[&a_other_org])).await;
    let consumer = start_consumer(&clickhouse, &topic, &dlq, &group).await;
    wait_for_rows(&clickhouse, 5).await;
    // A client retry (b again, d new) and d twice in one record.
    produce(&topic, "org-x", &record(&[&b, &d, &d])).await;
    wait_for_rows(&clickhouse, 6).await;
    assert_eq!(metric(&consumer.metrics_url, "tally_consumer_duplicates_dropped_total").await, 2.0);
    consumer.stop().await;

    // A new process rebuilds the window from ClickHouse: retries of a and c are still dropped.
    let mut old_again = old.clone();
    old_again.received_at_ms = now;
    old_again.timestamp_ms = now - 1000;
    let consumer = start_consumer(&clickhouse, &topic, &dlq, &group).await;
    produce(&topic, "org-x", &record(&[&a, &e, &c, &old_again])).await;
    wait_for_rows(&clickhouse, 8).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let totals = raw_totals(&clickhouse).await;
    assert_eq!(totals.rows, 8, "a b c old a' d | e old-again: {totals:?}");
    assert_eq!(
        count_where(&clickhouse, &format!("event_id = toUUID('{}')", a.event_id)).await,
        2,
        "one per org"
    );
    assert_eq!(count_where(&clickhouse, &format!("event_id = toUUID('{}')", old.event_id)).await, 2);
    for event in [&b, &c, &d, &e] {
        assert_eq!(count_where(&clickhouse, &format!("event_id = toUUID('{}')", event.event_id)).await, 1);
    }
    assert_eq!(metric(&consumer.metrics_url, "tally_consumer_duplicates_dropped_total").await, 2.0);
    assert!(metric(&consumer.metrics_url, "tally_consumer_dedup_ids").await >= 6.0);
    // The rollups saw exactly the stored rows.
    let totals = raw_totals(&clickhouse).await;
    rollups_match_raw(&clickhouse, &totals).await;
    consumer.stop().await;
    delete_topics(&[&topic, &dlq]).await;
    drop_database(&clickhouse).await;
}

/// A window bounded by `TALLY_DEDUP_MAX_IDS` forgets its oldest arrivals instead of growing, and
/// says so: a retry of an event that arrived before what it still remembers is stored again, a
/// retry of a recent one is dropped. A restarted consumer rebuilds the window within the bound.
#[tokio::test]
async fn a_bounded_dedup_window_forgets_its_oldest_ids_first_and_says_so() {
    let (clickhouse, topic, dlq, group) = fresh_pipeline("dedup_bound", 1).await;
    let now = chrono::Utc::now().timestamp_millis();
    let three_hours_ago = |n: u32| {
        let mut event = sample_event("org-x", n % 50);
        event.received_at_ms = now - 3 * 3600 * 1000;
        event.timestamp_ms = event.received_at_ms - 1000;
        event
    };
    let old: Vec<Event> = (0..700).map(three_hours_ago).collect();
    let recent: Vec<Event> = (0..700).map(|n| sample_event("org-x", n % 50)).collect();
    let bound = [("TALLY_DEDUP_MAX_IDS", "1000")];
    produce(&topic, "org-x", &record(&old.iter().collect::<Vec<_>>())).await;
    produce(&topic, "org-x", &record(&recent.iter().collect::<Vec<_>>())).await;
    let consumer = start_consumer_with(&clickhouse, &topic, &dlq, &group, &bound).await;
    wait_for_rows(&clickhouse, 1400).await;
    // Retries, stamped now by the ingest as a client's retry would be.
    let retry = |event: &Event| {
        let mut again = event.clone();
        again.received_at_ms = chrono::Utc::now().timestamp_millis();
        again
    };
    produce(&topic, "org-x", &record(&[&retry(&old[0]), &retry(&recent[0])])).await;
    wait_for_rows(&clickhouse, 1401).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let stored = |event: &Event| {
        let clickhouse = clickhouse.clone();
        let condition = format!("event_id = toUUID('{}')", event.event_id);
        async move { count_where(&clickhouse, &condition).await }
    };
    assert_eq!((stored(&old[0]).await, stored(&recent[0]).await), (2, 1));
    assert_eq!(metric(&consumer.metrics_url, "tally_consumer_dedup_evicted_total").await, 700.0);
    assert!(metric(&consumer.metrics_url, "tally_consumer_dedup_ids").await <= 1000.0);
    let remembered = metric(&consumer.metrics_url, "tally_consumer_dedup_window_seconds").await;
    assert!((3.0 * 3600.0 - 300.0..3.0 * 3600.0).contains(&remembered), "{remembered}");
    consumer.stop().await;

    // Restarted: the rebuild counts 1 401 ids by arrival slot and loads only the newest slot's 701
    // (recent, and old[0]'s retry): the 700 of three hours ago are not read.
    let consumer = start_consumer_with(&clickhouse, &topic, &dlq, &group, &bound).await;
    produce(&topic, "org-x", &record(&[&retry(&old[1]), &retry(&recent[1]), &retry(&old[0])])).await;
    wait_for_rows(&clickhouse, 1402).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!((stored(&old[1]).await, stored(&recent[1]).await, stored(&old[0]).await), (2, 1, 2));
    assert_eq!(raw_totals(&clickhouse).await.rows, 1402);
    assert_eq!(metric(&consumer.metrics_url, "tally_consumer_dedup_evicted_total").await, 700.0);
    // The 701 loaded and old[1]'s retry.
    assert_eq!(metric(&consumer.metrics_url, "tally_consumer_dedup_ids").await, 702.0);
    consumer.stop().await;
    delete_topics(&[&topic, &dlq]).await;
    drop_database(&clickhouse).await;
}

/// Under a backlog each batch is checked against the dedup window while the previous one is
/// inserted. A retry of an id of the batch being inserted is still dropped (confirmed once that
/// insert is done), and so are repeats inside a batch checked ahead.
#[tokio::test]
async fn duplicates_are_dropped_when_batches_are_checked_ahead_of_their_insert() {
    let (clickhouse, topic, dlq, group) = fresh_pipeline("dedup_ahead", 1).await;
    let events: Vec<Event> = (0..12).map(|n| sample_event("org-x", n)).collect();
    // One event per record, four rows per batch: [0 1 2 3] [1 4 4 5] [6 6 7 8] [9 10 11 7] [3 11].
    let order = [0, 1, 2, 3, 1, 4, 4, 5, 6, 6, 7, 8, 9, 10, 11, 7, 3, 11];
    let payloads: Vec<Vec<u8>> = order.iter().map(|&n| record(&[&events[n]])).collect();
    produce_all(&topic, "org-x", &payloads).await;
    let consumer =
        start_consumer_with(&clickhouse, &topic, &dlq, &group, &[("TALLY_BATCH_MAX_ROWS", "4")]).await;
    wait_for_rows(&clickhouse, 12).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let totals = raw_totals(&clickhouse).await;
    assert_eq!((totals.rows, totals.ids), (12, 12), "{totals:?}");
    assert_eq!(metric(&consumer.metrics_url, "tally_consumer_duplicates_dropped_total").await, 6.0);
    assert!(
        metric(&consumer.metrics_url, "tally_consumer_batches_prechecked_total").await >= 1.0,
        "the backlog was checked ahead"
    );
    rollups_match_raw(&clickhouse, &totals).await;
    consumer.stop().await;
    delete_topics(&[&topic, &dlq]).await;
    drop_database(&clickhouse).await;
}

/// Records in RowBinary (`tally-format: RowBinary`) are stored as JSONEachRow records are, in the
/// same batches; a damaged one, and one in a format the consumer does not read, are dead-lettered
/// with the reason, the failing row and column, and the format they came in (for `dlq replay`).
#[tokio::test]
async fn row_binary_records_are_stored_and_bad_ones_dead_lettered_with_their_format() {
    let (clickhouse, topic, dlq, group) = fresh_pipeline("rowbinary", 1).await;
    let send = |payload: Vec<u8>, format: Option<&'static str>| {
        let topic = topic.clone();
        async move {
            let headers: Vec<(&str, &str)> = format.map(|f| (HEADER_FORMAT, f)).into_iter().collect();
            produce_with_headers(&topic, "org-rb", &payload, &headers).await;
        }
    };
    let events: Vec<Event> = (0..6).map(|n| sample_event("org-rb", n)).collect();
    let all: Vec<&Event> = events.iter().collect();
    send(binary_record(&all[..3]), Some("RowBinary")).await;
    send(record(&all[3..5]), None).await;
    let mut damaged = binary_record(&all[5..]);
    damaged.truncate(damaged.len() - 3);
    send(damaged.clone(), Some("RowBinary")).await;
    send(record(&all[5..]), Some("Avro")).await;
    send(binary_record(&all[5..]), Some("RowBinary")).await;

    let consumer = start_consumer(&clickhouse, &topic, &dlq, &group).await;
    wait_for_rows(&clickhouse, 6).await;
    let totals = raw_totals(&clickhouse).await;
    assert_eq!((totals.rows, totals.ids, totals.positions), (6, 6, 6));
    let expected_tokens: u64 = (0..6).map(|n| 150 + 2 * n).sum();
    assert_eq!((totals.tokens, totals.errors), (expected_tokens, 2));
    rollups_match_raw(&clickhouse, &totals).await;
    // Each row at its own position: RowBinary rows get the record's offset and their index.
    let positions: Vec<(u64, u32)> = clickhouse
        .client()
        .query(&format!(
            "SELECT kafka_offset, kafka_index FROM {} ORDER BY kafka_offset, kafka_index",
            clickhouse.table("events")
        ))
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(positions, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (4, 0)]);

    let mut letters = dead_letters(&dlq, 2).await;
    letters.sort_by_key(|l| l.source.as_ref().map(|s| s.offset));
    let (cut, avro) = (&letters[0], &letters[1]);
    assert_eq!((cut.reason.as_str(), cut.format.as_deref()), ("undecodable_record", Some("RowBinary")));
    assert!(cut.detail.contains("row 0, column metadata_values"), "{}", cut.detail);
    assert_eq!(cut.original_bytes().unwrap(), damaged);
    assert_eq!(cut.source.as_ref().unwrap().offset, 2);
    assert_eq!((avro.reason.as_str(), avro.format.as_deref()), ("undecodable_record", Some("Avro")));
    assert!(avro.detail.contains("\"Avro\", a format this consumer does not read"), "{}", avro.detail);
    consumer.stop().await;
    delete_topics(&[&topic, &dlq]).await;
    drop_database(&clickhouse).await;
}

/// A batch is sized by the row count a record announces in its `tally-events` header, not by
/// scanning its lines: records of one event each that announce four fill a four-row batch alone
/// (counted by their lines, a backlog of six would go in two batches).
#[tokio::test]
async fn a_batch_is_bounded_by_the_rows_its_records_announce() {
    let (clickhouse, topic, dlq, group) = fresh_pipeline("announced", 1).await;
    for n in 0..6 {
        let payload = record(&[&sample_event("org-x", n)]);
        produce_with_headers(&topic, "org-x", &payload, &[(HEADER_EVENTS, "4")]).await;
    }
    let consumer =
        start_consumer_with(&clickhouse, &topic, &dlq, &group, &[("TALLY_BATCH_MAX_ROWS", "4")]).await;
    wait_for_rows(&clickhouse, 6).await;
    let totals = raw_totals(&clickhouse).await;
    assert_eq!((totals.rows, totals.ids), (6, 6), "every line is decoded whatever the header says");
    // A batch is counted after its commit, which follows the insert its rows became visible by.
    let mut batches = 0.0;
    for _ in 0..100 {
        batches = metric(&consumer.metrics_url, "tally_consumer_batches_total").await;
        if batches >= 6.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(batches, 6.0, "one record per batch");
    consumer.stop().await;
    delete_topics(&[&topic, &dlq]).await;
    drop_database(&clickhouse).await;
}

#[tokio::test]
async fn a_record_clickhouse_refuses_is_dead_lettered_and_the_rest_of_its_batch_stored() {
    let (clickhouse, topic, dlq, group) = fresh_pipeline("poison", 1).await;
    // A guard the operator added: ClickHouse itself refuses rows of one org (code 395, permanent).
    clickhouse
        .client()
        .query(&format!(
            "ALTER TABLE {} ADD COLUMN guard UInt8 DEFAULT throwIf(org_id = 'org-poison')",
            clickhouse.table("events")
        ))
        .execute()
        .await
        .unwrap();
    let good: Vec<Event> = (0..6).map(|n| sample_event("org-good", n)).collect();
    let poison = sample_event("org-poison", 9);
    produce(&topic, "k", &record(&[&good[0], &good[1]])).await;
    produce(&topic, "k", &record(&[&good[2], &poison, &good[3]])).await;
    produce(&topic, "k", &record(&[&good[4], &good[5]])).await;
    // One batch holds all three records (batch wait 200 ms after the first).
    let consumer = start_consumer(&clickhouse, &topic, &dlq, &group).await;
    wait_for_rows(&clickhouse, 4).await;

    let letter = first_dead_letter(&dlq).await;
    assert_eq!(letter.reason, "rejected_by_clickhouse");
    assert!(letter.detail.contains("395") || letter.detail.contains("throwIf"), "{}", letter.detail);
    assert_eq!(letter.source.as_ref().unwrap().offset, 1);
    assert_eq!(letter.original_bytes().unwrap(), record(&[&good[2], &poison, &good[3]]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let totals = raw_totals(&clickhouse).await;
    assert_eq!((totals.rows, totals.ids), (4, 4), "records 0 and 2 stored, record 1 dead-lettered whole");
    assert_eq!(count_where(&clickhouse, "org_id = 'org-poison'").await, 0);
    assert_eq!(
        metric(&consumer.metrics_url, "tally_consumer_dead_letters_total{reason=\"rejected_by_clickhouse\"}")
            .await,
        1.0
    );
    assert_eq!(metric(&consumer.metrics_url, "tally_consumer_rows_inserted_total").await, 4.0);
    consumer.stop().await;
    delete_topics(&[&topic, &dlq]).await;
    drop_database(&clickhouse).await;
}

/// ClickHouse dying between an insert's `events` part and its views' parts leaves rows the
/// rollups never saw; `views::repair` completes exactly those buckets, once.
#[tokio::test]
async fn rollups_missing_an_applied_insert_are_completed_once() {
    let clickhouse = migrated_database("views").await;
    let client = clickhouse.client();
    let insert = |partition: u16, offset: u64, org: &str, hour: u32, n: u32| {
        format!(
            "INSERT INTO {} (org_id, event_id, timestamp, provider, model, total_tokens, cost_nanos, latency_ms, \
             kafka_partition, kafka_offset, kafka_index) SELECT '{org}', generateUUIDv4(), \
             toDateTime(1795000000 + {hour} * 3600 + number * 7, 'UTC'), 'openai', 'gpt-4o', 10 + number, \
             1000000007 * (number + 1), 100 + number, {partition}, {offset}, toUInt32(number) FROM numbers({n})",
            clickhouse.table("events")
        )
    };
    // Stored normally: views and table agree.
    client.query(&insert(0, 1, "org-a", 0, 5)).execute().await.unwrap();
    client.query(&insert(1, 1, "org-b", 0, 4)).execute().await.unwrap();
    // The interrupted insert: its rows reach `events` while the views are away.
    for view in ["rollup_hourly_mv", "rollup_daily_mv"] {
        client.query(&format!("DETACH TABLE {}", clickhouse.table(view))).execute().await.unwrap();
    }
    client.query(&insert(0, 2, "org-a", 0, 3)).execute().await.unwrap(); // a bucket the rollup already has
    client.query(&insert(0, 3, "org-a", 30, 6)).execute().await.unwrap(); // a bucket it has not
    for view in ["rollup_hourly_mv", "rollup_daily_mv"] {
        client.query(&format!("ATTACH TABLE {}", clickhouse.table(view))).execute().await.unwrap();
    }
    let records: std::collections::BTreeSet<(i32, i64)> = [(0, 2), (0, 3)].into();
    let store = tally_consumer::store::EventStore::new(&clickhouse);
    let repair = |records| {
        let store = store.clone();
        async move { store.repair_views(records).await.unwrap() }
    };
    let first = repair(&records).await;
    // Hourly: hour 0 and hour 30 of org-a; daily: the two days. None was complete.
    assert_eq!((first.repaired, first.complete, first.rebuilt), (4, 0, 0), "{first:?}");
    let totals = raw_totals(&clickhouse).await;
    for rollup in ["rollup_hourly", "rollup_daily"] {
        assert_eq!(
            rollup_totals(&clickhouse, rollup).await,
            (totals.rows, totals.tokens, totals.cost, totals.errors),
            "{rollup} == raw after the repair"
        );
    }
    // Checking again (or checking an insert whose views ran) changes nothing.
    let again = repair(&records).await;
    assert_eq!((again.repaired, again.complete, again.rebuilt), (0, 4, 0), "{again:?}");
    let normal: std::collections::BTreeSet<(i32, i64)> = [(1, 1)].into();
    let untouched = repair(&normal).await;
    assert_eq!((untouched.repaired, untouched.complete), (0, 2));
    for rollup in ["rollup_hourly", "rollup_daily"] {
        assert_eq!(
            rollup_totals(&clickhouse, rollup).await.0,
            totals.rows,
            "{rollup}: nothing counted twice"
        );
    }
    // Percentiles included: the repaired states merge like the view's.
    let (from_rollup, from_raw) = percentiles(&clickhouse, "org_id = 'org-a'").await;
    assert_eq!(from_rollup, from_raw);
    drop_database(&clickhouse).await;
}

/// A bucket whose rollup disagrees with `events` beyond the records being checked — it lacks rows
/// of another insert as many as the checked insert has (which it holds), or it counts rows twice
/// — is not "completed" with the checked rows (which would hide one error under another): it is
/// rebuilt from `events`, percentiles included, and checking again finds it complete.
#[tokio::test]
async fn rollup_buckets_off_beyond_the_checked_insert_are_rebuilt_from_events() {
    let clickhouse = migrated_database("rebuild").await;
    let client = clickhouse.client();
    let insert = |offset: u64, hour: u32, n: u32, tokens: u32| {
        format!(
            "INSERT INTO {} (org_id, event_id, timestamp, provider, model, total_tokens, cost_nanos, latency_ms, status, \
             kafka_partition, kafka_offset, kafka_index) SELECT 'org-r', generateUUIDv4(), \
             toDateTime(1795000000 + {hour} * 3600 + number * 7, 'UTC'), 'openai', 'gpt-4o', {tokens} + number, \
             1000000007 * (number + 1), 100 + number * 13, if(number = 0, 'error', 'success'), 0, {offset}, toUInt32(number) \
             FROM numbers({n})",
            clickhouse.table("events")
        )
    };
    let views = ["rollup_hourly_mv", "rollup_daily_mv"];
    let detach = |detach: bool| {
        let client = client.clone();
        let clickhouse = clickhouse.clone();
        async move {
            for view in views {
                let verb = if detach { "DETACH" } else { "ATTACH" };
                client.query(&format!("{verb} TABLE {}", clickhouse.table(view))).execute().await.unwrap();
            }
        }
    };
    client.query(&insert(1, 0, 5, 10)).execute().await.unwrap(); // stored normally
                                                                 // Offset 2: 3 rows the rollups never saw (its insert was interrupted, and never checked).
    detach(true).await;
    client.query(&insert(2, 0, 3, 500)).execute().await.unwrap();
    detach(false).await;
    // Offset 3: 3 rows stored normally, the insert now checked: same count as the gap of offset 2.
    client.query(&insert(3, 0, 3, 20)).execute().await.unwrap();
    // Offset 4, another hour: stored normally, then its rollup rows counted twice.
    client.query(&insert(4, 5, 4, 30)).execute().await.unwrap();
    for (rollup, view) in [("rollup_hourly", "rollup_hourly_mv"), ("rollup_daily", "rollup_daily_mv")] {
        let select = tally_schemas::migrations::MIGRATIONS
            .iter()
            .flat_map(|m| m.statements(&clickhouse.database))
            .find(|s| {
                s.contains(&format!("{}.{view} ", clickhouse.database))
                    && s.starts_with("CREATE MATERIALIZED VIEW")
            })
            .unwrap();
        let body = &select[select.find("SELECT").unwrap()..];
        let (head, group) = body.split_at(body.find("\nFROM ").unwrap());
        let group = &group[group.rfind("GROUP BY").unwrap()..];
        client
            .query(&format!(
                "INSERT INTO {} {head} FROM {} WHERE kafka_offset = 4 {group}",
                clickhouse.table(rollup),
                clickhouse.table("events")
            ))
            .execute()
            .await
            .unwrap();
    }
    let store = tally_consumer::store::EventStore::new(&clickhouse);
    let checked: std::collections::BTreeSet<(i32, i64)> = [(0, 3), (0, 4)].into();
    let first = store.repair_views(&checked).await.unwrap();
    // Hour 0 and hour 5 (hourly) are off beyond offsets 3 and 4; so is their day (daily).
    assert_eq!((first.repaired, first.complete, first.rebuilt), (0, 0, 3), "{first:?}");
    let totals = raw_totals(&clickhouse).await;
    for rollup in ["rollup_hourly", "rollup_daily"] {
        assert_eq!(
            rollup_totals(&clickhouse, rollup).await,
            (totals.rows, totals.tokens, totals.cost, totals.errors),
            "{rollup} == raw after the rebuild"
        );
    }
    let (merged, raw) = percentiles(&clickhouse, "1").await;
    assert_eq!(merged, raw, "percentiles rebuilt as the view makes them");
    let again = store.repair_views(&checked).await.unwrap();
    assert_eq!((again.repaired, again.complete, again.rebuilt), (0, 3, 0), "{again:?}");
    drop_database(&clickhouse).await;
}

/// p50/p95/p99 latency of the rows `filter` selects, from the hourly rollup's states and from
/// the raw rows.
async fn percentiles(clickhouse: &ChConfig, filter: &str) -> (Vec<f32>, Vec<f32>) {
    #[derive(Row, Deserialize)]
    struct Q {
        q: Vec<f32>,
    }
    let mut out = Vec::new();
    for (function, table) in [
        ("quantilesTimingMerge(0.5, 0.95, 0.99)(latency_quantiles)", "rollup_hourly"),
        ("quantilesTiming(0.5, 0.95, 0.99)(latency_ms)", "events"),
    ] {
        let sql = format!("SELECT {function} AS q FROM {} WHERE {filter}", clickhouse.table(table));
        out.push(clickhouse.client().query(&sql).fetch_one::<Q>().await.unwrap().q);
    }
    let raw = out.pop().unwrap();
    (out.pop().unwrap(), raw)
}

/// The value of an unlabelled counter in the consumer's `/metrics`.
async fn counter(metrics_url: &str, name: &str) -> u64 {
    tally_testkit::metric_value(&reqwest::get(metrics_url).await.unwrap().text().await.unwrap(), name)
}

/// A static member can be fenced (after a broker restart `make chaos` saw it: librdkafka's fatal
/// `FencedInstanceId`, and the client never consumes again). Here another client joins with the
/// same `group.instance.id`, which fences the consumer the same way: it must replace its client,
/// take its partitions back and go on storing, exactly once.
#[tokio::test]
async fn a_fenced_static_member_replaces_its_kafka_client_and_goes_on() {
    let (clickhouse, topic, dlq, group) = fresh_pipeline("fenced", 2).await;
    let instance = unique_name("instance");
    let consumer =
        start_consumer_with(&clickhouse, &topic, &dlq, &group, &[("TALLY_CONSUMER_INSTANCE_ID", &instance)])
            .await;
    let send = |first: u32| {
        let topic = topic.clone();
        async move {
            let mut payload = Vec::new();
            for n in first..first + 10 {
                encode_event(&sample_event("org-f", n), &mut payload);
            }
            produce(&topic, "org-f", &payload).await;
        }
    };
    send(0).await;
    wait_for_rows(&clickhouse, 10).await;

    // The intruder: same group, same instance id; its join fences the consumer's member.
    let intruder: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", &group)
        .set("group.instance.id", &instance)
        .set("session.timeout.ms", "6000")
        .create()
        .unwrap();
    intruder.subscribe(&[topic.as_str()]).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), intruder.recv()).await;
    let mut replaced = 0;
    for _ in 0..300 {
        replaced = counter(&consumer.metrics_url, "tally_consumer_kafka_clients_replaced_total").await;
        if replaced > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(replaced >= 1, "the fenced consumer replaced its Kafka client");
    drop(intruder);

    send(10).await;
    wait_for_rows(&clickhouse, 20).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let totals = raw_totals(&clickhouse).await;
    assert_eq!((totals.rows, totals.ids), (20, 20), "every event stored once after the replacement");
    consumer.stop().await;
    delete_topics(&[&topic, &dlq]).await;
    drop_database(&clickhouse).await;
}

/// The re-check after a failed insert (`Reconciler::filter`, retried until it succeeds) must
/// change nothing when it fails half way. On a cluster one shard can answer (partition 0: its
/// rows are stored) while another is not caught up or down (partition 1): the failed call must
/// leave partition 0's rows in the batch, so the retried call reports record (0, 5) as stored and
/// its rollups get checked. (Removing rows as each query answered lost such records from the
/// retried call's outcome, and their rollups were never repaired: the cluster suite's shortfall.)
/// Here shard 1 is a closed port and shard 0 the local server.
#[tokio::test]
async fn a_reconcile_that_fails_half_way_leaves_the_batch_as_it_was() {
    use tally_consumer::batch::{Pending, RawRecord};
    use tally_consumer::reconcile::Reconciler;
    use tally_consumer::store::EventStore;

    let clickhouse = migrated_database("reconcile_half").await;
    // Two orgs, one routed to each shard by the cluster's sharding rule (evaluated by ClickHouse).
    #[derive(Row, Deserialize)]
    struct Routed {
        org: String,
        shard: u64,
    }
    let routed: Vec<Routed> = clickhouse
        .client()
        .query(&format!(
            "SELECT org_id AS org, toUInt64({} % 2) AS shard FROM \
             (SELECT concat('org-', toString(number)) AS org_id FROM system.numbers LIMIT 64)",
            tally_schemas::cluster::SHARDING_KEY
        ))
        .fetch_all()
        .await
        .unwrap();
    let org_on = |shard: u64| routed.iter().find(|r| r.shard == shard).unwrap().org.clone();
    let (org_0, org_1) = (org_on(0), org_on(1));
    // The same bytes each time the batch is read, as a record redelivered by Kafka (events made
    // once: `sample_event` stamps them with the current time, so two calls can differ).
    let events = |org: &str, count: u32| (0..count).map(|n| sample_event(org, n)).collect::<Vec<_>>();
    let (events_0, events_1) = (events(&org_0, 3), events(&org_1, 2));
    let kafka_timestamp_ms = chrono::Utc::now().timestamp_millis();
    let record = |partition: i32, offset: i64, events: &[Event]| {
        let mut original = Vec::new();
        for event in events {
            encode_event(event, &mut original);
        }
        Pending::decode(RawRecord {
            partition,
            offset,
            kafka_timestamp_ms,
            original: original.into(),
            format: Ok(RecordFormat::JsonEachRow),
        })
    };
    let batch = || vec![record(0, 5, &events_0), record(1, 7, &events_1)];
    let rows = |batch: &[Pending]| batch.iter().map(Pending::row_count).collect::<Vec<_>>();

    // Partition 0's record is stored already (its insert applied, the answer lost).
    let stored = batch();
    let store = EventStore::new(&clickhouse);
    store.insert(&tally_consumer::batch::rows_of(&stored[..1])).await.unwrap();

    let half_down = ChConfig {
        cluster: Some(tally_common::ch::Cluster {
            name: "tally".into(),
            shards: vec![vec![clickhouse.url.clone()], vec!["http://127.0.0.1:9".into()]],
            insert_quorum: 1,
        }),
        ..clickhouse.clone()
    };
    let mut failing = Reconciler::new(EventStore::new(&half_down));
    let mut retried = batch();
    failing.record_stored(&retried); // both partitions' stored offsets known: no high-offset query
    assert!(failing.filter(&mut retried).await.is_err(), "shard 1 cannot be read");
    assert_eq!(rows(&retried), vec![3, 2], "a failed call leaves every row in the batch");

    // The retried call (here with both shards answering) sees every stored record.
    let mut working = Reconciler::new(store);
    working.record_stored(&retried);
    let outcome = working.filter(&mut retried).await.unwrap();
    assert_eq!(rows(&retried), vec![0, 2], "partition 0's stored rows are taken out, partition 1's kept");
    assert_eq!(outcome.stored_records, [(0, 5)].into(), "{outcome:?}");
    assert_eq!((outcome.checked_records, outcome.skipped_rows), (2, 3), "{outcome:?}");
    drop_database(&clickhouse).await;
}

/// The consumer writes its inserts' RowBinary by hand, straight from the records' bytes: every
/// column ClickHouse stores must be what the event says, for lines in the shape the ingest writes
/// (read in place) and for lines that need escapes (read through serde), for the same events in
/// RowBinary records (copied, their position appended), with and without metadata, at each
/// position.
#[tokio::test]
async fn every_column_is_stored_as_the_event_says() {
    use tally_consumer::batch::{rows_of, Pending, RawRecord};
    use tally_consumer::store::EventStore;
    use tally_schemas::row::select_list;
    use tally_schemas::EventRow;

    let clickhouse = migrated_database("columns").await;
    let plain = sample_event("org-columns", 1);
    let mut escaped = sample_event("org-columns", 2);
    escaped.error = "rate \"limited\"\nretry in 2\u{1}s \\ é".into();
    escaped.user_id = "ユーザー".into();
    escaped.metadata = vec![("a\"b".into(), "c\\d".into()), ("e".into(), String::new())];
    let mut other = sample_event("org-other", 3);
    other.metadata = Vec::new();
    other.cost_nanos = -42;
    other.cost_source = CostSource::Unknown;
    other.http_status = 529;
    other.input_bytes = u64::MAX;
    other.output_bytes = 1 << 40;
    other.agent_id = "agent".into();
    other.action = "summarise".into();
    other.request_id = "req-1".into();
    let mut computed = sample_event("org-columns", 4);
    computed.cost_source = CostSource::Computed;
    computed.metadata = vec![("a".into(), "1".into()), ("b".into(), "2".into()), ("c".into(), "3".into())];
    // The same events again in RowBinary records, at other positions.
    let records = [
        (3, 17, vec![&plain, &escaped], RecordFormat::JsonEachRow),
        (5, 2, vec![&other, &computed], RecordFormat::JsonEachRow),
        (6, 40, vec![&plain, &escaped, &other], RecordFormat::RowBinary),
        (7, 1, vec![&computed], RecordFormat::RowBinary),
    ];
    let batch: Vec<Pending> = records
        .iter()
        .map(|(partition, offset, events, format)| {
            let original = match format {
                RecordFormat::JsonEachRow => record(events),
                RecordFormat::RowBinary => binary_record(events),
            };
            Pending::decode(RawRecord {
                partition: *partition,
                offset: *offset,
                kafka_timestamp_ms: 0,
                original: original.into(),
                format: Ok(*format),
            })
        })
        .collect();
    assert_eq!(batch.iter().map(Pending::row_count).collect::<Vec<_>>(), [2, 2, 3, 1]);
    EventStore::new(&clickhouse).insert(&rows_of(&batch)).await.unwrap();

    let expected: Vec<EventRow> = records
        .iter()
        .flat_map(|(partition, offset, events, _)| {
            events
                .iter()
                .enumerate()
                .map(|(index, event)| EventRow::new((*event).clone(), *partition, *offset, index as u32))
        })
        .collect();
    let stored: Vec<EventRow> = clickhouse
        .client()
        .query(&format!(
            "SELECT {} FROM {} ORDER BY kafka_partition, kafka_index",
            select_list(),
            clickhouse.table("events")
        ))
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(stored, expected);
    drop_database(&clickhouse).await;
}
