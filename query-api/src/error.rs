//! The query API's errors and the one place that maps them to HTTP responses: JSON
//! `{"error": {"code", "message", "hint"?}}` with a documented status, including for requests the
//! framework refuses before a handler runs (see `extract`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::store::archived::ArchiveReadError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing credentials: send the API key as X-API-Key or Authorization: Bearer")]
    MissingKey,
    #[error("unknown or revoked API key")]
    InvalidKey,
    #[error("admin token required")]
    AdminOnly,
    #[error("{0}")]
    BadRequest(String),
    /// A JSON body that does not parse, or does not fit the route's fields.
    #[error("{0}")]
    InvalidBody(String),
    /// A query string or path parameter of the wrong type.
    #[error("{0}")]
    InvalidParameter(String),
    #[error("the body must be JSON")]
    UnsupportedMedia,
    #[error("the body is larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("{0} not found")]
    NotFound(String),
    #[error("no route {0}")]
    NoRoute(String),
    #[error("method {0} is not allowed on this route")]
    MethodNotAllowed(String),
    #[error("this org already has {0} live streams open")]
    TooManyStreams(usize),
    #[error("the server has as many live streams open as it serves")]
    StreamsFull,
    #[error("storage error")]
    Storage(#[from] clickhouse::error::Error),
    #[error("{0}")]
    Archive(#[from] crate::store::archived::ArchiveReadError),
}

impl ApiError {
    fn status_code_hint(&self) -> (StatusCode, &'static str, Option<&'static str>) {
        match self {
            ApiError::MissingKey => (StatusCode::UNAUTHORIZED, "missing_api_key", None),
            ApiError::InvalidKey => (StatusCode::UNAUTHORIZED, "invalid_api_key", None),
            ApiError::AdminOnly => (
                StatusCode::UNAUTHORIZED,
                "admin_token_required",
                Some("send the admin token as Authorization: Bearer <TALLY_ADMIN_TOKEN>"),
            ),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request", None),
            ApiError::InvalidBody(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_body",
                Some("send a JSON object with the fields this route documents in /openapi.json"),
            ),
            ApiError::InvalidParameter(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_parameter",
                Some("see /openapi.json for each parameter's type and range"),
            ),
            ApiError::UnsupportedMedia => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                Some("send Content-Type: application/json"),
            ),
            ApiError::BodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", None),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found", None),
            ApiError::NoRoute(_) => {
                (StatusCode::NOT_FOUND, "no_route", Some("the routes are listed in /openapi.json"))
            }
            ApiError::MethodNotAllowed(_) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                Some("the methods of each route are listed in /openapi.json"),
            ),
            ApiError::TooManyStreams(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                Some("close another tab's dashboard of this org, or raise TALLY_QUERY_STREAMS_PER_ORG"),
            ),
            ApiError::StreamsFull => (
                StatusCode::SERVICE_UNAVAILABLE,
                "streams_full",
                Some("retry later with backoff; the operator can raise TALLY_QUERY_STREAMS_TOTAL or add replicas"),
            ),
            ApiError::Storage(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                Some("ClickHouse did not answer; retry with backoff"),
            ),
            ApiError::Archive(ArchiveReadError::TooManyRows(_)) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "archived_range_too_large", None)
            }
            ApiError::Archive(ArchiveReadError::Archive(_)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "archive_unavailable",
                Some("the range reaches into months archived out of ClickHouse and the archive did not answer; retry with backoff"),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, hint) = self.status_code_hint();
        if let ApiError::Storage(error) = &self {
            tracing::error!(error = %error, "clickhouse query failed");
        }
        if let ApiError::Archive(ArchiveReadError::Archive(error)) = &self {
            tracing::error!(error = %error, "archive read failed");
        }
        let mut error = json!({"code": code, "message": self.to_string()});
        if let Some(hint) = hint {
            error["hint"] = json!(hint);
        }
        (status, Json(json!({ "error": error }))).into_response()
    }
}
