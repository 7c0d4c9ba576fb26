//! Parsing and validation of both SDK dialects, and the Kafka record round trip.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use proptest::prelude::*;
use serde_json::json;
use tally_schemas::parse::{derived_event_id, parse_event, split_events, BodyError, Dialect, RequestContext};
use tally_schemas::record::{decode_events, encode_event};
use tally_schemas::{CostSource, Event, Status};

const NOW_MS: i64 = 1_769_169_600_000; // 2026-01-23T12:00:00Z

fn ctx(idempotency_key: Option<&str>) -> RequestContext<'_> {
    RequestContext { org_id: "org-1", received_at_ms: NOW_MS, idempotency_key }
}

fn seed_event() -> serde_json::Value {
    json!({"timestamp":"2026-01-23T12:00:00Z","provider":"openai","model":"gpt-4o",
      "tokens":{"promptTokens":1000,"completionTokens":500,"totalTokens":1500},
      "cost":0.0325,"latency":2500,"status":"success","error":null})
}

fn parse_sdk(events: serde_json::Value, key: Option<&str>) -> Vec<Result<Event, String>> {
    let body = serde_json::to_vec(&json!({ "events": events })).unwrap();
    let raw = split_events(Dialect::Sdk, &body).unwrap();
    raw.iter()
        .enumerate()
        .map(|(i, r)| {
            parse_event(Dialect::Sdk, r, i, &ctx(key)).map(Event::into_owned).map_err(|e| e.code.to_string())
        })
        .collect()
}

#[test]
fn seed_000_example_parses_exactly() {
    let parsed = parse_sdk(json!([seed_event()]), None);
    let event = parsed[0].as_ref().unwrap();
    assert_eq!(event.org_id, "org-1");
    assert_eq!(event.timestamp_ms, NOW_MS);
    assert_eq!((event.prompt_tokens, event.completion_tokens, event.total_tokens), (1000, 500, 1500));
    assert_eq!(event.cost_nanos, 32_500_000);
    assert_eq!(event.cost_source, CostSource::Client);
    assert_eq!(event.latency_ms, 2500);
    assert_eq!(event.status, Status::Success);
    assert_eq!(event.error, "");
    assert_eq!(event.event_id.get_version_num(), 7);
}

#[test]
fn one_bad_event_rejects_only_itself() {
    let mut bad_time = seed_event();
    bad_time["timestamp"] = json!("yesterday");
    let mut bad_status = seed_event();
    bad_status["status"] = json!("maybe");
    let mut missing_model = seed_event();
    missing_model.as_object_mut().unwrap().remove("model");
    let mut negative_cost = seed_event();
    negative_cost["cost"] = json!(-1.0);
    let mut too_old = seed_event();
    too_old["timestamp"] = json!("2025-01-01T00:00:00Z");
    let mut future = seed_event();
    future["timestamp"] = json!("2026-01-23T13:00:00Z");
    let mut inconsistent = seed_event();
    inconsistent["tokens"]["totalTokens"] = json!(10);
    let parsed = parse_sdk(
        json!([
            bad_time,
            seed_event(),
            bad_status,
            missing_model,
            negative_cost,
            too_old,
            future,
            inconsistent,
            7
        ]),
        None,
    );
    let codes: Vec<&str> = parsed.iter().map(|r| r.as_ref().err().map_or("ok", String::as_str)).collect();
    assert_eq!(
        codes,
        vec![
            "invalid_timestamp",
            "ok",
            "invalid_status",
            "invalid_event",
            "invalid_cost",
            "timestamp_too_old",
            "timestamp_in_future",
            "invalid_tokens",
            "invalid_event"
        ]
    );
}

#[test]
fn body_errors_are_whole_request_errors() {
    assert!(matches!(split_events(Dialect::Sdk, b"{\"events\": [1,"), Err(BodyError::Malformed(_))));
    assert!(matches!(split_events(Dialect::Sdk, b"[]"), Err(BodyError::Malformed(_))));
    let many = serde_json::to_vec(&json!({ "events": vec![json!({}); 1001] })).unwrap();
    assert!(matches!(
        split_events(Dialect::Sdk, &many),
        Err(BodyError::TooManyEvents { count: 1001, max: 1000 })
    ));
}

