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
use tally_schemas::record::{binary, encode_event, DeadLetter, SourcePosition, Stage};
use tally_schemas::{CostSource, Event, Status};
use tally_testkit::{
    create_topic_on, delete_topics_on, drop_database, kafka_brokers, migrated_database, unique_name,
    ClickHouseServer, KafkaBroker,
};

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
async fn produce(brokers: &str, topic: &str, first: u64, records: u64, per_record: u64) -> u64 {
    produce_paced(brokers, topic, first, records, per_record, Duration::ZERO).await
}

/// `produce`, one record every `pace` (each acknowledged before the next is sent).
async fn produce_paced(
    brokers: &str,
    topic: &str,
    first: u64,
    records: u64,
    per_record: u64,
    pace: Duration,
) -> u64 {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "60000")
        .create()
        .unwrap();
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
        tokio::time::sleep(pace).await;
    }
    records * per_record
}

/// What the consumer processes of one test share.
struct Setup {
    clickhouse: ChConfig,
    brokers: String,
    topic: String,
    dlq: String,
    group: String,
}

impl Setup {
    async fn new(prefix: &str, brokers: String) -> Setup {
        Setup::with_clickhouse(migrated_database(prefix).await, brokers).await
    }

    async fn with_clickhouse(clickhouse: ChConfig, brokers: String) -> Setup {
        let setup = Setup {
            clickhouse,
            brokers,
            topic: unique_name("events"),
            dlq: unique_name("dlq"),
            group: unique_name("group"),
        };
        create_topic_on(&setup.brokers, &setup.topic, 4).await;
        create_topic_on(&setup.brokers, &setup.dlq, 1).await;
        setup
    }

    /// The real consumer binary, configured for this setup.
    fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tally-consumer"));
        command
            .env("TALLY_KAFKA_BROKERS", &self.brokers)
            .env("TALLY_CLICKHOUSE_URL", &self.clickhouse.url)
            .env("TALLY_CLICKHOUSE_DATABASE", &self.clickhouse.database)
            .env("TALLY_EVENTS_TOPIC", &self.topic)
            .env("TALLY_DLQ_TOPIC", &self.dlq)
            .env("TALLY_CONSUMER_GROUP", &self.group);
        command
    }

    /// The real consumer binary as a child process, with static membership id `instance`.
    fn spawn_consumer(&self, instance: &str, crash_probability: f64) -> ConsumerProcess {
        self.spawn_consumer_with(instance, crash_probability, 0.0)
    }

    fn spawn_consumer_with(
        &self,
        instance: &str,
        crash_probability: f64,
        lost_answer_probability: f64,
    ) -> ConsumerProcess {
        let child = self
            .command()
            .env("TALLY_FAILPOINT_FAIL_AFTER_INSERT", lost_answer_probability.to_string())
            .env("TALLY_CONSUMER_INSTANCE_ID", format!("{}-{instance}", self.group))
            .env("TALLY_KAFKA_SESSION_TIMEOUT_MS", "6000")
            .env("TALLY_LISTEN_ADDR", "127.0.0.1:0")
            .env("TALLY_BATCH_MAX_ROWS", "300")
            .env("TALLY_BATCH_MAX_WAIT_MS", "100")
            .env("TALLY_FAILPOINT_CRASH_AFTER_INSERT", crash_probability.to_string())
            .env("TALLY_LOG", "info")
            .stdout(self.log_file(instance))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        ConsumerProcess(child)
    }

    /// What consumer `instance` logged.
    fn consumer_log(&self, instance: &str) -> String {
        std::fs::read_to_string(std::env::temp_dir().join(format!("{}-{instance}.log", self.group)))
            .unwrap_or_default()
    }

    /// Each consumer process logs to `$TMPDIR/<group>-<instance>.log`, kept for a failing run.
    fn log_file(&self, instance: &str) -> Stdio {
        let path = std::env::temp_dir().join(format!("{}-{instance}.log", self.group));
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null())
    }

    async fn produce(&self, first: u64, records: u64, per_record: u64) -> u64 {
        produce(&self.brokers, &self.topic, first, records, per_record).await
    }

    /// Waits until `expected` rows are stored (and 2 s more, for anything extra to show up).
    async fn drain(&self, expected: u64) {
        let started = Instant::now();
        while raw(&self.clickhouse).await.rows < expected && started.elapsed() < Duration::from_secs(90) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    /// Rows == events produced, distinct ids == rows, hourly and daily rollups == raw.
    async fn assert_exactly_once(&self, expected: u64, context: &str) {
        let clickhouse = &self.clickhouse;
        let totals = raw(clickhouse).await;
        assert_eq!(totals.rows, expected, "every event stored exactly once ({context})");
        assert_eq!(totals.ids, totals.rows, "no event id twice ({context})");
        for (bucket, rollup, column) in [
            ("toStartOfHour(timestamp)", "rollup_hourly", "hour"),
            ("toDate(timestamp)", "rollup_daily", "day"),
        ] {
            let from_raw = buckets(
                clickhouse,
                format!(
                    "SELECT toUInt32({bucket}) AS bucket, model, count() AS events, toUInt64(countIf(status = 'error')) AS errors, \
                     sum(toUInt64(total_tokens)) AS tokens, sum(cost_nanos) AS cost FROM {} GROUP BY bucket, model",
                    clickhouse.table("events")
                ),
            )
            .await;
            let from_rollup = buckets(
                clickhouse,
                format!(
                    "SELECT toUInt32({column}) AS bucket, model, toUInt64(countMerge(events)) AS events, sumMerge(errors) AS errors, \
                     sumMerge(total_tokens_sum) AS tokens, sumMerge(cost_nanos_sum) AS cost FROM {} GROUP BY bucket, model",
                    clickhouse.table(rollup)
                ),
            )
            .await;
            assert_eq!(from_rollup, from_raw, "{rollup} == raw ({context})");
        }
    }

    async fn cleanup(self) {
        delete_topics_on(&self.brokers, &[&self.topic, &self.dlq]).await;
        drop_database(&self.clickhouse).await;
    }
}

