//! `GET /api/telemetry/stream` against real ClickHouse: the org's totals first and on change, only
//! its own; auth; the limits per org and in total; ClickHouse going away and coming back; the
//! streams ending when the server shuts down. (That a slow reader gets the newest totals rather
//! than a backlog is a unit test in `stream.rs`.)

#![allow(clippy::unwrap_used)] // tests fail loudly

mod common;

use std::time::Duration;

use common::Api;
use serde_json::Value;
use tally_testkit::{metric_value, ClickHouseServer};

/// A server-sent event stream read as it arrives.
struct Stream {
    response: reqwest::Response,
    buffer: String,
}

impl Stream {
    async fn open(api: &Api, key: &str) -> Stream {
        let response = open(api, key).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Stream { response, buffer: String::new() }
    }

    /// The next event (name, JSON data), or None if none came within `wait` or the stream ended.
    async fn next(&mut self, wait: Duration) -> Option<(String, Value)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut name = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        name = value.trim().to_owned();
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push_str(value.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Some((name, serde_json::from_str(&data).unwrap()));
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk()).await.ok()?.ok()??;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The next `totals` whose totalEvents is `events`, skipping older ones.
    async fn totals_reaching(&mut self, events: u64, wait: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let (name, data) = self
                .next(left)
                .await
                .unwrap_or_else(|| panic!("no totals of {events} events within {wait:?}"));
            if name == "totals" && data["totalEvents"] == events {
                return data;
            }
        }
    }
}

async fn open(api: &Api, key: &str) -> reqwest::Response {
    api.http.get(api.url("/api/telemetry/stream")).header("X-API-Key", key).send().await.unwrap()
}

fn fast() -> Vec<(&'static str, String)> {
    vec![("TALLY_QUERY_STREAM_INTERVAL_MS", "100".to_owned())]
}

const NOW: &str = "2026-06-01 12:00:00";

#[tokio::test]
async fn an_orgs_stream_sends_its_totals_then_each_change_and_nothing_of_other_orgs() {
    let api = Api::start_with(&fast()).await;
    let (org_a, key_a, _) = api.create_org("stream-a").await;
    let (org_b, key_b, _) = api.create_org("stream-b").await;
    api.insert_priced(&org_a, NOW, 0, "gpt-4o", 100, 1_500_000_001).await;
    api.insert_priced(&org_a, NOW, 1, "gpt-4o", 50, 2).await;

    let mut a = Stream::open(&api, &key_a).await;
    let mut b = Stream::open(&api, &key_b).await;
    let first = a.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!(first.0, "totals");
    assert_eq!(first.1["totalEvents"], 2);
    assert_eq!(first.1["totalTokens"], 150);
    assert_eq!(first.1["costNanos"], 1_500_000_003_i64);
    assert_eq!(first.1["errors"], 0);
    let (name, empty) = b.next(Duration::from_secs(5)).await.unwrap();
    assert_eq!((name.as_str(), &empty["totalEvents"]), ("totals", &Value::from(0)));

    // B's events reach B's stream, and A's stays silent: nothing of B's shows in A's.
    for i in 0..3 {
        api.insert_priced(&org_b, NOW, i, "claude", 10, 7).await;
    }
    let seen = b.totals_reaching(3, Duration::from_secs(5)).await;
    assert_eq!(seen["costNanos"], 21);
    assert!(
        a.next(Duration::from_millis(1500)).await.is_none(),
        "A's stream sent something when only B changed"
    );

    // A's next event arrives within about two seconds.
    let started = std::time::Instant::now();
    api.insert_priced(&org_a, NOW, 2, "gpt-4o", 1, 1).await;
    a.totals_reaching(3, Duration::from_secs(2)).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    drop((a, b));
    api.stop().await;
}

#[tokio::test]
async fn a_stream_needs_a_valid_key() {
    let api = Api::start().await;
    let missing = api.http.get(api.url("/api/telemetry/stream")).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    let wrong = open(&api, "tally_not-a-real-key-0000000000000000").await;
    assert_eq!(wrong.status(), 401);
    let body: Value = wrong.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    api.stop().await;
}

#[tokio::test]
async fn streams_are_limited_per_org_and_in_total_and_a_closed_one_frees_its_place() {
    let api = Api::start_with(&[
        ("TALLY_QUERY_STREAMS_PER_ORG", "2".to_owned()),
        ("TALLY_QUERY_STREAMS_TOTAL", "3".to_owned()),
    ])
    .await;
    let (_, key_a, _) = api.create_org("limit-a").await;
    let (_, key_b, _) = api.create_org("limit-b").await;
    let a1 = Stream::open(&api, &key_a).await;
    let _a2 = Stream::open(&api, &key_a).await;
    let third = open(&api, &key_a).await;
    assert_eq!(third.status(), 429);
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_streams");

    let _b1 = Stream::open(&api, &key_b).await;
    let full = open(&api, &key_b).await;
    assert_eq!(full.status(), 503);
    let body: Value = full.json().await.unwrap();
    assert_eq!(body["error"]["code"], "streams_full");
    let metrics = api.http.get(api.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric_value(&metrics, "tally_query_streams_open"), 3);

    // Closing one (the client goes away) frees its place, for any org.
    drop(a1);
    let mut reopened = None;
    for _ in 0..50 {
        let response = open(&api, &key_b).await;
        if response.status() == 200 {
            reopened = Some(response);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reopened.is_some(), "the closed stream's place was never freed");
    drop(reopened);
    api.stop().await;
}

#[tokio::test]
async fn clickhouse_going_away_sends_unavailable_and_totals_resume_when_it_is_back() {
    let mut server = ClickHouseServer::start().await;
    let clickhouse = server.migrated_database("stream_outage").await;
    let api = Api::start_on(clickhouse, &fast()).await;
    let (org, key, _) = api.create_org("outage").await;
    api.insert_priced(&org, NOW, 0, "gpt-4o", 5, 5).await;
    let mut stream = Stream::open(&api, &key).await;
    stream.totals_reaching(1, Duration::from_secs(5)).await;

    server.kill();
    let (name, data) = stream.next(Duration::from_secs(10)).await.expect("an event while ClickHouse is down");
    assert_eq!(name, "unavailable");
    assert_eq!(data["error"], "storage_unavailable");
    // A stream opened during the outage is served (keys are in memory) and says so too.
    let mut during = Stream::open(&api, &key).await;
    assert_eq!(during.next(Duration::from_secs(5)).await.unwrap().0, "unavailable");

    server.resume().await;
    stream.totals_reaching(1, Duration::from_secs(15)).await;
    during.totals_reaching(1, Duration::from_secs(5)).await;
    api.insert_priced(&org, NOW, 1, "gpt-4o", 5, 5).await;
    stream.totals_reaching(2, Duration::from_secs(5)).await;
    drop((stream, during));
    api.stop().await;
}

#[tokio::test]
async fn open_streams_end_when_the_server_shuts_down() {
    let api = Api::start_with(&fast()).await;
    let (_, key, _) = api.create_org("shutdown").await;
    let mut stream = Stream::open(&api, &key).await;
    stream.totals_reaching(0, Duration::from_secs(5)).await;
    // The drain must not wait for the stream: stop returns, and the stream ends.
    tokio::time::timeout(Duration::from_secs(10), api.stop())
        .await
        .expect("shutdown waited on an open stream");
    assert!(stream.next(Duration::from_secs(5)).await.is_none());
}
