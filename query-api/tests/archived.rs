//! The query API answers for months the archiver dropped from ClickHouse exactly as before: the
//! rollups for whole hours, the archive for the raw rows (edge hours, hours holding a local
//! midnight, one user's analytics, the events list); late rows, a month both dropped and still in
//! ClickHouse, and a restored month count every row once; an org sees only its own archived rows.
//! Real ClickHouse, the real archiver into a local directory.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use common::Api;
use serde_json::Value;
use tally_archiver::archive::{self, Outcome};
use tally_archiver::config::ArchiverConfig;
use tally_archiver::manifest::Dropped;
use tally_archiver::month::Month;
use tally_archiver::source;
use tally_archiver::store::Archive;
use tally_common::config::Env;
use tally_schemas::{CostSource, EventRow, Status};

const AUGUST: &str = "2026-08";

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
}

/// "Now" for the archiver: August is closed, and with one hot month it may be dropped.
fn now() -> DateTime<Utc> {
    at("2026-11-30T12:00:00Z")
}

/// `count` events of `org` spread over `[from, from + span_s)`, deterministic; `seed` keeps the
/// ids and Kafka positions of different calls apart.
fn events(org: &str, from: &str, span_s: u32, count: u32, seed: u32) -> Vec<EventRow> {
    let start = at(from).timestamp() as u32;
    (0..count)
        .map(|i| {
            let n = i.wrapping_mul(2_654_435_761).wrapping_add(seed);
            EventRow {
                org_id: org.to_owned(),
                event_id: uuid::Uuid::from_u128(u128::from(seed) << 64 | u128::from(i)),
                timestamp: start + n % span_s,
                timestamp_ms: (n % 1000) as u16,
                received_at: start + n % span_s,
                provider: ["openai", "anthropic"][(n % 2) as usize].into(),
                model: ["gpt-4o", "gpt-4o-mini", "claude-3"][(n % 3) as usize].into(),
                prompt_tokens: n % 5000,
                completion_tokens: n % 700,
                total_tokens: n % 5000 + n % 700,
                cost_nanos: 1_000_003 + i64::from(n % 90_000) * 7_919,
                cost_source: if n % 2 == 0 { CostSource::Client } else { CostSource::Computed },
                latency_ms: n % 3000,
                status: if n % 7 == 0 { Status::Error } else { Status::Success },
                http_status: if n % 7 == 0 { 500 } else { 200 },
                error: if n % 7 == 0 { "upstream".into() } else { String::new() },
                execution_id: format!("exec-{}", n % 17),
                agent_id: String::new(),
                user_id: format!("user-{}", n % 5),
                service: ["chat", "search"][(n % 2) as usize].into(),
                action: String::new(),
                request_id: format!("req-{i}"),
                input_bytes: u64::from(n % 10_000),
                output_bytes: u64::from(n % 20_000),
                metadata_keys: vec!["env".into()],
                metadata_values: vec![["prod", "dev"][(n % 2) as usize].into()],
                kafka_partition: (n % 4) as u16,
                kafka_offset: u64::from(seed) * 1_000_000 + u64::from(i),
                kafka_index: 0,
            }
        })
        .collect()
}

fn archiver(api: &Api, url: &str, hot_months: Option<u32>) -> ArchiverConfig {
    let mut env = Env::from_pairs([
        ("TALLY_CLICKHOUSE_URL", api.clickhouse.url.clone()),
        ("TALLY_CLICKHOUSE_DATABASE", api.clickhouse.database.clone()),
        ("TALLY_ARCHIVE_URL", url.to_owned()),
        ("TALLY_ARCHIVE_FILE_ROWS", "1500".to_owned()),
        ("TALLY_ARCHIVE_CHUNK_ROWS", "700".to_owned()),
        ("TALLY_ARCHIVE_DROP_GRACE_S", "0".to_owned()),
    ]);
    if let Some(hot) = hot_months {
        env = env.with("TALLY_ARCHIVE_HOT_MONTHS", hot.to_string());
    }
    ArchiverConfig::from_env(&env).unwrap()
}

