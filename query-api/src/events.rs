//! `GET /api/costs` (seed 000): the org's events, newest first, with filters and two ways to page:
//! `limit`/`offset` for small jumps, and a stable `cursor` (the position of the last event of a
//! page) that never skips or repeats an event when new ones arrive meanwhile.

use axum::extract::{Query, State};
use axum::Json;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use tally_schemas::row::select_list;
use tally_schemas::{limits, EventRow};

use crate::auth::Org;
use crate::costs::{Range, RangeParams};
use crate::error::ApiError;
use crate::stats::{text_param, usd, whole_range, Bind, Sql, EVENT_MS};
use crate::AppState;

pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 1000;
pub const MAX_OFFSET: u32 = 10_000;
/// How far back from the newest possible event a page is looked for, in turn; None = the range.
const LOOK_BACK: [Option<Duration>; 4] =
    [Some(Duration::hours(1)), Some(Duration::days(1)), Some(Duration::days(7)), None];

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

pub async fn list(
    State(state): State<AppState>,
    Org(org): Org,
    Query(params): Query<ListParams>,
) -> Result<Json<Page>, ApiError> {
    let range =
        Range::from_params(&RangeParams { from: params.from.clone(), to: params.to.clone() }, Utc::now())?;
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
    let status = match params.status.as_deref() {
        None => None,
        Some(s @ ("success" | "error")) => Some(s),
        Some(other) => {
            return Err(ApiError::BadRequest(format!("status must be success or error, not {other:?}")))
        }
    };
    let filters = [
        ("model", text_param("model", &params.model, limits::MAX_NAME_LEN)?),
        ("provider", text_param("provider", &params.provider, limits::MAX_NAME_LEN)?),
        ("toString(status)", status),
        ("execution_id", text_param("executionId", &params.execution_id, limits::MAX_ID_LEN)?),
        ("user_id", text_param("userId", &params.user_id, limits::MAX_ID_LEN)?),
    ];
    let at = EVENT_MS;
    // The page of the events in [from, to) (and before the cursor).
    let page_sql = |from: DateTime<Utc>| {
        let bounds = whole_range(&Range { from, to: range.to });
        let mut sql = format!(
            "SELECT {} FROM {} WHERE org_id = ?{}",
            select_list(),
            state.clickhouse.table("events"),
            bounds.condition()
        );
        let mut binds = vec![Bind::Text(org.org_id.to_string())];
        binds.extend(bounds.binds());
        for (column, value) in filters {
            if let Some(value) = value {
                sql.push_str(&format!(" AND {column} = ?"));
                binds.push(Bind::Text(value.to_owned()));
            }
        }
        if let Some((at_ms, id)) = cursor {
            sql.push_str(&format!(" AND ({at} < ? OR ({at} = ? AND event_id < toUUID(?)))"));
            binds.extend([Bind::Number(at_ms), Bind::Number(at_ms), Bind::Text(id.to_string())]);
        }
        // One more than asked, to know whether another page exists.
        sql.push_str(&format!(" ORDER BY {at} DESC, event_id DESC LIMIT {offset}, {}", limit + 1));
        Sql { text: sql, binds }
    };
    // Newest first without reading and sorting the whole range: look back from the newest
    // possible event over growing windows. A window that holds the whole page (offset + limit + 1
    // rows) holds the newest ones, since every event outside it is older than every event in it.
    let newest = match cursor {
        Some((at_ms, _)) => i64::try_from(at_ms)
            .ok()
            .and_then(|ms| DateTime::from_timestamp_millis(ms.saturating_add(1)))
            .map_or(range.to, |t| t.min(range.to)),
        None => range.to,
    };
    let mut rows: Vec<EventRow> = Vec::new();
    for window in LOOK_BACK {
        let from =
            window.and_then(|w| newest.checked_sub_signed(w)).map_or(range.from, |t| t.max(range.from));
        rows = page_sql(from).query(&state.client()).fetch_all().await?;
        if rows.len() > limit as usize || from == range.from {
            break;
        }
    }
    let has_more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next_cursor = if has_more {
        rows.last().map(|r| format!("{}_{}", r.timestamp_epoch_ms(), r.event_id))
    } else {
        None
    };
    let events = rows
        .into_iter()
        .map(|r| EventView {
            event_id: r.event_id.to_string(),
            timestamp: DateTime::from_timestamp_millis(r.timestamp_epoch_ms())
                .unwrap_or_default()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
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
        })
        .collect();
    Ok(Json(Page { events, limit, offset, has_more, next_cursor }))
}
