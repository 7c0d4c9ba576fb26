//! `GET /api/costs/summary` (seed 000 §3.2): the org's cost, tokens and event count over a time
//! range, by model and by provider, exact to the millisecond (the rollup's whole hours plus the
//! raw edges, see `store::plan`). Money is summed as integer nano-dollars; `total`/`cost` in USD
//! are derived from them. (`GET /api/costs`, the events, is in `events`; the budget in `budget`.)

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use chrono::Utc;
use serde::Serialize;

use crate::auth::Org;
use crate::error::ApiError;
use crate::extract::QueryParams;
use crate::range::{rfc3339, usd, Range, RangeParams};
use crate::store::Scope;
use crate::AppState;

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
        self.cost = usd(self.cost_nanos);
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
    QueryParams(params): QueryParams<RangeParams>,
) -> Result<Json<Summary>, ApiError> {
    let range = Range::from_params(&params, Utc::now())?;
    let groups = state.store().model_totals(&Scope::org(&org.org_id), &range).await?;
    let mut by_model: BTreeMap<String, Totals> = BTreeMap::new();
    let mut by_provider: BTreeMap<String, Totals> = BTreeMap::new();
    let mut all = Totals::default();
    for group in groups {
        by_model.entry(group.model).or_default().add(group.requests, group.tokens, group.cost_nanos);
        by_provider.entry(group.provider).or_default().add(group.requests, group.tokens, group.cost_nanos);
        all.add(group.requests, group.tokens, group.cost_nanos);
    }
    Ok(Json(Summary {
        from: rfc3339(range.from),
        to: rfc3339(range.to),
        total: all.cost,
        total_nanos: all.cost_nanos,
        total_tokens: all.tokens,
        execution_count: all.count,
        by_model,
        by_provider,
    }))
}
