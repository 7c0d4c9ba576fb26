//! The HTTP plumbing every service shares: `/healthz`, `/readyz`, `/metrics`, request ids, HTTP
//! metrics labelled by matched route, and graceful shutdown on SIGINT/SIGTERM.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::future::BoxFuture;
use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The request id of the current request: the caller's `X-Request-Id` when it is sane, else a new
/// UUIDv7. Available to handlers as an extension and echoed on the response.
#[derive(Debug, Clone)]
pub struct RequestId(pub Arc<str>);

/// Assigns the request id and records the HTTP metrics, in one layer (one boxed future per
/// request instead of two on the hot path).
pub async fn observe(State(metrics): State<HttpMetrics>, mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(Arc::from)
        .unwrap_or_else(|| {
            // Thread-local RNG: no syscall and no global lock per request (uuid's now_v7 has both).
            let id = tally_schemas::parse::new_v7(chrono::Utc::now().timestamp_millis());
            Arc::from(id.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()) as &str)
        });
    request.extensions_mut().insert(RequestId(Arc::clone(&id)));
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let method = request.method().clone();
    let started = Instant::now();
    let mut response = next.run(request).await;
    metrics.duration.with_label_values(&[&route]).observe(started.elapsed().as_secs_f64());
    metrics.requests.with_label_values(&[&route, method.as_str(), response.status().as_str()]).inc();
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// Requests and latency by matched route (never the raw path, which would explode cardinality).
#[derive(Clone)]
pub struct HttpMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
}

impl HttpMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new("tally_http_requests_total", "HTTP requests by route, method and status"),
            &["route", "method", "status"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new("tally_http_request_duration_seconds", "HTTP request latency by route")
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
            &["route"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(HttpMetrics { requests, duration })
    }
}

/// A service's answer to "can you do your job right now?".
pub trait Readiness: Send + Sync + 'static {
    fn check(&self) -> BoxFuture<'_, Result<(), String>>;
}

#[derive(Clone)]
pub struct OpsState {
    pub registry: Registry,
    pub readiness: Arc<dyn Readiness>,
    pub shutdown: CancellationToken,
}

/// `/healthz`, `/readyz` and `/metrics`, to merge into a service's router.
pub fn ops_routes(state: OpsState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(serde_json::json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<OpsState>) -> Response {
    if state.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"ready": false, "reason": "shutting down"})),
        )
            .into_response();
    }
    match state.readiness.check().await {
        Ok(()) => Json(serde_json::json!({"ready": true})).into_response(),
        Err(reason) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"ready": false, "reason": reason})))
                .into_response()
        }
    }
}

async fn metrics(State(state): State<OpsState>) -> Response {
    let mut buffer = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut buffer) {
        Ok(()) => ([(axum::http::header::CONTENT_TYPE, TextEncoder::new().format_type().to_owned())], buffer)
            .into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

/// A token cancelled on SIGINT or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::error!(error = %error, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    trigger.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        trigger.cancel();
    });
    token
}

/// Serves `router` on `listener` until `shutdown`, then finishes in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}

/// Runs `task` now and then every `interval` until `shutdown` (a slow run delays the next one
/// rather than piling up). For the background refreshes of the key set and the price book.
pub fn spawn_every<F, Fut>(
    interval: std::time::Duration,
    shutdown: CancellationToken,
    mut task: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            task().await;
        }
    })
}

/// The API key of a request: `X-API-Key`, else the token of `Authorization: Bearer`.
pub fn presented_key(headers: &axum::http::HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(value.trim());
    }
    let authorization = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = authorization.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Why a service's `run` stopped with an error: a dependency it could not set up at start, or the
/// listener failing.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("migrations: {0}")]
    Migrate(#[from] crate::migrate::MigrateError),
}
