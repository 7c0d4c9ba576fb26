//! The query API: org-scoped reads over ClickHouse (an org's key sees only its own data) and the
//! admin surface. Handlers live in one module per area; every query is in `store`.

pub mod admin;
pub mod analytics;
pub mod auth;
pub mod budget;
pub mod config;
pub mod costs;
pub mod dashboard;
pub mod error;
pub mod events;
pub mod extract;
pub mod metrics;
pub mod params;
pub mod range;
pub mod status;
pub mod store;
pub mod stream;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post, put};
use axum::Router;
use futures::future::BoxFuture;
use prometheus::Registry;
use tally_common::ch::{self, ChConfig};
use tally_common::keyset::KeySet;
use tally_common::server::{self, HttpMetrics, OpsState, Readiness};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::QueryConfig;

#[derive(Clone)]
pub struct AppState {
    pub clickhouse: ChConfig,
    pub keys: Arc<KeySet>,
    pub admin_token: Arc<str>,
    pub metrics: metrics::QueryMetrics,
    /// The archive, for raw rows of months dropped from ClickHouse (None: not configured).
    pub archive: Option<Arc<store::archived::ArchiveReads>>,
    /// The open live-totals streams.
    pub streams: Arc<stream::Hub>,
}

impl AppState {
    /// A ClickHouse client for one request. `max_threads=1`: a request reads a few granules, and
    /// on 18.16 starting more threads per query cost more CPU than it saved (6.2 → 4.7 ms for an
    /// org's month of the hourly rollup); concurrency comes from concurrent requests.
    /// `use_uncompressed_cache=1`: the same rollup blocks are read by request after request, and
    /// decompressing them each time was most of a short read's cost (the overview route at 200
    /// requests/s: p95 700 ms without the cache, 9-11 ms with it). The server's
    /// `uncompressed_cache_size` sizes the cache (0, the current default, turns it off; the local
    /// stack and k8s/ set it).
    pub fn client(&self) -> clickhouse::Client {
        self.clickhouse.client().with_setting("max_threads", "1").with_setting("use_uncompressed_cache", "1")
    }

    /// The data access of one request (see `store`), through `client`.
    pub fn store(&self) -> store::Store<'_> {
        store::Store::new(self.client(), &self.clickhouse, self.archive.as_deref())
    }
}

pub fn app(state: AppState, http_metrics: HttpMetrics) -> Router {
    Router::new()
        .route("/api/telemetry/status", get(status::telemetry_status))
        .route("/api/telemetry/stream", get(stream::stream))
        .route("/api/costs/summary", get(costs::summary))
        .route("/api/costs", get(events::list))
        .route("/api/costs/budget", get(budget::get).put(budget::put))
        .route("/api/analytics/overview", get(analytics::org::overview))
        .route("/api/analytics/timeseries", get(analytics::org::timeseries))
        .route("/api/analytics/perf", get(analytics::org::perf))
        .route("/api/analytics/costs", get(analytics::org::costs))
        .route("/analytics/user/{user_id}/overview", get(analytics::user::overview))
        .route("/analytics/user/{user_id}/timeseries", get(analytics::user::timeseries))
        .route("/analytics/user/{user_id}/perf", get(analytics::user::perf))
        .route("/analytics/user/{user_id}/costs", get(analytics::user::costs))
        .route("/openapi.json", get(openapi))
        .route("/admin/orgs", post(admin::create_org).get(admin::list_orgs))
        .route("/admin/orgs/{org_id}/keys", post(admin::create_key))
        .route("/admin/orgs/{org_id}/budget", put(budget::admin_put))
        .route("/admin/orgs/{org_id}/rate-limit", get(admin::rate_limit_status))
        .route("/admin/keys/{key_id}", delete(admin::revoke_key))
        .route("/admin/prices", post(admin::add_price).get(admin::list_prices))
        .route("/admin/top-consumers", get(admin::top_consumers))
        .merge(dashboard::routes())
        .fallback(extract::no_route)
        .method_not_allowed_fallback(extract::method_not_allowed)
        .with_state(state)
        .layer(DefaultBodyLimit::max(extract::MAX_BODY_BYTES))
        .layer(server::ObserveLayer::new(http_metrics))
}

/// The OpenAPI document of the query API's routes (served as written in `openapi.json`).
async fn openapi() -> ([(axum::http::HeaderName, &'static str); 1], &'static str) {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], include_str!("../openapi.json"))
}

struct QueryReadiness {
    clickhouse: clickhouse::Client,
    keys: Arc<KeySet>,
}

impl Readiness for QueryReadiness {
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            if !self.keys.is_loaded() {
                return Err("api keys not loaded from clickhouse yet".into());
            }
            if !ch::ping(&self.clickhouse).await {
                return Err("clickhouse unreachable".into());
            }
            Ok(())
        })
    }
}

/// Runs the query API on `listener` until `shutdown`, then finishes in-flight requests.
pub async fn run(
    config: QueryConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tally_common::server::RunError> {
    let clickhouse = config.common.clickhouse.clone();
    if config.migrate {
        tally_common::migrate::migrate(&clickhouse).await?;
    }
    let registry = Registry::new();
    let http_metrics = HttpMetrics::register(&registry)?;
    let metrics = metrics::QueryMetrics::register(&registry)?;
    let keys = KeySet::new();
    if let Err(error) = keys.refresh(&clickhouse).await {
        tracing::warn!(error = %error, "api keys not loaded yet, will retry");
    }
    let background = CancellationToken::new();
    keys.spawn_refresher(clickhouse.clone(), config.key_refresh_interval, background.clone());
    let archive = match &config.archive {
        Some(archive) => {
            let store = tally_archiver::store::Archive::open(archive)
                .map_err(|e| std::io::Error::other(format!("TALLY_ARCHIVE_URL: {e}")))?;
            tracing::info!(archive = %store.location, "raw rows of dropped months are read from the archive");
            Some(Arc::new(store::archived::ArchiveReads::new(
                store,
                config.archive_cache,
                config.archive_max_rows,
            )))
        }
        None => {
            tracing::warn!(
                "TALLY_ARCHIVE_URL is not set: if the archiver drops months, set it here as for the archiver, \
                 or raw rows of those months (events list, per-user analytics, edge hours) are missing"
            );
            None
        }
    };
    let streams = stream::Hub::new(config.stream.clone(), shutdown.clone(), metrics.streams_open.clone());
    streams.spawn_poller(&clickhouse);
    let state = AppState {
        streams,
        clickhouse: clickhouse.clone(),
        keys: Arc::clone(&keys),
        admin_token: Arc::from(config.admin_token),
        metrics,
        archive,
    };
    let ops = OpsState {
        registry,
        readiness: Arc::new(QueryReadiness { clickhouse: clickhouse.client(), keys }),
        shutdown: shutdown.clone(),
    };
    let router = app(state, http_metrics).merge(server::ops_routes(ops));
    tracing::info!(addr = %listener.local_addr()?, "query api listening");
    server::serve(listener, router, shutdown).await?;
    background.cancel();
    Ok(())
}
