//! The query API against the real local ClickHouse: admin surface, key lifecycle, org isolation.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::net::SocketAddr;

use serde_json::{json, Value};
use tally_common::ch::ChConfig;
use tally_common::config::Env;
use tally_common::testing::{drop_database, new_database_config};
use tally_query_api::config::QueryConfig;
use tokio_util::sync::CancellationToken;

const ADMIN: &str = "test-admin-token-0123456789";

struct Api {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    clickhouse: ChConfig,
    http: reqwest::Client,
}

impl Api {
    async fn start() -> Api {
        let clickhouse = new_database_config("query");
        let env = Env::from_pairs([
            ("TALLY_CLICKHOUSE_URL", clickhouse.url.clone()),
            ("TALLY_CLICKHOUSE_DATABASE", clickhouse.database.clone()),
            ("TALLY_ADMIN_TOKEN", ADMIN.to_owned()),
        ]);
        let config = QueryConfig::from_env(&env).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(tally_query_api::run(config, listener, shutdown.clone()));
        let api = Api { addr, shutdown, task, clickhouse, http: reqwest::Client::new() };
        for _ in 0..100 {
            if let Ok(r) = api.http.get(api.url("/readyz")).send().await {
                if r.status() == 200 {
                    return api;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("query api never became ready");
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    async fn create_org(&self, name: &str) -> (String, String, String) {
        let response = self
            .http
            .post(self.url("/admin/orgs"))
            .bearer_auth(ADMIN)
            .json(&json!({"name": name, "plan": "startup"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["plan"], "STARTUP");
        (
            body["orgId"].as_str().unwrap().to_owned(),
            body["apiKey"].as_str().unwrap().to_owned(),
            body["keyId"].as_str().unwrap().to_owned(),
        )
    }

    async fn status(&self, key: &str) -> (u16, Value) {
        let response =
            self.http.get(self.url("/api/telemetry/status")).header("X-API-Key", key).send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
    }

    async fn insert_event(&self, org: &str, timestamp: &str, millis: u16) {
        self.clickhouse
            .client()
            .query(&format!(
                "INSERT INTO {} (org_id, event_id, timestamp, timestamp_ms, provider, model) VALUES (?, ?, ?, ?, 'openai', 'gpt-4o')",
                self.clickhouse.table("events")
            ))
            .bind(org)
            .bind(uuid::Uuid::new_v4().to_string())
            .bind(timestamp)
            .bind(millis)
            .execute()
            .await
            .unwrap();
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
        drop_database(&self.clickhouse).await;
    }
}

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
    assert_eq!(post(Some(ADMIN), json!({"name": "x", "orgId": "mine"})).send().await.unwrap().status(), 422);

    let (org_id, key, _) = api.create_org("acme").await;
    let listed: Value =
        api.http.get(api.url("/admin/orgs")).bearer_auth(ADMIN).send().await.unwrap().json().await.unwrap();
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