#[test]
fn event_ids_come_from_client_then_idempotency_key_then_server() {
    let mut with_id = seed_event();
    with_id["eventId"] = json!("0196b6c2-5b1a-7c3e-9a2b-3c4d5e6f7a8b");
    let parsed = parse_sdk(json!([with_id, seed_event()]), Some("retry-me"));
    assert_eq!(parsed[0].as_ref().unwrap().event_id.to_string(), "0196b6c2-5b1a-7c3e-9a2b-3c4d5e6f7a8b");
    assert_eq!(parsed[1].as_ref().unwrap().event_id, derived_event_id("org-1", "retry-me", 1));
    let again = parse_sdk(json!([seed_event(), seed_event()]), Some("retry-me"));
    assert_eq!(again[1].as_ref().unwrap().event_id, parsed[1].as_ref().unwrap().event_id);
    assert_ne!(again[0].as_ref().unwrap().event_id, again[1].as_ref().unwrap().event_id);
    let mut bad_id = seed_event();
    bad_id["eventId"] = json!("not-a-uuid");
    assert_eq!(parse_sdk(json!([bad_id]), None)[0].as_ref().unwrap_err(), "invalid_event_id");
}

#[test]
fn optional_fields_metadata_and_truncation() {
    let mut event = seed_event();
    event["executionId"] = json!("exec-9");
    event["userId"] = json!("user-3");
    event["metadata"] = json!({"b":"2","a":"1"});
    event["error"] = json!("e".repeat(5000));
    event["status"] = json!("error");
    event.as_object_mut().unwrap().remove("cost");
    let parsed = parse_sdk(json!([event]), None);
    let e = parsed[0].as_ref().unwrap();
    assert_eq!(e.execution_id, "exec-9");
    assert_eq!(e.user_id, "user-3");
    assert_eq!(e.metadata, vec![("a".into(), "1".into()), ("b".into(), "2".into())]);
    assert_eq!(e.error.len(), tally_schemas::limits::MAX_ERROR_LEN);
    assert_eq!(e.status, Status::Error);
    assert_eq!(e.cost_source, CostSource::Unknown);
    let mut nested = seed_event();
    nested["metadata"] = json!({"a": {"b": 1}});
    assert_eq!(parse_sdk(json!([nested]), None)[0].as_ref().unwrap_err(), "invalid_event");
    let mut long_model = seed_event();
    long_model["model"] = json!("m".repeat(129));
    assert_eq!(parse_sdk(json!([long_model]), None)[0].as_ref().unwrap_err(), "field_too_long");
}

#[test]
fn seed_004_documents_map_onto_the_same_event() {
    let doc = json!({"_id":"x","ts":"2026-01-23T11:59:59.901Z","userId":"u-1","username":"john@acme.com",
      "service":"chat","action":"message","requestId":"r-1","provider":"githubmodels","model":"gpt-4o-mini",
      "latencyMs":1420,"status":503,"tokens":{"in":1200,"out":350},"size":{"inputBytes":8421,"outputBytes":1048576},
      "cost":{"usd":0.0032},"meta":{"params":{"size":"1024x1024"},"region":"eu"}});
    for body in [serde_json::to_vec(&doc).unwrap(), serde_json::to_vec(&json!([doc, doc])).unwrap()] {
        let raw = split_events(Dialect::Analytics, &body).unwrap();
        let e = parse_event(Dialect::Analytics, raw[0], 0, &ctx(None)).unwrap().into_owned();
        assert_eq!(e.timestamp_ms, NOW_MS - 99);
        assert_eq!((e.prompt_tokens, e.completion_tokens, e.total_tokens), (1200, 350, 1550));
        assert_eq!((e.input_bytes, e.output_bytes), (8421, 1_048_576));
        assert_eq!(e.cost_nanos, 3_200_000);
        assert_eq!(e.status, Status::Error);
        assert_eq!(e.http_status, 503);
        assert_eq!((e.service.as_str(), e.action.as_str(), e.user_id.as_str()), ("chat", "message", "u-1"));
        assert_eq!(
            e.metadata,
            vec![("params".into(), "{\"size\":\"1024x1024\"}".into()), ("region".into(), "eu".into())]
        );
    }
    let ok = json!({"ts":"2026-01-23T12:00:00Z","provider":"p","model":"m","status":200});
    let raw = serde_json::to_vec(&ok).unwrap();
    let e =
        parse_event(Dialect::Analytics, split_events(Dialect::Analytics, &raw).unwrap()[0], 0, &ctx(None))
            .unwrap();
    assert_eq!(e.status, Status::Success);
    assert_eq!(e.cost_source, CostSource::Unknown);
}

