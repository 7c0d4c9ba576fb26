//! `POST /v1/ingest` (seed-000 SDK batches) and `POST /analytics/events` (seed-004 documents):
//! authenticate from the in-memory key set, split the body, validate and price each event on its
//! own, produce the accepted ones as one Kafka record and each rejected one as a dead letter, and
//! answer 202 only once Kafka acknowledged.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use bytes::BufMut;
use futures::future::BoxFuture;
use futures::FutureExt;
use prometheus::IntCounter;
use serde::Serialize;
use tally_common::keyset::OrgInfo;
use tally_common::scratch;
use tally_common::server::{key_of, RequestId};
use tally_schemas::limits::MAX_IDEMPOTENCY_KEY_LEN;
use tally_schemas::parse::{derived_event_id, parse_batch, sdk_rows, Batch, Dialect, RequestContext};
use tally_schemas::record::{DeadLetter, Stage};

use crate::body;
use crate::error::{IngestError, MalformedBody, RateLimitValues, UnsupportedMedia};
use crate::ratelimit::Admission;
use crate::sink::{SinkError, Topic};
use crate::AppState;

#[derive(Serialize)]
struct Rejected {
    index: usize,
    reason: String,
}

/// The 202's message.
const QUEUED: &str = "Events queued for processing";

#[derive(Serialize)]
struct Accepted {
    accepted: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    rejected: Vec<Rejected>,
    message: &'static str,
}

pub async fn ingest_sdk(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    request: Request,
) -> Result<Response, IngestError> {
    handle(&state, Dialect::Sdk, request_id, request).await
}

pub async fn ingest_analytics(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    request: Request,
) -> Result<Response, IngestError> {
    handle(&state, Dialect::Analytics, request_id, request).await
}

/// The request headers the ingest reads, found in one pass over the request's headers: a lookup
/// each hashed the name and probed the map (five of them, ~800 instructions of a 1-event request).
/// Each is the header's first value, as `HeaderMap::get` gives it.
#[derive(Default)]
struct IngestHeaders<'a> {
    api_key: Option<&'a HeaderValue>,
    authorization: Option<&'a HeaderValue>,
    content_type: Option<&'a HeaderValue>,
    content_encoding: Option<&'a HeaderValue>,
    idempotency_key: Option<&'a HeaderValue>,
}

impl<'a> IngestHeaders<'a> {
    fn of(headers: &'a HeaderMap) -> Self {
        let mut found = IngestHeaders::default();
        for (name, value) in headers {
            // Header names are lower case in a `HeaderMap`.
            let slot = match name.as_str() {
                "x-api-key" => &mut found.api_key,
                "authorization" => &mut found.authorization,
                "content-type" => &mut found.content_type,
                "content-encoding" => &mut found.content_encoding,
                "idempotency-key" => &mut found.idempotency_key,
                _ => continue,
            };
            slot.get_or_insert(value);
        }
        found
    }
}

fn check_media(content_type: Option<&HeaderValue>) -> Result<(), IngestError> {
    if let Some(content_type) = content_type {
        if content_type.as_bytes() == b"application/json" {
            return Ok(()); // what every SDK sends: no parsing of parameters and case
        }
        let essence = content_type.to_str().unwrap_or("").split(';').next().unwrap_or("").trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(IngestError::Unsupported(UnsupportedMedia::ContentType(essence.to_owned())));
        }
    }
    Ok(())
}

/// The request's `Idempotency-Key`, if any: 1..=MAX_IDEMPOTENCY_KEY_LEN visible bytes.
fn idempotency_key(value: Option<&HeaderValue>) -> Result<Option<&str>, IngestError> {
    match value {
        None => Ok(None),
        Some(value) => match value.to_str() {
            Ok(text) if !text.is_empty() && text.len() <= MAX_IDEMPOTENCY_KEY_LEN => Ok(Some(text)),
            _ => Err(IngestError::Malformed(MalformedBody::IdempotencyKey)),
        },
    }
}

/// What becomes of a request's events: the accepted ones encoded as Kafka lines, the rejected
/// ones with their reasons and, for invalid events, their dead letters.
struct Sorted {
    payload: Vec<u8>,
    accepted: usize,
    rejected: Vec<Rejected>,
    dead_letters: Vec<Vec<u8>>,
}

