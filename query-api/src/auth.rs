//! Who is asking: an org (by API key, from the in-memory key set) or the admin (by token,
//! compared in constant time).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use subtle::ConstantTimeEq;
use tally_common::keyset::OrgInfo;
use tally_common::server::presented_key;

use crate::error::ApiError;
use crate::AppState;

/// The org whose key authenticated the request. Every org route takes this, and scopes every
/// query by `org.org_id`: nothing from the request body or path chooses the org.
pub struct Org(pub std::sync::Arc<OrgInfo>);

impl FromRequestParts<AppState> for Org {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let key = presented_key(&parts.headers).ok_or(ApiError::MissingKey)?;
        state.keys.lookup(key).map(Org).ok_or(ApiError::InvalidKey)
    }
}

pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = presented_key(&parts.headers).ok_or(ApiError::AdminOnly)?;
        if bool::from(token.as_bytes().ct_eq(state.admin_token.as_bytes())) {
            Ok(Admin)
        } else {
            Err(ApiError::AdminOnly)
        }
    }
}
