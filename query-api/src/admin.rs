//! The admin surface (bearer `TALLY_ADMIN_TOKEN`): orgs with plans and limit overrides, and their
//! API keys. A key is shown once, at creation; only its SHA-256 is stored.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use tally_common::keyset::{load_org, load_orgs};
use tally_schemas::keys;
use tally_schemas::plan::Plan;

use crate::auth::Admin;
use crate::error::ApiError;
use crate::extract::{JsonBody, PathParams, QueryParams};
use crate::range::{usd, Range, RangeParams};
use crate::store::admin::{KeyRow, NewPrice as PriceRow};
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

/// The public id of a key: the first 16 hex digits of its hash (reveals nothing of the key).
fn key_id(hash: &str) -> String {
    hash[..16].to_owned()
}

async fn insert_key(state: &AppState, org_id: &str, name: &str) -> Result<keys::NewKey, ApiError> {
    let key = keys::generate();
    let row = KeyRow { hash: &key.hash, prefix: &key.display_prefix, org_id, name, revoked: false };
    state.store().write_key(&row).await?;
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
    JsonBody(body): JsonBody<CreateOrg>,
) -> Result<(StatusCode, Json<CreatedOrg>), ApiError> {
    let name = body.name.trim().to_owned();
    if name.is_empty() || name.len() > 128 {
        return Err(ApiError::BadRequest("name must be 1 to 128 bytes".into()));
    }
    let plan: Plan = body.plan.as_deref().unwrap_or("FREE").parse().map_err(ApiError::BadRequest)?;
    let org_id = uuid::Uuid::new_v4().to_string();
    let (per_minute, burst) = (body.rate_limit_per_min.unwrap_or(0), body.rate_limit_burst.unwrap_or(0));
    state.store().insert_org(&org_id, &name, plan, per_minute, burst).await?;
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
    PathParams(org_id): PathParams<String>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    if load_org(&state.clickhouse, &org_id).await?.is_none() {
        return Err(ApiError::NotFound(format!("org {org_id}")));
    }
    let key = insert_key(&state, &org_id, "admin").await?;
    refresh_keys(&state).await;
    Ok((StatusCode::CREATED, Json(CreatedKey { org_id, key_id: key_id(&key.hash), api_key: key.secret })))
}

