//! Date arithmetic on epoch seconds and milliseconds, hand-rolled for the hot paths: the ingest
//! parses RFC 3339 and writes ClickHouse DateTime text per event, the consumer reads it back.

/// Milliseconds since the epoch, now (the system clock; before the epoch, negative). What chrono's
/// `Utc::now().timestamp_millis()` gives, without building a calendar date first.
pub fn now_ms() -> i64 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(since) => since.as_millis() as i64,
        Err(before) => -(before.duration().as_millis() as i64),
    }
}

fn two_digits(bytes: &[u8], at: usize) -> Option<u32> {
    let (tens, ones) = (bytes.get(at)?.wrapping_sub(b'0'), bytes.get(at + 1)?.wrapping_sub(b'0'));
    (tens < 10 && ones < 10).then(|| u32::from(tens) * 10 + u32::from(ones))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month_index = i64::from(if month > 2 { month - 3 } else { month + 9 });
    let day_of_year = (153 * month_index + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Epoch milliseconds of the common RFC 3339 shapes SDKs send (`2026-01-23T12:00:00Z`, with an
/// optional fraction and a `Z` or `±hh:mm` offset); `None` for anything else, which then goes
/// through chrono's full parser. A property test holds the two equal.
pub fn fast_rfc3339_ms(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let local_seconds = civil_seconds(b, b'T')?;
    let mut at = 19;
    let mut millis = 0i64;
    if b[at] == b'.' {
        at += 1;
        let start = at;
        while at < b.len() && b[at].is_ascii_digit() {
            if at - start < 3 {
                millis = millis * 10 + i64::from(b[at] - b'0');
            }
            at += 1;
        }
        let digits = at - start;
        if digits == 0 || digits > 9 {
            return None;
        }
        for _ in digits..3 {
            millis *= 10;
        }
    }
    let offset_s = match &b[at..] {
        [b'Z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (h, m) = (two_digits(b, at + 1)?, two_digits(b, at + 4)?);
            if h > 23 || m > 59 {
                return None;
            }
            let magnitude = i64::from(h * 3600 + m * 60);
            if *sign == b'+' {
                magnitude
            } else {
                -magnitude
            }
        }
        _ => return None,
    };
    Some((local_seconds - offset_s) * 1000 + millis)
}

/// Seconds since the epoch of `YYYY-MM-DD<sep>hh:mm:ss` in the first 19 bytes of `b`, validated.
fn civil_seconds(b: &[u8], sep: u8) -> Option<i64> {
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[10] != sep || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let year = i64::from(two_digits(b, 0)? * 100 + two_digits(b, 2)?);
    let (month, day) = (two_digits(b, 5)?, two_digits(b, 8)?);
    let (hour, minute, second) = (two_digits(b, 11)?, two_digits(b, 14)?, two_digits(b, 17)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(1..=12).contains(&month)
        || day == 0
        || day > month_days[month as usize - 1]
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + i64::from(hour * 3600 + minute * 60 + second))
}

/// Epoch seconds of ClickHouse's DateTime text `YYYY-MM-DD hh:mm:ss` (UTC), exactly 19 bytes.
pub fn fast_datetime_text_seconds(text: &str) -> Option<i64> {
    if text.len() != 19 {
        return None;
    }
    civil_seconds(text.as_bytes(), b' ')
}

/// The civil date (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// ClickHouse DateTime text of epoch milliseconds (seconds resolution, UTC): `YYYY-MM-DD hh:mm:ss`.
/// Hand-rolled because it runs twice per event on the ingest's hot path; a property test holds it
/// equal to chrono's formatting.
pub struct DateTimeText([u8; 19]);

thread_local! {
    /// The thread's last day (days since the epoch) and its `YYYY-MM-DD`: an event's time and its
    /// arrival, and the events after it, are nearly always on the same day.
    static LAST_DAY: std::cell::Cell<(i64, [u8; 10])> = const { std::cell::Cell::new((i64::MIN, [0; 10])) };
}

/// `value` (below 100) as two ASCII digits.
fn two(value: u32) -> [u8; 2] {
    [b'0' + (value / 10) as u8, b'0' + (value % 10) as u8]
}

/// `YYYY-MM-DD` of a day since 1970-01-01 (years 0..=9999).
fn date_text(days: i64) -> [u8; 10] {
    let (year, month, day) = civil_from_days(days);
    let year = year as u32;
    let ([y0, y1], [y2, y3], [m0, m1], [d0, d1]) = (two(year / 100), two(year % 100), two(month), two(day));
    [y0, y1, y2, y3, b'-', m0, m1, b'-', d0, d1]
}

impl DateTimeText {
    pub fn from_epoch_ms(epoch_ms: i64) -> Self {
        let seconds = epoch_ms.div_euclid(1000).clamp(0, 253_402_300_799);
        let day = seconds.div_euclid(86_400);
        let date = LAST_DAY.with(|last| match last.get() {
            (cached, text) if cached == day => text,
            _ => {
                let text = date_text(day);
                last.set((day, text));
                text
            }
        });
        let of_day = seconds.rem_euclid(86_400) as u32;
        let ([h0, h1], [i0, i1], [s0, s1]) = (two(of_day / 3600), two(of_day / 60 % 60), two(of_day % 60));
        let [a, b, c, d, e, f, g, h, i, j] = date;
        DateTimeText([a, b, c, d, e, f, g, h, i, j, b' ', h0, h1, b':', i0, i1, b':', s0, s1])
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("1970-01-01 00:00:00")
    }
}

/// Formats epoch milliseconds as ClickHouse DateTime text (seconds) in UTC.
pub fn datetime_text(epoch_ms: i64) -> String {
    DateTimeText::from_epoch_ms(epoch_ms).as_str().to_owned()
}

#[cfg(test)]
mod tests {
    /// Times on the same day and on others, in turn, so the thread's cached day is used and
    /// replaced: each as chrono writes it.
    #[test]
    fn datetime_text_is_chronos_across_days() {
        let mut at = 1_796_205_600_123i64;
        for step in 0..20_000i64 {
            // a second, a day, a minute, a day back, a millisecond, 23 hours, 40 days: forward on the whole
            at += [999, 86_400_000 - 1, 37_000, -86_400_000, 1, 3_600_000 * 23, 86_400_000 * 40]
                [(step % 7) as usize];
            let expected = chrono::DateTime::from_timestamp_millis(at)
                .expect("in range")
                .format("%Y-%m-%d %H:%M:%S")
                .to_string();
            assert_eq!(super::DateTimeText::from_epoch_ms(at).as_str(), expected, "{at}");
        }
        assert_eq!(super::DateTimeText::from_epoch_ms(-1).as_str(), "1970-01-01 00:00:00");
        assert_eq!(super::DateTimeText::from_epoch_ms(i64::MAX).as_str(), "9999-12-31 23:59:59");
    }

    #[test]
    fn now_is_chronos_now() {
        let before = chrono::Utc::now().timestamp_millis();
        let now = super::now_ms();
        let after = chrono::Utc::now().timestamp_millis();
        assert!(before <= now && now <= after, "{before} {now} {after}");
    }
}
