//! The admin surface (bearer `TALLY_ADMIN_TOKEN`): orgs with plans and limit overrides, and their
//! API keys. A key is shown once, at creation; only its SHA-256 is stored.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use clickhouse::Row;
use serde::{Deserialize, Serialize};
use tally_common::keyset::load_orgs;
use tally_schemas::keys;
use tally_schemas::plan::Plan;

use crate::auth::Admin;
use crate::error::ApiError;
use crate::AppState;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateOrg {
    name: String,
    #[serde(default)]
    plan: Option<String>,
    #[serde(default)]
    rate_limit_per_min: Option<u32>,
    #[serde(default)]
    rate_limit_burst: Option<u32>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedOrg {
    org_id: String,
    name: String,
    plan: Plan,
    api_key: String,
    key_id: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrgView {
    org_id: String,
    name: String,
    plan: Plan,
    events_per_minute: u32,
    burst: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedKey {
    org_id: String,
    api_key: String,
    key_id: String,
}

fn now_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

/// The public id of a key: the first 16 hex digits of its hash (reveals nothing of the key).
fn key_id(hash: &str) -> String {
    hash[..16].to_owned()
}

/// Writes a version of an `api_keys` row (a new key, or a revocation of an existing one).
async fn write_key_row(
    state: &AppState,
    hash: &str,
    prefix: &str,
    org_id: &str,
    name: &str,
    revoked: bool,
) -> Result<(), ApiError> {
    let sql = format!(
        "INSERT INTO {} (key_hash, key_prefix, org_id, name, created_at, revoked, version) VALUES (?, ?, ?, ?, now(), ?, ?)",
        state.clickhouse.table("api_keys")
    );
    state
        .clickhouse
        .client()
        .query(&sql)
        .bind(hash)
        .bind(prefix)
        .bind(org_id)
        .bind(name)
        .bind(u8::from(revoked))
        .bind(now_ms())
        .execute()
        .await?;
    Ok(())
}

async fn insert_key(state: &AppState, org_id: &str, name: &str) -> Result<keys::NewKey, ApiError> {
    let key = keys::generate();
    write_key_row(state, &key.hash, &key.display_prefix, org_id, name, false).await?;
    Ok(key)
}

/// Makes a change visible to this replica at once (others see it at their next refresh).
async fn refresh_keys(state: &AppState) {
    if let Err(error) = state.keys.refresh(&state.clickhouse).await {
        tracing::warn!(error = %error, "key refresh after an admin change failed");
    }
}

pub async fn create_org(
    State(state): State<AppState>,
    _: Admin,
    Json(body): Json<CreateOrg>,
) -> Result<(StatusCode, Json<CreatedOrg>), ApiError> {
    let name = body.name.trim().to_owned();
    if name.is_empty() || name.len() > 128 {
        return Err(ApiError::BadRequest("name must be 1 to 128 bytes".into()));
    }
    let plan: Plan = body.plan.as_deref().unwrap_or("FREE").parse().map_err(ApiError::BadRequest)?;
    let org_id = uuid::Uuid::new_v4().to_string();
    let sql = format!(
        "INSERT INTO {} (org_id, name, plan, rate_limit_per_min, rate_limit_burst, created_at, deleted, version) VALUES (?, ?, ?, ?, ?, now(), 0, ?)",
        state.clickhouse.table("orgs")
    );
    state
        .clickhouse
        .client()
        .query(&sql)
        .bind(&org_id)
        .bind(&name)
        .bind(plan.as_str())
        .bind(body.rate_limit_per_min.unwrap_or(0))
        .bind(body.rate_limit_burst.unwrap_or(0))
        .bind(now_ms())
        .execute()
        .await?;
    let key = insert_key(&state, &org_id, "default").await?;
    refresh_keys(&state).await;
    tracing::info!(org_id = %org_id, key_prefix = %key.display_prefix, "created org");
    Ok((
        StatusCode::CREATED,
        Json(CreatedOrg { org_id, name, plan, key_id: key_id(&key.hash), api_key: key.secret }),
    ))
}

pub async fn list_orgs(State(state): State<AppState>, _: Admin) -> Result<Json<Vec<OrgView>>, ApiError> {
    let orgs = load_orgs(&state.clickhouse).await?;
    Ok(Json(
        orgs.into_iter()
            .map(|org| OrgView {
                org_id: org.org_id.to_string(),
                name: org.name,
                plan: org.plan,
                events_per_minute: org.events_per_minute,
                burst: org.burst,
            })
            .collect(),
    ))
}

pub async fn create_key(
    State(state): State<AppState>,
    _: Admin,
    Path(org_id): Path<String>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    let exists = load_orgs(&state.clickhouse).await?.iter().any(|org| *org.org_id == *org_id);
    if !exists {
        return Err(ApiError::NotFound(format!("org {org_id}")));
    }
    let key = insert_key(&state, &org_id, "admin").await?;
    refresh_keys(&state).await;
    Ok((StatusCode::CREATED, Json(CreatedKey { org_id, key_id: key_id(&key.hash), api_key: key.secret })))
}

#[derive(Row, Deserialize)]
struct KeyOwner {
    key_hash: String,
    key_prefix: String,
    owner: String,
}

pub async fn revoke_key(
    State(state): State<AppState>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::BadRequest("a key id is 16 hex digits".into()));
    }
    let sql = format!(
        "SELECT key_hash, any(key_prefix) AS key_prefix, argMax(org_id, version) AS owner FROM {} WHERE substring(key_hash, 1, 16) = ? GROUP BY key_hash",
        state.clickhouse.table("api_keys")
    );
    let found: Vec<KeyOwner> =
        state.clickhouse.client().query(&sql).bind(id.to_ascii_lowercase()).fetch_all().await?;
    let [key] = found.as_slice() else {
        return Err(ApiError::NotFound(format!("key {id}")));
    };
    write_key_row(&state, &key.key_hash, &key.key_prefix, &key.owner, "revoked", true).await?;
    refresh_keys(&state).await;
    tracing::info!(key_prefix = %key.key_prefix, org_id = %key.owner, "revoked key");
    Ok(StatusCode::NO_CONTENT)
}
