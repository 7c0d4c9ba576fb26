//! The HTTP plumbing every service shares: `/healthz`, `/readyz`, `/metrics`, request ids, HTTP
//! metrics labelled by matched route, and graceful shutdown on SIGINT/SIGTERM.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::future::BoxFuture;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
};
use tokio_util::sync::CancellationToken;

pub const REQUEST_ID_HEADER: &str = "x-request-id";
const REQUEST_ID: HeaderName = HeaderName::from_static(REQUEST_ID_HEADER);

/// The request id of the current request: the caller's `X-Request-Id` when it is sane, else a new
/// UUIDv7. Available to handlers as an extension and echoed on the response. It is kept as the
/// header value it is echoed as: the caller's is a slice of the request as read, a generated one a
/// slice of a per-thread chunk (`scratch`), so a clone is a reference count, no copy and no allocation.
#[derive(Debug, Clone)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// A fixed id (tests, and work that no request started). Panics if it is not a valid header value.
    pub const fn from_static(id: &'static str) -> Self {
        RequestId(HeaderValue::from_static(id))
    }

    /// The id as text (always visible ASCII: checked or generated so).
    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }

    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The request id of `request`: the caller's `X-Request-Id` when it is sane, else a new UUIDv7.
fn request_id(request: &Request) -> RequestId {
    let sane = |v: &&HeaderValue| {
        let bytes = v.as_bytes();
        !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(u8::is_ascii_graphic)
    };
    if let Some(given) = request.headers().get(REQUEST_ID).filter(sane) {
        return RequestId(given.clone());
    }
    // Thread-local RNG: no syscall and no global lock per request (uuid's now_v7 has both).
    let id = tally_schemas::parse::new_v7(tally_schemas::time::now_ms());
    let (text, ()) = crate::scratch::bytes_from(uuid::fmt::Hyphenated::LENGTH, |buf| {
        buf.extend_from_slice(id.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()).as_bytes())
    });
    // A hyphenated UUID is always a valid header value.
    RequestId(HeaderValue::from_maybe_shared(text).unwrap_or(HeaderValue::from_static("unknown")))
}

/// The layer that gives each request its id (an extension for the handlers, echoed on the
/// response) and records the HTTP metrics: `router.layer(ObserveLayer::new(metrics))`. A plain
/// tower service with its own future: axum's `from_fn` middleware boxed the inner service and the
/// future on every request, which the ingest's 1-event profile showed as 3 µs of a 30 µs request.
#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Arc<HttpMetrics>,
}

impl ObserveLayer {
    pub fn new(metrics: HttpMetrics) -> Self {
        ObserveLayer { metrics: Arc::new(metrics) }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe { inner, handles: RouteHandles::new(&self.metrics) }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    handles: Arc<RouteHandles>,
}

/// The metric handles of one layered service (axum layers each route on its own), resolved on its
/// first request and reused while its labels stay the same: `with_label_values` hashes the labels
/// and takes a lock on every call, which showed in the ingest's per-request profile. Other labels
/// (another status, the fallback's routes) are looked up as before.
struct RouteHandles {
    metrics: Arc<HttpMetrics>,
    duration: OnceLock<(String, Histogram)>,
    requests: OnceLock<(String, axum::http::Method, StatusCode, IntCounter)>,
}

impl RouteHandles {
    fn new(metrics: &Arc<HttpMetrics>) -> Arc<Self> {
        Arc::new(RouteHandles {
            metrics: Arc::clone(metrics),
            duration: OnceLock::new(),
            requests: OnceLock::new(),
        })
    }

    fn observe(&self, route: &str, method: &axum::http::Method, status: StatusCode, seconds: f64) {
        match self.duration.get() {
            Some((cached, histogram)) if cached == route => histogram.observe(seconds),
            _ => {
                let histogram = self.metrics.duration.with_label_values(&[route]);
                histogram.observe(seconds);
                // The first route seen stays cached; a later different one is looked up each time.
                let _ = self.duration.set((route.to_owned(), histogram));
            }
        }
        match self.requests.get() {
            Some((r, m, s, counter)) if r == route && m == method && *s == status => counter.inc(),
            _ => {
                let counter =
                    self.metrics.requests.with_label_values(&[route, method.as_str(), status.as_str()]);
                counter.inc();
                let _ = self.requests.set((route.to_owned(), method.clone(), status, counter));
            }
        }
    }
}

impl<S> tower::Service<Request> for Observe<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let route = match request.extensions().get::<MatchedPath>() {
            Some(matched) => RouteLabel::Matched(matched.clone()),
            None => RouteLabel::Unmatched,
        };
        let observed = Observed::start(&request, route, &self.handles);
        request.extensions_mut().insert(observed.id.clone());
        ObserveFuture { inner: self.inner.call(request), observed: Some(observed) }
    }
}

