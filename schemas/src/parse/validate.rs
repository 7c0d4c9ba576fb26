//! Validation of an event's fields against the limits of `limits`, and the event it makes.

use std::borrow::Cow;

use chrono::DateTime;
use uuid::Uuid;

use super::dialects::Fields;
use super::{Rejection, RejectionCode, RequestContext};
use crate::event::{CostSource, Event};
use crate::limits::*;
use crate::time::fast_rfc3339_ms;

/// Namespace of the UUIDv5 event ids derived from an `Idempotency-Key`.
const IDEMPOTENCY_NAMESPACE: Uuid = Uuid::from_u128(0x7a11_e5d0_4f1c_4b7e_9c3a_1d2e_3f40_5a6b);

/// The event id of the event at `index` of a request sent with `Idempotency-Key: key` by `org_id`:
/// stable across retries of that request.
pub fn derived_event_id(org_id: &str, key: &str, index: usize) -> Uuid {
    let name = format!("{org_id}\n{key}\n{index}");
    Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, name.as_bytes())
}

/// A UUIDv7 for `epoch_ms` with 74 random bits from the thread-local generator: no system call
/// and no shared lock per event (uuid's `now_v7` takes a global mutex and reads the OS RNG).
pub fn new_v7(epoch_ms: i64) -> Uuid {
    use rand::RngCore;
    // Two words of the thread's generator (`rand::random::<[u8; 10]>` drew a word per byte).
    let mut rng = rand::rng();
    let words = (u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64())).to_le_bytes();
    let mut random = [0u8; 10];
    random.copy_from_slice(&words[..10]);
    uuid::Builder::from_unix_timestamp_millis(u64::try_from(epoch_ms).unwrap_or(0), &random).into_uuid()
}

fn bounded<'a>(
    name: &'static str,
    value: Option<Cow<'a, str>>,
    max: usize,
) -> Result<Cow<'a, str>, Rejection> {
    let text = value.unwrap_or_default();
    if text.len() > max {
        return Err(Rejection::new(
            RejectionCode::FieldTooLong,
            format!("{name} is {} bytes, at most {max}", text.len()),
        ));
    }
    Ok(text)
}

/// `text` cut to `part(text)`, a slice of itself: a borrowed text stays borrowed, an owned one is
/// copied only when the cut shortens it.
fn cut<'a>(text: Cow<'a, str>, part: impl Fn(&str) -> &str) -> Cow<'a, str> {
    match text {
        Cow::Borrowed(text) => Cow::Borrowed(part(text)),
        Cow::Owned(text) => {
            let kept = part(&text);
            if kept.len() < text.len() {
                Cow::Owned(kept.to_owned())
            } else {
                Cow::Owned(text)
            }
        }
    }
}

fn required_name<'a>(name: &'static str, value: Cow<'a, str>) -> Result<Cow<'a, str>, Rejection> {
    let trimmed = cut(value, str::trim);
    if trimmed.is_empty() {
        return Err(Rejection::new(RejectionCode::MissingField, format!("{name} must not be empty")));
    }
    bounded(name, Some(trimmed), MAX_NAME_LEN)
}

fn count(name: &'static str, value: u64) -> Result<u32, Rejection> {
    if value > MAX_TOKENS {
        return Err(Rejection::new(
            RejectionCode::InvalidTokens,
            format!("{name} is {value}, at most {MAX_TOKENS}"),
        ));
    }
    Ok(value as u32)
}

/// Converts a USD amount to nano-dollars. Amounts are bounded below 2^53 nano-dollars, where an f64
/// holds every integer exactly, so rounding to the nearest nano-dollar is exact for any decimal
/// the client wrote with nine or fewer fractional digits.
pub fn usd_to_nanos(usd: f64) -> Option<i64> {
    if !usd.is_finite() || usd < 0.0 {
        return None;
    }
    let nanos = (usd * NANOS_PER_USD as f64).round();
    if nanos > MAX_COST_NANOS as f64 {
        return None;
    }
    Some(nanos as i64)
}

