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

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
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
use tally_schemas::parse::Dialect;
use tally_schemas::record::RecordFormat;

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
    /// How accepted events are written into their Kafka record.
    pub record_format: RecordFormat,
}

pub fn system_clock() -> i64 {
    tally_schemas::time::now_ms()
}

/// The ingest routes (without the operational ones) as a router. `IngestService` answers their
/// POSTs before the router sees them; the router keeps the two POST routes for every other method
/// on those paths (405 with `Allow: POST`), and a POST would be answered the same way here.
fn routes(state: AppState, observe: &server::ObserveLayer) -> Router {
    Router::new()
        .route("/v1/ingest", post(handler::ingest_sdk))
        .route("/analytics/events", post(handler::ingest_analytics))
        .route("/openapi.json", get(openapi))
        .fallback(no_route)
        .with_state(state)
        .layer(observe.clone())
}

/// A path the ingest does not serve: 404 with the error body its other errors have, given its
/// request id and counted under the `unmatched` route by the layer (axum's own 404 was neither).
async fn no_route(uri: axum::http::Uri) -> error::IngestError {
    error::IngestError::NoRoute(uri.path().chars().take(200).collect())
}

/// The ingest as served: `POST /v1/ingest` and `POST /analytics/events` go straight to their
/// handler, observed as the router's layer would (same request id, metrics and headers); every
/// other request (other methods on those paths included) goes through the router. One `Arc`:
/// hyper clones the service for every request, and each reference count of it is shared by all
/// the runtime's workers.
#[derive(Clone)]
pub struct IngestService(Arc<Routes>);

struct Routes {
    state: AppState,
    sdk: server::DirectRoute,
    analytics: server::DirectRoute,
    router: Router,
}

impl IngestService {
    /// The ingest routes and `more` (the operational ones) behind the direct ingest routes.
    pub fn new(state: AppState, http_metrics: HttpMetrics, more: Router) -> Self {
        let observe = server::ObserveLayer::new(http_metrics);
        IngestService(Arc::new(Routes {
            sdk: observe.direct("/v1/ingest"),
            analytics: observe.direct("/analytics/events"),
            router: routes(state.clone(), &observe).merge(more),
            state,
        }))
    }
}

type DirectFuture = server::ObserveFuture<BoxFuture<'static, Result<Response, Infallible>>>;