/// A consumer child process, killed when dropped, so a failing test leaves no process behind.
struct ConsumerProcess(Child);

impl ConsumerProcess {
    fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.0.try_wait()
    }
}

impl Drop for ConsumerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// kill -9.
fn stop(child: ConsumerProcess) {
    drop(child);
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
    let setup = Setup::new("exactly", kafka_brokers()).await;
    let mut expected = setup.produce(0, 600, 50).await;
    // More records arrive while the consumer is being crashed.
    let (brokers, topic) = (setup.brokers.clone(), setup.topic.clone());
    let late = tokio::spawn(async move {
        let mut produced = 0;
        for wave in 0..6u64 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            produced += produce(&brokers, &topic, 1_000_000 + wave * 10_000, 10, 40).await;
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
        let mut child = setup.spawn_consumer("0", if use_failpoint { 0.3 } else { 0.0 });
        let wait_ms = if use_failpoint { 5000 } else { rand::rng().random_range(200..1200) };
        let deadline = Instant::now() + Duration::from_millis(wait_ms);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(!status.success(), "the consumer only stops here by crashing");
                failpoint_crashes += 1;
                break;
            }
            if Instant::now() >= deadline {
                stop(child); // SIGKILL
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
    let child = setup.spawn_consumer("0", 0.0);
    setup.drain(expected).await;
    stop(child);
    setup.assert_exactly_once(expected, &format!("failpoint {failpoint_crashes}, kill -9 {kills}")).await;
    setup.cleanup().await;
}

#[tokio::test]
async fn a_second_consumer_joining_and_the_first_dying_mid_stream() {
    let setup = Setup::new("rebalance", kafka_brokers()).await;
    let mut expected = setup.produce(0, 200, 50).await;
    let first = setup.spawn_consumer("a", 0.0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = setup.spawn_consumer("b", 0.0); // rebalance: partitions move while batches are in flight
    expected += setup.produce(100_000, 200, 50).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop(first); // kill -9: its partitions move to the second after the session timeout
    expected += setup.produce(200_000, 100, 50).await;
    setup.drain(expected).await;
    stop(second);
    setup.assert_exactly_once(expected, "rebalance and a dead member").await;
    setup.cleanup().await;
}

#[tokio::test]
async fn the_kafka_broker_restarting_mid_stream() {
    let mut broker = KafkaBroker::start().await;
    let setup = Setup::new("brokerbounce", broker.bootstrap()).await;
    let mut expected = setup.produce(0, 200, 50).await;
    let child = setup.spawn_consumer("0", 0.0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    broker.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.resume().await;
    expected += setup.produce(100_000, 200, 50).await;
    setup.drain(expected).await;
    stop(child);
    setup.assert_exactly_once(expected, "broker restarted").await;
    setup.cleanup().await;
    drop(broker);
}

/// A consumer killed and restarted just before the broker is. `make chaos` caught the consumer
/// stopping for good there: its synchronous offset commit waited, without a deadline, on the
/// thread that serves the client's group events, which the group needed after the broker's
/// restart (`dev/chaos.py --plan 10:consumer,10:kafka` replays it). Records keep arriving
/// throughout, so commits are in flight when the broker goes.
#[tokio::test]
async fn a_consumer_restarted_just_before_the_broker_goes_on() {
    let mut broker = KafkaBroker::start().await;
    let setup = Setup::new("restartbounce", broker.bootstrap()).await;
    let mut expected = setup.produce(0, 100, 20).await;
    let first = setup.spawn_consumer("0", 0.0);
    setup.drain(expected).await;
    stop(first); // kill -9: its static member stays in the group
    let (brokers, topic) = (setup.brokers.clone(), setup.topic.clone());
    let trickle = tokio::spawn(async move {
        produce_paced(&brokers, &topic, 100_000, 400, 5, Duration::from_millis(25)).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stored_before = raw(&setup.clickhouse).await.rows;
    let second = setup.spawn_consumer("0", 0.0); // the same instance id takes the member over
    let started = Instant::now();
    while raw(&setup.clickhouse).await.rows == stored_before {
        assert!(started.elapsed() < Duration::from_secs(30), "the restarted consumer stored nothing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.kill();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    broker.resume().await;
    expected += trickle.await.unwrap();
    setup.drain(expected).await;
    stop(second);
    setup.assert_exactly_once(expected, "a consumer restarted, then the broker").await;
    setup.cleanup().await;
    drop(broker);
}

#[tokio::test]
async fn clickhouse_stopped_mid_stream_then_back() {
    let mut server = ClickHouseServer::start().await;
    let setup = Setup::with_clickhouse(server.migrated_database("chdown").await, kafka_brokers()).await;
    let mut expected = setup.produce(0, 200, 50).await;
    let mut child = setup.spawn_consumer("0", 0.0);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill();
    expected += setup.produce(100_000, 200, 50).await; // the lag grows while ClickHouse is away
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the consumer waits and retries; it does not exit or crash-loop"
    );
    server.resume().await;
    setup.drain(expected).await;
    stop(child);
    setup.assert_exactly_once(expected, "clickhouse stopped and restarted").await;
    setup.cleanup().await;
    drop(server);
}

/// Inserts ClickHouse confirmed and then lost in a restart: 18.16 confirms an insert whose part's
/// `columns.txt` a full disk left empty (the write error is swallowed where the file is closed)
/// and deletes that part as broken at its next start; any server loses its unsynced parts in a
/// power cut. Here two parts of `events` get an empty `columns.txt` while the server is down, as
/// the full disk leaves them. The consumer sees the restart, reads the partitions again, stores
/// exactly the missing rows, and the rollups, which kept those rows, do not count them twice.
#[tokio::test]
async fn inserts_clickhouse_lost_in_a_restart_are_stored_again() {
    let mut server = ClickHouseServer::start().await;
    let setup = Setup::with_clickhouse(server.migrated_database("lostparts").await, kafka_brokers()).await;
    let client = setup.clickhouse.client();
    // One part per insert, unmerged, so a part lost is one insert's rows.
    client.query("SYSTEM STOP MERGES").execute().await.unwrap();
    let mut expected = setup.produce(0, 120, 50).await;
    let child = setup.spawn_consumer("0", 0.0);
    setup.drain(expected).await;
    let parts: Vec<String> = client
        .query(
            "SELECT name FROM system.parts WHERE database = ? AND table = 'events' AND active ORDER BY name",
        )
        .bind(&setup.clickhouse.database)
        .fetch_all()
        .await
        .unwrap();
    assert!(parts.len() >= 4, "one part per insert: {parts:?}");
    server.kill();
    let dir = server.table_dir(&setup.clickhouse.database, "events");
    for part in [&parts[1], &parts[parts.len() / 2]] {
        std::fs::File::create(dir.join(part).join("columns.txt")).unwrap();
    }
    server.resume().await;
    let left = raw(&setup.clickhouse).await.rows;
    assert!(left < expected, "ClickHouse dropped the damaged parts at start: {left} of {expected} rows left");
    // Records after the restart: the consumer checks the server's start between batches.
    expected += setup.produce(100_000, 20, 50).await;
    setup.drain(expected).await;
    stop(child);
    setup.assert_exactly_once(expected, "parts lost in a restart").await;
    let log = setup.consumer_log("0");
    assert!(log.contains("ClickHouse restarted: reading"), "the restart was seen");
    assert!(log.contains("re-read after a ClickHouse restart done"), "the re-read stored the lost rows");
    setup.cleanup().await;
    drop(server);
}

/// Inserts ClickHouse applied but whose answer was lost: the re-check finds their rows, inserts
/// only what is missing, and the rollup check finds the views complete (nothing counted twice).
#[tokio::test]
async fn inserts_whose_answer_is_lost_are_not_applied_twice() {
    let setup = Setup::new("lost", kafka_brokers()).await;
    let expected = setup.produce(0, 150, 40).await;
    let child = setup.spawn_consumer_with("0", 0.0, 0.5);
    setup.drain(expected).await;
    stop(child);
    setup.assert_exactly_once(expected, "answers lost after applied inserts").await;
    let log = setup.consumer_log("0");
    assert!(log.contains("failpoint: reporting an applied insert as failed"), "the failpoint fired");
    assert!(log.contains("rollups checked"), "the rollup check ran");
    assert!(!log.contains("completed rollup buckets"), "the views had run: nothing to complete");
    setup.cleanup().await;
}

async fn send_letter(brokers: &str, topic: &str, letter: &DeadLetter) {
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    let payload = serde_json::to_vec(letter).unwrap();
    producer.send(FutureRecord::<(), _>::to(topic).payload(&payload), Duration::from_secs(10)).await.unwrap();
}

fn run_dlq(setup: &Setup, args: &[&str]) -> Vec<serde_json::Value> {
    let output = setup.command().env("TALLY_LOG", "warn").args(args).output().unwrap();
    assert!(output.status.success(), "tally-consumer {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|l| l.starts_with('{') && !l.contains("\"level\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn dead_letters_are_listed_and_replayed_once() {
    let setup = Setup::new("dlq", kafka_brokers()).await;
    let letter = |reason: &str, stage: Stage, offset: i64, original: &[u8]| {
        DeadLetter {
            stage,
            reason: reason.into(),
            detail: "test".into(),
            org_id: String::new(),
            request_id: String::new(),
            index: None,
            event_id: None,
            received_at_ms: 0,
            source: Some(SourcePosition { topic: setup.topic.clone(), partition: 0, offset }),
            original: None,
            original_hex: None,
            format: None,
        }
        .with_original(original)
    };
    // A record ClickHouse refused earlier (now it would take it), one that still does not
    // decode, and an invalid event the ingest rejected.
    let mut refused = Vec::new();
    for n in 0..5 {
        encode_event(&event(n), &mut refused);
    }
    send_letter(&setup.brokers, &setup.dlq, &letter("rejected_by_clickhouse", Stage::Consume, 42, &refused))
        .await;
    send_letter(
        &setup.brokers,
        &setup.dlq,
        &letter("undecodable_record", Stage::Consume, 43, b"\xffnot json"),
    )
    .await;
    send_letter(&setup.brokers, &setup.dlq, &letter("invalid_timestamp", Stage::Ingest, 0, b"{}")).await;
    // A RowBinary record ClickHouse refused: its letter names the format, so it is read as such.
    let mut binary_rows = Vec::new();
    for n in 5..8 {
        binary::encode_row(&event(n).borrowed(), &mut binary_rows);
    }
    let mut binary_letter = letter("rejected_by_clickhouse", Stage::Consume, 44, &binary_rows);
    binary_letter.format = Some("RowBinary".into());
    send_letter(&setup.brokers, &setup.dlq, &binary_letter).await;

    let listed = run_dlq(&setup, &["dlq", "list"]);
    assert_eq!(listed.len(), 4);
    assert_eq!(listed[0]["reason"], "rejected_by_clickhouse");
    assert_eq!(listed[0]["source"]["offset"], 42);

    let first = run_dlq(&setup, &["dlq", "replay"]);
    assert_eq!(
        first[0],
        serde_json::json!({"letters": 4, "replayable": 2, "rows_inserted": 8, "rows_already_stored": 0, "still_undecodable": 1})
    );
    let second = run_dlq(&setup, &["dlq", "replay"]);
    assert_eq!(second[0]["rows_inserted"], 0, "a second replay stores nothing twice");
    assert_eq!(second[0]["rows_already_stored"], 8);
    setup.assert_exactly_once(8, "dlq replay").await;
    setup.cleanup().await;
}
