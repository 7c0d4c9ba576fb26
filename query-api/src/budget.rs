//! `GET|PUT /api/costs/budget` (seed 000): the org's monthly budget, what it spent this calendar
//! month (UTC) to the nano-dollar, and which alert thresholds that crossed. The admin sets budgets
//! with `PUT /admin/orgs/{orgId}/budget`. A crossed threshold shows in the response
//! (`crossedThresholds`, `alert`) and in the metrics `tally_budget_percent_used` and
//! `tally_budget_threshold_crossed`, labelled by org, each time the budget is read.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Months, Utc};
use serde::{Deserialize, Serialize};
use tally_common::keyset::load_org;
use tally_schemas::limits::NANOS_PER_USD;

use crate::auth::{Admin, Org};
use crate::error::ApiError;
use crate::extract::{JsonBody, PathParams};
use crate::range::{month_start, rfc3339, usd, Range};
use crate::AppState;

pub const DEFAULT_THRESHOLDS: [u8; 3] = [50, 80, 100];
/// The largest monthly budget accepted, in USD.
pub const MAX_LIMIT_USD: f64 = 1e9;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SetBudget {
    /// Monthly limit in USD.
    limit: f64,
    /// Percentages of the limit that raise an alert, e.g. [50, 80, 100]; 1..=200, at most 10.
    #[serde(default)]
    thresholds: Option<Vec<u8>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetView {
    /// Null when no budget is set.
    limit: Option<f64>,
    limit_nanos: Option<i64>,
    spent: f64,
    spent_nanos: i64,
    remaining: Option<f64>,
    remaining_nanos: Option<i64>,
    percent_used: Option<f64>,
    period: &'static str,
    period_start: String,
    resets_at: String,
    thresholds: Vec<u8>,
    crossed_thresholds: Vec<u8>,
    /// The highest crossed threshold, if any.
    alert: Option<u8>,
}

fn month_bounds(now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let start = month_start(now);
    (start, start.checked_add_months(Months::new(1)).unwrap_or(now))
}

async fn view(state: &AppState, org_id: &str) -> Result<BudgetView, ApiError> {
    let store = state.store();
    let stored = store.budget(org_id).await?;
    let now = Utc::now();
    let (start, resets_at) = month_bounds(now);
    let spent_nanos = if now > start {
        // The whole calendar month (events stamped a little ahead of the clock count too): whole
        // hours, so the rollup alone answers.
        store.spent(org_id, &Range { from: start, to: resets_at }).await?
    } else {
        0
    };
    let limit_nanos = (stored.versions > 0).then_some(stored.limit_nanos);
    let thresholds = if stored.versions > 0 { stored.thresholds } else { Vec::new() };
    let percent_used = limit_nanos.map(|limit| {
        if limit == 0 {
            if spent_nanos > 0 {
                f64::INFINITY
            } else {
                0.0
            }
        } else {
            spent_nanos as f64 * 100.0 / limit as f64
        }
    });
    let crossed: Vec<u8> = match (limit_nanos, percent_used) {
        // Exact: spent * 100 >= threshold * limit, in integers.
        (Some(limit), Some(_)) => thresholds
            .iter()
            .copied()
            .filter(|t| i128::from(spent_nanos) * 100 >= i128::from(*t) * i128::from(limit))
            .collect(),
        _ => Vec::new(),
    };
    let alert = crossed.iter().copied().max();
    state
        .metrics
        .budget_percent_used
        .with_label_values(&[org_id])
        .set(percent_used.map_or(0.0, |p| p.min(1e6)));
    state.metrics.budget_threshold_crossed.with_label_values(&[org_id]).set(i64::from(alert.unwrap_or(0)));
    Ok(BudgetView {
        limit: limit_nanos.map(usd),
        limit_nanos,
        spent: usd(spent_nanos),
        spent_nanos,
        remaining: limit_nanos.map(|l| usd(l - spent_nanos)),
        remaining_nanos: limit_nanos.map(|l| l - spent_nanos),
        percent_used: percent_used.map(|p| if p.is_finite() { (p * 100.0).round() / 100.0 } else { 1e6 }),
        period: "monthly",
        period_start: rfc3339(start),
        resets_at: rfc3339(resets_at),
        thresholds,
        crossed_thresholds: crossed,
        alert,
    })
}

async fn write(state: &AppState, org_id: &str, body: SetBudget) -> Result<(), ApiError> {
    if !body.limit.is_finite() || body.limit < 0.0 || body.limit > MAX_LIMIT_USD {
        return Err(ApiError::BadRequest(format!("limit must be a number of USD from 0 to {MAX_LIMIT_USD}")));
    }
    let limit_nanos = (body.limit * NANOS_PER_USD as f64).round() as i64;
    let mut thresholds = body.thresholds.unwrap_or_else(|| DEFAULT_THRESHOLDS.to_vec());
    thresholds.sort_unstable();
    thresholds.dedup();
    if thresholds.len() > 10 || thresholds.iter().any(|t| !(1..=200).contains(t)) {
        return Err(ApiError::BadRequest("thresholds are at most 10 percentages, each 1..=200".into()));
    }
    state.store().set_budget(org_id, limit_nanos, &thresholds).await?;
    Ok(())
}

pub async fn get(State(state): State<AppState>, Org(org): Org) -> Result<Json<BudgetView>, ApiError> {
    Ok(Json(view(&state, &org.org_id).await?))
}

pub async fn put(
    State(state): State<AppState>,
    Org(org): Org,
    JsonBody(body): JsonBody<SetBudget>,
) -> Result<Json<BudgetView>, ApiError> {
    write(&state, &org.org_id, body).await?;
    Ok(Json(view(&state, &org.org_id).await?))
}

pub async fn admin_put(
    State(state): State<AppState>,
    _: Admin,
    PathParams(org_id): PathParams<String>,
    JsonBody(body): JsonBody<SetBudget>,
) -> Result<Json<BudgetView>, ApiError> {
    if load_org(&state.clickhouse, &org_id).await?.is_none() {
        return Err(ApiError::NotFound(format!("org {org_id}")));
    }
    write(&state, &org_id, body).await?;
    Ok(Json(view(&state, &org_id).await?))
}
