//! A reader of the common SDK batch: `{"events":[...]}` whose events hold only the SDK's fields,
//! strings without escapes and numbers in their plain form. It returns `None` on anything else (an
//! unknown or repeated field, an escape, a shape it does not know, a number it would not read
//! exactly as serde does) and the caller then parses the body with serde, so it accepts nothing
//! serde refuses and reads what it accepts the same way (tested against serde on generated
//! bodies). On a 1-event request serde's derive was most of the parse's CPU.

use std::borrow::Cow;
use std::collections::BTreeMap;

use super::dialects::{SdkEvent, SdkTokens};
use crate::cursor::Cursor;

/// Reads an SDK batch in the common shape, handing `each` its events in order. `None` when the
/// body is not in that shape or when `each` refused an event (the reading stops there).
pub(super) fn sdk_each<'a>(text: &'a str, mut each: impl FnMut(SdkEvent<'a>) -> Option<()>) -> Option<()> {
    let mut c = Cursor::new(text);
    let mut seen = false;
    object(&mut c, Cursor::raw_str, |c, key| match key {
        "events" if !seen => {
            seen = true;
            items(c, |c| each(event(c)?))
        }
        _ => None,
    })?;
    c.ws();
    (seen && c.at == text.len()).then_some(())
}

/// The events of an SDK batch, or `None` when the body is not in the shape this reader takes.
pub(super) fn sdk_batch(text: &str) -> Option<Vec<SdkEvent<'_>>> {
    let mut events = Vec::new();
    sdk_each(text, |event| {
        events.push(event);
        Some(())
    })?;
    Some(events)
}

