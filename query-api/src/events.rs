//! `GET /api/costs` (seed 000): the org's events, newest first, with filters and two ways to page:
//! `limit`/`offset` for small jumps, and a stable `cursor` (the position of the last event of a
//! page) that never skips or repeats an event when new ones arrive meanwhile.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tally_schemas::{limits, EventRow};

use crate::auth::Org;
use crate::error::ApiError;
use crate::extract::QueryParams;
use crate::params::text_param;
use crate::range::{rfc3339, usd, Range, RangeParams};
use crate::store::reads::{EventFilters, PageRequest};
use crate::AppState;

pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 1000;
pub const MAX_OFFSET: u32 = 10_000;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListParams {
    from: Option<String>,
    to: Option<String>,
    model: Option<String>,
    provider: Option<String>,
    status: Option<String>,
    execution_id: Option<String>,
    user_id: Option<String>,
    limit: Option<u32>,
    offset: Option<u32>,
    cursor: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Tokens {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventView {
    event_id: String,
    timestamp: String,
    provider: String,
    model: String,
    tokens: Tokens,
    cost: f64,
    cost_nanos: i64,
    /// `client` (sent by the SDK), `computed` (priced by Tally) or `unknown`.
    cost_source: String,
    latency: u32,
    status: String,
    http_status: u16,
    error: Option<String>,
    execution_id: Option<String>,
    agent_id: Option<String>,
    user_id: Option<String>,
    service: Option<String>,
    action: Option<String>,
    request_id: Option<String>,
    metadata: serde_json::Map<String, serde_json::Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Page {
    events: Vec<EventView>,
    limit: u32,
    offset: u32,
    has_more: bool,
    /// Pass as `cursor` for the next page; null on the last one.
    next_cursor: Option<String>,
}

/// A position in the newest-first order: event time in ms and event id.
fn parse_cursor(text: &str) -> Result<(u64, uuid::Uuid), ApiError> {
    let bad = || ApiError::BadRequest("cursor is not one this API returned".into());
    let (at, id) = text.split_once('_').ok_or_else(bad)?;
    Ok((at.parse().map_err(|_| bad())?, uuid::Uuid::parse_str(id).map_err(|_| bad())?))
}

fn non_empty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

/// The page's limit, offset and cursor, checked together.
fn page_request(params: &ListParams) -> Result<(u32, PageRequest), ApiError> {
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!("limit must be 1..={MAX_LIMIT}")));
    }
    let offset = params.offset.unwrap_or(0);
    if offset > MAX_OFFSET {
        return Err(ApiError::BadRequest(format!(
            "offset must be at most {MAX_OFFSET}; page further with cursor"
        )));
    }
    let cursor = params.cursor.as_deref().map(parse_cursor).transpose()?;
    if cursor.is_some() && offset > 0 {
        return Err(ApiError::BadRequest("give cursor or offset, not both".into()));
    }
    // One more than asked, to know whether another page exists.
    Ok((limit, PageRequest { cursor, offset, rows: limit + 1 }))
}

fn filters(params: &ListParams) -> Result<EventFilters<'_>, ApiError> {
    let status = match params.status.as_deref() {
        None => None,
        Some(s @ ("success" | "error")) => Some(s),
        Some(other) => {
            return Err(ApiError::BadRequest(format!("status must be success or error, not {other:?}")))
        }
    };
    Ok(EventFilters {
        model: text_param("model", &params.model, limits::MAX_NAME_LEN)?,
        provider: text_param("provider", &params.provider, limits::MAX_NAME_LEN)?,
        status,
        execution_id: text_param("executionId", &params.execution_id, limits::MAX_ID_LEN)?,
        user_id: text_param("userId", &params.user_id, limits::MAX_ID_LEN)?,
    })
}

fn view(r: EventRow) -> EventView {
    EventView {
        event_id: r.event_id.to_string(),
        timestamp: rfc3339(
            DateTime::<Utc>::from_timestamp_millis(r.timestamp_epoch_ms()).unwrap_or_default(),
        ),
        provider: r.provider,
        model: r.model,
        tokens: Tokens {
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            total_tokens: r.total_tokens,
        },
        cost: usd(r.cost_nanos),
        cost_nanos: r.cost_nanos,
        cost_source: r.cost_source.as_str().to_owned(),
        latency: r.latency_ms,
        status: r.status.as_str().to_owned(),
        http_status: r.http_status,
        error: non_empty(r.error),
        execution_id: non_empty(r.execution_id),
        agent_id: non_empty(r.agent_id),
        user_id: non_empty(r.user_id),
        service: non_empty(r.service),
        action: non_empty(r.action),
        request_id: non_empty(r.request_id),
        metadata: r
            .metadata_keys
            .into_iter()
            .zip(r.metadata_values.into_iter().map(serde_json::Value::String))
            .collect(),
    }
}

pub async fn list(
    State(state): State<AppState>,
    Org(org): Org,
    QueryParams(params): QueryParams<ListParams>,
) -> Result<Json<Page>, ApiError> {
    let range =
        Range::from_params(&RangeParams { from: params.from.clone(), to: params.to.clone() }, Utc::now())?;
    let (limit, page) = page_request(&params)?;
    let filters = filters(&params)?;
    let mut rows = state.store().events_page(&org.org_id, &range, &filters, &page).await?;
    let has_more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next_cursor = if has_more {
        rows.last().map(|r| format!("{}_{}", r.timestamp_epoch_ms(), r.event_id))
    } else {
        None
    };
    let events = rows.into_iter().map(view).collect();
    Ok(Json(Page { events, limit, offset: page.offset, has_more, next_cursor }))
}