/// Truncates to at most `max` bytes at a character boundary.
pub fn truncate_utf8(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn timestamp_ms(text: &str) -> Result<i64, Rejection> {
    if let Some(ms) = fast_rfc3339_ms(text) {
        return Ok(ms);
    }
    DateTime::parse_from_rfc3339(text).map(|t| t.timestamp_millis()).map_err(|e| {
        Rejection::new(RejectionCode::InvalidTimestamp, format!("timestamp {text:?} is not RFC 3339: {e}"))
    })
}

/// The event's time, within the accepted window around its arrival.
fn checked_time(text: &str, ctx: &RequestContext) -> Result<i64, Rejection> {
    let timestamp_ms = timestamp_ms(text)?;
    if timestamp_ms < ctx.received_at_ms - MAX_EVENT_AGE_MS {
        return Err(Rejection::new(
            RejectionCode::TimestampTooOld,
            format!("timestamp is more than {} days in the past", MAX_EVENT_AGE_MS / 86_400_000),
        ));
    }
    if timestamp_ms > ctx.received_at_ms + MAX_EVENT_FUTURE_MS {
        return Err(Rejection::new(
            RejectionCode::TimestampInFuture,
            format!("timestamp is more than {} minutes in the future", MAX_EVENT_FUTURE_MS / 60_000),
        ));
    }
    Ok(timestamp_ms)
}

/// Prompt, completion and total tokens: each bounded, the total at least the sum of the two
/// (and the sum when not given).
fn checked_tokens(prompt: u64, completion: u64, total: Option<u64>) -> Result<(u32, u32, u32), Rejection> {
    let prompt_tokens = count("promptTokens", prompt)?;
    let completion_tokens = count("completionTokens", completion)?;
    let sum = u64::from(prompt_tokens) + u64::from(completion_tokens);
    let total_tokens = count("totalTokens", total.unwrap_or(sum))?;
    if u64::from(total_tokens) < sum {
        return Err(Rejection::new(
            RejectionCode::InvalidTokens,
            format!("totalTokens {total_tokens} is less than promptTokens + completionTokens ({sum})"),
        ));
    }
    Ok((prompt_tokens, completion_tokens, total_tokens))
}

/// The client's cost in nano-dollars, or unknown (priced later) when it sent none.
fn checked_cost(cost_usd: Option<f64>) -> Result<(i64, CostSource), Rejection> {
    let Some(usd) = cost_usd else { return Ok((0, CostSource::Unknown)) };
    let nanos = usd_to_nanos(usd).ok_or_else(|| {
        Rejection::new(
            RejectionCode::InvalidCost,
            format!("cost must be between 0 and {} USD, got {usd}", MAX_COST_NANOS / NANOS_PER_USD),
        )
    })?;
    Ok((nanos, CostSource::Client))
}

/// The latency in whole ms.
fn checked_latency(latency_ms: f64) -> Result<u32, Rejection> {
    if !latency_ms.is_finite() || latency_ms < 0.0 || latency_ms > MAX_LATENCY_MS as f64 {
        return Err(Rejection::new(
            RejectionCode::InvalidLatency,
            format!("latency must be between 0 and {MAX_LATENCY_MS} ms, got {latency_ms}"),
        ));
    }
    Ok(latency_ms.round() as u32)
}

fn checked_sizes(input_bytes: u64, output_bytes: u64) -> Result<(), Rejection> {
    for (name, value) in [("inputBytes", input_bytes), ("outputBytes", output_bytes)] {
        if value > MAX_PAYLOAD_BYTES {
            return Err(Rejection::new(
                RejectionCode::InvalidSize,
                format!("{name} is {value}, at most {MAX_PAYLOAD_BYTES}"),
            ));
        }
    }
    Ok(())
}

/// The client's event id; else one derived from the request's idempotency key and the event's
/// index (stable across retries); else a new UUIDv7.
fn event_id(given: Option<&str>, index: usize, ctx: &RequestContext) -> Result<Uuid, Rejection> {
    match (given, ctx.idempotency_key) {
        (Some(text), _) => Uuid::parse_str(text).map_err(|_| {
            Rejection::new(RejectionCode::InvalidEventId, format!("eventId {text:?} is not a UUID"))
        }),
        (None, Some(key)) => Ok(derived_event_id(ctx.org_id, key, index)),
        (None, None) => Ok(new_v7(ctx.received_at_ms)),
    }
}

fn checked_metadata(metadata: &std::collections::BTreeMap<String, String>) -> Result<(), Rejection> {
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(Rejection::new(
            RejectionCode::InvalidMetadata,
            format!("metadata has {} entries, at most {MAX_METADATA_ENTRIES}", metadata.len()),
        ));
    }
    for (key, value) in metadata {
        if key.is_empty() || key.len() > MAX_METADATA_KEY_LEN || value.len() > MAX_METADATA_VALUE_LEN {
            return Err(Rejection::new(
                RejectionCode::InvalidMetadata,
                format!(
                    "metadata keys must be 1..={MAX_METADATA_KEY_LEN} bytes and values at most {MAX_METADATA_VALUE_LEN} bytes (key {:?})",
                    truncate_utf8(key, MAX_METADATA_KEY_LEN)
                ),
            ));
        }
    }
    Ok(())
}