/// Steps through an object (whitespace allowed around every token), reading each member's key
/// with `key` and calling `member` with the cursor on its value; `member` reads the value or fails
/// the object, and so does a key `key` does not read.
fn object<'a, K>(
    c: &mut Cursor<'a>,
    mut key: impl FnMut(&mut Cursor<'a>) -> Option<K>,
    mut member: impl FnMut(&mut Cursor<'a>, K) -> Option<()>,
) -> Option<()> {
    c.ws();
    c.expect(b"{")?;
    c.ws();
    if c.expect(b"}").is_some() {
        return Some(());
    }
    loop {
        let key = key(c)?;
        c.ws();
        c.expect(b":")?;
        c.ws();
        member(c, key)?;
        c.ws();
        if c.expect(b",").is_none() {
            return c.expect(b"}");
        }
        c.ws();
    }
}

/// The names of the SDK's fields (an event's and its `tokens`'), `Optional` indexing the optional
/// strings in the order `event` unpacks them.
#[derive(Clone, Copy)]
enum Field {
    Timestamp,
    Provider,
    Model,
    Status,
    Tokens,
    Cost,
    Latency,
    Metadata,
    Optional(usize),
    PromptTokens,
    CompletionTokens,
    TotalTokens,
}

/// The key at the cursor when it is one of the SDK's field names written plainly (`"model"`),
/// stepping over it: compared whole, quotes included, instead of scanned as a string and then
/// matched. `None` for any other key (an unknown name, or a known one written with escapes), and
/// the reader then leaves the body to serde, as it did when it read every key as a string.
fn field(c: &mut Cursor<'_>) -> Option<Field> {
    use Field::*;
    macro_rules! one_of {
        ($($name:literal => $field:expr),+) => {{
            $(if c.expect($name).is_some() {
                return Some($field);
            })+
            None
        }};
    }
    match *c.bytes().get(1)? {
        b't' => {
            one_of!(b"\"timestamp\"" => Timestamp, b"\"tokens\"" => Tokens, b"\"totalTokens\"" => TotalTokens)
        }
        b'p' => one_of!(b"\"provider\"" => Provider, b"\"promptTokens\"" => PromptTokens),
        b'm' => one_of!(b"\"model\"" => Model, b"\"metadata\"" => Metadata),
        b's' => one_of!(b"\"status\"" => Status, b"\"service\"" => Optional(5)),
        b'c' => one_of!(b"\"cost\"" => Cost, b"\"completionTokens\"" => CompletionTokens),
        b'l' => one_of!(b"\"latency\"" => Latency),
        b'e' => {
            one_of!(b"\"error\"" => Optional(0), b"\"eventId\"" => Optional(1), b"\"executionId\"" => Optional(2))
        }
        b'a' => one_of!(b"\"agentId\"" => Optional(3), b"\"action\"" => Optional(6)),
        b'u' => one_of!(b"\"userId\"" => Optional(4)),
        b'r' => one_of!(b"\"requestId\"" => Optional(7)),
        _ => None,
    }
}

/// Steps through an array, `item` reading each of its items.
fn items<'a>(c: &mut Cursor<'a>, mut item: impl FnMut(&mut Cursor<'a>) -> Option<()>) -> Option<()> {
    c.expect(b"[")?;
    c.ws();
    if c.expect(b"]").is_some() {
        return Some(());
    }
    loop {
        item(c)?;
        c.ws();
        if c.expect(b",").is_none() {
            return c.expect(b"]");
        }
        c.ws();
    }
}

/// `null` as `None`, else the value `read` reads.
fn nullable<'a, T>(c: &mut Cursor<'a>, read: impl FnOnce(&mut Cursor<'a>) -> Option<T>) -> Option<Option<T>> {
    if c.null().is_some() {
        return Some(None);
    }
    read(c).map(Some)
}

/// A JSON number read as an `f64` exactly as serde_json reads it: a plain integer of at most 15
/// digits is converted directly (serde_json converts the same u64 the same way), and so is a plain
/// decimal (`0.0062`) of at most 15 digits: its digits as an integer, exact in an f64, divided by
/// the exact power of ten, which IEEE division rounds correctly, as serde_json does for them. Any
/// other form (a sign, an exponent, more digits) is handed to serde_json itself.
fn number(c: &mut Cursor<'_>) -> Option<f64> {
    let bytes = c.bytes();
    let len =
        bytes.iter().take_while(|b| matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')).count();
    if let Some(value) = plain_decimal(&bytes[..len]) {
        c.at += len;
        return Some(value);
    }
    let value = serde_json::from_str::<f64>(&c.text[c.at..c.at + len]).ok()?;
    c.at += len;
    Some(value)
}

/// `digits` or `digits.digits`, at most 15 digits in all, in JSON's form (no leading zero but a
/// lone one before the point): the value, exactly rounded.
fn plain_decimal(token: &[u8]) -> Option<f64> {
    const POW10: [f64; 16] =
        [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15];
    let (whole, fraction) = match token.iter().position(|b| *b == b'.') {
        Some(point) => (&token[..point], Some(&token[point + 1..])),
        None => (token, None),
    };
    let digits = whole.len() + fraction.map_or(0, <[u8]>::len);
    if whole.is_empty()
        || (whole.len() > 1 && whole[0] == b'0')
        || fraction.is_some_and(<[u8]>::is_empty)
        || digits > 15
    {
        return None;
    }
    let mut mantissa = 0u64;
    for b in whole.iter().chain(fraction.unwrap_or_default()) {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        mantissa = mantissa * 10 + u64::from(digit);
    }
    Some(mantissa as f64 / POW10[fraction.map_or(0, <[u8]>::len)])
}

/// Records `bit` in `seen`, failing when it was already there (serde refuses a repeated field).
fn first_time(seen: &mut u32, bit: u32) -> Option<()> {
    let mask = 1 << bit;
    (*seen & mask == 0).then(|| *seen |= mask)
}

fn tokens(c: &mut Cursor<'_>) -> Option<SdkTokens> {
    let (mut prompt, mut completion, mut total, mut seen) = (0, 0, None, 0);
    object(c, field, |c, key| match key {
        Field::PromptTokens => {
            first_time(&mut seen, 0)?;
            prompt = c.unsigned()?;
            Some(())
        }
        Field::CompletionTokens => {
            first_time(&mut seen, 1)?;
            completion = c.unsigned()?;
            Some(())
        }
        Field::TotalTokens => {
            first_time(&mut seen, 2)?;
            total = nullable(c, Cursor::unsigned)?;
            Some(())
        }
        _ => None,
    })?;
    Some(SdkTokens { prompt_tokens: prompt, completion_tokens: completion, total_tokens: total })
}

fn metadata(c: &mut Cursor<'_>) -> Option<BTreeMap<String, String>> {
    let mut entries = BTreeMap::new();
    object(c, Cursor::raw_str, |c, key| {
        // A repeated key: the last value wins, as with serde's map.
        entries.insert(key.to_owned(), c.raw_str()?.to_owned());
        Some(())
    })?;
    Some(entries)
}

fn event<'a>(c: &mut Cursor<'a>) -> Option<SdkEvent<'a>> {
    let (mut timestamp, mut provider, mut model, mut status) = (None, None, None, None);
    let (mut tokens_read, mut cost, mut latency, mut metadata_read) = (None, None, None, None);
    let mut optional: [Option<&'a str>; 8] = [None; 8];
    let mut seen = 0u32;
    object(c, field, |c, key| {
        let slot = match key {
            Field::Timestamp => &mut timestamp,
            Field::Provider => &mut provider,
            Field::Model => &mut model,
            Field::Status => &mut status,
            Field::Tokens => {
                first_time(&mut seen, 4)?;
                tokens_read = Some(tokens(c)?);
                return Some(());
            }
            Field::Cost => {
                first_time(&mut seen, 5)?;
                cost = nullable(c, number)?;
                return Some(());
            }
            Field::Latency => {
                first_time(&mut seen, 6)?;
                latency = Some(number(c)?);
                return Some(());
            }
            Field::Metadata => {
                first_time(&mut seen, 7)?;
                metadata_read = nullable(c, metadata)?;
                return Some(());
            }
            Field::Optional(index) => {
                first_time(&mut seen, 8 + index as u32)?;
                optional[index] = nullable(c, Cursor::raw_str)?;
                return Some(());
            }
            Field::PromptTokens | Field::CompletionTokens | Field::TotalTokens => return None,
        };
        if slot.is_some() {
            return None;
        }
        *slot = Some(c.raw_str()?);
        Some(())
    })?;
    let [error, event_id, execution_id, agent_id, user_id, service, action, request_id] =
        optional.map(|value| value.map(Cow::Borrowed));
    Some(SdkEvent {
        timestamp: Cow::Borrowed(timestamp?),
        provider: Cow::Borrowed(provider?),
        model: Cow::Borrowed(model?),
        tokens: tokens_read?,
        cost,
        latency: latency.unwrap_or_default(),
        status: Cow::Borrowed(status?),
        error,
        event_id,
        execution_id,
        agent_id,
        user_id,
        service,
        action,
        request_id,
        metadata: metadata_read,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::limits::MAX_EVENTS_PER_REQUEST;
    use crate::record::RecordFormat;

    #[derive(serde::Deserialize)]
    struct Batch<'a> {
        #[serde(borrow)]
        events: Vec<SdkEvent<'a>>,
    }

    fn serde_batch(text: &str) -> Option<Vec<SdkEvent<'_>>> {
        serde_json::from_str::<Batch>(text).ok().map(|batch| batch.events)
    }

    /// The request every row test reads: event ids derived from an idempotency key, so the two
    /// paths make the same rows; the generated timestamps (2026-12-02T10:00:00Z) an hour old.
    const CTX: crate::parse::RequestContext<'static> = crate::parse::RequestContext {
        org_id: "org-1",
        received_at_ms: 1_796_205_600_000 + 3_600_000,
        idempotency_key: Some("retry-1"),
    };

    fn book() -> crate::pricing::PriceBook {
        crate::pricing::PriceBook::new([crate::pricing::ModelPrice {
            provider: "openai".into(),
            model: "gpt-4o".into(),
            effective_from_ms: 0,
            input_nanos_per_mtok: 2_500_000_000,
            output_nanos_per_mtok: 10_000_000_000,
        }])
    }

    /// What the event-by-event path makes of a body: every event priced and encoded in `format`,
    /// when every event was accepted.
    fn rows_one_by_one(body: &str, format: RecordFormat) -> Option<Vec<u8>> {
        let batch = crate::parse::parse_batch(crate::parse::Dialect::Sdk, body.as_bytes(), &CTX).ok()?;
        let (book, mut out) = (book(), Vec::new());
        for outcome in batch.outcomes {
            let mut event = outcome.ok()?;
            book.price(&mut event);
            format.encode(&event, &mut out);
        }
        Some(out)
    }

    /// `sdk_rows` after a prefix already in the buffer: the rows it appended, or `None` with the
    /// prefix left as it was.
    fn rows_in_one_pass(body: &str, format: RecordFormat) -> Option<(usize, Vec<u8>)> {
        let mut out = b"prefix\n".to_vec();
        let rows = crate::parse::sdk_rows(body.as_bytes(), &CTX, &book(), format, &mut out);
        match rows {
            Some(rows) => Some((rows, out.split_off(7))),
            None => {
                assert_eq!(out, b"prefix\n", "a refused body left rows behind");
                None
            }
        }
    }

    /// The one-pass path and the event-by-event path agree on `body`, in both record formats: the
    /// same rows when the first takes it, and the first takes every body in the common shape whose
    /// events are valid.
    fn assert_paths_agree(body: &str) {
        for format in [RecordFormat::JsonEachRow, RecordFormat::RowBinary] {
            let one_by_one = rows_one_by_one(body, format);
            match rows_in_one_pass(body, format) {
                Some((rows, out)) => {
                    assert_eq!(Some(&out), one_by_one.as_ref(), "{format:?} {body}");
                    assert_eq!(format.prefix_len(&out, rows).ok(), Some(out.len()), "{format:?} {body}");
                    assert!(rows == 0 || format.prefix_len(&out, rows - 1).ok() < Some(out.len()));
                }
                None => assert!(
                    one_by_one.is_none() || sdk_batch(body).is_none_or(|e| e.len() > MAX_EVENTS_PER_REQUEST),
                    "valid batch in the common shape not taken: {body}"
                ),
            }
        }
    }

    const LOADGEN_EVENT: &str = r#"{"agentId":null,"completionTokens":1,"error":null,"executionId":"exec-7","latency":4150,"model":"gpt-4o","provider":"openai","status":"success","timestamp":"2026-12-02T10:00:00.123Z","tokens":{"completionTokens":320,"promptTokens":1200,"totalTokens":1520},"userId":"user-7","cost":0.0062}"#;

    #[test]
    fn the_common_batches_take_the_fast_path() {
        // The load generator's events (serde_json's compact output) and a pretty-printed batch.
        let event = LOADGEN_EVENT.replace("\"completionTokens\":1,", "");
        for body in [
            format!(r#"{{"events":[{event}]}}"#),
            format!(r#"{{"events":[{event},{event}]}}"#),
            format!("{{\n  \"events\": [\n    {event} ,\n {event}\n  ]\n}}\n"),
            r#"{"events":[]}"#.to_owned(),
        ] {
            let fast = sdk_batch(&body).unwrap_or_else(|| panic!("not read: {body}"));
            assert_eq!(Some(fast), serde_batch(&body), "{body}");
        }
    }

    #[test]
    fn valid_batches_become_rows_in_one_pass() {
        let event = LOADGEN_EVENT.replace("\"completionTokens\":1,", "");
        let unpriced = event.replace(",\"cost\":0.0062", ""); // priced from the book
        let invalid = event.replace("success", "maybe");
        let one = format!(r#"{{"events":[{event}]}}"#);
        let (rows, out) =
            rows_in_one_pass(&one, RecordFormat::JsonEachRow).expect("the load generator's batch");
        assert_eq!(rows, 1);
        let decoded = crate::record::decode_events(&out).unwrap();
        assert_eq!((decoded[0].cost_nanos, decoded[0].org_id.as_str()), (6_200_000, "org-1"));
        let (_, priced) =
            rows_in_one_pass(&format!(r#"{{"events":[{unpriced}]}}"#), RecordFormat::JsonEachRow).unwrap();
        let decoded = crate::record::decode_events(&priced).unwrap();
        assert_eq!(
            (decoded[0].cost_nanos, decoded[0].cost_source),
            (6_200_000, crate::event::CostSource::Computed)
        );
        let many = vec![unpriced.as_str(); MAX_EVENTS_PER_REQUEST].join(",");
        assert_eq!(
            rows_in_one_pass(&format!(r#"{{"events":[{many}]}}"#), RecordFormat::JsonEachRow).map(|r| r.0),
            Some(1000)
        );
        for body in [
            one.clone(),
            format!(r#"{{"events":[{event},{unpriced},{event}]}}"#),
            format!(r#"{{"events":[{event},{invalid}]}}"#),
            format!(r#"{{"events":[{many},{event}]}}"#),
            r#"{"events":[]}"#.to_owned(),
            r#"{"events":[],"events":[]}"#.to_owned(),
            "{}".to_owned(),
        ] {
            assert_paths_agree(&body);
        }
        assert!(rows_in_one_pass(&format!(r#"{{"events":[{event},{invalid}]}}"#), RecordFormat::JsonEachRow)
            .is_none());
        assert!(
            rows_in_one_pass(&format!(r#"{{"events":[{many},{event}]}}"#), RecordFormat::JsonEachRow)
                .is_none(),
            "1001 events"
        );
        assert_eq!(rows_in_one_pass(r#"{"events":[]}"#, RecordFormat::JsonEachRow).map(|r| r.0), Some(0));
    }

    #[test]
    fn what_it_does_not_read_is_left_to_serde() {
        let cases = [
            // unknown field, repeated field, escape, integer with a fraction, bad shape
            r#"{"events":[{"timestamp":"t","provider":"p","model":"m","tokens":{},"status":"success","extra":1}]}"#,
            r#"{"events":[{"timestamp":"t","timestamp":"t","provider":"p","model":"m","tokens":{},"status":"success"}]}"#,
            r#"{"events":[{"timestamp":"t","provider":"p\"q","model":"m","tokens":{},"status":"success"}]}"#,
            r#"{"events":[{"timestamp":"t","provider":"p","model":"m","tokens":{"promptTokens":1.0},"status":"success"}]}"#,
            r#"{"events":[{"timestamp":"t","provider":"p","model":"m","tokens":{},"status":"success"}],"more":1}"#,
            r#"{"events":[{"timestamp":"t","provider":"p","model":"m","tokens":{},"status":"success"}]} x"#,
            r#"{"events":[{"timestamp":"t","provider":"p","model":"m","tokens":{},"status":"success","latency":01}]}"#,
            // a known name written with an escape, names extending or cut from known ones, a
            // tokens name at the event's level
            r#"{"events":[{"t\u0069mestamp":"t","provider":"p","model":"m","tokens":{},"status":"success"}]}"#,
            r#"{"events":[{"timestamp":"t","provider":"p","models":"m","tokens":{},"status":"success"}]}"#,
            r#"{"events":[{"timestamp":"t","provider":"p","model":"m","tokens":{},"status":"success","cos":1}]}"#,
            r#"{"events":[{"timestamp":"t","provider":"p","model":"m","tokens":{},"status":"success","totalTokens":1}]}"#,
        ];
        for body in cases {
            assert_eq!(sdk_batch(body), None, "{body}");
        }
    }

    /// One member of a generated event: a known field in one of its forms, or something the fast
    /// reader must refuse or read exactly as serde does.
    fn member() -> impl Strategy<Value = String> {
        let string = prop_oneof![
            Just("\"openai\"".to_owned()),
            Just("\"\"".to_owned()),
            Just("\"gpt-4o \\u00e9\"".to_owned()),
            Just("\"caf\u{e9} \u{1F600}\"".to_owned()),
            Just("\"tab\there\"".to_owned()),
            Just("null".to_owned()),
            Just("12".to_owned()),
            Just("\"2026-12-02T10:00:00Z\"".to_owned()),
        ];
        let number = prop_oneof![
            (0u64..100_000).prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| f.to_string()),
            (0.0f64..10.0).prop_map(|f| format!("{f}")),
            Just("1e3".to_owned()),
            Just("-0".to_owned()),
            Just("0.1E-2".to_owned()),
            Just("007".to_owned()),
            Just("123456789012345678901234".to_owned()),
            Just("null".to_owned()),
            Just("\"5\"".to_owned()),
        ];
        let tokens = (
            proptest::option::of(number.clone()),
            proptest::option::of(number.clone()),
            proptest::option::of(number.clone()),
        )
            .prop_map(|(p, c, t)| {
                let mut parts = Vec::new();
                if let Some(p) = p {
                    parts.push(format!("\"promptTokens\":{p}"));
                }
                if let Some(c) = c {
                    parts.push(format!("\"completionTokens\" : {c}"));
                }
                if let Some(t) = t {
                    parts.push(format!("\"totalTokens\":{t}"));
                }
                format!("{{{}}}", parts.join(","))
            });
        let metadata = prop_oneof![
            Just("{}".to_owned()),
            Just("null".to_owned()),
            Just(r#"{"a":"1","b":"2","a":"3"}"#.to_owned()),
            Just(r#"{"a":1}"#.to_owned()),
        ];
        // A `&str` strategy is a regex: one of the names.
        prop_oneof![
            ("timestamp|provider|model|status|error|eventId|executionId|agentId|userId|service|action|requestId|other",
             string.clone()),
            ("cost|latency", number),
            ("tokens", tokens),
            ("metadata", metadata),
            ("status", prop_oneof![Just("\"success\"".to_owned()), Just("\"error\"".to_owned())]),
        ]
        .prop_map(|(name, value)| format!("\"{name}\":{value}"))
    }

    fn required() -> Vec<String> {
        vec![
            "\"timestamp\":\"2026-12-02T10:00:00Z\"".to_owned(),
            "\"provider\":\"openai\"".to_owned(),
            "\"model\":\"gpt-4o\"".to_owned(),
            "\"tokens\":{\"promptTokens\":3}".to_owned(),
            "\"status\":\"success\"".to_owned(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]
        /// Whatever the fast reader reads, serde reads the same; and a body of valid members in
        /// their plain forms is read by the fast reader (it does not just give up).
        #[test]
        fn it_reads_what_serde_reads(
            extra in proptest::collection::vec(member(), 0..6),
            keep in proptest::collection::vec(proptest::bool::weighted(0.9), 5),
            spaces in any::<bool>(),
            events in 1usize..3,
        ) {
            let mut members: Vec<String> =
                required().into_iter().zip(&keep).filter(|(_, k)| **k).map(|(m, _)| m).collect();
            members.extend(extra);
            let separator = if spaces { " ,\n " } else { "," };
            let event = format!("{{{}}}", members.join(separator));
            let body = format!("{{\"events\":[{}]}}", vec![event; events].join(","));
            if let Some(fast) = sdk_batch(&body) {
                prop_assert_eq!(Some(fast), serde_batch(&body), "{}", body);
            }
        }

        /// Plain decimals of up to 15 digits (and the forms around them) read as serde_json reads
        /// them, to the last bit.
        #[test]
        fn decimals_are_read_as_serde_reads_them(
            mantissa in 0u64..1_000_000_000_000_000,
            scale in 0usize..17,
            suffix in prop_oneof![Just(""), Just("0"), Just("e1"), Just(".")],
        ) {
            let digits = mantissa.to_string();
            let text = if scale == 0 {
                format!("{digits}{suffix}")
            } else if scale >= digits.len() {
                format!("0.{}{digits}{suffix}", "0".repeat(scale - digits.len()))
            } else {
                format!("{}.{}{suffix}", &digits[..digits.len() - scale], &digits[digits.len() - scale..])
            };
            let serde = serde_json::from_str::<f64>(&text).ok();
            let mut c = Cursor::new(&text);
            let fast = number(&mut c);
            prop_assert_eq!(fast.map(f64::to_bits), serde.map(f64::to_bits), "{}", text);
            if fast.is_some() {
                prop_assert_eq!(c.at, text.len());
            }
        }

        /// On generated bodies (valid and invalid events, shapes the reader takes and others) the
        /// one-pass rows are the event-by-event path's.
        #[test]
        fn one_pass_rows_are_the_event_by_event_rows(
            extra in proptest::collection::vec(member(), 0..6),
            keep in proptest::collection::vec(proptest::bool::weighted(0.95), 5),
            events in 1usize..4,
        ) {
            let mut members: Vec<String> =
                required().into_iter().zip(&keep).filter(|(_, k)| **k).map(|(m, _)| m).collect();
            members.extend(extra);
            let event = format!("{{{}}}", members.join(","));
            assert_paths_agree(&format!("{{\"events\":[{}]}}", vec![event; events].join(",")));
        }

        #[test]
        fn plain_events_are_read(
            latency in 0u64..1_000_000_000_000_000,
            cost in 0.0f64..1000.0,
            prompt in any::<u64>(),
            user in "[a-z0-9-]{0,20}",
        ) {
            let body = format!(
                r#"{{"events":[{{"timestamp":"2026-12-02T10:00:00Z","provider":"openai","model":"gpt-4o","tokens":{{"promptTokens":{prompt}}},"status":"error","latency":{latency},"cost":{cost},"userId":"{user}","metadata":{{"k":"v"}}}}]}}"#
            );
            let fast = sdk_batch(&body);
            prop_assert!(fast.is_some(), "{}", body);
            prop_assert_eq!(fast, serde_batch(&body));
        }
    }
}