/// A route served before the router, for a service's hot path: axum's routing (path matching,
/// its extensions, the boxed and cloned per-route services the layer wraps) costs a 1-event
/// ingest request about a fifth of its own work. The request gets the same id, the same metrics
/// under `route` and the same echoed header as through [`ObserveLayer`].
#[derive(Clone)]
pub struct DirectRoute {
    route: &'static str,
    handles: Arc<RouteHandles>,
}

impl ObserveLayer {
    /// The observation of `route` (the path it is served on, its metrics label) outside the router.
    pub fn direct(&self, route: &'static str) -> DirectRoute {
        DirectRoute { route, handles: RouteHandles::new(&self.metrics) }
    }
}

impl DirectRoute {
    /// The path this route is served on.
    pub fn path(&self) -> &'static str {
        self.route
    }

    /// Gives `request` its id and observes the future `serve` makes of them (the id is passed,
    /// not put in the request's extensions).
    pub fn call<F>(&self, request: Request, serve: impl FnOnce(RequestId, Request) -> F) -> ObserveFuture<F>
    where
        F: Future<Output = Result<Response, Infallible>>,
    {
        let observed = Observed::start(&request, RouteLabel::Fixed(self.route), &self.handles);
        ObserveFuture { inner: serve(observed.id.clone(), request), observed: Some(observed) }
    }
}