#[test]
fn records_round_trip_through_json_each_row() {
    let mut event = seed_event();
    event["timestamp"] = json!("2026-01-23T11:00:00.123Z");
    event["metadata"] = json!({"quote":"a\"b\nc","ünï":"cødé"});
    event["error"] = json!("line1\nline2");
    let events: Vec<Event> =
        parse_sdk(json!([event, seed_event()]), None).into_iter().map(Result::unwrap).collect();
    let mut payload = Vec::new();
    for e in &events {
        encode_event(e, &mut payload);
    }
    assert_eq!(payload.iter().filter(|b| **b == b'\n').count(), 2);
    let mut decoded = decode_events(&payload).unwrap();
    // DateTime text has second resolution: received_at keeps seconds, timestamp keeps its ms.
    for (d, e) in decoded.iter_mut().zip(&events) {
        assert_eq!(d.received_at_ms, e.received_at_ms / 1000 * 1000);
        d.received_at_ms = e.received_at_ms;
    }
    assert_eq!(decoded, events);
    assert!(decode_events(b"{\"org_id\":1}\n").is_err());
    assert!(decode_events(b"\xff\xfe").is_err());
}

proptest! {
    // The fast RFC 3339 path agrees with chrono wherever it answers, and answers the common shapes.
    #[test]
    fn fast_timestamps_match_chrono(
        epoch_s in 0i64..8_000_000_000, millis in 0u32..1000, offset_min in -1439i32..1440,
        shape in 0usize..5,
    ) {
        let offset = chrono::FixedOffset::east_opt(offset_min * 60).unwrap();
        let t = chrono::DateTime::from_timestamp(epoch_s, millis * 1_000_000).unwrap().with_timezone(&offset);
        let text = match shape {
            0 => t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            1 => t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            2 => t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            3 => t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, false),
            _ => t.with_timezone(&chrono::Utc).to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        };
        let expected = chrono::DateTime::parse_from_rfc3339(&text).unwrap().timestamp_millis();
        prop_assert_eq!(tally_schemas::parse::fast_rfc3339_ms(&text), Some(expected), "{}", text);
    }

    #[test]
    fn fast_timestamps_never_accept_what_chrono_refuses(text in "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{0,4})?(Z|[+-][0-9]{2}:[0-9]{2})") {
        if let Some(ms) = tally_schemas::parse::fast_rfc3339_ms(&text) {
            prop_assert_eq!(chrono::DateTime::parse_from_rfc3339(&text).map(|t| t.timestamp_millis()).ok(), Some(ms), "{}", text);
        }
    }

    // The hand-rolled DateTime text equals chrono's, over four centuries and their leap days.
    #[test]
    fn datetime_text_matches_chrono(epoch_ms in 0i64..13_000_000_000_000) {
        let expected = chrono::DateTime::from_timestamp_millis(epoch_ms).unwrap().format("%Y-%m-%d %H:%M:%S").to_string();
        prop_assert_eq!(tally_schemas::record::datetime_text(epoch_ms), expected);
    }

    // The consumer's DateTime text reader agrees with chrono on valid and invalid text alike (a leap
    // second, which it leaves to chrono, aside).
    #[test]
    fn datetime_text_reads_back_like_chrono(text in "[0-9]{4}-[0-1][0-9]-[0-3][0-9] [0-2][0-9]:[0-5][0-9]:[0-5][0-9]") {
        let expected = chrono::NaiveDateTime::parse_from_str(&text, "%Y-%m-%d %H:%M:%S").ok().map(|t| t.and_utc().timestamp());
        prop_assert_eq!(tally_schemas::parse::fast_datetime_text_seconds(&text), expected, "{}", text);
    }

    // Whatever bytes arrive, parsing never panics, and every accepted event respects the bounds.
    #[test]
    fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        for dialect in [Dialect::Sdk, Dialect::Analytics] {
            if let Ok(raw) = split_events(dialect, &body) {
                for (i, r) in raw.iter().enumerate() {
                    let _ = parse_event(dialect, r, i, &ctx(None));
                }
            }
        }
    }

    // Whatever the strings hold (quotes, control characters, unicode), the record decodes back.
    #[test]
    fn any_strings_round_trip_through_the_record(error in ".{0,40}", user in "\\PC{0,20}", key in "[a-z\"\\\\\n]{1,8}", value in ".{0,20}") {
        let mut event = parse_sdk(json!([seed_event()]), None).remove(0).unwrap();
        event.error = error;
        event.user_id = user;
        event.metadata = vec![(key, value)];
        let mut payload = Vec::new();
        encode_event(&event, &mut payload);
        let mut decoded = decode_events(&payload).unwrap().remove(0);
        decoded.received_at_ms = event.received_at_ms;
        prop_assert_eq!(decoded, event);
    }

    #[test]
    fn accepted_events_respect_bounds(
        prompt in 0u64..200_000_000, completion in 0u64..200_000_000,
        cost in proptest::option::of(-10.0f64..2_000_000.0), latency in -10.0f64..100_000_000.0,
        offset_s in -40i64*86_400..3_600, model in "[a-z0-9-]{0,140}",
    ) {
        let ts = chrono::DateTime::from_timestamp(NOW_MS / 1000 + offset_s, 0).unwrap().to_rfc3339();
        let mut e = json!({"timestamp": ts, "provider":"openai", "model": model,
            "tokens": {"promptTokens": prompt, "completionTokens": completion},
            "latency": latency, "status": "success"});
        if let Some(c) = cost { e["cost"] = json!(c); }
        if let Ok(event) = &parse_sdk(json!([e]), None)[0] {
            prop_assert!(u64::from(event.total_tokens) <= tally_schemas::limits::MAX_TOKENS);
            prop_assert!(event.cost_nanos >= 0 && event.cost_nanos <= tally_schemas::limits::MAX_COST_NANOS);
            prop_assert!(u64::from(event.latency_ms) <= tally_schemas::limits::MAX_LATENCY_MS);
            prop_assert!(!event.model.is_empty() && event.model.len() <= 128);
            prop_assert!(event.timestamp_ms >= NOW_MS - tally_schemas::limits::MAX_EVENT_AGE_MS);
            prop_assert!(event.timestamp_ms <= NOW_MS + tally_schemas::limits::MAX_EVENT_FUTURE_MS);
            let mut payload = Vec::new();
            encode_event(event, &mut payload);
            prop_assert_eq!(decode_events(&payload).unwrap()[0].cost_nanos, event.cost_nanos);
        }
    }
}