async fn held_in_august(api: &Api) -> u64 {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct N {
        n: u64,
    }
    let sql = format!(
        "SELECT count() AS n FROM {} WHERE toYYYYMM(timestamp) = 202608",
        api.clickhouse.table("events")
    );
    api.clickhouse.client().query(&sql).fetch_one::<N>().await.unwrap().n
}

async fn get(api: &Api, key: &str, path: &str) -> Value {
    let response = api.http.get(api.url(path)).header("X-API-Key", key).send().await.unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    body
}

/// Every event id of the events list over `query`, following the cursor page by page.
async fn all_pages(api: &Api, key: &str, query: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let path = match &cursor {
            Some(c) => format!("/api/costs?{query}&cursor={c}"),
            None => format!("/api/costs?{query}"),
        };
        let page = get(api, key, &path).await;
        ids.extend(
            page["events"].as_array().unwrap().iter().map(|e| e["eventId"].as_str().unwrap().to_owned()),
        );
        match page["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return ids,
        }
    }
    panic!("the events list of {query} never ended: {} events in 1000 pages", ids.len());
}

const RANGE_IN_AUGUST: &str = "from=2026-08-03T10:15:30.250Z&to=2026-08-29T05:20:00.500Z";
const RANGE_ACROSS: &str = "from=2026-08-20T07:45:00Z&to=2026-11-19T07:30:00Z";

/// The answers compared before and after: summary, budget, org and per-user analytics (hour and
/// local-day buckets, in a zone whose midnight is not on a UTC hour), and the events list with
/// filters, offsets and cursors.
async fn answers(api: &Api, key: &str) -> Vec<(String, Value)> {
    let mut paths = vec!["/api/costs/budget".to_owned()];
    for range in [RANGE_IN_AUGUST, RANGE_ACROSS] {
        paths.extend([
            format!("/api/costs/summary?{range}"),
            format!("/api/analytics/overview?{range}"),
            format!("/api/analytics/timeseries?{range}&bucket=day&tz=Asia/Kolkata&groupBy=model"),
            format!("/api/analytics/timeseries?{range}&bucket=hour"),
            format!("/api/analytics/perf?{range}"),
            format!("/api/analytics/costs?{range}"),
            format!("/analytics/user/user-1/overview?{range}"),
            format!("/analytics/user/user-2/timeseries?{range}&bucket=day&tz=Australia/Adelaide"),
            format!("/analytics/user/user-3/costs?{range}&model=gpt-4o"),
            format!("/api/costs?{range}&limit=40&offset=120&model=gpt-4o&status=error"),
            format!("/api/costs?{range}&limit=25&userId=user-4"),
        ]);
    }
    let mut out = Vec::new();
    for path in paths {
        let body = get(api, key, &path).await;
        out.push((path, body));
    }
    for range in [RANGE_IN_AUGUST, RANGE_ACROSS] {
        let ids = all_pages(api, key, &format!("{range}&limit=97")).await;
        out.push((format!("every page of {range}"), Value::from(ids)));
    }
    out
}

fn assert_same(before: &[(String, Value)], after: &[(String, Value)], when: &str) {
    assert_eq!(before.len(), after.len());
    for ((path, a), (_, b)) in before.iter().zip(after) {
        assert_eq!(a, b, "{path} answers differently {when}");
    }
}