impl<'a> Fields<'a> {
    /// Validates the fields of the event at `index` of its request (the first failed check
    /// rejects it, in the order below) and builds the event, its strings borrowed from the body
    /// (and the org id from the context) wherever the body had them without escapes.
    pub(super) fn into_event(
        self,
        index: usize,
        ctx: &RequestContext<'a>,
    ) -> Result<Event<Cow<'a, str>>, Rejection> {
        let timestamp_ms = checked_time(&self.timestamp, ctx)?;
        let (prompt_tokens, completion_tokens, total_tokens) =
            checked_tokens(self.prompt_tokens, self.completion_tokens, self.total_tokens)?;
        let (cost_nanos, cost_source) = checked_cost(self.cost_usd)?;
        let latency_ms = checked_latency(self.latency_ms)?;
        checked_sizes(self.input_bytes, self.output_bytes)?;
        let event_id = event_id(self.event_id.as_deref(), index, ctx)?;
        checked_metadata(&self.metadata)?;
        Ok(Event {
            event_id,
            org_id: Cow::Borrowed(ctx.org_id),
            received_at_ms: ctx.received_at_ms,
            timestamp_ms,
            provider: required_name("provider", self.provider)?,
            model: required_name("model", self.model)?,
            prompt_tokens,
            completion_tokens,
            total_tokens,
            cost_nanos,
            cost_source,
            latency_ms,
            status: self.status,
            http_status: self.http_status,
            error: cut(self.error.unwrap_or_default(), |text| truncate_utf8(text, MAX_ERROR_LEN)),
            execution_id: bounded("executionId", self.execution_id, MAX_ID_LEN)?,
            agent_id: bounded("agentId", self.agent_id, MAX_ID_LEN)?,
            user_id: bounded("userId", self.user_id, MAX_ID_LEN)?,
            service: bounded("service", self.service, MAX_ID_LEN)?,
            action: bounded("action", self.action, MAX_ID_LEN)?,
            request_id: bounded("requestId", self.request_id, MAX_ID_LEN)?,
            input_bytes: self.input_bytes,
            output_bytes: self.output_bytes,
            metadata: self.metadata.into_iter().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_are_v7_at_their_time_and_distinct() {
        let at = 1_796_205_600_123;
        let ids: std::collections::HashSet<Uuid> = (0..10_000).map(|_| new_v7(at)).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(100) {
            assert_eq!(id.get_version_num(), 7);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            let (seconds, nanos) = id.get_timestamp().expect("a v7 timestamp").to_unix();
            assert_eq!(seconds * 1000 + u64::from(nanos / 1_000_000), at as u64);
        }
        // The random bits vary in every one of their bytes (a byte drawn as zero by mistake would not).
        let bytes: Vec<[u8; 16]> = ids.iter().map(|id| *id.as_bytes()).collect();
        for position in [7, 9, 10, 11, 12, 13, 14, 15] {
            assert!(bytes.iter().any(|b| b[position] != bytes[0][position]), "byte {position} constant");
        }
    }
}
