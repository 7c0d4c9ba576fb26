//! The query API against the real local ClickHouse: admin surface, key lifecycle, org isolation.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use common::{epoch_ms, Api, ADMIN};
use serde_json::{json, Value};

#[tokio::test]
async fn admin_surface_requires_the_token_and_validates_input() {
    let api = Api::start().await;
    let post = |token: Option<&str>, body: Value| {
        let request = api.http.post(api.url("/admin/orgs")).json(&body);
        match token {
            Some(t) => request.bearer_auth(t),
            None => request,
        }
    };
    assert_eq!(post(None, json!({"name": "x"})).send().await.unwrap().status(), 401);
    assert_eq!(
        post(Some("wrong-token-wrong-token"), json!({"name": "x"})).send().await.unwrap().status(),
        401
    );
    let bad_plan = post(Some(ADMIN), json!({"name": "x", "plan": "GOLD"})).send().await.unwrap();
    assert_eq!(bad_plan.status(), 400);
    let body: Value = bad_plan.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");
    assert_eq!(post(Some(ADMIN), json!({"name": ""})).send().await.unwrap().status(), 400);
    // An unknown field (a client choosing its org id) is refused with the documented 400 (axum's own
    // answer, an undocumented 422 in plain text, was the contract defect of issue 11).
    assert_eq!(post(Some(ADMIN), json!({"name": "x", "orgId": "mine"})).send().await.unwrap().status(), 400);

    let (org_id, key, _) = api.create_org("acme").await;
    let listed: Value = api.admin_get("/admin/orgs").await;
    let acme = listed.as_array().unwrap().iter().find(|o| o["orgId"] == org_id.as_str()).expect("listed");
    assert_eq!((acme["name"].as_str(), acme["eventsPerMinute"].as_u64()), (Some("acme"), Some(1000)));
    // An org key is not an admin token.
    assert_eq!(api.http.get(api.url("/admin/orgs")).bearer_auth(&key).send().await.unwrap().status(), 401);
    api.stop().await;
}

