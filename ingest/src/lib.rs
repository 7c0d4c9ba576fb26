//! The ingest tier: stateless HTTP in front of Kafka. See `handler` for the request path.

pub mod body;
pub mod config;
pub mod control;
pub mod error;
pub mod handler;
pub mod metrics;
pub mod prices;
pub mod ratelimit;
pub mod sink;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use futures::future::BoxFuture;
use prometheus::Registry;
use tally_common::keyset::KeySet;
use tally_common::server::{self, HttpMetrics, OpsState, Readiness};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{ControlSource, IngestConfig, SinkKind};
use crate::metrics::IngestMetrics;
use crate::prices::Prices;
use crate::sink::{DiscardSink, EventSink, KafkaSink};

/// Handler state: one `Arc`, so axum's per-request clone is a single reference count.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    pub fn new(shared: Shared) -> Self {
        AppState(Arc::new(shared))
    }
}

/// What every request of the ingest shares.
pub struct Shared {
    pub sink: Arc<dyn EventSink>,
    pub keys: Arc<KeySet>,
    pub prices: Arc<Prices>,
    pub metrics: IngestMetrics,
    /// Milliseconds since the epoch; injected so tests can pin time.
    pub clock: fn() -> i64,
    pub limits: Arc<ratelimit::OrgLimits>,
    /// Largest body after decompression, and largest compressed body off the wire.
    pub max_body_bytes: usize,
    pub max_compressed_bytes: usize,
}

pub fn system_clock() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The ingest routes (without the operational ones), testable with `oneshot`.
pub fn app(state: AppState, http_metrics: HttpMetrics) -> Router {
    Router::new()
        .route("/v1/ingest", post(handler::ingest_sdk))
        .route("/analytics/events", post(handler::ingest_analytics))
        .route("/openapi.json", get(openapi))
        .with_state(state)
        .layer(server::ObserveLayer::new(http_metrics))
}

/// The OpenAPI document of the ingest routes.
pub const OPENAPI: &str = include_str!("../openapi.json");

async fn openapi() -> impl axum::response::IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI)
}

struct IngestReadiness {
    sink: Arc<dyn EventSink>,
    keys: Arc<KeySet>,
    prices: Arc<Prices>,
}

impl Readiness for IngestReadiness {
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            if !self.keys.is_loaded() || !self.prices.is_loaded() {
                return Err(
                    "api keys and prices not loaded yet (from clickhouse, or the control topic)".into()
                );
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
) -> Result<(), tally_common::server::RunError> {
    let registry = Registry::new();
    let metrics = IngestMetrics::register(&registry)?;
    let http_metrics = HttpMetrics::register(&registry)?;
    let background = CancellationToken::new();
    let (sink, kafka): (Arc<dyn EventSink>, Option<Arc<KafkaSink>>) = match config.sink {
        SinkKind::Kafka => {
            let kafka =
                Arc::new(KafkaSink::new(&config.kafka, &config.common.kafka_security, metrics.clone())?);
            kafka.spawn_health_probe(Duration::from_secs(2), background.clone());
            (kafka.clone(), Some(kafka))
        }
        SinkKind::Discard => {
            tracing::warn!(
                "TALLY_SINK=discard: events are validated and encoded, then dropped (benchmarks only)"
            );
            (Arc::new(DiscardSink), None)
        }
    };

    let keys = KeySet::new();
    let prices = Arc::new(Prices::default());
    match &config.control {
        ControlSource::ClickHouse => {
            let clickhouse = &config.common.clickhouse;
            if let Err(error) = keys.refresh(clickhouse).await {
                tracing::warn!(error = %error, "api keys not loaded yet, will retry");
            }
            keys.spawn_refresher(clickhouse.clone(), config.key_refresh_interval, background.clone());
            match prices::load(clickhouse).await {
                Ok(book) => prices.replace(book),
                Err(error) => tracing::warn!(error = %error, "prices not loaded yet, will retry"),
            }
            prices::spawn_refresher(
                &prices,
                clickhouse.clone(),
                config.price_refresh_interval,
                background.clone(),
            );
        }
        ControlSource::Kafka { topic } => {
            let targets = control::Targets {
                keys: Arc::clone(&keys),
                prices: Arc::clone(&prices),
                applied: metrics.control_snapshots.clone(),
            };
            control::spawn_reader(
                &config.kafka,
                &config.common.kafka_security,
                topic,
                targets,
                background.clone(),
            )?;
        }
    }

    let state = AppState::new(Shared {
        sink: Arc::clone(&sink),
        keys: Arc::clone(&keys),
        prices: Arc::clone(&prices),
        metrics,
        clock: system_clock,
        limits: Arc::new(ratelimit::OrgLimits::new(config.replicas)),
        max_body_bytes: config.max_body_bytes,
        max_compressed_bytes: config.max_compressed_bytes,
    });
    let ops = OpsState {
        registry,
        readiness: Arc::new(IngestReadiness { sink, keys, prices }),
        shutdown: shutdown.clone(),
    };
    let router = app(state, http_metrics).merge(server::ops_routes(ops));
    tracing::info!(addr = %listener.local_addr()?, "ingest listening");
    server::serve(listener, router, shutdown).await?;
    tracing::info!("draining: flushing the producer");
    if let Some(kafka) = kafka {
        kafka.flush(config.common.shutdown_timeout);
    }
    background.cancel();
    Ok(())
}
