//! `perf` (requests, errors and latency by model and by service) and `costs` (cost by service, provider and
//! model).

use serde::Serialize;

use super::{rate, request, Params, Percentiles};
use crate::error::ApiError;
use crate::range::{rfc3339, usd};
use crate::AppState;

/// Requests, errors and latency of one group (a model, a service).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PerfMeasures {
    requests: u64,
    errors: u64,
    error_rate: f64,
    latency_ms: Option<Percentiles>,
}

impl PerfMeasures {
    fn new(requests: u64, errors: u64, latency: &[f32]) -> PerfMeasures {
        PerfMeasures {
            requests,
            errors,
            error_rate: rate(errors, requests),
            latency_ms: Percentiles::from(latency, requests),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PerfEntry {
    provider: String,
    model: String,
    #[serde(flatten)]
    measures: PerfMeasures,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePerfEntry {
    service: String,
    #[serde(flatten)]
    measures: PerfMeasures,
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
                measures: PerfMeasures::new(r.requests, r.errors, &r.latency),
                provider: r.provider,
                model: r.model,
            })
            .collect(),
        services: services
            .into_iter()
            .map(|r| ServicePerfEntry {
                measures: PerfMeasures::new(r.requests, r.errors, &r.latency),
                service: r.service,
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