#[tokio::test]
async fn status_is_scoped_to_the_key_and_follows_key_lifecycle() {
    let api = Api::start().await;
    let (org_a, key_a, key_a_id) = api.create_org("a").await;
    let (org_b, key_b, _) = api.create_org("b").await;
    let (status, body) = api.status(&key_a).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"connected": false, "firstEventAt": null, "lastEventAt": null, "totalEvents": 0})
    );

    api.insert_event(&org_a, "2026-01-23 12:00:00", 250).await;
    api.insert_event(&org_a, "2026-01-23 18:30:00", 0).await;
    api.insert_event(&org_b, "2025-12-01 00:00:00", 0).await;
    let (_, a) = api.status(&key_a).await;
    assert_eq!(
        a,
        json!({"connected": true, "firstEventAt": "2026-01-23T12:00:00.250Z", "lastEventAt": "2026-01-23T18:30:00.000Z", "totalEvents": 2})
    );
    let (_, b) = api.status(&key_b).await;
    assert_eq!(b["totalEvents"], 1, "org b sees only its own event");
    assert_eq!(b["firstEventAt"], "2025-12-01T00:00:00.000Z");

    // The first and last events are found within their hours, however many events between them.
    api.insert_event(&org_b, "2025-12-01 00:59:59", 999).await;
    api.insert_event(&org_b, "2026-02-10 07:00:00", 1).await;
    api.insert_event(&org_b, "2026-02-10 07:45:10", 42).await;
    let (_, b) = api.status(&key_b).await;
    assert_eq!(
        (&b["totalEvents"], &b["firstEventAt"], &b["lastEventAt"]),
        (&json!(4), &json!("2025-12-01T00:00:00.000Z"), &json!("2026-02-10T07:45:10.042Z"))
    );
    // A month the archiver dropped from the events table still counts (the rollups keep it); its
    // first event is then given as the start of its hour.
    api.clickhouse
        .client()
        .query(&format!("ALTER TABLE {} DROP PARTITION 202512", api.clickhouse.table("events")))
        .execute()
        .await
        .unwrap();
    let (_, b) = api.status(&key_b).await;
    assert_eq!(
        (&b["totalEvents"], &b["firstEventAt"], &b["lastEventAt"]),
        (&json!(4), &json!("2025-12-01T00:00:00.000Z"), &json!("2026-02-10T07:45:10.042Z"))
    );
    api.insert_event(&org_b, "2025-12-01 00:30:00", 500).await; // restored into the month
    assert_eq!(api.status(&key_b).await.1["firstEventAt"], "2025-12-01T00:30:00.500Z");

    assert_eq!(api.status("tally_0000").await.0, 401);
    assert_eq!(api.http.get(api.url("/api/telemetry/status")).send().await.unwrap().status(), 401);

    // A second key works; revoking the first stops it at once on this replica.
    let created: Value = api
        .http
        .post(api.url(&format!("/admin/orgs/{org_a}/keys")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let second = created["apiKey"].as_str().unwrap().to_owned();
    let revoke =
        api.http.delete(api.url(&format!("/admin/keys/{key_a_id}"))).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(revoke.status(), 204);
    assert_eq!(api.status(&key_a).await.0, 401);
    assert_eq!(api.status(&second).await.1["totalEvents"], 2);
    let missing =
        api.http.post(api.url("/admin/orgs/no-such-org/keys")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    api.stop().await;
}

#[tokio::test]
async fn cost_summary_equals_the_raw_table_for_any_range_and_sees_one_org() {
    let api = Api::start().await;
    let (org_a, key_a, _) = api.create_org("a").await;
    let (org_b, key_b, _) = api.create_org("b").await;
    let models = ["gpt-4o", "gpt-4o-mini", "claude-3-haiku-20240307"];
    for i in 0..120u32 {
        let minute = i * 7; // spread over ~14 hours
        let timestamp = format!("2026-01-23 {:02}:{:02}:{:02}", 3 + minute / 60, minute % 60, i % 60);
        let cost = 1_000_000_007 + i64::from(i) * 333_333_331; // nano-dollar digits all the way down
        api.insert_priced(&org_a, &timestamp, (i * 37 % 1000) as u16, models[i as usize % 3], 100 + i, cost)
            .await;
    }
    api.insert_priced(&org_b, "2026-01-23 05:30:00", 0, "gpt-4o", 999, 5_000_000_000).await;
    // A late event into an hour that already has rollup rows.
    api.insert_priced(&org_a, "2026-01-23 04:15:00", 5, "gpt-4o", 7, 123_456_789).await;
    // Events one millisecond either side of the bounds below that fall inside a second.
    for (timestamp, millis) in [
        ("2026-01-23 04:10:30", 249),
        ("2026-01-23 04:10:30", 250),
        ("2026-01-23 11:47:00", 499),
        ("2026-01-23 11:47:00", 500),
    ] {
        api.insert_priced(&org_a, timestamp, millis, "gpt-4o-mini", 11, 1_000 + i64::from(millis)).await;
    }

    for (from, to) in [
        ("2026-01-23T00:00:00Z", "2026-01-24T00:00:00Z"), // whole hours only
        ("2026-01-23T04:10:30.250Z", "2026-01-23T11:47:00.500Z"), // partial hours at both ends
        ("2026-01-23T06:05:00Z", "2026-01-23T06:50:00Z"), // inside one hour
        ("2026-01-23T04:10:30.250Z", "2026-01-23T04:59:59.999Z"), // inside one hour, to the millisecond
        ("2026-01-23T04:10:30Z", "2026-01-23T11:47:00Z"), // whole seconds at both ends
        ("2026-01-23T05:00:00Z", "2026-01-23T11:47:00.500Z"), // a whole hour start, a partial end
    ] {
        let (status, summary) = api.summary(&key_a, from, to).await;
        assert_eq!(status, 200);
        let raw = api.raw_by_model(&org_a, epoch_ms(from), epoch_ms(to)).await;
        let mut from_api: Vec<(String, u64, u64, i64)> = summary["byModel"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(m, t)| {
                (
                    m.clone(),
                    t["count"].as_u64().unwrap(),
                    t["tokens"].as_u64().unwrap(),
                    t["costNanos"].as_i64().unwrap(),
                )
            })
            .collect();
        from_api.sort();
        assert_eq!(from_api, raw, "summary by model == raw for {from}..{to}");
        let total: i64 = raw.iter().map(|r| r.3).sum();
        assert_eq!(summary["totalNanos"].as_i64().unwrap(), total, "exact to the nano-dollar");
        assert_eq!(summary["executionCount"].as_u64().unwrap(), raw.iter().map(|r| r.1).sum::<u64>());
        assert!(summary["byProvider"]["openai"]["costNanos"].as_i64().unwrap() == total);
    }
    // Org b sees only its own event; bad ranges are 400.
    let (_, b) = api.summary(&key_b, "2026-01-23T00:00:00Z", "2026-01-24T00:00:00Z").await;
    assert_eq!((b["executionCount"].as_u64(), b["totalNanos"].as_i64()), (Some(1), Some(5_000_000_000)));
    assert_eq!(api.summary(&key_a, "2026-01-24T00:00:00Z", "2026-01-23T00:00:00Z").await.0, 400);
    assert_eq!(api.summary(&key_a, "yesterday", "2026-01-23T00:00:00Z").await.0, 400);
    assert_eq!(api.summary(&key_a, "2020-01-01T00:00:00Z", "2026-01-23T00:00:00Z").await.0, 400);
    api.stop().await;
}

/// Sends one request and returns its status, content type and JSON body.
async fn send(request: reqwest::RequestBuilder) -> (u16, String, Value) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let content_type =
        response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let text = response.text().await.unwrap();
    let body =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("{status} {content_type}: not JSON: {text}"));
    (status, content_type, body)
}

