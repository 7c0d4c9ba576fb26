//! A cursor over JSON text for the hand-written readers of the hot paths (`record::fast`, the
//! consumer's records; `parse::fast`, the SDK's batches). Every method returns `None` on anything
//! it does not read exactly, and the readers then fall back to serde.

/// How far `raw_str` scans a word at a time before it hands the rest of a string to memchr.
const SHORT_STRING: usize = 64;

/// The index of the first `"`, `\\` or control character (< 0x20) of `bytes`, eight bytes at a
/// time: in each word, a byte equal to the pattern becomes zero and `(x - 0x01..) & !x & 0x80..`
/// flags zero bytes (and bytes below 0x20 for the control test). A borrow can flag a byte above a
/// real match but never below one, so the lowest flag is exact. These are also the bytes a JSON
/// string must escape (`record::json_str` asks it).
pub(crate) fn special_byte(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let zero_bytes = |x: u64, below: u64| x.wrapping_sub(below) & !x & HIGHS;
    let mut at = 0;
    while let Some(chunk) = bytes[at..].first_chunk::<8>() {
        let word = u64::from_le_bytes(*chunk);
        let found = zero_bytes(word ^ (ONES * u64::from(b'"')), ONES)
            | zero_bytes(word ^ (ONES * u64::from(b'\\')), ONES)
            | zero_bytes(word, ONES * 0x20);
        if found != 0 {
            return Some(at + (found.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    bytes[at..].iter().position(|b| matches!(b, b'"' | b'\\' | 0..=0x1f)).map(|i| at + i)
}

pub(crate) struct Cursor<'a> {
    pub(crate) text: &'a str,
    pub(crate) at: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        Cursor { text, at: 0 }
    }

    pub(crate) fn bytes(&self) -> &'a [u8] {
        &self.text.as_bytes()[self.at..]
    }

    /// The literal next, and steps over it. Its length is a constant, so the comparison compiles
    /// to a few loads instead of a `memcmp` call (`perf`: 5 % of the consumer's CPU as calls).
    pub(crate) fn expect<const N: usize>(&mut self, literal: &[u8; N]) -> Option<()> {
        (self.bytes().first_chunk::<N>() == Some(literal)).then(|| self.at += N)
    }

    /// Steps over JSON whitespace.
    pub(crate) fn ws(&mut self) {
        let skipped = self.bytes().iter().take_while(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')).count();
        self.at += skipped;
    }

    /// `null` next: steps over it.
    pub(crate) fn null(&mut self) -> Option<()> {
        self.expect(b"null")
    }

    /// A string without escapes or control characters, as a slice of the line.
    pub(crate) fn raw_str(&mut self) -> Option<&'a str> {
        self.expect(b"\"")?;
        let rest = self.bytes();
        // Most strings (names, ids, times) end within a few dozen bytes: a word-at-a-time scan
        // finds the quote, a backslash or a control character there (which also checks the
        // string's bytes); longer strings get memchr and a vectorised control check.
        let short = rest.len().min(SHORT_STRING);
        let end = match special_byte(&rest[..short]) {
            Some(end) if rest[end] == b'"' => end,
            Some(_) => return None,
            None if short < rest.len() => {
                let end = short + memchr::memchr2(b'"', b'\\', &rest[short..])?;
                // Without an early exit, so the check compiles to a vector loop.
                if rest[end] != b'"'
                    || rest[short..end].iter().fold(false, |control, b| control | (*b < 0x20))
                {
                    return None;
                }
                end
            }
            None => return None,
        };
        let text = &self.text[self.at..self.at + end];
        self.at += end + 1;
        Some(text)
    }

    /// An unsigned JSON integer: digits, no leading zero, within u64.
    pub(crate) fn unsigned(&mut self) -> Option<u64> {
        let bytes = self.bytes();
        let mut value: u64 = 0;
        let mut digits = 0;
        for &b in bytes {
            let digit = b.wrapping_sub(b'0');
            if digit > 9 {
                break;
            }
            value = value.checked_mul(10)?.checked_add(u64::from(digit))?;
            digits += 1;
        }
        if digits == 0 || (digits > 1 && bytes[0] == b'0') {
            return None;
        }
        self.at += digits;
        Some(value)
    }

    pub(crate) fn signed(&mut self) -> Option<i64> {
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

    pub(crate) fn uint<T: TryFrom<u64>>(&mut self) -> Option<T> {
        T::try_from(self.unsigned()?).ok()
    }

    pub(crate) fn seconds(&mut self) -> Option<i64> {
        crate::time::fast_datetime_text_seconds(self.raw_str()?)
    }

    /// An array of strings without escapes: its text (brackets included) and its length.
    pub(crate) fn strings(&mut self) -> Option<(&'a str, usize)> {
        let start = self.at;
        self.expect(b"[")?;
        let mut count = 0;
        if self.expect(b"]").is_none() {
            loop {
                self.raw_str()?;
                count += 1;
                if self.expect(b",").is_none() {
                    self.expect(b"]")?;
                    break;
                }
            }
        }
        Some((&self.text[start..self.at], count))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::special_byte;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 5000, ..ProptestConfig::default() })]
        /// The word-at-a-time scan finds what a byte-by-byte one finds, wherever the byte sits.
        #[test]
        fn finds_the_first_special_byte_as_a_plain_loop_does(
            bytes in proptest::collection::vec(
                prop_oneof![60 => 0x20u8..=0xff, 1 => Just(b'"'), 1 => Just(b'\\'), 1 => 0u8..0x20], 0..80),
        ) {
            let plain = bytes.iter().position(|b| *b == b'"' || *b == b'\\' || *b < 0x20);
            prop_assert_eq!(special_byte(&bytes), plain);
        }
    }
}
