//! One event end to end, through the real services and the real stack: admin creates an org, the
//! SDK batch goes through the ingest to Kafka, the consumer stores it in ClickHouse, and the query
//! API reports it in `GET /api/telemetry/status`.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::time::Duration;

use serde_json::{json, Value};
use tally_common::config::Env;
use tally_testkit::{
    create_topic, delete_topics, drop_database, kafka_brokers, new_database_config, unique_name,
};
use tokio_util::sync::CancellationToken;

const ADMIN: &str = "e2e-admin-token-0123456789";

async fn bind() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (listener, url)
}

async fn wait_ready(http: &reqwest::Client, base: &str) {
    for _ in 0..200 {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{base} never became ready");
}

#[tokio::test]
async fn sdk_batch_flows_from_ingest_to_status() {
    let clickhouse = new_database_config("e2e");
    let (topic, dlq) = (unique_name("events"), unique_name("dlq"));
    create_topic(&topic, 4).await;
    create_topic(&dlq, 1).await;
    let env = Env::from_pairs([
        ("TALLY_KAFKA_BROKERS", kafka_brokers()),
        ("TALLY_CLICKHOUSE_URL", clickhouse.url.clone()),
        ("TALLY_CLICKHOUSE_DATABASE", clickhouse.database.clone()),
        ("TALLY_EVENTS_TOPIC", topic.clone()),
        ("TALLY_DLQ_TOPIC", dlq.clone()),
        ("TALLY_CONSUMER_GROUP", unique_name("group")),
        ("TALLY_ADMIN_TOKEN", ADMIN.to_owned()),
        ("TALLY_KEY_REFRESH_MS", "200".to_owned()),
        ("TALLY_BATCH_MAX_WAIT_MS", "200".to_owned()),
    ]);
    let shutdown = CancellationToken::new();
    let http = reqwest::Client::new();

    let (query_listener, query_url) = bind().await;
    let query = tokio::spawn(tally_query_api::run(
        tally_query_api::config::QueryConfig::from_env(&env).unwrap(),
        query_listener,
        shutdown.clone(),
    ));
    wait_ready(&http, &query_url).await; // migrations applied
    let (consumer_listener, _) = bind().await;
    let consumer = tokio::spawn(tally_consumer::run(
        tally_consumer::config::ConsumerConfig::from_env(&env).unwrap(),
        consumer_listener,
        shutdown.clone(),
    ));
    let (ingest_listener, ingest_url) = bind().await;
    let ingest = tokio::spawn(tally_ingest::run(
        tally_ingest::config::IngestConfig::from_env(&env).unwrap(),
        ingest_listener,
        shutdown.clone(),
    ));
    wait_ready(&http, &ingest_url).await;

    let created: Value = http
        .post(format!("{query_url}/admin/orgs"))
        .bearer_auth(ADMIN)
        .json(&json!({"name": "e2e", "plan": "ENTERPRISE"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["apiKey"].as_str().unwrap().to_owned();

    let now = chrono::Utc::now();
    let first = (now - chrono::Duration::minutes(30)).format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
    let last = (now - chrono::Duration::seconds(5)).format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
    let batch = json!({"events": [
        {"timestamp": first, "provider":"openai","model":"gpt-4o",
         "tokens":{"promptTokens":1000,"completionTokens":500,"totalTokens":1500},
         "cost":0.0325,"latency":2500,"status":"success","error":null},
        {"timestamp": last, "provider":"anthropic","model":"claude-3-haiku-20240307",
         "tokens":{"promptTokens":10,"completionTokens":5,"totalTokens":15},
         "latency":300,"status":"error","error":"rate limited upstream"}
    ]});
    // The ingest learns the new key at its next refresh (200 ms here).
    let mut accepted = None;
    for _ in 0..50 {
        let response = http
            .post(format!("{ingest_url}/v1/ingest"))
            .header("X-API-Key", &key)
            .json(&batch)
            .send()
            .await
            .unwrap();
        if response.status() == 202 {
            accepted = Some(response.json::<Value>().await.unwrap());
            break;
        }
        assert_eq!(response.status(), 401);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        accepted.expect("ingest accepted the batch"),
        json!({"accepted": 2, "message": "Events queued for processing"})
    );
    let analytics = json!({"ts": last, "userId":"u-1","service":"chat","provider":"openai","model":"gpt-4o-mini",
        "latencyMs": 1420, "status": 200, "tokens": {"in": 1200, "out": 350}, "cost": {"usd": 0.0032}});
    let response = http
        .post(format!("{ingest_url}/analytics/events"))
        .header("X-API-Key", &key)
        .json(&analytics)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);

    let mut status = Value::Null;
    for _ in 0..100 {
        status = http
            .get(format!("{query_url}/api/telemetry/status"))
            .header("X-API-Key", &key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if status["totalEvents"] == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        status,
        json!({"connected": true, "firstEventAt": first, "lastEventAt": last, "totalEvents": 3})
    );

    shutdown.cancel();
    query.await.unwrap().unwrap();
    consumer.await.unwrap().unwrap();
    ingest.await.unwrap().unwrap();
    delete_topics(&[&topic, &dlq]).await;
    drop_database(&clickhouse).await;
}
