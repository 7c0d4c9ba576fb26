//! Seed 004's analytics for the key's org, optionally one user of it: overview, timeseries, perf
//! and costs. `/api/analytics/{view}?userId=` and `/analytics/user/{userId}/{view}` are the same
//! handlers; the org always comes from the API key.
//!
//! Analytics work at hour resolution: `from` is rounded down and `to` up to a whole hour (UTC),
//! and every response states the range it covers. So the rollup alone answers an org's view, in
//! one query, and each number equals the same aggregate over the raw events of the stated range.
//! (`/api/costs/summary`, the budget and the events list keep millisecond bounds.)

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::{Path, Query, State};
use axum::Json;
use chrono::{DateTime, Utc};
use clickhouse::Row;
use serde::{Deserialize, Serialize};
use tally_schemas::limits;

use crate::auth::Org;
use crate::costs::{Range, RangeParams};
use crate::error::ApiError;
use crate::stats::{self, Scope};
use crate::AppState;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Params {
    from: Option<String>,
    to: Option<String>,
    user_id: Option<String>,
    provider: Option<String>,
    model: Option<String>,
    /// timeseries: `hour` (default) or `day`
    bucket: Option<String>,
    /// timeseries: split by `model`, `service` or `provider`; none by default
    group_by: Option<String>,
    /// timeseries with day buckets: an IANA time zone for the day boundaries (default UTC)
    tz: Option<String>,
}

struct Request<'a> {
    scope: Scope<'a>,
    range: Range,
}

fn request<'a>(
    org_id: &'a str,
    params: &'a Params,
    path_user: Option<&'a str>,
) -> Result<Request<'a>, ApiError> {
    let range =
        Range::from_params(&RangeParams { from: params.from.clone(), to: params.to.clone() }, Utc::now())?
            .whole_hours();
    let query_user = stats::text_param("userId", &params.user_id, limits::MAX_ID_LEN)?;
    if path_user.is_some() && query_user.is_some() {
        return Err(ApiError::BadRequest("give the user in the path or as userId, not both".into()));
    }
    let user_id = match path_user {
        Some(user) if user.is_empty() || user.len() > limits::MAX_ID_LEN => {
            return Err(ApiError::BadRequest(format!("userId must be 1..={} bytes", limits::MAX_ID_LEN)))
        }
        Some(user) => Some(user),
        None => query_user,
    };
    Ok(Request {
        scope: Scope {
            org_id,
            user_id,
            provider: stats::text_param("provider", &params.provider, limits::MAX_NAME_LEN)?,
            model: stats::text_param("model", &params.model, limits::MAX_NAME_LEN)?,
        },
        range,
    })
}

#[derive(Row, Deserialize)]
struct Group {
    provider: String,
    model: String,
    service: String,
    requests: u64,
    errors: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    tokens: u64,
    cost_nanos: i64,
    input_bytes: u64,
    output_bytes: u64,
}

#[derive(Row, Deserialize)]
struct Latency {
    latency: Vec<f32>,
}

