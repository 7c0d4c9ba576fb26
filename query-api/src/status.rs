//! `GET /api/telemetry/status` (seed 000 §2.3): has the org's SDK connected, and when.

use axum::extract::State;
use axum::Json;
use clickhouse::Row;
use serde::{Deserialize, Serialize};

use crate::auth::Org;
use crate::error::ApiError;
use crate::AppState;

#[derive(Row, Deserialize)]
struct StatusRow {
    total: u64,
    first_ms: u64,
    last_ms: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TelemetryStatus {
    connected: bool,
    first_event_at: Option<String>,
    last_event_at: Option<String>,
    total_events: u64,
}

pub fn rfc3339_ms(epoch_ms: u64) -> Option<String> {
    chrono::DateTime::from_timestamp_millis(i64::try_from(epoch_ms).ok()?)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

pub async fn telemetry_status(
    State(state): State<AppState>,
    Org(org): Org,
) -> Result<Json<TelemetryStatus>, ApiError> {
    let sql = format!(
        "SELECT count() AS total, min(toUInt64(timestamp) * 1000 + timestamp_ms) AS first_ms, \
         max(toUInt64(timestamp) * 1000 + timestamp_ms) AS last_ms FROM {} WHERE org_id = ?",
        state.clickhouse.table("events")
    );
    let row: StatusRow = state.client().query(&sql).bind(&*org.org_id).fetch_one().await?;
    let connected = row.total > 0;
    Ok(Json(TelemetryStatus {
        connected,
        first_event_at: if connected { rfc3339_ms(row.first_ms) } else { None },
        last_event_at: if connected { rfc3339_ms(row.last_ms) } else { None },
        total_events: row.total,
    }))
}
