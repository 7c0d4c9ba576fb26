//! A reader of exactly what `encode_event` writes. It returns `None` (and the caller falls back to
//! serde) on anything else: another key order, whitespace, an escaped string, a number out of
//! range, a bad time, so it accepts nothing serde would refuse and decodes what it accepts the
//! same way (tested against serde on generated events).

use super::{EventRef, Metadata, Uuid};
use crate::cursor::Cursor;
use crate::{CostSource, Status};

pub(super) fn decode_line(line: &str) -> Option<EventRef<'_>> {
    let mut c = Cursor::new(line);
    c.expect(b"{\"org_id\":")?;
    let org_id = c.raw_str()?;
    c.expect(b",\"event_id\":")?;
    let event_id = Uuid::try_parse(c.raw_str()?).ok()?;
    c.expect(b",\"timestamp\":")?;
    let timestamp_s = c.seconds()?;
    c.expect(b",\"timestamp_ms\":")?;
    let millis: u16 = c.uint()?;
    if millis >= 1000 {
        return None;
    }
    c.expect(b",\"received_at\":")?;
    let received_s = c.seconds()?;
    c.expect(b",\"provider\":")?;
    let provider = c.raw_str()?;
    c.expect(b",\"model\":")?;
    let model = c.raw_str()?;
    c.expect(b",\"prompt_tokens\":")?;
    let prompt_tokens = c.uint()?;
    c.expect(b",\"completion_tokens\":")?;
    let completion_tokens = c.uint()?;
    c.expect(b",\"total_tokens\":")?;
    let total_tokens = c.uint()?;
    c.expect(b",\"cost_nanos\":")?;
    let cost_nanos = c.signed()?;
    c.expect(b",\"cost_source\":")?;
    let cost_source = match c.raw_str()? {
        "client" => CostSource::Client,
        "computed" => CostSource::Computed,
        "unknown" => CostSource::Unknown,
        _ => return None,
    };
    c.expect(b",\"latency_ms\":")?;
    let latency_ms = c.uint()?;
    c.expect(b",\"status\":")?;
    let status = match c.raw_str()? {
        "success" => Status::Success,
        "error" => Status::Error,
        _ => return None,
    };
    c.expect(b",\"http_status\":")?;
    let http_status = c.uint()?;
    c.expect(b",\"error\":")?;
    let error = c.raw_str()?;
    c.expect(b",\"execution_id\":")?;
    let execution_id = c.raw_str()?;
    c.expect(b",\"agent_id\":")?;
    let agent_id = c.raw_str()?;
    c.expect(b",\"user_id\":")?;
    let user_id = c.raw_str()?;
    c.expect(b",\"service\":")?;
    let service = c.raw_str()?;
    c.expect(b",\"action\":")?;
    let action = c.raw_str()?;
    c.expect(b",\"request_id\":")?;
    let request_id = c.raw_str()?;
    c.expect(b",\"input_bytes\":")?;
    let input_bytes = c.unsigned()?;
    c.expect(b",\"output_bytes\":")?;
    let output_bytes = c.unsigned()?;
    c.expect(b",\"metadata_keys\":")?;
    let (keys, len) = c.strings()?;
    c.expect(b",\"metadata_values\":")?;
    let (values, values_len) = c.strings()?;
    c.expect(b"}")?;
    if c.at != line.trim_end_matches(['\r', ' ', '\t']).len() || len != values_len {
        return None;
    }
    Some(EventRef {
        org_id,
        event_id,
        timestamp_ms: timestamp_s * 1000 + i64::from(millis),
        received_at_ms: received_s * 1000,
        provider,
        model,
        prompt_tokens,
        completion_tokens,
        total_tokens,
        cost_nanos,
        cost_source,
        latency_ms,
        status,
        http_status,
        error,
        execution_id,
        agent_id,
        user_id,
        service,
        action,
        request_id,
        input_bytes,
        output_bytes,
        metadata: Metadata::Json { keys, values, len },
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::record::encode_event;
    use crate::row::write_row_binary;
    use crate::Event;

    #[test]
    fn integers_are_read_to_the_edge_of_their_type_and_no_further() {
        let read = |text: &str| Cursor::new(text).unsigned();
        assert_eq!(read("18446744073709551615,"), Some(u64::MAX));
        assert_eq!(read("18446744073709551616"), None);
        assert_eq!(read("00000000000000000000001"), None);
        assert_eq!(read("0"), Some(0));
        assert_eq!(read("01"), None);
        assert_eq!(read("-1"), None);
        assert_eq!(read("7x"), Some(7));
        let signed = |text: &str| Cursor::new(text).signed();
        assert_eq!(signed("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(signed("-9223372036854775809"), None);
        assert_eq!(signed("9223372036854775808"), None);
        assert_eq!(signed("-0"), None);
    }

    /// Strings of every kind, or (`plain`) only those Tally writes without escapes, which the
    /// fast reader reads (with every kind, few events have no escaped string among their 12).
    fn text(plain: bool) -> BoxedStrategy<String> {
        if plain {
            prop_oneof!["[a-z0-9_.-]{0,12}", "[^\"\\\\\u{0}-\u{1f}]{0,12}"].boxed()
        } else {
            prop_oneof!["[a-z0-9_.-]{0,12}", ".{0,12}", "[\"\\\\\u{0}-\u{1f}a]{0,4}"].boxed()
        }
    }

    /// Half of them in the fast reader's shape.
    pub(crate) fn event() -> impl Strategy<Value = Event> {
        prop_oneof![event_of(false), event_of(true)]
    }

    prop_compose! {
        fn event_of(plain: bool)(
            org_id in text(plain), id in any::<u128>(), ts in 0i64..4_000_000_000_000, received in 0i64..4_000_000_000,
            tokens in any::<(u32, u32, u32)>(), cost_nanos in any::<i64>(), source in 0u8..3, latency_ms in any::<u32>(),
            error_status in any::<bool>(), http_status in any::<u16>(),
            strings in proptest::collection::vec(text(plain), 9), bytes in any::<(u64, u64)>(),
            metadata in proptest::collection::vec((text(plain), text(plain)), 0..3),
        ) -> Event {
            Event {
                org_id, event_id: Uuid::from_u128(id), timestamp_ms: ts, received_at_ms: received * 1000,
                provider: strings[0].clone(), model: strings[1].clone(),
                prompt_tokens: tokens.0, completion_tokens: tokens.1, total_tokens: tokens.2, cost_nanos,
                cost_source: [CostSource::Client, CostSource::Computed, CostSource::Unknown][source as usize],
                latency_ms, status: if error_status { Status::Error } else { Status::Success }, http_status,
                error: strings[2].clone(), execution_id: strings[3].clone(), agent_id: strings[4].clone(),
                user_id: strings[5].clone(), service: strings[6].clone(), action: strings[7].clone(),
                request_id: strings[8].clone(), input_bytes: bytes.0, output_bytes: bytes.1, metadata,
            }
        }
    }

    fn line_of(event: &Event) -> String {
        let mut out = Vec::new();
        encode_event(event, &mut out);
        String::from_utf8(out).unwrap_or_default().trim_end().to_owned()
    }

    proptest! {
        // What the fast reader accepts, it decodes as the event written; it declines only
        // escaped strings (which serde then reads).
        #[test]
        fn reads_what_the_encoder_writes(event in event()) {
            let line = line_of(&event);
            match decode_line(&line) {
                Some(decoded) => prop_assert_eq!(decoded.to_event(), event),
                None => prop_assert!(line.contains('\\'), "declined an unescaped line: {}", line),
            }
        }

        // The fast reader's borrowed event is written to ClickHouse byte for byte as the event
        // it was read from (metadata arrays read from their JSON text, not from pairs).
        #[test]
        fn writes_the_same_row_as_the_event(event in event_of(true), partition in 0i32..64, offset in any::<i64>(), index in any::<u32>()) {
            let line = line_of(&event);
            let decoded = decode_line(&line);
            prop_assert!(decoded.is_some(), "declined an unescaped line: {}", line);
            let (mut fast, mut owned) = (Vec::new(), Vec::new());
            write_row_binary(&decoded.unwrap(), (partition, offset, index), &mut fast);
            write_row_binary(&event.borrowed(), (partition, offset, index), &mut owned);
            prop_assert_eq!(fast, owned);
        }

        // A damaged line is either declined or decoded exactly as serde decodes it.
        #[test]
        fn never_accepts_what_serde_refuses(event in event(), cut in 0usize..400, byte in any::<u8>()) {
            let mut bytes = line_of(&event).into_bytes();
            let at = cut.min(bytes.len().saturating_sub(1));
            if !bytes.is_empty() {
                bytes[at] = byte;
            }
            if let Ok(line) = std::str::from_utf8(&bytes) {
                if let Some(fast) = decode_line(line) {
                    let slow = crate::record::decode_line_serde(line);
                    prop_assert!(slow.is_ok(), "fast accepted what serde refused: {}", line);
                    prop_assert_eq!(slow.ok(), Some(fast.to_event()));
                }
            }
        }
    }
}