#[tokio::test]
async fn dropped_months_answer_exactly_as_before_from_the_archive_for_their_own_org_only() {
    let dir = std::env::temp_dir().join(format!("tally-query-archive-{}", uuid::Uuid::new_v4().simple()));
    let url = format!("file://{}", dir.display());
    let api = Api::start_with(&[
        ("TALLY_ARCHIVE_URL", url.clone()),
        ("TALLY_QUERY_ARCHIVE_CACHE_S", "0".to_owned()),
    ])
    .await;
    let (org_a, key_a, _) = api.create_org("archived-a").await;
    let (org_b, key_b, _) = api.create_org("archived-b").await;
    let table = api.clickhouse.table("events");
    let mut rows = events(&org_a, "2026-08-01T00:00:00Z", 31 * 86_400, 3000, 1);
    rows.extend(events(&org_b, "2026-08-01T00:00:00Z", 31 * 86_400, 1200, 2));
    rows.extend(events(&org_a, "2026-11-01T00:00:00Z", 24 * 86_400, 600, 3));
    rows.extend(events(&org_b, "2026-11-01T00:00:00Z", 24 * 86_400, 300, 4));
    let (from, to) =
        (at("2026-08-20T07:45:00Z").timestamp_millis(), at("2026-11-19T07:30:00Z").timestamp_millis());
    let across_a: BTreeSet<String> = rows
        .iter()
        .filter(|r| r.org_id == org_a && (from..to).contains(&r.timestamp_epoch_ms()))
        .map(|r| r.event_id.to_string())
        .collect();
    source::insert(&api.clickhouse, &table, rows).await.unwrap();

    let before_a = answers(&api, &key_a).await;
    let before_b = answers(&api, &key_b).await;
    // The events list of each org holds only its own rows, and the ranges do read August.
    let ids = |answers: &[(String, Value)]| -> BTreeSet<String> {
        answers.last().unwrap().1.as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(ids(&before_a), across_a);
    assert!(ids(&before_a).is_disjoint(&ids(&before_b)));

    // Archive August and drop it from ClickHouse.
    let store = Archive::open(&archiver(&api, &url, None)).unwrap();
    let pass = archive::run(&archiver(&api, &url, Some(1)), &store, now()).await.unwrap();
    let august = pass.iter().find(|r| r.month == AUGUST).unwrap();
    assert_eq!(august.outcome, Outcome::DroppedNow { version: 1, rows: 4200 }, "{pass:?}");
    assert_eq!(held_in_august(&api).await, 0);

    assert_same(&before_a, &answers(&api, &key_a).await, "after the drop (org a)");
    assert_same(&before_b, &answers(&api, &key_b).await, "after the drop (org b)");

    // The moment between a drop record and the drop, or a restored month whose record is not yet
    // removed: the rows are in both places and count once.
    let month = Month::parse(AUGUST).unwrap();
    archive::restore(&archiver(&api, &url, None), &store, month).await.unwrap();
    assert_eq!(held_in_august(&api).await, 4200);
    assert_same(&before_a, &answers(&api, &key_a).await, "after the restore");
    Dropped::now(month, 1, 4200).publish(&store).await.unwrap();
    assert_same(&before_a, &answers(&api, &key_a).await, "with the month in ClickHouse and the archive");

    // Dropped again, then a late row lands in August: it is read from ClickHouse; archived as a
    // new version and dropped once more, it is read from the archive; never twice.
    archive::run(&archiver(&api, &url, Some(1)), &store, now()).await.unwrap();
    assert_eq!(held_in_august(&api).await, 0);
    let mut late = events(&org_a, "2026-08-28T23:10:00Z", 600, 1, 5);
    late[0].user_id = "user-1".into();
    source::insert(&api.clickhouse, &table, late.clone()).await.unwrap();
    let with_late = answers(&api, &key_a).await;
    let summary = |answers: &[(String, Value)]| answers[1].1["executionCount"].as_u64().unwrap();
    assert_eq!(summary(&with_late), summary(&before_a) + 1, "{}", with_late[1].1);
    assert_same(&before_b, &answers(&api, &key_b).await, "after org a's late row (org b)");
    let pass = archive::run(&archiver(&api, &url, Some(1)), &store, now()).await.unwrap();
    let outcomes: Vec<String> = pass.iter().map(|r| format!("{} {:?}", r.month, r.outcome)).collect();
    assert!(outcomes.contains(&format!("{AUGUST} DroppedNow {{ version: 2, rows: 1 }}")), "{outcomes:?}");
    let again = archive::run(&archiver(&api, &url, Some(1)), &store, now()).await.unwrap();
    assert_eq!(held_in_august(&api).await, 0, "{outcomes:?} then {again:?}");
    assert_same(&with_late, &answers(&api, &key_a).await, "after the late row was archived and dropped");

    api.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
