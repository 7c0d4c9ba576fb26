//! The framework's extractors with the API's error shape: a body, query string or path
//! parameter that does not fit answers the documented status with the JSON `Error` body (axum's
//! own extractors answer 415/422 with plain text), and unknown routes and methods the same way.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{Method, Uri};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The largest JSON body a route accepts (the bodies of this API are a few hundred bytes); set on
/// the router with `DefaultBodyLimit`.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A JSON body (`Content-Type: application/json`).
pub struct JsonBody<T>(pub T);

/// The query string, deserialized.
pub struct QueryParams<T>(pub T);

/// The path parameters, deserialized.
pub struct PathParams<T>(pub T);

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        match rejection {
            JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMedia,
            too_large if too_large.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::BodyTooLarge(MAX_BODY_BYTES)
            }
            other => ApiError::InvalidBody(other.body_text()),
        }
    }
}

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(value) = axum::Json::<T>::from_request(request, state).await?;
        Ok(JsonBody(value))
    }
}

impl<S, T> FromRequestParts<S> for QueryParams<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| QueryParams(value))
            .map_err(|rejection: QueryRejection| ApiError::InvalidParameter(rejection.body_text()))
    }
}

impl<S, T> FromRequestParts<S> for PathParams<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| PathParams(value))
            .map_err(|rejection: PathRejection| ApiError::InvalidParameter(rejection.body_text()))
    }
}

/// Any path no route has.
pub async fn no_route(uri: Uri) -> ApiError {
    ApiError::NoRoute(uri.path().chars().take(200).collect())
}

/// A route asked with a method it does not have.
pub async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(method.to_string())
}