impl tower::Service<axum::extract::Request> for IngestService {
    type Response = Response;
    type Error = Infallible;
    type Future =
        futures::future::Either<DirectFuture, <Router as tower::Service<axum::extract::Request>>::Future>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(())) // the router is always ready too
    }

    fn call(&mut self, request: axum::extract::Request) -> Self::Future {
        use futures::future::Either;
        let routes = &self.0;
        if request.method() == axum::http::Method::POST {
            let path = request.uri().path();
            let direct = if path == routes.sdk.path() {
                Some((&routes.sdk, Dialect::Sdk))
            } else if path == routes.analytics.path() {
                Some((&routes.analytics, Dialect::Analytics))
            } else {
                None
            };
            if let Some((route, dialect)) = direct {
                let service = self.clone();
                return Either::Left(route.call(request, move |request_id, request| {
                    let answer: BoxFuture<'static, Result<Response, Infallible>> = Box::pin(async move {
                        Ok(handler::handle(&service.0.state, dialect, request_id, request)
                            .await
                            .into_response())
                    });
                    answer
                }));
            }
        }
        // The router is an `Arc` inside; calling it needs it mutably, so a clone of it.
        Either::Right(tower::Service::call(&mut routes.router.clone(), request))
    }
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
        record_format: config.kafka.record_format,
    });
    let ops = OpsState {
        registry,
        readiness: Arc::new(IngestReadiness { sink, keys, prices }),
        shutdown: shutdown.clone(),
    };
    let service = IngestService::new(state, http_metrics, server::ops_routes(ops));
    tracing::info!(addr = %listener.local_addr()?, "ingest listening");
    server::serve_service(listener, service, shutdown).await?;
    tracing::info!("draining: flushing the producer");
    if let Some(kafka) = kafka {
        kafka.flush(config.common.shutdown_timeout);
    }
    background.cancel();
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use axum::body::Body;
    use axum::http::{Method, StatusCode};
    use tally_schemas::control::KeyEntry;
    use tally_schemas::plan::Plan;
    use tally_schemas::pricing::PriceBook;
    use tower::ServiceExt;

    use super::*;

    /// The service as `run` builds it, with the discard sink, one org's key and an empty price book.
    fn service(registry: &Registry) -> (IngestService, String) {
        let key = tally_schemas::keys::generate();
        let keys = KeySet::new();
        keys.replace(vec![KeyEntry {
            key_hash: key.hash.clone(),
            org_id: "org-direct".into(),
            name: "direct".into(),
            plan: Plan::Enterprise,
            events_per_minute: 1_000_000,
            burst: 0,
        }]);
        let prices = Arc::new(Prices::default());
        prices.replace(PriceBook::new([]));
        let state = AppState::new(Shared {
            sink: Arc::new(DiscardSink),
            keys,
            prices,
            metrics: IngestMetrics::register(registry).unwrap(),
            clock: system_clock,
            limits: Arc::new(ratelimit::OrgLimits::new(1)),
            max_body_bytes: 1 << 20,
            max_compressed_bytes: 1 << 20,
            record_format: RecordFormat::JsonEachRow,
        });
        let http_metrics = HttpMetrics::register(registry).unwrap();
        (
            IngestService::new(state, http_metrics, Router::new().route("/healthz", get(|| async { "ok" }))),
            key.secret,
        )
    }

    async fn send(
        service: &IngestService,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: &str,
    ) -> Response {
        let mut request = axum::http::Request::builder().method(method).uri(path);
        if let Some(key) = key {
            request = request.header("x-api-key", key).header("content-type", "application/json");
        }
        service.clone().oneshot(request.body(Body::from(body.to_owned())).unwrap()).await.unwrap()
    }

    fn requests(registry: &Registry, route: &str, method: &str, status: &str) -> u64 {
        let families = registry.gather();
        let Some(family) = families.iter().find(|f| f.name() == "tally_http_requests_total") else {
            return 0;
        };
        family
            .get_metric()
            .iter()
            .find(|m| {
                let label = |name: &str| {
                    m.get_label().iter().find(|l| l.name() == name).map(|l| l.value().to_owned())
                };
                label("route").as_deref() == Some(route)
                    && label("method").as_deref() == Some(method)
                    && label("status").as_deref() == Some(status)
            })
            .map_or(0, |m| m.get_counter().get_value() as u64)
    }

    #[tokio::test]
    async fn the_direct_ingest_routes_answer_and_are_observed_as_through_the_router() {
        let registry = Registry::new();
        let (service, key) = service(&registry);
        let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ");
        let body = format!(
            r#"{{"events":[{{"timestamp":"{now}","provider":"openai","model":"gpt-4o","tokens":{{"promptTokens":3}},"status":"success"}}]}}"#
        );
        let accepted = send(&service, Method::POST, "/v1/ingest", Some(&key), &body).await;
        assert_eq!(accepted.status(), StatusCode::ACCEPTED);
        assert_eq!(accepted.headers()["x-request-id"].len(), 36, "a generated UUID is echoed");
        assert_eq!(accepted.headers()["x-ratelimit-limit"], "1000000");
        let text = axum::body::to_bytes(accepted.into_body(), 1024).await.unwrap();
        assert_eq!(&text[..], br#"{"accepted":1,"message":"Events queued for processing"}"#);

        let unauthorized = send(&service, Method::POST, "/v1/ingest?x=1", None, &body).await;
        assert_eq!(unauthorized.status(), StatusCode::UNAUTHORIZED);
        assert!(unauthorized.headers().contains_key("x-request-id"));
        let analytics = send(&service, Method::POST, "/analytics/events", Some(&key), "[]").await;
        assert_eq!(analytics.status(), StatusCode::ACCEPTED);

        // Everything else is the router's: another method on the path, the other routes, 404s.
        assert_eq!(
            send(&service, Method::GET, "/v1/ingest", None, "").await.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(send(&service, Method::GET, "/openapi.json", None, "").await.status(), StatusCode::OK);
        assert_eq!(send(&service, Method::GET, "/healthz", None, "").await.status(), StatusCode::OK);
        let not_found = send(&service, Method::POST, "/v1/ingest/", Some(&key), &body).await;
        assert_eq!(not_found.status(), StatusCode::NOT_FOUND);
        assert_eq!(not_found.headers()["x-request-id"].len(), 36, "a 404 has its request id too");
        let error: serde_json::Value =
            serde_json::from_slice(&axum::body::to_bytes(not_found.into_body(), 1024).await.unwrap())
                .unwrap();
        assert_eq!(error["error"]["code"], "not_found");
        assert_eq!(error["error"]["message"], "no route for /v1/ingest/");

        assert_eq!(requests(&registry, "/v1/ingest", "POST", "202"), 1);
        assert_eq!(requests(&registry, "/v1/ingest", "POST", "401"), 1);
        assert_eq!(requests(&registry, "/analytics/events", "POST", "202"), 1);
        assert_eq!(requests(&registry, "/v1/ingest", "GET", "405"), 1);
        assert_eq!(requests(&registry, "/openapi.json", "GET", "200"), 1);
        assert_eq!(requests(&registry, "unmatched", "POST", "404"), 1);
        assert_eq!(
            requests(&registry, "/healthz", "GET", "200"),
            0,
            "the operational routes are not counted"
        );
    }
}
