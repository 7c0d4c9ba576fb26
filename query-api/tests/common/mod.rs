//! Shared by the query API's integration tests: the API on a fresh database, and helpers.

#![allow(clippy::unwrap_used, dead_code)] // tests fail loudly; not every test file uses every helper

use std::net::SocketAddr;

use serde_json::{json, Value};
use tally_common::ch::ChConfig;
use tally_common::config::Env;
use tally_query_api::config::QueryConfig;
use tally_testkit::{drop_database, new_database_config};
use tokio_util::sync::CancellationToken;

pub const ADMIN: &str = "test-admin-token-0123456789";

pub struct Api {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), tally_common::server::RunError>>,
    pub clickhouse: ChConfig,
    pub http: reqwest::Client,
}

impl Api {
    pub async fn start() -> Api {
        Api::start_with(&[]).await
    }

    /// The API with more settings (e.g. `TALLY_ARCHIVE_URL`).
    pub async fn start_with(settings: &[(&str, String)]) -> Api {
        Api::start_on(new_database_config("query"), settings).await
    }

    /// The API on the database of `clickhouse` (e.g. on a private server a test stops).
    pub async fn start_on(clickhouse: ChConfig, settings: &[(&str, String)]) -> Api {
        let mut env = Env::from_pairs([
            ("TALLY_CLICKHOUSE_URL", clickhouse.url.clone()),
            ("TALLY_CLICKHOUSE_DATABASE", clickhouse.database.clone()),
            ("TALLY_ADMIN_TOKEN", ADMIN.to_owned()),
        ]);
        for (key, value) in settings {
            env = env.with(*key, value.clone());
        }
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

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn create_org(&self, name: &str) -> (String, String, String) {
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

    /// GET an admin route (with the admin token) and its JSON body.
    pub async fn admin_get(&self, path_and_query: &str) -> Value {
        let response = self.http.get(self.url(path_and_query)).bearer_auth(ADMIN).send().await.unwrap();
        assert!(response.status().is_success(), "{path_and_query}: {}", response.status());
        response.json().await.unwrap()
    }

    pub async fn status(&self, key: &str) -> (u16, Value) {
        let response =
            self.http.get(self.url("/api/telemetry/status")).header("X-API-Key", key).send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
    }

    pub async fn insert_event(&self, org: &str, timestamp: &str, millis: u16) {
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

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
        drop_database(&self.clickhouse).await;
    }
}

impl Api {
    pub async fn insert_priced(
        &self,
        org: &str,
        timestamp: &str,
        millis: u16,
        model: &str,
        tokens: u32,
        cost_nanos: i64,
    ) {
        self.clickhouse
            .client()
            .query(&format!(
                "INSERT INTO {} (org_id, event_id, timestamp, timestamp_ms, provider, model, total_tokens, cost_nanos) \
                 VALUES (?, ?, ?, ?, 'openai', ?, ?, ?)",
                self.clickhouse.table("events")
            ))
            .bind(org)
            .bind(uuid::Uuid::new_v4().to_string())
            .bind(timestamp)
            .bind(millis)
            .bind(model)
            .bind(tokens)
            .bind(cost_nanos)
            .execute()
            .await
            .unwrap();
    }

    /// The same figures straight from the raw table, independently of the endpoint's rollup path.
    pub async fn raw_by_model(&self, org: &str, from_ms: u64, to_ms: u64) -> Vec<(String, u64, u64, i64)> {
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct R {
            model: String,
            n: u64,
            tokens: u64,
            cost: i64,
        }
        let rows: Vec<R> = self
            .clickhouse
            .client()
            .query(&format!(
                "SELECT model, count() AS n, sum(toUInt64(total_tokens)) AS tokens, sum(cost_nanos) AS cost FROM {} \
                 WHERE org_id = ? AND toUInt64(timestamp) * 1000 + timestamp_ms >= ? AND toUInt64(timestamp) * 1000 + timestamp_ms < ? \
                 GROUP BY model ORDER BY model",
                self.clickhouse.table("events")
            ))
            .bind(org)
            .bind(from_ms)
            .bind(to_ms)
            .fetch_all()
            .await
            .unwrap();
        rows.into_iter().map(|r| (r.model, r.n, r.tokens, r.cost)).collect()
    }

    pub async fn summary(&self, key: &str, from: &str, to: &str) -> (u16, Value) {
        let response = self
            .http
            .get(self.url("/api/costs/summary"))
            .query(&[("from", from), ("to", to)])
            .header("X-API-Key", key)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
    }
}

pub fn epoch_ms(rfc3339: &str) -> u64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap().timestamp_millis() as u64
}
