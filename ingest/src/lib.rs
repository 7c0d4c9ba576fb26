//! The ingest tier: stateless HTTP in front of Kafka. See `handler` for the request path.

pub mod config;
pub mod error;
pub mod handler;
pub mod metrics;
pub mod prices;
pub mod sink;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::{middleware, Router};
use futures::future::BoxFuture;
use prometheus::Registry;
use tally_common::keyset::KeySet;
use tally_common::server::{self, HttpMetrics, OpsState, Readiness};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::IngestConfig;
use crate::metrics::IngestMetrics;
use crate::prices::Prices;
use crate::sink::{EventSink, KafkaSink};

/// Handler state: small, cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub sink: Arc<dyn EventSink>,
    pub keys: Arc<KeySet>,
    pub prices: Arc<Prices>,
    pub metrics: IngestMetrics,
    /// Milliseconds since the epoch; injected so tests can pin time.
    pub clock: fn() -> i64,
    pub max_body_bytes: usize,
}

pub fn system_clock() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The ingest routes (without the operational ones), testable with `oneshot`.
pub fn app(state: AppState, http_metrics: HttpMetrics) -> Router {
    Router::new()
        .route("/v1/ingest", post(handler::ingest_sdk))
        .route("/analytics/events", post(handler::ingest_analytics))
        .with_state(state)
        .layer(middleware::from_fn_with_state(http_metrics, server::track_http))
        .layer(middleware::from_fn(server::request_id))
}

struct IngestReadiness {
    sink: Arc<dyn EventSink>,
    keys: Arc<KeySet>,
}

impl Readiness for IngestReadiness {
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            if !self.keys.is_loaded() {
                return Err("api keys not loaded from clickhouse yet".into());
            }
            if !self.sink.is_available() {
                return Err("kafka unreachable".into());
            }
            Ok(())
        })
    }
}

/// Runs the ingest on `listener` until `shutdown`: stops accepting, finishes in-flight requests
/// (each waits for its Kafka acknowledgement), then flushes the producer.
pub async fn run(
    config: IngestConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let registry = Registry::new();
    let metrics = IngestMetrics::register(&registry)?;
    let http_metrics = HttpMetrics::register(&registry)?;
    let kafka = Arc::new(KafkaSink::new(&config.kafka, metrics.clone())?);
    let background = CancellationToken::new();
    kafka.spawn_health_probe(Duration::from_secs(2), background.clone());

    let keys = KeySet::new();
    if let Err(error) = keys.refresh(&config.common.clickhouse).await {
        tracing::warn!(error = %error, "api keys not loaded yet, will retry");
    }
    keys.spawn_refresher(config.common.clickhouse.clone(), config.key_refresh_interval, background.clone());
    let prices = Arc::new(Prices::default());
    prices.spawn_refresher(
        config.common.clickhouse.clone(),
        config.price_refresh_interval,
        background.clone(),
    );

    let sink: Arc<dyn EventSink> = kafka.clone();
    let state = AppState {
        sink: Arc::clone(&sink),
        keys: Arc::clone(&keys),
        prices,
        metrics,
        clock: system_clock,
        max_body_bytes: config.max_body_bytes,
    };
    let ops = OpsState {
        registry,
        readiness: Arc::new(IngestReadiness { sink, keys }),
        shutdown: shutdown.clone(),
    };
    let router = app(state, http_metrics).merge(server::ops_routes(ops));
    tracing::info!(addr = %listener.local_addr()?, "ingest listening");
    server::serve(listener, router, shutdown).await?;
    tracing::info!("draining: flushing the producer");
    kafka.flush(config.common.shutdown_timeout);
    background.cancel();
    Ok(())
}
