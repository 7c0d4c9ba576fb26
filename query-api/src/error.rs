//! The query API's errors and the one place that maps them to HTTP responses (JSON with a code).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

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
    #[error("{0} not found")]
    NotFound(String),
    #[error("storage error")]
    Storage(#[from] clickhouse::error::Error),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ApiError::MissingKey => (StatusCode::UNAUTHORIZED, "missing_api_key"),
            ApiError::InvalidKey => (StatusCode::UNAUTHORIZED, "invalid_api_key"),
            ApiError::AdminOnly => (StatusCode::UNAUTHORIZED, "admin_token_required"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Storage(error) => {
                tracing::error!(error = %error, "clickhouse query failed");
                (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable")
            }
        };
        (status, Json(json!({"error": {"code": code, "message": self.to_string()}}))).into_response()
    }
}