/// The route label of a request's metrics.
enum RouteLabel {
    Matched(MatchedPath),
    Fixed(&'static str),
    Unmatched,
}

impl RouteLabel {
    fn as_str(&self) -> &str {
        match self {
            RouteLabel::Matched(matched) => matched.as_str(),
            RouteLabel::Fixed(route) => route,
            RouteLabel::Unmatched => "unmatched",
        }
    }
}

/// What the layer keeps of a request until its response.
struct Observed {
    id: RequestId,
    route: RouteLabel,
    method: axum::http::Method,
    started: Instant,
    handles: Arc<RouteHandles>,
}

impl Observed {
    /// The request's id and what its metrics need, as it starts.
    fn start(request: &Request, route: RouteLabel, handles: &Arc<RouteHandles>) -> Self {
        Observed {
            id: request_id(request),
            route,
            method: request.method().clone(),
            started: Instant::now(),
            handles: Arc::clone(handles),
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner service's future, then the metrics and the request id header on its response.
    pub struct ObserveFuture<F> {
        #[pin]
        inner: F,
        observed: Option<Observed>,
    }
}

impl<F: Future<Output = Result<Response, Infallible>>> Future for ObserveFuture<F> {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = std::task::ready!(this.inner.poll(cx));
        if let Some(Observed { id, route, method, started, handles }) = this.observed.take() {
            handles.observe(route.as_str(), &method, response.status(), started.elapsed().as_secs_f64());
            response.headers_mut().insert(REQUEST_ID, id.0);
        }
        Poll::Ready(Ok(response))
    }
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

/// [`serve`] for a service that is not a plain router (one with a [`DirectRoute`] before it).
pub async fn serve_service<S>(
    listener: tokio::net::TcpListener,
    service: S,
    shutdown: CancellationToken,
) -> std::io::Result<()>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    axum::serve(listener, EachConnection(service))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Hands every connection a clone of the service.
#[derive(Clone)]
struct EachConnection<S>(S);

impl<S: Clone, T> tower::Service<T> for EachConnection<S> {
    type Response = S;
    type Error = Infallible;
    type Future = std::future::Ready<Result<S, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: T) -> Self::Future {
        std::future::ready(Ok(self.0.clone()))
    }
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
    const API_KEY: HeaderName = HeaderName::from_static("x-api-key");
    key_of(headers.get(API_KEY), headers.get(axum::http::header::AUTHORIZATION))
}

/// [`presented_key`] from the two headers' values, for a caller that has already found them.
pub fn key_of<'a>(
    api_key: Option<&'a HeaderValue>,
    authorization: Option<&'a HeaderValue>,
) -> Option<&'a str> {
    // `to_str` only passes visible ASCII, spaces and tabs, so ASCII trimming is all there is to do.
    if let Some(value) = api_key.and_then(|v| v.to_str().ok()) {
        return Some(value.trim_ascii());
    }
    let authorization = authorization?.to_str().ok()?;
    let (scheme, token) = authorization.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim_ascii())
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

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::routing::get;
    use axum::Extension;
    use tower::ServiceExt;

    use super::*;

    /// A router whose one route answers the request id the layer gave it.
    fn app(registry: &Registry) -> Router {
        let metrics = HttpMetrics::register(registry).unwrap();
        Router::new()
            .route("/things/{id}", get(|Extension(id): Extension<RequestId>| async move { id.to_string() }))
            .route(
                "/answer/{code}",
                get(|axum::extract::Path(code): axum::extract::Path<u16>| async move {
                    StatusCode::from_u16(code).unwrap()
                }),
            )
            .layer(ObserveLayer::new(metrics))
    }

    async fn call(
        app: &Router,
        path: &str,
        request_id: Option<&str>,
    ) -> (StatusCode, Option<String>, String) {
        let mut request = Request::builder().uri(path);
        if let Some(id) = request_id {
            request = request.header(REQUEST_ID_HEADER, id);
        }
        let response = app.clone().oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
        let status = response.status();
        let echoed = response.headers().get(REQUEST_ID_HEADER).map(|v| v.to_str().unwrap().to_owned());
        let body = axum::body::to_bytes(response.into_body(), 1024).await.unwrap();
        (status, echoed, String::from_utf8(body.to_vec()).unwrap())
    }

    fn metric(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
        let families = registry.gather();
        let family = families.iter().find(|f| f.name() == name).unwrap();
        family
            .get_metric()
            .iter()
            .find(|m| {
                labels.iter().all(|(k, v)| m.get_label().iter().any(|l| l.name() == *k && l.value() == *v))
            })
            .map_or(0.0, |m| {
                if name.ends_with("_total") {
                    m.get_counter().get_value()
                } else {
                    m.get_histogram().get_sample_count() as f64
                }
            })
    }

    #[tokio::test]
    async fn the_callers_sane_request_id_reaches_the_handler_and_is_echoed() {
        let app = app(&Registry::new());
        let (status, echoed, seen) = call(&app, "/things/1", Some("req-123")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(echoed.as_deref(), Some("req-123"));
        assert_eq!(seen, "req-123");
    }

    #[tokio::test]
    async fn a_missing_or_insane_request_id_is_replaced_by_a_new_uuid_v7() {
        let app = app(&Registry::new());
        let too_long = "a".repeat(129);
        for given in [None, Some("has space"), Some(""), Some(too_long.as_str())] {
            let (_, echoed, seen) = call(&app, "/things/1", given).await;
            let echoed = echoed.unwrap();
            assert_eq!(echoed, seen, "the handler sees the id the response carries");
            let id = uuid::Uuid::parse_str(&echoed).unwrap();
            assert_eq!(id.get_version_num(), 7, "{given:?} -> {echoed}");
        }
        let (_, first, _) = call(&app, "/things/1", None).await;
        let (_, second, _) = call(&app, "/things/1", None).await;
        assert_ne!(first, second);
    }

    #[tokio::test]
    async fn metrics_are_labelled_by_the_matched_route_never_the_raw_path() {
        let registry = Registry::new();
        let app = app(&registry);
        for path in ["/things/1", "/things/2", "/nowhere"] {
            call(&app, path, None).await;
        }
        let requests = "tally_http_requests_total";
        let route = [("route", "/things/{id}"), ("method", "GET"), ("status", "200")];
        assert_eq!(metric(&registry, requests, &route), 2.0);
        let unmatched = [("route", "unmatched"), ("status", "404")];
        assert_eq!(metric(&registry, requests, &unmatched), 1.0);
        assert_eq!(
            metric(&registry, "tally_http_request_duration_seconds", &[("route", "/things/{id}")]),
            2.0
        );
        assert_eq!(metric(&registry, requests, &[("route", "/things/1")]), 0.0);
    }

    #[tokio::test]
    async fn each_status_of_a_route_is_counted_under_its_own_label() {
        // The first answer's handles are cached; the others must still land on their own labels.
        let registry = Registry::new();
        let app = app(&registry);
        for code in [202, 429, 202, 503, 429, 202] {
            call(&app, &format!("/answer/{code}"), None).await;
        }
        let requests = "tally_http_requests_total";
        for (status, count) in [("202", 3.0), ("429", 2.0), ("503", 1.0)] {
            let labels = [("route", "/answer/{code}"), ("method", "GET"), ("status", status)];
            assert_eq!(metric(&registry, requests, &labels), count, "status {status}");
        }
        let durations =
            metric(&registry, "tally_http_request_duration_seconds", &[("route", "/answer/{code}")]);
        assert_eq!(durations, 6.0);
    }
}
