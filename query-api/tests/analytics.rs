//! Every read endpoint compared with an independent aggregate over the raw `events` table on
//! generated data (late events into past hours included), every parameter tried against another
//! org's data, and every input bound.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use chrono::{DateTime, Duration, DurationRound, Utc};
use common::{Api, ADMIN};
use serde_json::{json, Value};

const PROVIDERS: [(&str, &str); 4] = [
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("anthropic", "claude-3-5-sonnet"),
    ("ollama", "llama3"),
];

/// One INSERT of `count` generated events for `org`, ending near `end`, every ~9.7 minutes back.
async fn generate(api: &Api, org: &str, end: DateTime<Utc>, count: u32, seed: u32) {
    let mut values = Vec::new();
    for i in 0..count {
        let n = i.wrapping_mul(2_654_435_761).wrapping_add(seed) % 1_000_003;
        let at = end - Duration::milliseconds(i64::from(i) * 583_123 + i64::from(n % 1000));
        let (provider, model) = PROVIDERS[(n % 4) as usize];
        values.push(format!(
            "('{org}', '{id}', '{ts}', {ms}, '{provider}', '{model}', {p}, {c}, {t}, {cost}, {lat}, '{status}', \
             'exec-{e}', 'user-{u}', 'svc-{s}', {ib}, {ob})",
            id = uuid::Uuid::new_v4(),
            ts = at.format("%Y-%m-%d %H:%M:%S"),
            ms = at.timestamp_subsec_millis(),
            p = 10 + n % 500,
            c = 5 + n % 300,
            t = 15 + n % 500 + n % 300,
            cost = 1_000_003 + i64::from(n) * 7_919,
            lat = 20 + n % 3000,
            status = if n % 7 == 0 { "error" } else { "success" },
            e = n % 17,
            u = n % 5,
            s = n % 3,
            ib = n % 10_000,
            ob = n % 20_000,
        ));
    }
    api.clickhouse
        .client()
        .query(&format!(
            "INSERT INTO {} (org_id, event_id, timestamp, timestamp_ms, provider, model, prompt_tokens, completion_tokens, \
             total_tokens, cost_nanos, latency_ms, status, execution_id, user_id, service, input_bytes, output_bytes) VALUES {}",
            api.clickhouse.table("events"),
            values.join(", ")
        ))
        .execute()
        .await
        .unwrap();
}

