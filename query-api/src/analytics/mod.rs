//! Seed 004's analytics for the key's org, optionally one user of it: overview, timeseries, perf
//! and costs. `/api/analytics/{view}?userId=` and `/analytics/user/{userId}/{view}` are the same
//! handlers; the org always comes from the API key.
//!
//! Analytics work at hour resolution: `from` is rounded down and `to` up to a whole hour (UTC),
//! and every response states the range it covers. So the rollup answers an org's view (with the
//! raw rows of the hours holding a local midnight, for day buckets in zones offset by :30 or :45),
//! and each number equals the same aggregate over the raw events of the stated range.
//! (`/api/costs/summary`, the budget and the events list keep millisecond bounds.)

mod breakdowns;
mod overview;
mod timeseries;

use axum::extract::State;
use axum::Json;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use tally_schemas::limits;

use crate::auth::Org;
use crate::error::ApiError;
use crate::extract::{PathParams, QueryParams};
use crate::params::text_param;
use crate::range::{Range, RangeParams};
use crate::store::Scope;
use crate::AppState;

pub use breakdowns::{Costs, Perf};
pub use overview::Overview;
pub use timeseries::Timeseries;

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

/// Whose events, over which whole hours.
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
    let query_user = text_param("userId", &params.user_id, limits::MAX_ID_LEN)?;
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
            provider: text_param("provider", &params.provider, limits::MAX_NAME_LEN)?,
            model: text_param("model", &params.model, limits::MAX_NAME_LEN)?,
        },
        range,
    })
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

fn rate(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

macro_rules! routes {
    ($($view:ident => $for:path: $out:ty),*) => {
        /// `GET /api/analytics/{view}` (org, or one user with `userId`) and
        /// `GET /analytics/user/{userId}/{view}` (seed 004's paths).
        pub mod org {
            use super::*;
            $(pub async fn $view(State(state): State<AppState>, Org(org): Org, QueryParams(params): QueryParams<Params>) -> Result<Json<$out>, ApiError> {
                $for(state, &org.org_id, params, None).await.map(Json)
            })*
        }
        pub mod user {
            use super::*;
            $(pub async fn $view(
                State(state): State<AppState>, Org(org): Org, PathParams(user_id): PathParams<String>, QueryParams(params): QueryParams<Params>,
            ) -> Result<Json<$out>, ApiError> {
                $for(state, &org.org_id, params, Some(&user_id)).await.map(Json)
            })*
        }
    };
}

routes!(
    overview => overview::overview: Overview,
    timeseries => timeseries::timeseries: Timeseries,
    perf => breakdowns::perf: Perf,
    costs => breakdowns::costs: Costs
);
