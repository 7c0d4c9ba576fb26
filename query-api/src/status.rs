//! `GET /api/telemetry/status` (seed 000 §2.3): has the org's SDK connected, and when.

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use crate::auth::Org;
use crate::error::ApiError;
use crate::range::rfc3339_ms;
use crate::AppState;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TelemetryStatus {
    connected: bool,
    first_event_at: Option<String>,
    last_event_at: Option<String>,
    total_events: u64,
}

pub async fn telemetry_status(
    State(state): State<AppState>,
    Org(org): Org,
) -> Result<Json<TelemetryStatus>, ApiError> {
    let row = state.store().telemetry(&org.org_id).await?;
    let connected = row.total > 0;
    Ok(Json(TelemetryStatus {
        connected,
        first_event_at: if connected { rfc3339_ms(row.first_ms) } else { None },
        last_event_at: if connected { rfc3339_ms(row.last_ms) } else { None },
        total_events: row.total,
    }))
}
