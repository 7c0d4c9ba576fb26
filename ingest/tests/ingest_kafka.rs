//! The ingest against the real local Kafka and ClickHouse: each test has its own topics and
//! database, and runs the real `run()` on an ephemeral port.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::net::SocketAddr;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use serde_json::{json, Value};
use tally_common::ch::ChConfig;
use tally_common::config::Env;
use tally_common::testing::{
    create_org_with_key, create_topic, delete_topics, drop_database, kafka_brokers, migrated_database,
    unique_name,
};
use tally_ingest::config::IngestConfig;
use tally_schemas::record::{decode_events, DeadLetter, HEADER_REQUEST_ID, HEADER_SCHEMA_VERSION};
use tokio_util::sync::CancellationToken;

struct Ingest {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    clickhouse: ChConfig,
    events_topic: String,
    dlq_topic: String,
    key: String,
    org_id: String,
}

impl Ingest {
    async fn start(extra: &[(&str, &str)]) -> Ingest {
        let clickhouse = migrated_database("ingest").await;
        let org_id = unique_name("org");
        let key = create_org_with_key(&clickhouse, &org_id, "ENTERPRISE", 0).await;
        let (events_topic, dlq_topic) = (unique_name("events"), unique_name("dlq"));
        create_topic(&events_topic, 2).await;
        create_topic(&dlq_topic, 1).await;
        let mut env = Env::from_pairs([
            ("TALLY_KAFKA_BROKERS", kafka_brokers()),
            ("TALLY_CLICKHOUSE_URL", clickhouse.url.clone()),
            ("TALLY_CLICKHOUSE_DATABASE", clickhouse.database.clone()),
            ("TALLY_EVENTS_TOPIC", events_topic.clone()),
            ("TALLY_DLQ_TOPIC", dlq_topic.clone()),
        ]);
        for (k, v) in extra {
            env = env.with(*k, *v);
        }
        let config = IngestConfig::from_env(&env).expect("valid config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(tally_ingest::run(config, listener, shutdown.clone()));
        Ingest { addr, shutdown, task, clickhouse, events_topic, dlq_topic, key, org_id }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
        delete_topics(&[&self.events_topic, &self.dlq_topic]).await;
        drop_database(&self.clickhouse).await;
    }
}

fn event(model: &str) -> Value {
    json!({"timestamp": chrono::Utc::now().to_rfc3339(), "provider":"openai","model":model,
      "tokens":{"promptTokens":1000,"completionTokens":500,"totalTokens":1500},
      "cost":0.0325,"latency":2500,"status":"success","error":null})
}

/// Reads every record of `topic` (until 3 s pass without one).
async fn read_all(topic: &str) -> Vec<OwnedMessage> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", unique_name("reader"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut messages = Vec::new();
    while let Ok(Ok(message)) = tokio::time::timeout(Duration::from_secs(3), consumer.recv()).await {
        messages.push(message.detach());
    }
    messages
}

fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

