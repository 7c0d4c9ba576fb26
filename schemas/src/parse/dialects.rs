//! The two wire formats of an event (the SDK's and seed 004's analytics format), each mapped onto
//! the same `Fields` before validation.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Rejection, RejectionCode};
use crate::event::Status;

#[derive(Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SdkTokens {
    #[serde(default)]
    pub(super) prompt_tokens: u64,
    #[serde(default)]
    pub(super) completion_tokens: u64,
    pub(super) total_tokens: Option<u64>,
}

#[derive(Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SdkEvent<'a> {
    #[serde(borrow)]
    pub(super) timestamp: Cow<'a, str>,
    #[serde(borrow)]
    pub(super) provider: Cow<'a, str>,
    #[serde(borrow)]
    pub(super) model: Cow<'a, str>,
    pub(super) tokens: SdkTokens,
    pub(super) cost: Option<f64>,
    #[serde(default)]
    pub(super) latency: f64,
    #[serde(borrow)]
    pub(super) status: Cow<'a, str>,
    #[serde(borrow, default)]
    pub(super) error: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(super) event_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(super) execution_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(super) agent_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(super) user_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(super) service: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(super) action: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub(super) request_id: Option<Cow<'a, str>>,
    #[serde(default)]
    pub(super) metadata: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct AnalyticsTokens {
    #[serde(default, rename = "in")]
    input: u64,
    #[serde(default, rename = "out")]
    output: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnalyticsSize {
    #[serde(default)]
    input_bytes: u64,
    #[serde(default)]
    output_bytes: u64,
}

#[derive(Deserialize)]
struct AnalyticsCost {
    usd: Option<f64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnalyticsEvent<'a> {
    #[serde(borrow)]
    ts: Cow<'a, str>,
    #[serde(borrow, default)]
    user_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    service: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    action: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    request_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    provider: Cow<'a, str>,
    #[serde(borrow)]
    model: Cow<'a, str>,
    #[serde(default)]
    latency_ms: f64,
    status: u16,
    tokens: Option<AnalyticsTokens>,
    size: Option<AnalyticsSize>,
    cost: Option<AnalyticsCost>,
    #[serde(borrow, default)]
    event_id: Option<Cow<'a, str>>,
    #[serde(default)]
    meta: Option<BTreeMap<String, serde_json::Value>>,
}

/// The fields both dialects map onto, before validation.
pub(super) struct Fields<'a> {
    pub(super) timestamp: Cow<'a, str>,
    pub(super) provider: Cow<'a, str>,
    pub(super) model: Cow<'a, str>,
    pub(super) prompt_tokens: u64,
    pub(super) completion_tokens: u64,
    pub(super) total_tokens: Option<u64>,
    pub(super) cost_usd: Option<f64>,
    pub(super) latency_ms: f64,
    pub(super) status: Status,
    pub(super) http_status: u16,
    pub(super) error: Option<Cow<'a, str>>,
    pub(super) event_id: Option<Cow<'a, str>>,
    pub(super) execution_id: Option<Cow<'a, str>>,
    pub(super) agent_id: Option<Cow<'a, str>>,
    pub(super) user_id: Option<Cow<'a, str>>,
    pub(super) service: Option<Cow<'a, str>>,
    pub(super) action: Option<Cow<'a, str>>,
    pub(super) request_id: Option<Cow<'a, str>>,
    pub(super) input_bytes: u64,
    pub(super) output_bytes: u64,
    pub(super) metadata: BTreeMap<String, String>,
}

fn invalid(e: serde_json::Error) -> Rejection {
    Rejection::new(RejectionCode::InvalidEvent, e.to_string())
}

pub(super) fn sdk_fields(raw: &RawValue) -> Result<Fields<'_>, Rejection> {
    sdk_event_fields(serde_json::from_str(raw.get()).map_err(invalid)?)
}

pub(super) fn sdk_event_fields(e: SdkEvent<'_>) -> Result<Fields<'_>, Rejection> {
    let status = match e.status.as_ref() {
        "success" => Status::Success,
        "error" => Status::Error,
        other => {
            return Err(Rejection::new(
                RejectionCode::InvalidStatus,
                format!("status must be \"success\" or \"error\", got {other:?}"),
            ))
        }
    };
    Ok(Fields {
        timestamp: e.timestamp,
        provider: e.provider,
        model: e.model,
        prompt_tokens: e.tokens.prompt_tokens,
        completion_tokens: e.tokens.completion_tokens,
        total_tokens: e.tokens.total_tokens,
        cost_usd: e.cost,
        latency_ms: e.latency,
        status,
        http_status: 0,
        error: e.error,
        event_id: e.event_id,
        execution_id: e.execution_id,
        agent_id: e.agent_id,
        user_id: e.user_id,
        service: e.service,
        action: e.action,
        request_id: e.request_id,
        input_bytes: 0,
        output_bytes: 0,
        metadata: e.metadata.unwrap_or_default(),
    })
}

pub(super) fn analytics_fields(raw: &RawValue) -> Result<Fields<'_>, Rejection> {
    let e: AnalyticsEvent = serde_json::from_str(raw.get()).map_err(invalid)?;
    if !(100..=599).contains(&e.status) {
        return Err(Rejection::new(
            RejectionCode::InvalidStatus,
            format!("status must be an HTTP status code, got {}", e.status),
        ));
    }
    let tokens = e.tokens.unwrap_or(AnalyticsTokens { input: 0, output: 0 });
    let size = e.size.unwrap_or(AnalyticsSize { input_bytes: 0, output_bytes: 0 });
    // `meta` may nest; string values are kept as they are, anything else as its JSON text.
    let metadata = e
        .meta
        .unwrap_or_default()
        .into_iter()
        .map(|(key, value)| match value {
            serde_json::Value::String(text) => (key, text),
            other => (key, other.to_string()),
        })
        .collect();
    Ok(Fields {
        timestamp: e.ts,
        provider: e.provider,
        model: e.model,
        prompt_tokens: tokens.input,
        completion_tokens: tokens.output,
        total_tokens: None,
        cost_usd: e.cost.and_then(|c| c.usd),
        latency_ms: e.latency_ms,
        status: if e.status >= 400 { Status::Error } else { Status::Success },
        http_status: e.status,
        error: None,
        event_id: e.event_id,
        execution_id: None,
        agent_id: None,
        user_id: e.user_id,
        service: e.service,
        action: e.action,
        request_id: e.request_id,
        input_bytes: size.input_bytes,
        output_bytes: size.output_bytes,
        metadata,
    })
}
