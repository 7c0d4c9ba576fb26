//! A reader of exactly what `encode_event` writes. It returns `None` (and the caller falls back to
//! serde) on anything else: another key order, whitespace, an escaped string, a number out of
//! range, a bad time, so it accepts nothing serde would refuse and decodes what it accepts the
//! same way (tested against serde on generated events).

use super::{Event, Uuid};
use crate::{CostSource, Status};

struct Cursor<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn bytes(&self) -> &'a [u8] {
        &self.text.as_bytes()[self.at..]
    }

    fn expect(&mut self, literal: &[u8]) -> Option<()> {
        self.bytes().starts_with(literal).then(|| self.at += literal.len())
    }

    /// A string without escapes or control characters, as a slice of the line.
    fn raw_str(&mut self) -> Option<&'a str> {
        self.expect(b"\"")?;
        let rest = self.bytes();
        let end = memchr::memchr2(b'"', b'\\', rest)?;
        if rest[end] != b'"' || rest[..end].iter().any(|b| *b < 0x20) {
            return None;
        }
        let text = &self.text[self.at..self.at + end];
        self.at += end + 1;
        Some(text)
    }

    fn string(&mut self) -> Option<String> {
        self.raw_str().map(str::to_owned)
    }

    /// An unsigned JSON integer: digits, no leading zero, within u64.
    fn unsigned(&mut self) -> Option<u64> {
        let digits = self.bytes().iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 20 || (digits > 1 && self.bytes()[0] == b'0') {
            return None;
        }
        let value = self.text[self.at..self.at + digits].parse().ok()?;
        self.at += digits;
        Some(value)
    }

    fn signed(&mut self) -> Option<i64> {
        if self.expect(b"-").is_some() {
            let magnitude = self.unsigned()?;
            if magnitude == 0 {
                return None;
            }
            0i64.checked_sub_unsigned(magnitude)
        } else {
            i64::try_from(self.unsigned()?).ok()
        }
    }

    fn uint<T: TryFrom<u64>>(&mut self) -> Option<T> {
        T::try_from(self.unsigned()?).ok()
    }

    fn seconds(&mut self) -> Option<i64> {
        crate::time::fast_datetime_text_seconds(self.raw_str()?)
    }

    fn strings(&mut self) -> Option<Vec<String>> {
        self.expect(b"[")?;
        let mut items = Vec::new();
        if self.expect(b"]").is_some() {
            return Some(items);
        }
        loop {
            items.push(self.string()?);
            if self.expect(b",").is_none() {
                self.expect(b"]")?;
                return Some(items);
            }
        }
    }
}

pub(super) fn decode_line(line: &str) -> Option<Event> {
    let mut c = Cursor { text: line, at: 0 };
    c.expect(b"{\"org_id\":")?;
    let org_id = c.string()?;
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
    let provider = c.string()?;
    c.expect(b",\"model\":")?;
    let model = c.string()?;
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
    let error = c.string()?;
    c.expect(b",\"execution_id\":")?;
    let execution_id = c.string()?;
    c.expect(b",\"agent_id\":")?;
    let agent_id = c.string()?;
    c.expect(b",\"user_id\":")?;
    let user_id = c.string()?;
    c.expect(b",\"service\":")?;
    let service = c.string()?;
    c.expect(b",\"action\":")?;
    let action = c.string()?;
    c.expect(b",\"request_id\":")?;
    let request_id = c.string()?;
    c.expect(b",\"input_bytes\":")?;
    let input_bytes = c.unsigned()?;
    c.expect(b",\"output_bytes\":")?;
    let output_bytes = c.unsigned()?;
    c.expect(b",\"metadata_keys\":")?;
    let keys = c.strings()?;
    c.expect(b",\"metadata_values\":")?;
    let values = c.strings()?;
    c.expect(b"}")?;
    if c.at != line.trim_end_matches(['\r', ' ', '\t']).len() || keys.len() != values.len() {
        return None;
    }
    Some(Event {
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
        metadata: keys.into_iter().zip(values).collect(),
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::record::encode_event;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof!["[a-z0-9_.-]{0,12}", ".{0,12}", "[\"\\\\\u{0}-\u{1f}a]{0,4}"]
    }

    prop_compose! {
        fn event()(
            org_id in text(), id in any::<u128>(), ts in 0i64..4_000_000_000_000, received in 0i64..4_000_000_000,
            tokens in any::<(u32, u32, u32)>(), cost_nanos in any::<i64>(), source in 0u8..3, latency_ms in any::<u32>(),
            error_status in any::<bool>(), http_status in any::<u16>(),
            strings in proptest::collection::vec(text(), 9), bytes in any::<(u64, u64)>(),
            metadata in proptest::collection::vec((text(), text()), 0..3),
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
                Some(decoded) => prop_assert_eq!(decoded, event),
                None => prop_assert!(line.contains('\\'), "declined an unescaped line: {}", line),
            }
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
                    prop_assert_eq!(slow.ok(), Some(fast));
                }
            }
        }
    }
}
