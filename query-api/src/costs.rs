//! `GET /api/costs/summary` (seed 000 §3.2): the org's cost, tokens and event count over a time
//! range, by model and by provider, from the rollup plus exact edges (see `stats`). Also
//! `GET /api/costs` (the org's events, newest first) and the monthly budget.
//! Money is summed as integer nano-dollars; `total`/`cost` in USD are derived from them.

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::Json;
use chrono::{DateTime, Datelike, Duration, DurationRound, Utc};
use clickhouse::Row;
use serde::{Deserialize, Serialize};

use crate::auth::Org;
use crate::error::ApiError;
use crate::AppState;

/// Longest range one request may ask for.
const MAX_RANGE_DAYS: i64 = 400;

#[derive(Deserialize)]
pub struct RangeParams {
    pub from: Option<String>,
    pub to: Option<String>,
}

/// `[from, to)` in UTC; defaults: from the start of the current month to now (rounded up to the
/// second, which spares ClickHouse a millisecond condition).
pub struct Range {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// The start of `now`'s calendar month, UTC: the default `from`, and the budget period's start.
pub fn month_start(now: DateTime<Utc>) -> DateTime<Utc> {
    now.date_naive().with_day0(0).and_then(|d| d.and_hms_opt(0, 0, 0)).map_or(now, |d| d.and_utc())
}

/// `t` rounded up to a whole second.
fn up_to_second(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_round_up(Duration::seconds(1)).unwrap_or(t)
}

fn parse_time(name: &str, text: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| ApiError::BadRequest(format!("{name} must be an RFC 3339 time: {e}")))
}

impl Range {
    pub fn from_params(params: &RangeParams, now: DateTime<Utc>) -> Result<Range, ApiError> {
        let to = params.to.as_deref().map(|t| parse_time("to", t)).transpose()?.unwrap_or(up_to_second(now));
        let from =
            params.from.as_deref().map(|t| parse_time("from", t)).transpose()?.unwrap_or(month_start(now));
        if from >= to {
            return Err(ApiError::BadRequest("from must be before to".into()));
        }
        if to - from > Duration::days(MAX_RANGE_DAYS) {
            return Err(ApiError::BadRequest(format!("a range may span at most {MAX_RANGE_DAYS} days")));
        }
        Ok(Range { from, to })
    }

    /// The smallest range of whole UTC hours that contains this one.
    pub fn whole_hours(self) -> Range {
        let hour = Duration::hours(1);
        Range {
            from: self.from.duration_trunc(hour).unwrap_or(self.from),
            to: self.to.duration_round_up(hour).unwrap_or(self.to),
        }
    }
}

#[derive(Row, Deserialize)]
struct Group {
    provider: String,
    model: String,
    requests: u64,
    tokens: u64,
    cost_nanos: i64,
}

#[derive(Serialize, Default, Clone, Copy)]
#[serde(rename_all = "camelCase")]
pub struct Totals {
    count: u64,
    tokens: u64,
    cost: f64,
    cost_nanos: i64,
}

impl Totals {
    fn add(&mut self, events: u64, tokens: u64, cost_nanos: i64) {
        self.count += events;
        self.tokens += tokens;
        self.cost_nanos += cost_nanos;
        self.cost = self.cost_nanos as f64 / 1e9;
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    from: String,
    to: String,
    total: f64,
    total_nanos: i64,
    total_tokens: u64,
    /// Events in the range (each event is one LLM call of an execution).
    execution_count: u64,
    by_model: BTreeMap<String, Totals>,
    by_provider: BTreeMap<String, Totals>,
}

pub async fn summary(
    State(state): State<AppState>,
    Org(org): Org,
    Query(params): Query<RangeParams>,
) -> Result<Json<Summary>, ApiError> {
    let range = Range::from_params(&params, Utc::now())?;
    let scope = crate::stats::Scope { org_id: &org.org_id, user_id: None, provider: None, model: None };
    let groups: Vec<Group> = crate::stats::sums(
        &state,
        &scope,
        &range,
        crate::stats::Keys::columns("provider, model"),
        "toUInt64(countMerge(events)) AS requests, sumMerge(total_tokens_sum) AS tokens, sumMerge(cost_nanos_sum) AS cost_nanos",
        "count() AS requests, sum(toUInt64(total_tokens)) AS tokens, sum(cost_nanos) AS cost_nanos",
    )
    .await?;
    let mut by_model: BTreeMap<String, Totals> = BTreeMap::new();
    let mut by_provider: BTreeMap<String, Totals> = BTreeMap::new();
    let mut all = Totals::default();
    for group in groups {
        by_model.entry(group.model).or_default().add(group.requests, group.tokens, group.cost_nanos);
        by_provider.entry(group.provider).or_default().add(group.requests, group.tokens, group.cost_nanos);
        all.add(group.requests, group.tokens, group.cost_nanos);
    }
    let format = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    Ok(Json(Summary {
        from: format(range.from),
        to: format(range.to),
        total: all.cost,
        total_nanos: all.cost_nanos,
        total_tokens: all.tokens,
        execution_count: all.count,
        by_model,
        by_provider,
    }))
}