/// Rows of a raw-table query as JSON (64-bit integers unquoted).
async fn raw(api: &Api, sql: &str) -> Vec<Value> {
    let text = api
        .http
        .post(format!("{}/?output_format_json_quote_64bit_integers=0", api.clickhouse.url))
        .body(format!("{sql} FORMAT JSONEachRow"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn rfc(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The answer states the range it covers.
fn assert_range(answer: &Value, from: DateTime<Utc>, to: DateTime<Utc>) {
    assert_eq!(
        (answer["from"].as_str(), answer["to"].as_str()),
        (Some(rfc(from).as_str()), Some(rfc(to).as_str())),
        "{answer}"
    );
}

/// The raw-table condition for one org (and optionally user) in [from, to).
fn raw_where(api: &Api, org: &str, user: Option<&str>, from: DateTime<Utc>, to: DateTime<Utc>) -> String {
    format!(
        "FROM {} WHERE org_id = '{org}' {} AND toInt64(timestamp) * 1000 + timestamp_ms >= {} \
         AND toInt64(timestamp) * 1000 + timestamp_ms < {}",
        api.clickhouse.table("events"),
        user.map_or(String::new(), |u| format!("AND user_id = '{u}'")),
        ms(from),
        ms(to)
    )
}

async fn get(api: &Api, key: &str, path: &str, query: &[(&str, String)]) -> (u16, Value) {
    let response = api.http.get(api.url(path)).query(query).header("X-API-Key", key).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

fn q(pairs: &[(&str, &str)]) -> Vec<(&'static str, String)> {
    pairs.iter().map(|(k, v)| (Box::leak(k.to_string().into_boxed_str()) as &str, v.to_string())).collect()
}

/// Checks overview, perf, costs and timeseries against the raw table for one scope.
async fn check_analytics(
    api: &Api,
    key: &str,
    org: &str,
    user: Option<&str>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) {
    let range = [("from", rfc(from)), ("to", rfc(to))];
    let prefix = match user {
        Some(u) => format!("/analytics/user/{u}"),
        None => "/api/analytics".into(),
    };
    // Analytics cover whole hours: the range is widened to them and the answer says so.
    let hour = Duration::hours(1);
    let (from, to) = (from.duration_trunc(hour).unwrap(), to.duration_round_up(hour).unwrap());
    let w = raw_where(api, org, user, from, to);

    let (status, overview) = get(api, key, &format!("{prefix}/overview"), &range).await;
    assert_eq!(status, 200, "{overview}");
    assert_range(&overview, from, to);
    let expected = &raw(
        api,
        &format!(
            "SELECT count() AS requests, countIf(status = 'error') AS errors, sum(toUInt64(prompt_tokens)) AS tin, \
             sum(toUInt64(completion_tokens)) AS tout, sum(toUInt64(total_tokens)) AS tokens, sum(input_bytes) AS bin, \
             sum(output_bytes) AS bout, sum(cost_nanos) AS cost, uniqExact(service) AS services, \
             quantilesTiming(0.5, 0.95, 0.99)(latency_ms) AS q {w}"
        ),
    )
    .await[0];
    assert!(expected["requests"].as_u64().unwrap() > 0, "the scope has data");
    for (field, column) in [
        ("totalRequests", "requests"),
        ("errors", "errors"),
        ("tokensIn", "tin"),
        ("tokensOut", "tout"),
        ("totalTokens", "tokens"),
        ("bytesIn", "bin"),
        ("bytesOut", "bout"),
        ("costNanos", "cost"),
        ("distinctServices", "services"),
    ] {
        assert_eq!(overview[field].as_i64(), expected[column].as_i64(), "overview {field} for {user:?}");
    }
    for (i, p) in ["p50", "p95", "p99"].iter().enumerate() {
        assert_eq!(overview["latencyMs"][p].as_f64(), expected["q"][i].as_f64(), "overview {p}");
    }

    let (_, perf) = get(api, key, &format!("{prefix}/perf"), &range).await;
    assert_range(&perf, from, to);
    let expected = raw(
        api,
        &format!(
            "SELECT provider, model, count() AS requests, countIf(status = 'error') AS errors, \
             quantilesTiming(0.5, 0.95, 0.99)(latency_ms) AS q {w} GROUP BY provider, model ORDER BY requests DESC, provider, model"
        ),
    )
    .await;
    let models = perf["models"].as_array().unwrap();
    assert_eq!(models.len(), expected.len());
    for (got, want) in models.iter().zip(&expected) {
        assert_eq!((&got["provider"], &got["model"]), (&want["provider"], &want["model"]));
        assert_eq!(got["requests"].as_u64(), want["requests"].as_u64());
        assert_eq!(got["errors"].as_u64(), want["errors"].as_u64());
        assert_eq!(got["latencyMs"]["p99"].as_f64(), want["q"][2].as_f64(), "perf p99 {}", want["model"]);
    }
    let expected = raw(
        api,
        &format!(
            "SELECT service, count() AS requests, countIf(status = 'error') AS errors, \
             quantilesTiming(0.5, 0.95, 0.99)(latency_ms) AS q {w} GROUP BY service ORDER BY requests DESC, service"
        ),
    )
    .await;
    let services = perf["services"].as_array().unwrap();
    assert_eq!(services.len(), expected.len(), "perf services for {user:?}");
    assert!(!services.is_empty());
    for (got, want) in services.iter().zip(&expected) {
        assert_eq!(got["service"], want["service"]);
        assert_eq!(
            got["requests"].as_u64(),
            want["requests"].as_u64(),
            "perf service requests {}",
            want["service"]
        );
        assert_eq!(
            got["errors"].as_u64(),
            want["errors"].as_u64(),
            "perf service errors {}",
            want["service"]
        );
        for (i, p) in ["p50", "p95", "p99"].iter().enumerate() {
            assert_eq!(
                got["latencyMs"][p].as_f64(),
                want["q"][i].as_f64(),
                "perf service {p} {}",
                want["service"]
            );
        }
    }

    let (_, costs) = get(api, key, &format!("{prefix}/costs"), &range).await;
    assert_range(&costs, from, to);
    let expected = raw(
        api,
        &format!(
            "SELECT service, provider, model, count() AS requests, sum(toUInt64(total_tokens)) AS tokens, \
             sum(cost_nanos) AS cost {w} GROUP BY service, provider, model ORDER BY cost DESC, service, provider, model"
        ),
    )
    .await;
    let breakdown = costs["breakdown"].as_array().unwrap();
    assert_eq!(breakdown.len(), expected.len());
    for (got, want) in breakdown.iter().zip(&expected) {
        for (field, column) in
            [("service", "service"), ("model", "model"), ("costNanos", "cost"), ("tokens", "tokens")]
        {
            assert_eq!(got[field], want[column], "costs {field}");
        }
    }
    let total: i64 = expected.iter().map(|r| r["cost"].as_i64().unwrap()).sum();
    assert_eq!(costs["totalNanos"].as_i64(), Some(total));

    let mut query = range.to_vec();
    query.push(("groupBy", "model".into()));
    let (_, series) = get(api, key, &format!("{prefix}/timeseries"), &query).await;
    assert_range(&series, from, to);
    let expected = raw(
        api,
        &format!(
            "SELECT toUInt32(toStartOfHour(timestamp)) AS h, model, count() AS requests, sum(cost_nanos) AS cost, \
             quantilesTiming(0.5, 0.95, 0.99)(latency_ms) AS q {w} GROUP BY h, model ORDER BY h, model"
        ),
    )
    .await;
    let points = series["points"].as_array().unwrap();
    assert_eq!(points.len(), expected.len(), "one point per (hour, model)");
    for (got, want) in points.iter().zip(&expected) {
        let hour = DateTime::from_timestamp(want["h"].as_i64().unwrap(), 0).unwrap();
        assert_eq!(got["time"].as_str().unwrap(), rfc(hour));
        assert_eq!(got["key"], want["model"]);
        assert_eq!(got["requests"].as_u64(), want["requests"].as_u64());
        assert_eq!(got["costNanos"].as_i64(), want["cost"].as_i64());
        assert_eq!(got["latencyMs"]["p95"].as_f64(), want["q"][1].as_f64());
    }
    // Day buckets in a time zone other than UTC.
    check_days(api, key, org, user, (from, to), "America/New_York").await;
}

/// Day buckets in `tz` (grouped by model) against the raw table grouped by `toDate(timestamp, tz)`,
/// over the whole hours of `range`.
async fn check_days(
    api: &Api,
    key: &str,
    org: &str,
    user: Option<&str>,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
    tz: &str,
) {
    let prefix = match user {
        Some(u) => format!("/analytics/user/{u}"),
        None => "/api/analytics".into(),
    };
    let query = [
        ("from", rfc(from)),
        ("to", rfc(to)),
        ("bucket", "day".to_owned()),
        ("tz", tz.to_owned()),
        ("groupBy", "model".to_owned()),
    ];
    let (status, series) = get(api, key, &format!("{prefix}/timeseries"), &query).await;
    assert_eq!(status, 200, "{series}");
    assert_range(&series, from, to);
    assert_eq!(series["tz"].as_str(), Some(tz));
    let w = raw_where(api, org, user, from, to);
    let expected = raw(
        api,
        &format!(
            "SELECT toString(toDate(timestamp, '{tz}')) AS d, model, count() AS requests, sum(cost_nanos) AS cost, \
             countIf(status = 'error') AS errors, quantilesTiming(0.5, 0.95, 0.99)(latency_ms) AS q \
             {w} GROUP BY d, model ORDER BY d, model"
        ),
    )
    .await;
    assert!(expected.len() > 1, "the range spans several local days in {tz}");
    let points = series["points"].as_array().unwrap();
    let got: Vec<_> = points
        .iter()
        .map(|p| {
            (
                p["time"].clone(),
                p["key"].clone(),
                p["requests"].as_u64(),
                p["costNanos"].as_i64(),
                p["errors"].as_u64(),
            )
        })
        .collect();
    let want: Vec<_> = expected
        .iter()
        .map(|r| {
            (
                r["d"].clone(),
                r["model"].clone(),
                r["requests"].as_u64(),
                r["cost"].as_i64(),
                r["errors"].as_u64(),
            )
        })
        .collect();
    assert_eq!(got, want, "day buckets in {tz} for {user:?}");
    for (point, row) in points.iter().zip(&expected) {
        assert_eq!(point["latencyMs"]["p99"].as_f64(), row["q"][2].as_f64(), "p99 of {} in {tz}", row["d"]);
    }
}

#[tokio::test]
async fn day_buckets_are_exact_in_zones_whose_midnight_is_not_on_a_whole_utc_hour() {
    let api = Api::start().await;
    let (org, key, _) = api.create_org("zones").await;
    // ~5.4 days of events every ~9.7 minutes up to each end: Adelaide moves from +09:30 to +10:30
    // on 2026-10-04, St John's from -02:30 to -03:30 on 2026-11-01.
    let ends = [at("2026-10-06T23:59:00Z"), at("2026-11-03T12:00:00Z"), at("2026-11-30T06:00:00Z")];
    for (seed, end) in ends.iter().enumerate() {
        generate(&api, &org, *end, 800, seed as u32 + 11).await;
    }
    // The case: 18:15Z and 18:45Z on 2026-11-29 are 23:45 and 00:15 in Kolkata.
    for at_utc in ["2026-11-29 18:15:00", "2026-11-29 18:45:00"] {
        api.clickhouse
            .client()
            .query(&format!(
                "INSERT INTO {} (org_id, event_id, timestamp, provider, model, cost_nanos, user_id) \
                 VALUES (?, toUUID(?), ?, 'openai', 'gpt-4o', 1000, 'user-1')",
                api.clickhouse.table("events")
            ))
            .bind(&org)
            .bind(uuid::Uuid::new_v4().to_string())
            .bind(at_utc)
            .execute()
            .await
            .unwrap();
    }
    let cases = [
        ("Australia/Adelaide", ends[0]),
        ("America/St_Johns", ends[1]),
        ("Asia/Kolkata", ends[2]),
        ("Asia/Kathmandu", ends[2]),
        ("Asia/Tehran", ends[2]),
        ("Australia/Eucla", ends[2]),
        ("Pacific/Chatham", ends[2]),
    ];
    for (tz, end) in cases {
        let hour = Duration::hours(1);
        let range =
            ((end - Duration::days(5)).duration_trunc(hour).unwrap(), end.duration_round_up(hour).unwrap());
        check_days(&api, &key, &org, None, range, tz).await;
        check_days(&api, &key, &org, Some("user-1"), range, tz).await;
    }
    // The two events of the issue land on two local days.
    let query = [
        ("from", "2026-11-29T18:00:00Z".to_owned()),
        ("to", "2026-11-29T19:00:00Z".to_owned()),
        ("bucket", "day".to_owned()),
        ("tz", "Asia/Kolkata".to_owned()),
        ("model", "gpt-4o".to_owned()),
    ];
    let (_, series) = get(&api, &key, "/api/analytics/timeseries", &query).await;
    let days: Vec<&str> =
        series["points"].as_array().unwrap().iter().map(|p| p["time"].as_str().unwrap()).collect();
    assert_eq!(days, ["2026-11-29", "2026-11-30"], "{series}");
    api.stop().await;
}

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
}

#[tokio::test]
async fn analytics_equal_the_raw_table_for_the_org_and_for_one_user() {
    let api = Api::start().await;
    let (org_a, key_a, _) = api.create_org("a").await;
    let (org_b, key_b, _) = api.create_org("b").await;
    let now = Utc::now();
    generate(&api, &org_a, now - Duration::minutes(3), 400, 1).await;
    // Late events: a second insert into hours the first already filled.
    generate(&api, &org_a, now - Duration::hours(20) - Duration::minutes(7), 40, 2).await;
    // Org b has the same user, execution and service names, other numbers.
    generate(&api, &org_b, now - Duration::minutes(5), 150, 3).await;
    let hour = Duration::hours(1);
    let from = now.duration_trunc(hour).unwrap() - Duration::hours(50)
        + Duration::minutes(17)
        + Duration::milliseconds(123);
    let to = now - Duration::minutes(31);
    check_analytics(&api, &key_a, &org_a, None, from, to).await;
    check_analytics(&api, &key_a, &org_a, Some("user-3"), from, to).await;
    check_analytics(&api, &key_b, &org_b, None, from, to).await;
    check_analytics(&api, &key_b, &org_b, Some("user-3"), from, to).await;
    // Whole hours only: the rollup alone answers (one flat query per endpoint).
    let (whole_from, whole_to) =
        (now.duration_trunc(hour).unwrap() - Duration::hours(30), now.duration_trunc(hour).unwrap());
    check_analytics(&api, &key_a, &org_a, None, whole_from, whole_to).await;
    // userId as a parameter is the same scope as the seed-004 path.
    let range = [("from", rfc(from)), ("to", rfc(to))];
    let mut with_user = range.to_vec();
    with_user.push(("userId", "user-3".into()));
    let by_param = get(&api, &key_a, "/api/analytics/overview", &with_user).await.1;
    let by_path = get(&api, &key_a, "/analytics/user/user-3/overview", &range).await.1;
    assert_eq!(by_param, by_path);
    // A user the org does not have: zeros, not another org's numbers.
    let (status, none) = get(&api, &key_a, "/analytics/user/nobody/overview", &range).await;
    assert_eq!((status, none["totalRequests"].as_u64()), (200, Some(0)));
    assert!(none["latencyMs"].is_null());
    api.stop().await;
}

/// The rollup reads of a request ask for the uncompressed cache: an org's second overview reads
/// its blocks from the cache, not by decompressing them again (what kept the overview route from
/// its latency target at 200 requests/s).
#[tokio::test]
async fn an_orgs_repeated_rollup_reads_come_from_the_uncompressed_cache() {
    let api = Api::start().await;
    let (org, key, _) = api.create_org("cached").await;
    let now = Utc::now();
    generate(&api, &org, now - Duration::minutes(3), 300, 5).await;
    let hour = Duration::hours(1);
    let range = [
        ("from", rfc(now.duration_trunc(hour).unwrap() - Duration::hours(40))),
        ("to", rfc(now.duration_trunc(hour).unwrap())),
    ];
    for _ in 0..2 {
        let (status, overview) = get(&api, &key, "/api/analytics/overview", &range).await;
        assert_eq!(status, 200, "{overview}");
        assert!(overview["totalRequests"].as_u64().unwrap() > 0, "{overview}");
    }
    api.clickhouse.client().query("SYSTEM FLUSH LOGS").execute().await.unwrap();
    let reads = raw(
        &api,
        &format!(
            "SELECT Settings.Values[indexOf(Settings.Names, 'use_uncompressed_cache')] AS cache, \
             ProfileEvents.Values[indexOf(ProfileEvents.Names, 'UncompressedCacheHits')] AS hits \
             FROM system.query_log WHERE type = 2 AND query LIKE '%{}%' AND query LIKE '%sumMerge(prompt_tokens_sum)%' \
             AND query NOT LIKE '%system.query_log%' ORDER BY event_time, query_start_time",
            api.clickhouse.table("rollup_hourly")
        ),
    )
    .await;
    assert_eq!(reads.len(), 2, "one usage read per overview: {reads:?}");
    assert!(reads.iter().all(|r| r["cache"] == "1"), "{reads:?}");
    assert!(reads[1]["hits"].as_u64().unwrap() > 0, "the second read hits the cache: {reads:?}");
    api.stop().await;
}

#[tokio::test]
async fn events_list_pages_newest_first_with_filters_and_a_stable_cursor() {
    let api = Api::start().await;
    let (org_a, key_a, _) = api.create_org("a").await;
    let (org_b, key_b, _) = api.create_org("b").await;
    let now = Utc::now();
    generate(&api, &org_a, now - Duration::minutes(1), 300, 4).await;
    generate(&api, &org_b, now - Duration::minutes(1), 50, 5).await;
    let from = now - Duration::hours(40);
    let to = now;
    for filters in [
        vec![],
        vec![("model", "gpt-4o")],
        vec![("status", "error"), ("userId", "user-1")],
        vec![("executionId", "exec-4")],
    ] {
        let mut condition = raw_where(&api, &org_a, None, from, to);
        for (name, value) in &filters {
            let column = match *name {
                "userId" => "user_id",
                "executionId" => "execution_id",
                other => other,
            };
            condition.push_str(&format!(" AND {column} = '{value}'"));
        }
        let expected: Vec<String> = raw(
            &api,
            &format!(
                "SELECT toString(event_id) AS id {condition} ORDER BY toInt64(timestamp) * 1000 + timestamp_ms DESC, event_id DESC"
            ),
        )
        .await
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
        assert!(!expected.is_empty());
        // Cursor pages of 7.
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut query = vec![("from", rfc(from)), ("to", rfc(to)), ("limit", "7".to_owned())];
            query.extend(filters.iter().map(|(k, v)| (*k, v.to_string())));
            if let Some(c) = &cursor {
                query.push(("cursor", c.clone()));
            }
            let (status, page) = get(&api, &key_a, "/api/costs", &query).await;
            assert_eq!(status, 200, "{page}");
            for event in page["events"].as_array().unwrap() {
                seen.push(event["eventId"].as_str().unwrap().to_owned());
                for (name, value) in &filters {
                    assert_eq!(event[*name].as_str(), Some(*value), "filter {name}");
                }
            }
            match page["nextCursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
            // A new event arriving meanwhile does not shift the next page.
            if seen.len() == 7 {
                generate(&api, &org_a, now - Duration::seconds(1), 1, 99).await;
            }
        }
        assert_eq!(seen, expected, "cursor paging with {filters:?}");
    }
    // Offset paging returns the same order; a whole event's fields come back. The range is explicit:
    // the default (this month so far) holds only minutes of events just after a month begins.
    let (from_text, to_text) = (rfc(from), rfc(to));
    let range = [("from", from_text.as_str()), ("to", to_text.as_str())];
    let (_, first) =
        get(&api, &key_a, "/api/costs", &q(&[range[0], range[1], ("limit", "5"), ("offset", "3")])).await;
    let (_, all) = get(&api, &key_a, "/api/costs", &q(&[range[0], range[1], ("limit", "8")])).await;
    assert_eq!(first["events"].as_array().unwrap()[..], all["events"].as_array().unwrap()[3..8]);
    let event = &all["events"][0];
    for field in
        ["eventId", "timestamp", "provider", "model", "cost", "costNanos", "costSource", "latency", "status"]
    {
        assert!(!event[field].is_null(), "{field} in {event}");
    }
    assert!(event["tokens"]["totalTokens"].as_u64().is_some());
    // Org b's key with org a's filters sees only org b's events.
    let (_, b_page) =
        get(&api, &key_b, "/api/costs", &q(&[range[0], range[1], ("limit", "1000"), ("userId", "user-1")]))
            .await;
    let b_ids: Vec<Value> = raw(
        &api,
        &format!(
            "SELECT toString(event_id) AS id FROM {} WHERE org_id = '{org_b}' AND user_id = 'user-1'",
            api.clickhouse.table("events")
        ),
    )
    .await
    .into_iter()
    .map(|r| r["id"].clone())
    .collect();
    let mut got: Vec<Value> =
        b_page["events"].as_array().unwrap().iter().map(|e| e["eventId"].clone()).collect();
    let mut want = b_ids;
    got.sort_by_key(|v| v.to_string());
    want.sort_by_key(|v| v.to_string());
    assert_eq!(got, want);
    api.stop().await;
}

#[tokio::test]
async fn budget_reports_the_month_exactly_and_the_thresholds_crossed() {
    let api = Api::start().await;
    let (org_a, key_a, _) = api.create_org("a").await;
    let (org_b, key_b, _) = api.create_org("b").await;
    let now = Utc::now();
    generate(&api, &org_a, now - Duration::seconds(30), 200, 6).await;
    generate(&api, &org_b, now - Duration::seconds(30), 20, 7).await;
    let (status, none) = get(&api, &key_a, "/api/costs/budget", &[]).await;
    assert_eq!(status, 200);
    assert!(none["limit"].is_null() && none["alert"].is_null(), "{none}");
    let month_start = now.date_naive().with_day0_safe().and_hms_opt(0, 0, 0).unwrap().and_utc();
    let spent = raw(
        &api,
        &format!(
            "SELECT sum(cost_nanos) AS s {}",
            raw_where(&api, &org_a, None, month_start, now + Duration::seconds(1))
        ),
    )
    .await[0]["s"]
        .as_i64()
        .unwrap();
    assert_eq!(none["spentNanos"].as_i64(), Some(spent));
    // A limit of 1.5x the spend: 10 % and 50 % crossed, 100 % not.
    let limit_usd = spent as f64 * 1.5 / 1e9;
    let put = api
        .http
        .put(api.url("/api/costs/budget"))
        .header("X-API-Key", &key_a)
        .json(&json!({"limit": limit_usd, "thresholds": [100, 10, 50]}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let (_, budget) = get(&api, &key_a, "/api/costs/budget", &[]).await;
    assert_eq!(budget["thresholds"], json!([10, 50, 100]));
    assert_eq!(budget["crossedThresholds"], json!([10, 50]));
    assert_eq!(budget["alert"], json!(50));
    let limit_nanos = budget["limitNanos"].as_i64().unwrap();
    assert_eq!(budget["remainingNanos"].as_i64(), Some(limit_nanos - spent));
    assert_eq!(budget["period"], "monthly");
    assert!(budget["resetsAt"].as_str().unwrap() > rfc(now).as_str());
    let metrics = api.http.get(api.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(&format!("tally_budget_threshold_crossed{{org_id=\"{org_a}\"}} 50")),
        "{metrics}"
    );
    // The admin lowers it: 100 % crossed. Org b's budget is untouched.
    let admin = api
        .http
        .put(api.url(&format!("/admin/orgs/{org_a}/budget")))
        .bearer_auth(ADMIN)
        .json(&json!({"limit": spent as f64 / 2e9}))
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 200);
    let (_, budget) = get(&api, &key_a, "/api/costs/budget", &[]).await;
    assert_eq!((budget["alert"].clone(), budget["thresholds"].clone()), (json!(100), json!([50, 80, 100])));
    let (_, b) = get(&api, &key_b, "/api/costs/budget", &[]).await;
    assert!(b["limit"].is_null());
    assert_ne!(b["spentNanos"].as_i64(), Some(spent));
    // Bad budgets.
    for body in [
        json!({"limit": -1}),
        json!({"limit": 1e12}),
        json!({"limit": 5, "thresholds": [0]}),
        json!({"limit": 5, "thresholds": [1,2,3,4,5,6,7,8,9,10,11]}),
    ] {
        let r = api
            .http
            .put(api.url("/api/costs/budget"))
            .header("X-API-Key", &key_a)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
    }
    let r = api
        .http
        .put(api.url("/admin/orgs/no-such-org/budget"))
        .bearer_auth(ADMIN)
        .json(&json!({"limit": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    api.stop().await;
}

#[tokio::test]
async fn every_endpoint_validates_its_input_and_needs_a_key() {
    let api = Api::start().await;
    let (_, key, _) = api.create_org("a").await;
    let endpoints = [
        "/api/costs/summary",
        "/api/costs",
        "/api/analytics/overview",
        "/api/analytics/timeseries",
        "/api/analytics/perf",
        "/api/analytics/costs",
        "/analytics/user/u1/overview",
        "/analytics/user/u1/timeseries",
        "/analytics/user/u1/perf",
        "/analytics/user/u1/costs",
    ];
    let long = "x".repeat(300);
    for path in endpoints {
        assert_eq!(api.http.get(api.url(path)).send().await.unwrap().status(), 401, "{path}");
        assert_eq!(get(&api, "tally_0000", path, &[]).await.0, 401, "{path}");
        assert_eq!(get(&api, &key, path, &[]).await.0, 200, "{path} with defaults");
        for bad in [
            q(&[("from", "yesterday")]),
            q(&[("from", "2026-02-01T00:00:00Z"), ("to", "2026-01-01T00:00:00Z")]),
            q(&[("from", "2020-01-01T00:00:00Z"), ("to", "2026-01-01T00:00:00Z")]),
        ] {
            let (status, body) = get(&api, &key, path, &bad).await;
            assert_eq!(status, 400, "{path} {bad:?}");
            assert_eq!(body["error"]["code"], "bad_request");
        }
        if path != "/api/costs/summary" {
            assert_eq!(get(&api, &key, path, &q(&[("model", &long)])).await.0, 400, "{path} long model");
        }
    }
    for bad in [
        q(&[("limit", "0")]),
        q(&[("limit", "1001")]),
        q(&[("offset", "10001")]),
        q(&[("cursor", "garbage")]),
        q(&[("cursor", "1_00000000-0000-0000-0000-000000000000"), ("offset", "2")]),
        q(&[("status", "maybe")]),
        q(&[("limit", "-1")]),
    ] {
        assert_eq!(get(&api, &key, "/api/costs", &bad).await.0, 400, "{bad:?}");
    }
    for bad in [
        q(&[("bucket", "week")]),
        q(&[("groupBy", "user")]),
        q(&[("bucket", "day"), ("tz", "Mars/Olympus")]),
        q(&[("bucket", "day"), ("tz", "x'; DROP TABLE")]),
        q(&[("tz", "Europe/Paris")]),
        q(&[("from", "2025-11-01T00:00:00Z"), ("to", "2026-11-01T00:00:00Z")]),
    ] {
        assert_eq!(get(&api, &key, "/api/analytics/timeseries", &bad).await.0, 400, "{bad:?}");
    }
    assert_eq!(get(&api, &key, "/analytics/user/u1/overview", &q(&[("userId", "u2")])).await.0, 400);
    let spec: Value = api.http.get(api.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    for path in endpoints.iter().map(|p| p.replace("u1", "{userId}")) {
        assert!(spec["paths"][&path]["get"].is_object(), "{path} documented");
    }
    api.stop().await;
}

#[tokio::test]
async fn admin_prices_top_consumers_and_rate_limit_status() {
    let api = Api::start().await;
    let (org_a, _, _) = api.create_org("small").await;
    let (org_b, _, _) = api.create_org("big").await;
    let now = Utc::now();
    generate(&api, &org_a, now - Duration::seconds(10), 10, 8).await;
    generate(&api, &org_b, now - Duration::seconds(10), 100, 9).await;
    let top = api
        .admin_get(&format!("/admin/top-consumers?from={}&to={}", rfc(now - Duration::hours(30)), rfc(now)))
        .await;
    let consumers = top["consumers"].as_array().unwrap();
    assert_eq!(consumers.len(), 2);
    assert_eq!(
        (consumers[0]["orgId"].as_str(), consumers[0]["name"].as_str()),
        (Some(org_b.as_str()), Some("big"))
    );
    let cost_b = raw(
        &api,
        &format!(
            "SELECT sum(cost_nanos) AS c FROM {} WHERE org_id = '{org_b}'",
            api.clickhouse.table("events")
        ),
    )
    .await[0]["c"]
        .as_i64();
    assert_eq!(consumers[0]["costNanos"].as_i64(), cost_b);

    // The generated events carry no arrival time (1970): only these three arrived in the last minute.
    api.clickhouse
        .client()
        .query(&format!(
            "INSERT INTO {} (org_id, event_id, timestamp, received_at) \
             SELECT ?, generateUUIDv4(), now(), now() FROM system.numbers LIMIT 3",
            api.clickhouse.table("events")
        ))
        .bind(&org_b)
        .execute()
        .await
        .unwrap();
    let status = api.admin_get(&format!("/admin/orgs/{org_b}/rate-limit")).await;
    assert_eq!(status["eventsPerMinute"], 1000);
    assert_eq!(status["acceptedLastMinute"], 3);
    assert_eq!(status["percentOfLimit"], 0.3);
    let quiet = api.admin_get(&format!("/admin/orgs/{org_a}/rate-limit")).await;
    assert_eq!(quiet["acceptedLastMinute"], 0);
    let missing =
        api.http.get(api.url("/admin/orgs/nope/rate-limit")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(missing.status(), 404);

    let price = json!({"provider": "openai", "model": "gpt-5", "effectiveFrom": "2026-12-01T00:00:00Z", "inputPerMtok": 1.25, "outputPerMtok": 10});
    let created =
        api.http.post(api.url("/admin/prices")).bearer_auth(ADMIN).json(&price).send().await.unwrap();
    assert_eq!(created.status(), 201);
    let prices: Value = api.admin_get("/admin/prices").await;
    let gpt5 = prices.as_array().unwrap().iter().find(|p| p["model"] == "gpt-5").expect("listed");
    assert_eq!(
        (gpt5["inputNanosPerMtok"].as_i64(), gpt5["outputNanosPerMtok"].as_i64()),
        (Some(1_250_000_000), Some(10_000_000_000))
    );
    assert_eq!(gpt5["effectiveFrom"], "2026-12-01T00:00:00Z");
    assert!(prices.as_array().unwrap().len() >= 14, "the seeded registry is listed too");
    for bad in [
        json!({"provider": "", "model": "m", "effectiveFrom": "2026-12-01T00:00:00Z", "inputPerMtok": 1, "outputPerMtok": 1}),
        json!({"provider": "p", "model": "m", "effectiveFrom": "soon", "inputPerMtok": 1, "outputPerMtok": 1}),
        json!({"provider": "p", "model": "m", "effectiveFrom": "2026-12-01T00:00:00Z", "inputPerMtok": -1, "outputPerMtok": 1}),
    ] {
        assert_eq!(
            api.http
                .post(api.url("/admin/prices"))
                .bearer_auth(ADMIN)
                .json(&bad)
                .send()
                .await
                .unwrap()
                .status(),
            400,
            "{bad}"
        );
    }
    assert_eq!(api.http.get(api.url("/admin/prices")).send().await.unwrap().status(), 401);
    api.stop().await;
}

trait Day0 {
    fn with_day0_safe(self) -> chrono::NaiveDate;
}

impl Day0 for chrono::NaiveDate {
    fn with_day0_safe(self) -> chrono::NaiveDate {
        use chrono::Datelike;
        self.with_day0(0).unwrap()
    }
}