/// A batch's events borrow their strings from the body (and the org id from the request) when the
/// body is in the common shape; escaped strings are decoded into owned ones, trimmed and cut the
/// same way, and either kind encodes to the same row.
#[test]
fn batch_events_borrow_their_unescaped_strings() {
    use std::borrow::Cow;
    use tally_schemas::parse::parse_batch;

    let plain_body = r#"{"events":[{"timestamp":"2026-01-23T12:00:00Z","provider":"openai","model":"gpt-4o","tokens":{"promptTokens":1},"status":"error","error":"timeout","userId":"u-1"}]}"#;
    let long_escaped = format!("\\u00e9{}", "x".repeat(3000)); // é then 3000 bytes: cut at 2048
    let escaped_body = format!(
        r#"{{"events":[{{"timestamp":"2026-01-23T12:00:00Z","provider":" open\u0041i ","model":"gpt\/4o","tokens":{{"promptTokens":1}},"status":"error","error":"{long_escaped}","userId":"u\"1"}}]}}"#
    );
    let context = ctx(None);
    let plain_batch = parse_batch(Dialect::Sdk, plain_body.as_bytes(), &context).unwrap();
    let plain = plain_batch.outcomes[0].as_ref().unwrap();
    for text in [&plain.org_id, &plain.provider, &plain.model, &plain.error, &plain.user_id] {
        assert!(matches!(text, Cow::Borrowed(_)), "{text:?} was copied");
    }
    assert_eq!((plain.provider.as_ref(), plain.error.as_ref()), ("openai", "timeout"));
    let escaped_batch = parse_batch(Dialect::Sdk, escaped_body.as_bytes(), &context).unwrap();
    let escaped = escaped_batch.outcomes[0].as_ref().unwrap();
    assert!(matches!(escaped.provider, Cow::Owned(_)));
    assert_eq!(escaped.provider, "openAi", "decoded, then trimmed");
    assert_eq!(escaped.model, "gpt/4o");
    assert_eq!(escaped.user_id, "u\"1");
    assert_eq!(escaped.error.len(), tally_schemas::limits::MAX_ERROR_LEN);
    assert!(escaped.error.starts_with('é'));
    for outcome in plain_batch.outcomes.iter().chain(&escaped_batch.outcomes) {
        let (borrowed, owned) = (outcome.as_ref().unwrap(), outcome.as_ref().unwrap().clone().into_owned());
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode_event(borrowed, &mut a);
        encode_event(&owned, &mut b);
        assert_eq!(a, b);
        assert_eq!(decode_events(&a).unwrap(), vec![owned]);
    }
}