#[derive(Serialize, Default, Clone)]
#[serde(rename_all = "camelCase")]
pub struct Share {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<String>,
    requests: u64,
    cost: f64,
    cost_nanos: i64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Percentiles {
    p50: f64,
    p95: f64,
    p99: f64,
}

impl Percentiles {
    fn from(values: &[f32], requests: u64) -> Option<Percentiles> {
        match values {
            [p50, p95, p99] if requests > 0 => {
                Some(Percentiles { p50: f64::from(*p50), p95: f64::from(*p95), p99: f64::from(*p99) })
            }
            _ => None,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Overview {
    from: String,
    to: String,
    user_id: Option<String>,
    total_requests: u64,
    errors: u64,
    error_rate: f64,
    distinct_services: usize,
    top_services: Vec<Share>,
    top_models: Vec<Share>,
    /// Latency percentiles in ms, null without events.
    latency_ms: Option<Percentiles>,
    tokens_in: u64,
    tokens_out: u64,
    total_tokens: u64,
    bytes_in: u64,
    bytes_out: u64,
    cost: f64,
    cost_nanos: i64,
}

const TOP: usize = 10;

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn rate(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn top(shares: BTreeMap<String, Share>) -> Vec<Share> {
    let mut list: Vec<Share> = shares.into_values().collect();
    list.sort_by(|a, b| {
        b.requests.cmp(&a.requests).then(b.cost_nanos.cmp(&a.cost_nanos)).then(a.name.cmp(&b.name))
    });
    list.truncate(TOP);
    list
}

async fn overview_for(
    state: AppState,
    org_id: &str,
    params: Params,
    path_user: Option<&str>,
) -> Result<Json<Overview>, ApiError> {
    let request = request(org_id, &params, path_user)?;
    let client = state.client();
    use stats::*;
    let merged =
        format!("{M_EVENTS}, {M_ERRORS}, {M_PROMPT}, {M_COMPLETION}, {M_TOKENS}, {M_COST}, {M_INPUT_BYTES}, {M_OUTPUT_BYTES}");
    let totals = sums::<Group>(
        &state,
        &request.scope,
        &request.range,
        Keys::columns("provider, model, service"),
        &merged,
        "count() AS requests, toUInt64(countIf(status = 'error')) AS errors, sum(toUInt64(prompt_tokens)) AS prompt_tokens, \
         sum(toUInt64(completion_tokens)) AS completion_tokens, sum(toUInt64(total_tokens)) AS tokens, \
         sum(cost_nanos) AS cost_nanos, sum(input_bytes) AS input_bytes, sum(output_bytes) AS output_bytes",
    );
    let latency_sql =
        over_states(&state, &request.scope, &request.range, Keys::columns(""), &[LATENCY], M_LATENCY, "");
    let (groups, latency) = futures::try_join!(totals, latency_sql.query(&client).fetch_one::<Latency>())?;
    let mut services: BTreeMap<String, Share> = BTreeMap::new();
    let mut models: BTreeMap<String, Share> = BTreeMap::new();
    let mut overview = Overview {
        from: rfc3339(request.range.from),
        to: rfc3339(request.range.to),
        user_id: request.scope.user_id.map(str::to_owned),
        total_requests: 0,
        errors: 0,
        error_rate: 0.0,
        distinct_services: 0,
        top_services: Vec::new(),
        top_models: Vec::new(),
        latency_ms: None,
        tokens_in: 0,
        tokens_out: 0,
        total_tokens: 0,
        bytes_in: 0,
        bytes_out: 0,
        cost: 0.0,
        cost_nanos: 0,
    };
    for g in &groups {
        overview.total_requests += g.requests;
        overview.errors += g.errors;
        overview.tokens_in += g.prompt_tokens;
        overview.tokens_out += g.completion_tokens;
        overview.total_tokens += g.tokens;
        overview.bytes_in += g.input_bytes;
        overview.bytes_out += g.output_bytes;
        overview.cost_nanos += g.cost_nanos;
        for (map, name, provider) in
            [(&mut services, &g.service, None), (&mut models, &g.model, Some(g.provider.clone()))]
        {
            let key = format!("{}/{name}", provider.as_deref().unwrap_or(""));
            let share =
                map.entry(key).or_insert_with(|| Share { name: name.clone(), provider, ..Share::default() });
            share.requests += g.requests;
            share.cost_nanos += g.cost_nanos;
            share.cost = usd(share.cost_nanos);
        }
    }
    overview.distinct_services = groups.iter().map(|g| g.service.as_str()).collect::<BTreeSet<_>>().len();
    overview.error_rate = rate(overview.errors, overview.total_requests);
    overview.cost = usd(overview.cost_nanos);
    overview.latency_ms = Percentiles::from(&latency.latency, overview.total_requests);
    overview.top_services = top(services);
    overview.top_models = top(models);
    Ok(Json(overview))
}

#[derive(Row, Deserialize)]
struct Point {
    bucket: String,
    key: String,
    requests: u64,
    errors: u64,
    tokens: u64,
    cost_nanos: i64,
    latency: Vec<f32>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TimePoint {
    /// Bucket start: RFC 3339 for hours, `YYYY-MM-DD` (in `tz`) for days.
    time: String,
    /// The group's value (model, service or provider), or "" when not grouped.
    key: String,
    requests: u64,
    errors: u64,
    tokens: u64,
    cost: f64,
    cost_nanos: i64,
    latency_ms: Option<Percentiles>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Timeseries {
    from: String,
    to: String,
    bucket: &'static str,
    group_by: Option<&'static str>,
    tz: String,
    points: Vec<TimePoint>,
}

fn valid_tz(tz: &str) -> bool {
    !tz.is_empty()
        && tz.len() <= 64
        && tz.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'+'))
        && !tz.contains("..")
}

async fn timeseries_for(
    state: AppState,
    org_id: &str,
    params: Params,
    path_user: Option<&str>,
) -> Result<Json<Timeseries>, ApiError> {
    let request = request(org_id, &params, path_user)?;
    let bucket = match params.bucket.as_deref().unwrap_or("hour") {
        "hour" => "hour",
        "day" => "day",
        other => return Err(ApiError::BadRequest(format!("bucket must be hour or day, not {other:?}"))),
    };
    let group_by = match params.group_by.as_deref() {
        None => None,
        Some("model") => Some("model"),
        Some("service") => Some("service"),
        Some("provider") => Some("provider"),
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "groupBy must be model, service or provider, not {other:?}"
            )))
        }
    };
    let tz = params.tz.clone().unwrap_or_else(|| "UTC".into());
    if !valid_tz(&tz) {
        return Err(ApiError::BadRequest("tz must be an IANA time zone name such as Europe/Paris".into()));
    }
    if bucket == "hour" && tz != "UTC" {
        return Err(ApiError::BadRequest("tz applies to day buckets; hour buckets are UTC".into()));
    }
    if bucket == "hour" && request.range.to - request.range.from > chrono::Duration::days(93) {
        return Err(ApiError::BadRequest("hour buckets cover at most 93 days; use bucket=day".into()));
    }
    use stats::*;
    let key = group_by.unwrap_or("''");
    // Hour buckets: each hour comes whole from one source (the rollup, or the raw rows of an edge
    // hour), so two plain queries run concurrently. Day buckets mix both: states merged in one.
    let points: Result<Vec<Point>, clickhouse::error::Error> = if bucket == "hour" {
        sums(
            &state,
            &request.scope,
            &request.range,
            Keys {
                rollup: &format!("toString(toUInt32(hour)) AS bucket, {key} AS key"),
                raw: &format!("toString(toUInt32(toStartOfHour(timestamp))) AS bucket, {key} AS key"),
                group: "bucket, key",
            },
            &format!("{M_EVENTS}, {M_ERRORS}, {M_TOKENS}, {M_COST}, {M_LATENCY}"),
            "count() AS requests, toUInt64(countIf(status = 'error')) AS errors, sum(toUInt64(total_tokens)) AS tokens, \
             sum(cost_nanos) AS cost_nanos, quantilesTiming(0.5, 0.95, 0.99)(latency_ms) AS latency",
        )
        .await
    } else {
        // The zone is checked above (letters, digits, / _ - +) and ClickHouse refuses unknown ones.
        over_states(
            &state,
            &request.scope,
            &request.range,
            Keys {
                rollup: &format!("toString(toDate(hour, '{tz}')) AS bucket, {key} AS key"),
                raw: &format!("toString(toDate(toStartOfHour(timestamp), '{tz}')) AS bucket, {key} AS key"),
                group: "bucket, key",
            },
            &[EVENTS, ERRORS, TOTAL_TOKENS, COST, LATENCY],
            &format!("{M_EVENTS}, {M_ERRORS}, {M_TOKENS}, {M_COST}, {M_LATENCY}"),
            "ORDER BY bucket, key",
        )
        .query(&state.client())
        .fetch_all()
        .await
    };
    // ClickHouse refuses a zone it does not know: code 1000 (a Poco exception) on 18.16, 36
    // (BAD_ARGUMENTS) on current versions.
    let points = points.map_err(|error| match tally_common::ch::error_code(&error) {
        Some(1000 | 36) if params.tz.is_some() => ApiError::BadRequest(format!("unknown time zone {tz:?}")),
        _ => ApiError::Storage(error),
    })?;
    // In time order, then key: hour buckets by their epoch seconds (comparing the RFC 3339 texts
    // of 700 points cost a quarter of the endpoint's CPU), day buckets by their ISO dates.
    let mut points: Vec<(i64, Point)> = points
        .into_iter()
        .map(|p| (if bucket == "hour" { p.bucket.parse::<i64>().unwrap_or(i64::MAX) } else { 0 }, p))
        .collect();
    points.sort_unstable_by(|(ta, a), (tb, b)| {
        ta.cmp(tb).then_with(|| a.bucket.cmp(&b.bucket)).then_with(|| a.key.cmp(&b.key))
    });
    let out: Vec<TimePoint> = points
        .into_iter()
        .map(|(_, p)| TimePoint {
            time: match bucket {
                "hour" => p
                    .bucket
                    .parse::<i64>()
                    .ok()
                    .and_then(|s| DateTime::from_timestamp(s, 0))
                    .map_or(p.bucket.clone(), rfc3339),
                _ => p.bucket.clone(),
            },
            key: p.key,
            latency_ms: Percentiles::from(&p.latency, p.requests),
            requests: p.requests,
            errors: p.errors,
            tokens: p.tokens,
            cost: usd(p.cost_nanos),
            cost_nanos: p.cost_nanos,
        })
        .collect();
    Ok(Json(Timeseries {
        from: rfc3339(request.range.from),
        to: rfc3339(request.range.to),
        bucket,
        group_by,
        tz,
        points: out,
    }))
}

#[derive(Row, Deserialize)]
struct PerfRow {
    provider: String,
    model: String,
    requests: u64,
    errors: u64,
    latency: Vec<f32>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PerfEntry {
    provider: String,
    model: String,
    requests: u64,
    errors: u64,
    error_rate: f64,
    latency_ms: Option<Percentiles>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Perf {
    from: String,
    to: String,
    models: Vec<PerfEntry>,
}

async fn perf_for(
    state: AppState,
    org_id: &str,
    params: Params,
    path_user: Option<&str>,
) -> Result<Json<Perf>, ApiError> {
    let request = request(org_id, &params, path_user)?;
    use stats::*;
    let rows: Vec<PerfRow> = over_states(
        &state,
        &request.scope,
        &request.range,
        Keys::columns("provider, model"),
        &[EVENTS, ERRORS, LATENCY],
        &format!("{M_EVENTS}, {M_ERRORS}, {M_LATENCY}"),
        "ORDER BY requests DESC, provider, model",
    )
    .query(&state.client())
    .fetch_all()
    .await?;
    Ok(Json(Perf {
        from: rfc3339(request.range.from),
        to: rfc3339(request.range.to),
        models: rows
            .into_iter()
            .map(|r| PerfEntry {
                error_rate: rate(r.errors, r.requests),
                latency_ms: Percentiles::from(&r.latency, r.requests),
                provider: r.provider,
                model: r.model,
                requests: r.requests,
                errors: r.errors,
            })
            .collect(),
    }))
}

#[derive(Row, Deserialize)]
struct CostRow {
    service: String,
    provider: String,
    model: String,
    requests: u64,
    tokens: u64,
    cost_nanos: i64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CostEntry {
    service: String,
    provider: String,
    model: String,
    requests: u64,
    tokens: u64,
    cost: f64,
    cost_nanos: i64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Costs {
    from: String,
    to: String,
    total: f64,
    total_nanos: i64,
    /// By service, provider and model, most expensive first.
    breakdown: Vec<CostEntry>,
}

async fn costs_for(
    state: AppState,
    org_id: &str,
    params: Params,
    path_user: Option<&str>,
) -> Result<Json<Costs>, ApiError> {
    let request = request(org_id, &params, path_user)?;
    use stats::*;
    let rows: Vec<CostRow> = over_states(
        &state,
        &request.scope,
        &request.range,
        Keys::columns("service, provider, model"),
        &[EVENTS, TOTAL_TOKENS, COST],
        &format!("{M_EVENTS}, {M_TOKENS}, {M_COST}"),
        "ORDER BY cost_nanos DESC, service, provider, model",
    )
    .query(&state.client())
    .fetch_all()
    .await?;
    let total_nanos = rows.iter().map(|r| r.cost_nanos).sum();
    Ok(Json(Costs {
        from: rfc3339(request.range.from),
        to: rfc3339(request.range.to),
        total: usd(total_nanos),
        total_nanos,
        breakdown: rows
            .into_iter()
            .map(|r| CostEntry {
                cost: usd(r.cost_nanos),
                service: r.service,
                provider: r.provider,
                model: r.model,
                requests: r.requests,
                tokens: r.tokens,
                cost_nanos: r.cost_nanos,
            })
            .collect(),
    }))
}

macro_rules! routes {
    ($($view:ident => $for:ident: $out:ty),*) => {
        /// `GET /api/analytics/{view}` (org, or one user with `userId`) and
        /// `GET /analytics/user/{userId}/{view}` (seed 004's paths).
        pub mod org {
            use super::*;
            $(pub async fn $view(State(state): State<AppState>, Org(org): Org, Query(params): Query<Params>) -> Result<Json<$out>, ApiError> {
                $for(state, &org.org_id, params, None).await
            })*
        }
        pub mod user {
            use super::*;
            $(pub async fn $view(
                State(state): State<AppState>, Org(org): Org, Path(user_id): Path<String>, Query(params): Query<Params>,
            ) -> Result<Json<$out>, ApiError> {
                $for(state, &org.org_id, params, Some(&user_id)).await
            })*
        }
    };
}

routes!(overview => overview_for: Overview, timeseries => timeseries_for: Timeseries, perf => perf_for: Perf, costs => costs_for: Costs);
