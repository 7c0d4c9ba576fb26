//! `overview`: totals, error rate, latency percentiles and the top services and models.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{rate, request, Params, Percentiles};
use crate::error::ApiError;
use crate::range::{rfc3339, usd};
use crate::store::reads::Usage;
use crate::AppState;

/// How many services and models the overview lists.
const TOP: usize = 10;

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

#[derive(Serialize, Default)]
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

fn top(shares: BTreeMap<String, Share>) -> Vec<Share> {
    let mut list: Vec<Share> = shares.into_values().collect();
    list.sort_by(|a, b| {
        b.requests.cmp(&a.requests).then(b.cost_nanos.cmp(&a.cost_nanos)).then(a.name.cmp(&b.name))
    });
    list.truncate(TOP);
    list
}

/// Adds a group's usage to the share of `name` (of `provider`, for models).
fn add_share(shares: &mut BTreeMap<String, Share>, name: &str, provider: Option<&str>, usage: &Usage) {
    let key = format!("{}/{name}", provider.unwrap_or(""));
    let share = shares.entry(key).or_insert_with(|| Share {
        name: name.to_owned(),
        provider: provider.map(str::to_owned),
        ..Share::default()
    });
    share.requests += usage.requests;
    share.cost_nanos += usage.cost_nanos;
    share.cost = usd(share.cost_nanos);
}

/// The overview of the usage groups of a scope.
fn summarise(groups: &[Usage]) -> Overview {
    let mut overview = Overview::default();
    let mut services = BTreeMap::new();
    let mut models = BTreeMap::new();
    for g in groups {
        overview.total_requests += g.requests;
        overview.errors += g.errors;
        overview.tokens_in += g.prompt_tokens;
        overview.tokens_out += g.completion_tokens;
        overview.total_tokens += g.tokens;
        overview.bytes_in += g.input_bytes;
        overview.bytes_out += g.output_bytes;
        overview.cost_nanos += g.cost_nanos;
        add_share(&mut services, &g.service, None, g);
        add_share(&mut models, &g.model, Some(&g.provider), g);
    }
    overview.distinct_services = groups.iter().map(|g| g.service.as_str()).collect::<BTreeSet<_>>().len();
    overview.error_rate = rate(overview.errors, overview.total_requests);
    overview.cost = usd(overview.cost_nanos);
    overview.top_services = top(services);
    overview.top_models = top(models);
    overview
}

pub(super) async fn overview(
    state: AppState,
    org_id: &str,
    params: Params,
    path_user: Option<&str>,
) -> Result<Overview, ApiError> {
    let request = request(org_id, &params, path_user)?;
    let store = state.store();
    let (groups, latency) = futures::try_join!(
        store.usage(&request.scope, &request.range),
        store.latency(&request.scope, &request.range)
    )?;
    let mut overview = summarise(&groups);
    overview.from = rfc3339(request.range.from);
    overview.to = rfc3339(request.range.to);
    overview.user_id = request.scope.user_id.map(str::to_owned);
    overview.latency_ms = Percentiles::from(&latency, overview.total_requests);
    Ok(overview)
}