/// The org's rate limit asked for `valid` events: a 429 (every one of them counted as limited) when
/// it admits none of them, else how many it admits.
fn admit(state: &AppState, org: &OrgInfo, valid: u32) -> Result<Admission, IngestError> {
    let admission = state.limits.admit(org, valid);
    if valid > 0 && admission.allowed == 0 {
        state.metrics.events_rate_limited.inc_by(u64::from(valid));
        return Err(IngestError::RateLimited(admission));
    }
    Ok(admission)
}

/// The rejection of a valid event over the org's rate limit (counted).
fn rate_limited(state: &AppState, index: usize, admission: &Admission) -> Rejected {
    state.metrics.events_rate_limited.inc();
    let reason = format!("rate_limited: over {} events per minute, retry later", admission.limit);
    Rejected { index, reason }
}

/// The answer to a request whose `rows` events were all valid and are already priced and encoded
/// in `payload` (`sdk_rows`): the rate limit admits the first ones, the others are rejected as over
/// it, exactly as `sort_events` would have sorted them.
async fn accept_rows(
    state: &AppState,
    org: &OrgInfo,
    request_id: &RequestId,
    mut payload: Vec<u8>,
    rows: usize,
) -> Result<Response, IngestError> {
    let admission = admit(state, org, rows as u32)?;
    let accepted = rows.min(admission.allowed as usize);
    let mut rejected = Vec::new();
    if accepted < rows {
        // Keep the payload up to the end of the last admitted row (the rows are this ingest's own).
        let end = state.record_format.prefix_len(&payload, accepted).map_err(IngestError::Encoding)?;
        payload.truncate(end);
        rejected = (accepted..rows).map(|index| rate_limited(state, index, &admission)).collect();
    }
    produce(state, org, request_id, payload, accepted, Vec::new()).await?;
    Ok(accepted_response(&Accepted { accepted, rejected, message: QUEUED }, &admission))
}

/// Prices and encodes the valid events the rate limit admits into `payload`; rejects the others
/// (over the limit, or invalid, with a dead letter holding the original JSON).
fn sort_events(
    state: &AppState,
    org: &OrgInfo,
    request_id: &RequestId,
    context: &RequestContext<'_>,
    batch: &mut Batch<'_>,
    admission: &Admission,
    payload: Vec<u8>,
) -> Result<Sorted, IngestError> {
    let prices = state.prices.current();
    let mut sorted = Sorted { payload, accepted: 0, rejected: Vec::new(), dead_letters: Vec::new() };
    for (index, outcome) in std::mem::take(&mut batch.outcomes).into_iter().enumerate() {
        match outcome {
            Ok(mut event) if sorted.accepted < admission.allowed as usize => {
                prices.price(&mut event);
                state.record_format.encode(&event, &mut sorted.payload);
                sorted.accepted += 1;
            }
            Ok(_) => sorted.rejected.push(rate_limited(state, index, admission)),
            Err(rejection) => {
                state.metrics.events_rejected.with_label_values(&[rejection.code.as_str()]).inc();
                let letter = DeadLetter {
                    stage: Stage::Ingest,
                    reason: rejection.code.as_str().to_owned(),
                    detail: rejection.detail.clone(),
                    org_id: org.org_id.to_string(),
                    request_id: request_id.to_string(),
                    index: Some(index),
                    event_id: context
                        .idempotency_key
                        .map(|key| derived_event_id(&org.org_id, key, index).to_string()),
                    received_at_ms: context.received_at_ms,
                    source: None,
                    original: None,
                    original_hex: None,
                    format: None,
                }
                .with_original(batch.original(index).as_bytes());
                sorted
                    .dead_letters
                    .push(serde_json::to_vec(&letter).map_err(IngestError::DeadLetterEncoding)?);
                sorted.rejected.push(Rejected { index, reason: rejection.to_string() });
            }
        }
    }
    Ok(sorted)
}

/// Produces the accepted events and the dead letters concurrently. Only the events decide the
/// answer: a dead letter that fails is logged and counted (see `report_dead_letter_failures`).
async fn produce(
    state: &AppState,
    org: &OrgInfo,
    request_id: &RequestId,
    payload: Vec<u8>,
    accepted: usize,
    dead_letters: Vec<Vec<u8>>,
) -> Result<(), IngestError> {
    let dead_letter_sends = |dead_letters: Vec<Vec<u8>>| {
        futures::future::join_all(dead_letters.into_iter().map(|letter| {
            state.sink.produce(Topic::DeadLetters, Arc::clone(&org.org_id), letter, 1, request_id.clone())
        }))
    };
    if accepted == 0 {
        report_dead_letter_failures(state, &dead_letter_sends(dead_letters).await);
        return Ok(());
    }
    let events_send = OutlivingSend {
        send: Some(state.sink.produce(
            Topic::Events,
            Arc::clone(&org.org_id),
            payload,
            accepted,
            request_id.clone(),
        )),
        events: accepted as u64,
        unanswered: &state.metrics.events_produced_unanswered,
    };
    if dead_letters.is_empty() {
        events_send.await?; // the common request: nothing to join
    } else {
        let (events_result, dead_letter_results) =
            futures::join!(events_send, dead_letter_sends(dead_letters));
        events_result?;
        report_dead_letter_failures(state, &dead_letter_results);
    }
    state.metrics.events_accepted.inc_by(accepted as u64);
    Ok(())
}

