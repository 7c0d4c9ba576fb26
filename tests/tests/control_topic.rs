//! An ingest that reaches Kafka only (`TALLY_INGEST_CONTROL=kafka`, as on Kubernetes, where its
//! NetworkPolicy allows Kafka and nothing else): it authenticates and prices with the snapshots a
//! consumer publishes on the control topic, follows a revocation and a new price, and a second
//! ingest started later reads the same state from the topic's start. Its ClickHouse address is a
//! closed port, so anything it read from ClickHouse would fail the test.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::Duration;

use serde_json::json;
use tally_common::ch::ChConfig;
use tally_common::config::Env;
use tally_testkit::{
    create_org_with_key, create_topic, delete_topics, drop_database, kafka_brokers, metric_value,
    migrated_database, unique_name,
};
use tokio_util::sync::CancellationToken;

async fn bind() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (listener, url)
}

async fn readyz(http: &reqwest::Client, base: &str) -> u16 {
    http.get(format!("{base}/readyz")).send().await.map(|r| r.status().as_u16()).unwrap_or(0)
}

/// Polls `send` until it answers `want` (at most 10 s); returns how long that took.
async fn until_status(send: impl Fn() -> reqwest::RequestBuilder, want: u16) -> Duration {
    let start = std::time::Instant::now();
    loop {
        let got = send().send().await.unwrap().status().as_u16();
        if got == want {
            return start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "still {got}, wanted {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn event(model: &str) -> serde_json::Value {
    let at = (chrono::Utc::now() - chrono::Duration::seconds(5)).format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
    json!({"events": [{"timestamp": at, "provider": "tally-test", "model": model,
        "tokens": {"promptTokens": 1_000_000, "completionTokens": 500_000, "totalTokens": 1_500_000},
        "latency": 100, "status": "success", "error": null}]})
}

async fn set_price(clickhouse: &ChConfig, model: &str, input: i64, output: i64, version: u32) {
    clickhouse
        .client()
        .query(&format!(
            "INSERT INTO {} (provider, model, effective_from, input_nanos_per_mtok, output_nanos_per_mtok, version) \
             VALUES ('tally-test', ?, toDateTime(0), ?, ?, ?)",
            clickhouse.table("model_prices")
        ))
        .bind(model)
        .bind(input)
        .bind(output)
        .bind(version)
        .execute()
        .await
        .unwrap();
}

async fn stored_costs(clickhouse: &ChConfig, model: &str) -> Vec<i64> {
    clickhouse
        .client()
        .query(&format!(
            "SELECT cost_nanos FROM {} WHERE model = ? ORDER BY received_at",
            clickhouse.table("events")
        ))
        .bind(model)
        .fetch_all()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_ingest_reading_kafka_only_authenticates_prices_and_revokes_from_the_control_topic() {
    let clickhouse = migrated_database("ctl").await;
    let (events, dlq, control) = (unique_name("events"), unique_name("dlq"), unique_name("control"));
    create_topic(&events, 2).await;
    create_topic(&dlq, 1).await;
    create_topic(&control, 1).await;
    let key = create_org_with_key(&clickhouse, "org_ctl", "ENTERPRISE", 600_000).await;
    set_price(&clickhouse, "ctl-model", 2_000_000_000, 8_000_000_000, 1).await;
    let env = Env::from_pairs([
        ("TALLY_KAFKA_BROKERS", kafka_brokers()),
        ("TALLY_CLICKHOUSE_URL", clickhouse.url.clone()),
        ("TALLY_CLICKHOUSE_DATABASE", clickhouse.database.clone()),
        ("TALLY_EVENTS_TOPIC", events.clone()),
        ("TALLY_DLQ_TOPIC", dlq.clone()),
        ("TALLY_CONTROL_TOPIC", control.clone()),
        ("TALLY_CONTROL_INTERVAL_MS", "200".to_owned()),
        ("TALLY_CONSUMER_GROUP", unique_name("group")),
        ("TALLY_BATCH_MAX_WAIT_MS", "100".to_owned()),
    ]);
    // The ingest knows ClickHouse only as a closed port.
    let ingest_env =
        env.clone().with("TALLY_INGEST_CONTROL", "kafka").with("TALLY_CLICKHOUSE_URL", "http://127.0.0.1:9");
    let shutdown = CancellationToken::new();
    let http = reqwest::Client::new();

    // Started before any consumer: nothing on the topic, so not ready, and every key unknown.
    let (listener, ingest) = bind().await;
    let first = tokio::spawn(tally_ingest::run(
        tally_ingest::config::IngestConfig::from_env(&ingest_env).unwrap(),
        listener,
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(readyz(&http, &ingest).await, 503, "no snapshot yet: not ready");

    let (listener, _) = bind().await;
    let consumer = tokio::spawn(tally_consumer::run(
        tally_consumer::config::ConsumerConfig::from_env(&env).unwrap(),
        listener,
        shutdown.clone(),
    ));
    let post = |base: &str, key: &str, model: &str| {
        let (url, key, body) = (format!("{base}/v1/ingest"), key.to_owned(), event(model));
        let http = http.clone();
        move || http.post(&url).header("X-API-Key", &key).json(&body)
    };
    until_status(post(&ingest, &key, "ctl-model"), 202).await;
    assert_eq!(readyz(&http, &ingest).await, 200);

    // Priced with the published price: 1 M prompt tokens at $2 + 0.5 M at $8 per million = $6.
    let mut costs = Vec::new();
    for _ in 0..100 {
        costs = stored_costs(&clickhouse, "ctl-model").await;
        if !costs.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(costs, [6_000_000_000], "priced from the control topic");

    // A new price and a revoked key reach the ingest through the topic within a few intervals.
    set_price(&clickhouse, "ctl-model", 4_000_000_000, 8_000_000_000, 2).await;
    let second_key = create_org_with_key(&clickhouse, "org_ctl_two", "STARTUP", 60_000).await;
    until_status(post(&ingest, &second_key, "ctl-model"), 202).await;
    clickhouse
        .client()
        .query(&format!(
            "INSERT INTO {} (key_hash, key_prefix, org_id, name, created_at, revoked, version) VALUES (?, 'x', 'org_ctl', 'test', now(), 1, 2)",
            clickhouse.table("api_keys")
        ))
        .bind(tally_schemas::keys::hash(&key))
        .execute()
        .await
        .unwrap();
    let revoked_after = until_status(post(&ingest, &key, "ctl-model"), 401).await;
    assert!(revoked_after < Duration::from_secs(5), "revocation took {revoked_after:?}");

    // A second ingest, started now, reads the same state from the topic's start.
    let (listener, late) = bind().await;
    let second = tokio::spawn(tally_ingest::run(
        tally_ingest::config::IngestConfig::from_env(&ingest_env).unwrap(),
        listener,
        shutdown.clone(),
    ));
    until_status(post(&late, &second_key, "ctl-model"), 202).await;
    assert_eq!(
        http.post(format!("{late}/v1/ingest"))
            .header("X-API-Key", &key)
            .json(&event("ctl-model"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let metrics = http.get(format!("{late}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metric_value(&metrics, "tally_ingest_control_snapshots_applied_total") >= 1, "{metrics}");
    for _ in 0..100 {
        if stored_costs(&clickhouse, "ctl-model").await.contains(&8_000_000_000) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let costs = stored_costs(&clickhouse, "ctl-model").await;
    assert!(
        costs.contains(&8_000_000_000),
        "the new price ($4 per million prompt tokens: $4 + $4) applied: {costs:?}"
    );

    shutdown.cancel();
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    consumer.await.unwrap().unwrap();
    delete_topics(&[&events, &dlq, &control]).await;
    drop_database(&clickhouse).await;
}
