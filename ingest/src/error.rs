//! The ingest's whole-request errors and the one place that maps them to HTTP responses.

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::{Bytes, BytesMut};
use serde_json::json;
use tally_schemas::limits::MAX_IDEMPOTENCY_KEY_LEN;
use tally_schemas::parse::BodyError;

use crate::sink::SinkError;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("missing API key: send it as X-API-Key or Authorization: Bearer")]
    MissingKey,
    #[error("unknown or revoked API key")]
    InvalidKey,
    #[error("{0}")]
    Malformed(MalformedBody),
    #[error("body larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("a request may carry at most {max} events, this one has {count}")]
    TooManyEvents { count: usize, max: usize },
    #[error("unsupported media: {0}")]
    Unsupported(UnsupportedMedia),
    #[error("event store unavailable: {0}")]
    Unavailable(#[from] SinkError),
    #[error("not ready: api keys and prices not loaded yet")]
    NotReady,
    /// A path the ingest does not serve (at most its first 200 characters).
    #[error("no route for {0}")]
    NoRoute(String),
    #[error("rate limit of {} events per minute reached", .0.limit)]
    RateLimited(crate::ratelimit::Admission),
    /// Tally could not write its own dead letter (a server fault, not the client's).
    #[error("internal error: dead letter not encodable: {0}")]
    DeadLetterEncoding(serde_json::Error),
    /// The ingest could not read back the rows it had just written (a server fault, not the client's).
    #[error("internal error: own record unreadable: {0}")]
    Encoding(tally_schemas::record::RecordError),
    /// The blocking task that decompresses a large body died (a server fault, not the client's).
    #[error("internal error: decompression task failed: {0}")]
    DecompressionTask(tokio::task::JoinError),
}

/// Why a body is not one the ingest can read (400 `malformed_body`).
#[derive(Debug, thiserror::Error)]
pub enum MalformedBody {
    /// Not JSON of the expected shape (the parser's message).
    #[error("{0}")]
    Json(BodyError),
    #[error("body does not decompress: {0}")]
    Decompress(std::io::Error),
    #[error("zstd: {0}")]
    Zstd(std::io::Error),
    #[error("Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} visible ASCII characters")]
    IdempotencyKey,
}

/// A `Content-Encoding` or `Content-Type` the ingest does not take (415).
#[derive(Debug, thiserror::Error)]
pub enum UnsupportedMedia {
    #[error("content encoding {0:?}; send gzip, zstd or identity")]
    Encoding(String),
    #[error("content type {0:?}; send application/json")]
    ContentType(String),
}

impl From<BodyError> for IngestError {
    fn from(error: BodyError) -> Self {
        match error {
            BodyError::TooManyEvents { count, max } => IngestError::TooManyEvents { count, max },
            BodyError::Malformed(_) => IngestError::Malformed(MalformedBody::Json(error)),
        }
    }
}

impl IngestError {
    fn status_and_code(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            IngestError::MissingKey => (StatusCode::UNAUTHORIZED, "missing_api_key", "send your API key"),
            IngestError::InvalidKey => {
                (StatusCode::UNAUTHORIZED, "invalid_api_key", "check the key or create a new one")
            }
            IngestError::Malformed(_) => {
                (StatusCode::BAD_REQUEST, "malformed_body", "fix the JSON body and resend")
            }
            IngestError::TooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", "split the batch into smaller requests")
            }
            IngestError::TooManyEvents { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "too_many_events", "send at most 1000 events per request")
            }
            IngestError::Unsupported(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media",
                "send Content-Type: application/json",
            ),
            IngestError::NoRoute(_) => (
                StatusCode::NOT_FOUND,
                "not_found",
                "the ingest serves POST /v1/ingest and POST /analytics/events (see /openapi.json)",
            ),
            IngestError::Unavailable(_) | IngestError::NotReady => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable", "retry after the delay in Retry-After")
            }
            IngestError::DeadLetterEncoding(_)
            | IngestError::Encoding(_)
            | IngestError::DecompressionTask(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "retry; if it persists, report it with the request id",
            ),
            IngestError::RateLimited(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "retry after the delay in Retry-After, or ask for a higher plan",
            ),
        }
    }
}

/// `X-RateLimit-Limit` (events per minute), `-Remaining` (events), `-Reset` (seconds until the
/// burst capacity is full again), on every 2xx and 429.
// Names parsed once, not on every response.
const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// The three rate-limit header values, written as text at the end of `buf` (which may hold the
/// response's body before them), so that the body and the values share one allocation.
pub struct RateLimitValues {
    ends: [usize; 4],
}

impl RateLimitValues {
    pub fn write(admission: &crate::ratelimit::Admission, buf: &mut BytesMut) -> Self {
        let reset = admission.reset_after.as_secs() + u64::from(admission.reset_after.subsec_nanos() > 0);
        let mut digits = itoa::Buffer::new();
        let start = buf.len();
        buf.extend_from_slice(digits.format(admission.limit).as_bytes());
        let limit_end = buf.len();
        buf.extend_from_slice(digits.format(admission.remaining).as_bytes());
        let remaining_end = buf.len();
        buf.extend_from_slice(digits.format(reset).as_bytes());
        RateLimitValues { ends: [start, limit_end, remaining_end, buf.len()] }
    }

    /// Inserts the headers, each value a slice of `bytes` (the frozen `buf` of `write`).
    pub fn insert(&self, bytes: &Bytes, headers: &mut HeaderMap) {
        let [start, limit_end, remaining_end, end] = self.ends;
        for (name, range) in [
            (RATELIMIT_LIMIT, start..limit_end),
            (RATELIMIT_REMAINING, limit_end..remaining_end),
            (RATELIMIT_RESET, remaining_end..end),
        ] {
            // Decimal digits are always a valid header value.
            if let Ok(value) = HeaderValue::from_maybe_shared(bytes.slice(range)) {
                headers.insert(name, value);
            }
        }
    }
}

pub fn rate_limit_headers(headers: &mut HeaderMap, admission: &crate::ratelimit::Admission) {
    let (bytes, values) = tally_common::scratch::bytes_from(32, |buf| RateLimitValues::write(admission, buf));
    values.insert(&bytes, headers);
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let (status, code, hint) = self.status_and_code();
        let body = json!({"error": {"code": code, "message": self.to_string(), "hint": hint}});
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let IngestError::RateLimited(admission) = &self {
            let wait = admission.retry_after.unwrap_or_default();
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            rate_limit_headers(response.headers_mut(), admission);
        }
        response
    }
}
