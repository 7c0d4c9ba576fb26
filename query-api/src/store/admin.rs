//! Writes of the admin tables (orgs, keys, prices, budgets) and the admin's cross-org reads. The
//! admin tables are versioned (ReplacingMergeTree-style): a change is a new row with a higher
//! `version`, read back with argMax.

use clickhouse::error::Error;
use clickhouse::Row;
use serde::Deserialize;
use tally_schemas::plan::Plan;

use super::Store;

/// A key found by its public id (the first 16 hex digits of its hash).
#[derive(Row, Deserialize)]
pub struct KeyOwner {
    pub key_hash: String,
    pub key_prefix: String,
    pub owner: String,
}

/// The latest version of one price.
#[derive(Row, Deserialize)]
pub struct Price {
    pub provider: String,
    pub model: String,
    /// RFC 3339, seconds, `Z`.
    pub effective_from: String,
    pub input_nanos_per_mtok: i64,
    pub output_nanos_per_mtok: i64,
}

/// An org's usage over a range, from the rollup.
#[derive(Row, Deserialize)]
pub struct OrgUsage {
    pub org_id: String,
    pub requests: u64,
    pub tokens: u64,
    pub cost_nanos: i64,
}

/// The org's budget as stored: `versions` = 0 when none was ever set.
#[derive(Row, Deserialize)]
pub struct StoredBudget {
    pub versions: u64,
    pub limit_nanos: i64,
    pub thresholds: Vec<u8>,
}

/// A new row of `api_keys`.
pub struct KeyRow<'a> {
    pub hash: &'a str,
    pub prefix: &'a str,
    pub org_id: &'a str,
    pub name: &'a str,
    pub revoked: bool,
}

/// A new price from an instant on.
pub struct NewPrice<'a> {
    pub provider: &'a str,
    pub model: &'a str,
    pub effective_from_s: u32,
    pub input_nanos_per_mtok: i64,
    pub output_nanos_per_mtok: i64,
}

/// A version number for a new row of an admin table: the current time in `unit`s since 1970.
fn now_version(micros: bool) -> u64 {
    let now = chrono::Utc::now();
    u64::try_from(if micros { now.timestamp_micros() } else { now.timestamp_millis() }).unwrap_or(0)
}

impl Store<'_> {
    pub async fn insert_org(
        &self,
        org_id: &str,
        name: &str,
        plan: Plan,
        per_minute: u32,
        burst: u32,
    ) -> Result<(), Error> {
        let sql = format!(
            "INSERT INTO {} (org_id, name, plan, rate_limit_per_min, rate_limit_burst, created_at, deleted, version) \
             VALUES (?, ?, ?, ?, ?, now(), 0, ?)",
            self.table("orgs")
        );
        let query = self.client.query(&sql).bind(org_id).bind(name).bind(plan.as_str());
        query.bind(per_minute).bind(burst).bind(now_version(false)).execute().await
    }

    /// Writes a version of an `api_keys` row (a new key, or a revocation of an existing one).
    pub async fn write_key(&self, key: &KeyRow<'_>) -> Result<(), Error> {
        let sql = format!(
            "INSERT INTO {} (key_hash, key_prefix, org_id, name, created_at, revoked, version) VALUES (?, ?, ?, ?, now(), ?, ?)",
            self.table("api_keys")
        );
        let query = self.client.query(&sql).bind(key.hash).bind(key.prefix).bind(key.org_id).bind(key.name);
        query.bind(u8::from(key.revoked)).bind(now_version(false)).execute().await
    }

    /// The keys whose hash starts with `id` (16 lowercase hex digits), with their current owner.
    pub async fn keys_by_id(&self, id: &str) -> Result<Vec<KeyOwner>, Error> {
        let sql = format!(
            "SELECT key_hash, any(key_prefix) AS key_prefix, argMax(org_id, version) AS owner FROM {} \
             WHERE substring(key_hash, 1, 16) = ? GROUP BY key_hash",
            self.table("api_keys")
        );
        self.client.query(&sql).bind(id).fetch_all().await
    }

    pub async fn insert_price(&self, price: &NewPrice<'_>) -> Result<(), Error> {
        let sql = format!(
            "INSERT INTO {} (provider, model, effective_from, input_nanos_per_mtok, output_nanos_per_mtok, version) \
             VALUES (?, ?, toDateTime(?), ?, ?, ?)",
            self.table("model_prices")
        );
        let query =
            self.client.query(&sql).bind(price.provider).bind(price.model).bind(price.effective_from_s);
        query
            .bind(price.input_nanos_per_mtok)
            .bind(price.output_nanos_per_mtok)
            .bind(now_version(false))
            .execute()
            .await
    }

    /// The registry: the latest version of each (provider, model, effective_from).
    pub async fn prices(&self) -> Result<Vec<Price>, Error> {
        let sql = format!(
            "SELECT provider, model, concat(replaceOne(toString(effective_from), ' ', 'T'), 'Z') AS effective_from, \
             argMax(input_nanos_per_mtok, version) AS input_nanos_per_mtok, \
             argMax(output_nanos_per_mtok, version) AS output_nanos_per_mtok \
             FROM {} GROUP BY provider, model, effective_from ORDER BY provider, model, effective_from",
            self.table("model_prices")
        );
        self.client.query(&sql).fetch_all().await
    }

    /// Orgs by cost over the whole hours `[from_s, to_s)` (epoch seconds), most expensive first.
    pub async fn top_orgs(&self, from_s: u32, to_s: u32, limit: u32) -> Result<Vec<OrgUsage>, Error> {
        let sql = format!(
            "SELECT org_id, toUInt64(countMerge(events)) AS requests, sumMerge(total_tokens_sum) AS tokens, \
             sumMerge(cost_nanos_sum) AS cost_nanos FROM {} WHERE hour >= toDateTime(?) AND hour < toDateTime(?) \
             GROUP BY org_id ORDER BY cost_nanos DESC, org_id LIMIT ?",
            self.tables.rollup_hourly
        );
        self.client.query(&sql).bind(from_s).bind(to_s).bind(limit).fetch_all().await
    }

    /// The org's stored events that arrived at an ingest since `since_s` (epoch seconds).
    /// Arrival time is not in the sort key: the event-time bound `floor_s` (validation keeps
    /// events at most 35 days old on arrival) limits the read to the org's recent range.
    pub async fn arrived_since(&self, org_id: &str, floor_s: u32, since_s: u32) -> Result<u64, Error> {
        let sql = format!(
            "SELECT count() FROM {} WHERE org_id = ? AND timestamp >= toDateTime(?) AND received_at >= toDateTime(?)",
            self.tables.events
        );
        self.client.query(&sql).bind(org_id).bind(floor_s).bind(since_s).fetch_one().await
    }

    pub async fn budget(&self, org_id: &str) -> Result<StoredBudget, Error> {
        let sql = format!(
            "SELECT count() AS versions, argMax(monthly_limit_nanos, version) AS limit_nanos, \
             argMax(alert_thresholds, version) AS thresholds FROM {} WHERE org_id = ?",
            self.table("budgets")
        );
        self.client.query(&sql).bind(org_id).fetch_one().await
    }

    pub async fn set_budget(&self, org_id: &str, limit_nanos: i64, thresholds: &[u8]) -> Result<(), Error> {
        let sql = format!(
            "INSERT INTO {} (org_id, monthly_limit_nanos, alert_thresholds, version) VALUES (?, ?, ?, ?)",
            self.table("budgets")
        );
        let query = self.client.query(&sql).bind(org_id).bind(limit_nanos).bind(thresholds);
        query.bind(now_version(true)).execute().await
    }
}