#[tokio::test]
async fn requests_the_framework_refuses_answer_the_documented_json_error() {
    let api = Api::start().await;
    let (org, key, _) = api.create_org("shapes").await;
    let budget = || api.http.put(api.url("/api/costs/budget")).header("X-API-Key", &key);
    let admin_post = |path: &str| api.http.post(api.url(path)).bearer_auth(ADMIN);
    let get = |path: &str| api.http.get(api.url(path)).header("X-API-Key", &key);
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        ("budget {}", budget().json(&json!({})), 400, "invalid_body"),
        ("budget unknown field", budget().json(&json!({"limit": 1, "extra": true})), 400, "invalid_body"),
        ("budget limit text", budget().json(&json!({"limit": "abc"})), 400, "invalid_body"),
        (
            "budget fractional threshold",
            budget().json(&json!({"limit": 1, "thresholds": [50.5]})),
            400,
            "invalid_body",
        ),
        (
            "budget truncated JSON",
            budget().header("content-type", "application/json").body("{\"limit\":"),
            400,
            "invalid_body",
        ),
        (
            "budget as text/plain",
            budget().header("content-type", "text/plain").body("{\"limit\":1}"),
            415,
            "unsupported_media_type",
        ),
        ("budget without content type", budget().body("{\"limit\":1}"), 415, "unsupported_media_type"),
        (
            "budget over 64 KiB",
            budget()
                .header("content-type", "application/json")
                .body(format!("{{\"limit\":1,\"x\":\"{}\"}}", "a".repeat(70_000))),
            413,
            "body_too_large",
        ),
        ("create org {}", admin_post("/admin/orgs").json(&json!({})), 400, "invalid_body"),
        (
            "create org unknown field",
            admin_post("/admin/orgs").json(&json!({"name": "x", "color": "red"})),
            400,
            "invalid_body",
        ),
        (
            "price missing field",
            admin_post("/admin/prices").json(&json!({"provider": "p", "model": "m"})),
            400,
            "invalid_body",
        ),
        ("limit=abc", get("/api/costs?limit=abc"), 400, "invalid_parameter"),
        ("limit=-1", get("/api/costs?limit=-1"), 400, "invalid_parameter"),
        ("offset=-1", get("/api/costs?offset=-1"), 400, "invalid_parameter"),
        (
            "top consumers limit=abc",
            api.http.get(api.url("/admin/top-consumers?limit=abc")).bearer_auth(ADMIN),
            400,
            "invalid_parameter",
        ),
        ("unknown route", get("/api/nothing-here"), 404, "no_route"),
        (
            "wrong method",
            api.http.delete(api.url("/api/costs")).header("X-API-Key", &key),
            405,
            "method_not_allowed",
        ),
    ];
    for (name, request, status, code) in cases {
        let (got, content_type, body) = send(request).await;
        assert_eq!((got, body["error"]["code"].as_str()), (status, Some(code)), "{name}: {body}");
        assert_eq!(content_type, "application/json", "{name}");
        assert!(!body["error"]["message"].as_str().unwrap().is_empty(), "{name}: {body}");
    }
    // The hint says what to do where the code alone does not.
    let (_, _, body) = send(budget().header("content-type", "text/plain").body("{}")).await;
    assert_eq!(body["error"]["hint"], "send Content-Type: application/json");
    // Nothing of the refused budgets was stored.
    let (status, _, budget) = send(get("/api/costs/budget")).await;
    assert_eq!((status, &budget["limit"]), (200, &Value::Null), "{org}: {budget}");
    api.stop().await;
}