/// The events' send, which outlives its request. The record is in the producer's queue once the
/// send starts, so it may reach Kafka even when the request ends first (the client timed out or
/// went away, and the server dropped the handler): then the send is finished in the background and,
/// once Kafka acknowledged it, its events are counted in
/// `tally_ingest_events_produced_unanswered_total`, so that accepted + unanswered adds up to what
/// the topic received. Nothing is spawned on the ordinary path, only when a request is dropped.
struct OutlivingSend<'a> {
    send: Option<BoxFuture<'static, Result<(), SinkError>>>,
    events: u64,
    /// Borrowed: cloned (a reference count every worker shares) only when a send is left behind.
    unanswered: &'a IntCounter,
}

impl Future for OutlivingSend<'_> {
    type Output = Result<(), SinkError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(send) = self.send.as_mut() else { return Poll::Ready(Err(SinkError::Timeout)) };
        let result = std::task::ready!(send.poll_unpin(cx));
        self.send = None;
        Poll::Ready(result)
    }
}

impl Drop for OutlivingSend<'_> {
    fn drop(&mut self) {
        let Some(send) = self.send.take() else { return };
        let (events, unanswered) = (self.events, self.unanswered.clone());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if send.await.is_ok() {
                    unanswered.inc_by(events);
                    tracing::warn!(events, "events reached Kafka after their request ended unanswered");
                }
            });
        }
    }
}

/// One ingest request, whichever way it came (the router's handlers above, or `IngestService`'s
/// direct route).
pub(crate) async fn handle(
    state: &AppState,
    dialect: Dialect,
    request_id: RequestId,
    request: Request,
) -> Result<Response, IngestError> {
    // The request's own header map, not a copy (a `HeaderMap` extractor clones it).
    let (parts, body) = request.into_parts();
    let headers = IngestHeaders::of(&parts.headers);
    let key = key_of(headers.api_key, headers.authorization).ok_or(IngestError::MissingKey)?;
    if !state.keys.is_loaded() || !state.prices.is_loaded() {
        return Err(IngestError::NotReady);
    }
    let org = state.keys.lookup(key).ok_or(IngestError::InvalidKey)?;
    check_media(headers.content_type)?;
    let idempotency_key = idempotency_key(headers.idempotency_key)?;
    let encoding = body::encoding(headers.content_encoding)?;
    let bytes = body::read(encoding, body, state.max_compressed_bytes, state.max_body_bytes).await?;
    let received_at_ms = (state.clock)();
    let context = RequestContext { org_id: &org.org_id, received_at_ms, idempotency_key };
    // A row of JSONEachRow is about twice its SDK event (every column is written).
    let mut payload = Vec::with_capacity(bytes.len() * 5 / 2 + 1024);
    if dialect == Dialect::Sdk {
        // The common request (valid events in the shape SDKs send) in one pass, straight to rows.
        let rows = sdk_rows(&bytes, &context, &state.prices.current(), state.record_format, &mut payload);
        if let Some(rows) = rows {
            return accept_rows(state, &org, &request_id, payload, rows).await;
        }
    }
    let mut batch = parse_batch(dialect, &bytes, &context)?;
    let valid = batch.outcomes.iter().filter(|p| p.is_ok()).count() as u32;
    let admission = admit(state, &org, valid)?;
    let sorted = sort_events(state, &org, &request_id, &context, &mut batch, &admission, payload)?;
    produce(state, &org, &request_id, sorted.payload, sorted.accepted, sorted.dead_letters).await?;
    let body = Accepted { accepted: sorted.accepted, rejected: sorted.rejected, message: QUEUED };
    Ok(accepted_response(&body, &admission))
}