async fn wait_ready(client: &reqwest::Client, ingest: &Ingest) {
    for _ in 0..100 {
        if let Ok(response) = client.get(ingest.url("/readyz")).send().await {
            if response.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("ingest never became ready");
}

#[tokio::test]
async fn valid_events_reach_kafka_and_invalid_ones_the_dead_letter_topic() {
    let ingest = Ingest::start(&[]).await;
    let client = reqwest::Client::new();
    wait_ready(&client, &ingest).await;
    let mut bad = event("gpt-4o");
    bad["timestamp"] = json!("not a time");
    let mut sneaky = event("gpt-4o-mini");
    sneaky["org_id"] = json!("someone-else"); // the org comes from the key, never the body
    sneaky.as_object_mut().unwrap().remove("cost"); // priced by the registry
    let response = client
        .post(ingest.url("/v1/ingest"))
        .header("X-API-Key", &ingest.key)
        .header("X-Request-Id", "req-123")
        .json(&json!({"events": [event("gpt-4o"), bad, sneaky]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(response.headers()["x-request-id"], "req-123");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["accepted"], 2);
    assert_eq!(body["rejected"][0]["index"], 1);
    assert!(body["rejected"][0]["reason"].as_str().unwrap().starts_with("invalid_timestamp"));

    let records = read_all(&ingest.events_topic).await;
    assert_eq!(records.len(), 1, "one record per request");
    let record = &records[0];
    assert_eq!(record.key(), Some(ingest.org_id.as_bytes()));
    assert_eq!(header(record, HEADER_SCHEMA_VERSION).as_deref(), Some("1"));
    assert_eq!(header(record, HEADER_REQUEST_ID).as_deref(), Some("req-123"));
    let events = decode_events(record.payload().unwrap()).unwrap();
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|e| e.org_id == ingest.org_id));
    assert_eq!(events[0].cost_nanos, 32_500_000);
    assert_eq!(events[0].cost_source, tally_schemas::CostSource::Client);
    // gpt-4o-mini from the seeded registry: 1000 × 0.15 + 500 × 0.60 USD per million = 0.00045 USD.
    assert_eq!(events[1].cost_source, tally_schemas::CostSource::Computed);
    assert_eq!(events[1].cost_nanos, 450_000);

    let letters = read_all(&ingest.dlq_topic).await;
    assert_eq!(letters.len(), 1);
    let letter: DeadLetter = serde_json::from_slice(letters[0].payload().unwrap()).unwrap();
    assert_eq!(letter.reason, "invalid_timestamp");
    assert_eq!(letter.request_id, "req-123");
    assert_eq!(letter.org_id, ingest.org_id);
    assert_eq!(letter.index, Some(1));
    let original: Value = serde_json::from_str(letter.original.as_deref().unwrap()).unwrap();
    assert_eq!(original["timestamp"], "not a time");
    ingest.stop().await;
}

#[tokio::test]
async fn whole_request_errors_have_their_status_and_touch_no_topic() {
    let ingest = Ingest::start(&[("TALLY_MAX_BODY_BYTES", "4096")]).await;
    let client = reqwest::Client::new();
    wait_ready(&client, &ingest).await;
    let batch = json!({"events": [event("gpt-4o")]});
    let post = |key: Option<&str>| {
        let request = client.post(ingest.url("/v1/ingest"));
        match key {
            Some(k) => request.header("Authorization", format!("Bearer {k}")),
            None => request,
        }
    };
    let missing = post(None).json(&batch).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    let unknown = post(Some(&tally_schemas::keys::generate().secret)).json(&batch).send().await.unwrap();
    assert_eq!(unknown.status(), 401);
    let body: Value = unknown.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let malformed = post(Some(&ingest.key))
        .header("Content-Type", "application/json")
        .body("{\"events\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    let wrong_type = post(Some(&ingest.key))
        .header("Content-Type", "text/plain")
        .body(batch.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_type.status(), 415);
    let wrong_encoding =
        post(Some(&ingest.key)).header("Content-Encoding", "br").json(&batch).send().await.unwrap();
    assert_eq!(wrong_encoding.status(), 415);
    let too_large =
        post(Some(&ingest.key)).json(&json!({"events": vec![event("gpt-4o"); 40]})).send().await.unwrap();
    assert_eq!(too_large.status(), 413);
    let body: Value = too_large.json().await.unwrap();
    assert_eq!(body["error"]["code"], "body_too_large");
    assert!(read_all(&ingest.events_topic).await.is_empty(), "no whole-request failure produced anything");
    assert!(read_all(&ingest.dlq_topic).await.is_empty());
    ingest.stop().await;
}

#[tokio::test]
async fn more_than_1000_events_is_refused() {
    let ingest = Ingest::start(&[]).await;
    let client = reqwest::Client::new();
    wait_ready(&client, &ingest).await;
    let response = client
        .post(ingest.url("/v1/ingest"))
        .header("X-API-Key", &ingest.key)
        .json(&json!({"events": vec![event("gpt-4o"); 1001]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_events");
    ingest.stop().await;
}

#[tokio::test]
async fn unreachable_kafka_answers_503_within_the_deadline() {
    let ingest =
        Ingest::start(&[("TALLY_KAFKA_BROKERS", "127.0.0.1:1"), ("TALLY_PRODUCE_TIMEOUT_MS", "1500")]).await;
    let client = reqwest::Client::new();
    // keys load from ClickHouse even though Kafka is away
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ready = client.get(ingest.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "not ready while kafka is unreachable");
    let started = std::time::Instant::now();
    let response = client
        .post(ingest.url("/v1/ingest"))
        .header("X-API-Key", &ingest.key)
        .json(&json!({"events": [event("gpt-4o")]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert!(started.elapsed() < Duration::from_secs(5), "no hang past the produce deadline");
    ingest.stop().await;
}
