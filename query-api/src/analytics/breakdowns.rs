//! `perf` (requests, errors and latency by model and by service) and `costs` (cost by service, provider and
//! model).

use serde::Serialize;

use super::{rate, request, Params, Percentiles};
use crate::error::ApiError;
use crate::range::{rfc3339, usd};
use crate::AppState;

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
pub struct ServicePerfEntry {
    service: String,
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
    /// The same measures by service (seed 004's "performance per service").
    services: Vec<ServicePerfEntry>,
}

pub(super) async fn perf(
    state: AppState,
    org_id: &str,
    params: Params,
    path_user: Option<&str>,
) -> Result<Perf, ApiError> {
    let request = request(org_id, &params, path_user)?;
    let store = state.store();
    let (rows, services) = futures::try_join!(
        store.perf(&request.scope, &request.range),
        store.perf_by_service(&request.scope, &request.range)
    )?;
    Ok(Perf {
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
        services: services
            .into_iter()
            .map(|r| ServicePerfEntry {
                error_rate: rate(r.errors, r.requests),
                latency_ms: Percentiles::from(&r.latency, r.requests),
                service: r.service,
                requests: r.requests,
                errors: r.errors,
            })
            .collect(),
    })
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

pub(super) async fn costs(
    state: AppState,
    org_id: &str,
    params: Params,
    path_user: Option<&str>,
) -> Result<Costs, ApiError> {
    let request = request(org_id, &params, path_user)?;
    let rows = state.store().costs(&request.scope, &request.range).await?;
    let total_nanos = rows.iter().map(|r| r.cost_nanos).sum();
    Ok(Costs {
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
    })
}