/// The 202: its JSON body and its rate-limit header values are written one after the other into
/// the thread's scratch chunk and shared from it (no allocation of their own, where a `Json` body
/// and three `HeaderValue`s took four).
fn accepted_response(body: &Accepted, admission: &Admission) -> Response {
    let (bytes, (written, body_end, values)) = scratch::bytes_from(128, |buf| {
        let written = if body.rejected.is_empty() {
            // The common answer, written directly (what serde writes for it, byte for byte).
            buf.extend_from_slice(b"{\"accepted\":");
            buf.extend_from_slice(itoa::Buffer::new().format(body.accepted).as_bytes());
            buf.extend_from_slice(b",\"message\":\"");
            buf.extend_from_slice(body.message.as_bytes());
            buf.extend_from_slice(b"\"}");
            true
        } else {
            serde_json::to_writer(buf.writer(), body).is_ok()
        };
        let body_end = buf.len();
        (written, body_end, RateLimitValues::write(admission, buf))
    });
    if !written {
        // Numbers and strings into memory do not fail; if they did, axum's `Json` answers for it.
        let mut response = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
        crate::error::rate_limit_headers(response.headers_mut(), admission);
        return response;
    }
    // Room for the request id the middleware adds, so the map is allocated once.
    let mut headers = HeaderMap::with_capacity(5);
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    values.insert(&bytes, &mut headers);
    let mut response = Response::new(Body::from(bytes.slice(..body_end)));
    *response.status_mut() = StatusCode::ACCEPTED;
    *response.headers_mut() = headers;
    response
}

/// The accepted events are durable, so a failed dead letter does not fail the request: the
/// response already tells the client each rejection and its reason; the loss is logged and counted.
fn report_dead_letter_failures(state: &AppState, results: &[Result<(), crate::sink::SinkError>]) {
    for error in results.iter().filter_map(|r| r.as_ref().err()) {
        state.metrics.dead_letter_failures.inc();
        tracing::error!(error = %error, "dead letter not produced");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use std::time::Duration;

    use axum::http::HeaderName;

    use super::*;

    #[test]
    fn the_one_pass_finds_each_header_as_a_lookup_would() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("host", "ingest.example"),
            ("Content-Type", "application/json"),
            ("user-agent", "sdk/1.0"),
            ("X-API-Key", " tk_live_one "),
            ("authorization", "Bearer tk_live_two"),
            ("content-encoding", "gzip"),
            ("Idempotency-Key", "batch-7"),
            ("content-type", "text/plain"), // a repeated header: the first value counts
            ("x-request-id", "r-1"),
        ] {
            headers.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_static(value));
        }
        let found = IngestHeaders::of(&headers);
        let same = |one: Option<&HeaderValue>, name: &str| assert_eq!(one, headers.get(name), "{name}");
        same(found.api_key, "x-api-key");
        same(found.authorization, "authorization");
        same(found.content_type, "content-type");
        same(found.content_encoding, "content-encoding");
        same(found.idempotency_key, "idempotency-key");
        assert_eq!(found.content_type.unwrap(), "application/json");
        assert_eq!(key_of(found.api_key, found.authorization), Some("tk_live_one"));

        let empty = HeaderMap::new();
        let none = IngestHeaders::of(&empty);
        assert!(none.api_key.is_none() && none.authorization.is_none() && none.content_type.is_none());
        assert!(none.content_encoding.is_none() && none.idempotency_key.is_none());
    }

    #[tokio::test]
    async fn the_202_is_what_serde_writes_with_its_rate_limit_headers() {
        let admission = Admission {
            allowed: 2,
            limit: 60_000,
            remaining: 59_998,
            reset_after: Duration::from_millis(2_500),
            retry_after: None,
        };
        let rejected = || vec![Rejected { index: 1, reason: "invalid_cost: \"x\" \\ \u{e9}".into() }];
        for (accepted, rejected) in [(1, Vec::new()), (1000, Vec::new()), (2, rejected())] {
            let body = Accepted { accepted, rejected, message: QUEUED };
            let response = accepted_response(&body, &admission);
            assert_eq!(response.status(), StatusCode::ACCEPTED);
            let headers = response.headers().clone();
            assert_eq!(headers[header::CONTENT_TYPE], "application/json");
            assert_eq!(headers["x-ratelimit-limit"], "60000");
            assert_eq!(headers["x-ratelimit-remaining"], "59998");
            assert_eq!(headers["x-ratelimit-reset"], "3");
            let bytes = axum::body::to_bytes(response.into_body(), 4096).await.unwrap();
            assert_eq!(bytes, serde_json::to_vec(&body).unwrap());
        }
    }
}
