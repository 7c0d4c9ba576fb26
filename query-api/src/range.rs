//! The time range of a request: `[from, to)` in UTC from the `from`/`to` query parameters, its
//! defaults and limits, and how responses print instants.

use chrono::{DateTime, Datelike, Duration, DurationRound, Utc};
use serde::Deserialize;

use crate::error::ApiError;

/// Longest range one request may ask for.
pub const MAX_RANGE_DAYS: i64 = 400;

#[derive(Deserialize)]
pub struct RangeParams {
    pub from: Option<String>,
    pub to: Option<String>,
}

/// `[from, to)` in UTC; defaults: from the start of the current month to now (rounded up to the
/// second, which spares ClickHouse a millisecond condition).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// The start of `now`'s calendar month, UTC: the default `from`, and the budget period's start.
pub fn month_start(now: DateTime<Utc>) -> DateTime<Utc> {
    now.date_naive().with_day0(0).and_then(|d| d.and_hms_opt(0, 0, 0)).map_or(now, |d| d.and_utc())
}

/// `t` rounded up to a whole second.
fn up_to_second(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_round_up(Duration::seconds(1)).unwrap_or(t)
}

fn parse_time(name: &str, text: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| ApiError::BadRequest(format!("{name} must be an RFC 3339 time: {e}")))
}

impl Range {
    pub fn from_params(params: &RangeParams, now: DateTime<Utc>) -> Result<Range, ApiError> {
        let to = params.to.as_deref().map(|t| parse_time("to", t)).transpose()?.unwrap_or(up_to_second(now));
        let from =
            params.from.as_deref().map(|t| parse_time("from", t)).transpose()?.unwrap_or(month_start(now));
        if from >= to {
            return Err(ApiError::BadRequest("from must be before to".into()));
        }
        if to - from > Duration::days(MAX_RANGE_DAYS) {
            return Err(ApiError::BadRequest(format!("a range may span at most {MAX_RANGE_DAYS} days")));
        }
        Ok(Range { from, to })
    }

    /// The smallest range of whole UTC hours that contains this one.
    pub fn whole_hours(self) -> Range {
        let hour = Duration::hours(1);
        Range {
            from: self.from.duration_trunc(hour).unwrap_or(self.from),
            to: self.to.duration_round_up(hour).unwrap_or(self.to),
        }
    }
}

/// An instant as responses print it: RFC 3339, UTC, milliseconds.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Epoch milliseconds as `rfc3339` prints them; None when out of chrono's range.
pub fn rfc3339_ms(epoch_ms: u64) -> Option<String> {
    DateTime::from_timestamp_millis(i64::try_from(epoch_ms).ok()?).map(rfc3339)
}

/// USD from nano-dollars, for display; the exact integer is always returned beside it.
pub fn usd(nanos: i64) -> f64 {
    nanos as f64 / 1e9
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    fn params(from: Option<&str>, to: Option<&str>) -> RangeParams {
        RangeParams { from: from.map(str::to_owned), to: to.map(str::to_owned) }
    }

    #[test]
    fn defaults_are_the_month_so_far_rounded_up_to_the_second() {
        let now = at("2026-11-30T12:34:56.789Z");
        let range = Range::from_params(&params(None, None), now).unwrap();
        assert_eq!(range, Range { from: at("2026-11-01T00:00:00Z"), to: at("2026-11-30T12:34:57Z") });
    }

    #[test]
    fn refuses_empty_reversed_too_long_and_unparsable_ranges() {
        let now = at("2026-11-30T00:00:00Z");
        for (from, to) in [
            (Some("2026-11-02T00:00:00Z"), Some("2026-11-02T00:00:00Z")),
            (Some("2026-11-03T00:00:00Z"), Some("2026-11-02T00:00:00Z")),
            (Some("2025-01-01T00:00:00Z"), Some("2026-11-02T00:00:00Z")),
            (Some("yesterday"), None),
            (None, Some("2026-13-01T00:00:00Z")),
        ] {
            assert!(Range::from_params(&params(from, to), now).is_err(), "{from:?}..{to:?}");
        }
        let offset = Range::from_params(&params(Some("2026-11-02T05:30:00+05:30"), None), now).unwrap();
        assert_eq!(offset.from, at("2026-11-02T00:00:00Z"));
    }

    #[test]
    fn whole_hours_cover_the_range() {
        let range = Range { from: at("2026-11-02T10:15:00Z"), to: at("2026-11-02T12:00:00.001Z") };
        assert_eq!(
            range.whole_hours(),
            Range { from: at("2026-11-02T10:00:00Z"), to: at("2026-11-02T13:00:00Z") }
        );
        let whole = Range { from: at("2026-11-02T10:00:00Z"), to: at("2026-11-02T12:00:00Z") };
        assert_eq!(whole.whole_hours(), whole);
    }
}