pub async fn revoke_key(
    State(state): State<AppState>,
    _: Admin,
    PathParams(id): PathParams<String>,
) -> Result<StatusCode, ApiError> {
    if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::BadRequest("a key id is 16 hex digits".into()));
    }
    let found = state.store().keys_by_id(&id.to_ascii_lowercase()).await?;
    let [key] = found.as_slice() else {
        return Err(ApiError::NotFound(format!("key {id}")));
    };
    let row = KeyRow {
        hash: &key.key_hash,
        prefix: &key.key_prefix,
        org_id: &key.owner,
        name: "revoked",
        revoked: true,
    };
    state.store().write_key(&row).await?;
    refresh_keys(&state).await;
    tracing::info!(key_prefix = %key.key_prefix, org_id = %key.owner, "revoked key");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewPrice {
    provider: String,
    model: String,
    /// RFC 3339; events at or after it are priced with this price (until a later one).
    effective_from: String,
    /// USD per million prompt tokens.
    input_per_mtok: f64,
    /// USD per million completion tokens.
    output_per_mtok: f64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PriceView {
    provider: String,
    model: String,
    effective_from: String,
    input_nanos_per_mtok: i64,
    output_nanos_per_mtok: i64,
}

/// USD per million tokens to nano-dollars, refusing what is not a sane price.
fn price_nanos(name: &str, usd: f64) -> Result<i64, ApiError> {
    if !usd.is_finite() || !(0.0..=1_000_000.0).contains(&usd) {
        return Err(ApiError::BadRequest(format!("{name} must be 0..=1000000 USD per million tokens")));
    }
    Ok((usd * tally_schemas::limits::NANOS_PER_USD as f64).round() as i64)
}

/// `POST /admin/prices`: adds a model price from an instant on. The ingest's price book picks it up
/// at its next refresh; events already stored keep the cost they were given.
pub async fn add_price(
    State(state): State<AppState>,
    _: Admin,
    JsonBody(body): JsonBody<NewPrice>,
) -> Result<(StatusCode, Json<PriceView>), ApiError> {
    for (name, value) in [("provider", &body.provider), ("model", &body.model)] {
        if value.is_empty()
            || value.len() > tally_schemas::limits::MAX_NAME_LEN
            || value.chars().any(char::is_control)
        {
            return Err(ApiError::BadRequest(format!(
                "{name} must be 1..=128 bytes without control characters"
            )));
        }
    }
    let effective = chrono::DateTime::parse_from_rfc3339(&body.effective_from)
        .map_err(|e| ApiError::BadRequest(format!("effectiveFrom must be an RFC 3339 time: {e}")))?
        .with_timezone(&chrono::Utc);
    let effective_s = u32::try_from(effective.timestamp())
        .map_err(|_| ApiError::BadRequest("effectiveFrom must be between 1970 and 2106".into()))?;
    let (input, output) = (
        price_nanos("inputPerMtok", body.input_per_mtok)?,
        price_nanos("outputPerMtok", body.output_per_mtok)?,
    );
    state
        .store()
        .insert_price(&PriceRow {
            provider: &body.provider,
            model: &body.model,
            effective_from_s: effective_s,
            input_nanos_per_mtok: input,
            output_nanos_per_mtok: output,
        })
        .await?;
    tracing::info!(provider = %body.provider, model = %body.model, effective_from = %effective, "added model price");
    Ok((
        StatusCode::CREATED,
        Json(PriceView {
            provider: body.provider,
            model: body.model,
            effective_from: effective.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            input_nanos_per_mtok: input,
            output_nanos_per_mtok: output,
        }),
    ))
}

/// `GET /admin/prices`: the registry, latest version of each (provider, model, effective_from).
pub async fn list_prices(State(state): State<AppState>, _: Admin) -> Result<Json<Vec<PriceView>>, ApiError> {
    let prices = state.store().prices().await?;
    Ok(Json(
        prices
            .into_iter()
            .map(|p| PriceView {
                provider: p.provider,
                model: p.model,
                effective_from: p.effective_from,
                input_nanos_per_mtok: p.input_nanos_per_mtok,
                output_nanos_per_mtok: p.output_nanos_per_mtok,
            })
            .collect(),
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopParams {
    from: Option<String>,
    to: Option<String>,
    limit: Option<u32>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerView {
    org_id: String,
    name: Option<String>,
    plan: Option<Plan>,
    requests: u64,
    tokens: u64,
    cost: f64,
    cost_nanos: i64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TopConsumers {
    /// The range actually summed: whole hours covering the requested one.
    from: String,
    to: String,
    consumers: Vec<ConsumerView>,
}

/// `GET /admin/top-consumers`: orgs by cost over whole hours (from the hourly rollup).
pub async fn top_consumers(
    State(state): State<AppState>,
    _: Admin,
    QueryParams(params): QueryParams<TopParams>,
) -> Result<Json<TopConsumers>, ApiError> {
    let range = Range::from_params(&RangeParams { from: params.from, to: params.to }, chrono::Utc::now())?;
    let limit = params.limit.unwrap_or(20);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be 1..=1000".into()));
    }
    let Range { from, to } = range.whole_hours();
    let seconds = |t: chrono::DateTime<chrono::Utc>, default| u32::try_from(t.timestamp()).unwrap_or(default);
    let rows = state.store().top_orgs(seconds(from, 0), seconds(to, u32::MAX), limit).await?;
    let orgs = load_orgs(&state.clickhouse).await?;
    let format = |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    Ok(Json(TopConsumers {
        from: format(from),
        to: format(to),
        consumers: rows
            .into_iter()
            .map(|r| {
                let org = orgs.iter().find(|o| *o.org_id == *r.org_id);
                ConsumerView {
                    name: org.map(|o| o.name.clone()),
                    plan: org.map(|o| o.plan),
                    cost: usd(r.cost_nanos),
                    org_id: r.org_id,
                    requests: r.requests,
                    tokens: r.tokens,
                    cost_nanos: r.cost_nanos,
                }
            })
            .collect(),
    }))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitStatus {
    org_id: String,
    plan: Plan,
    events_per_minute: u32,
    burst: u32,
    /// Events of this org that arrived at an ingest in the last 60 s and are stored.
    accepted_last_minute: u64,
    percent_of_limit: f64,
    /// How the limit holds with several ingest replicas.
    enforcement: &'static str,
}

/// `GET /admin/orgs/{orgId}/rate-limit`: the org's limit and what it used in the last minute.
pub async fn rate_limit_status(
    State(state): State<AppState>,
    _: Admin,
    PathParams(org_id): PathParams<String>,
) -> Result<Json<RateLimitStatus>, ApiError> {
    let org = load_org(&state.clickhouse, &org_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("org {org_id}")))?;
    let now = chrono::Utc::now().timestamp();
    let floor = now - 60 - tally_schemas::limits::MAX_EVENT_AGE_MS / 1000;
    let seconds = |t: i64| u32::try_from(t).unwrap_or(0);
    let used = state.store().arrived_since(&org_id, seconds(floor), seconds(now - 60)).await?;
    Ok(Json(RateLimitStatus {
        org_id: org_id.clone(),
        plan: org.plan,
        events_per_minute: org.events_per_minute,
        burst: if org.burst == 0 { org.events_per_minute } else { org.burst },
        accepted_last_minute: used,
        percent_of_limit: if org.events_per_minute == 0 {
            0.0
        } else {
            used as f64 * 100.0 / f64::from(org.events_per_minute)
        },
        enforcement:
            "each of N ingest replicas enforces limit/N (TALLY_INGEST_REPLICAS), so the org's total holds",
    }))
}
