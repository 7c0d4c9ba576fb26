//! Calendar months (UTC) and when one is closed: no event the ingest can still accept may land in
//! it. The ingest accepts events up to `MAX_EVENT_AGE_MS` old, and an accepted event reaches
//! ClickHouse after the consumer's lag; so a month that ended at `end` is closed from
//! `end + MAX_EVENT_AGE + lag margin` on. Selecting a month by event time before then would miss
//! rows still on their way (the exporters of other products lose or duplicate rows exactly there).

use std::fmt;

use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};
use tally_schemas::limits::MAX_EVENT_AGE_MS;

/// A calendar month, UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month {
    pub year: i32,
    /// 1..=12
    pub month: u32,
}

impl Month {
    pub fn of(t: DateTime<Utc>) -> Month {
        Month { year: t.year(), month: t.month() }
    }

    /// From ClickHouse's partition id of `toYYYYMM(timestamp)`, e.g. `202610`.
    pub fn from_partition(id: &str) -> Option<Month> {
        let n: u32 = id.parse().ok()?;
        let month = Month { year: i32::try_from(n / 100).ok()?, month: n % 100 };
        (1..=12).contains(&month.month).then_some(month)
    }

    /// `2026-10`.
    pub fn parse(text: &str) -> Option<Month> {
        let (year, month) = text.split_once('-')?;
        let month = Month { year: year.parse().ok()?, month: month.parse().ok()? };
        ((1..=12).contains(&month.month) && year.len() == 4 && text.len() == 7).then_some(month)
    }

    /// The partition of `tally.events` that holds it (`toYYYYMM`).
    pub fn partition(self) -> u32 {
        u32::try_from(self.year).unwrap_or(0) * 100 + self.month
    }

    pub fn start(self) -> DateTime<Utc> {
        NaiveDate::from_ymd_opt(self.year, self.month, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map_or(DateTime::UNIX_EPOCH, |d| d.and_utc())
    }

    pub fn next(self) -> Month {
        if self.month == 12 {
            Month { year: self.year + 1, month: 1 }
        } else {
            Month { year: self.year, month: self.month + 1 }
        }
    }

    /// The first instant after the month.
    pub fn end(self) -> DateTime<Utc> {
        self.next().start()
    }

    /// From when no accepted event can still land in it: its end, plus the oldest event the ingest
    /// accepts, plus `lag_margin` for events accepted but not yet stored.
    pub fn closed_at(self, lag_margin: Duration) -> DateTime<Utc> {
        self.end() + Duration::milliseconds(MAX_EVENT_AGE_MS) + lag_margin
    }

    pub fn is_closed(self, now: DateTime<Utc>, lag_margin: Duration) -> bool {
        now >= self.closed_at(lag_margin)
    }

    /// The months before `now`'s to keep in ClickHouse (`hot` of them, the current one not counted)
    /// end before the returned month: months before it may be dropped once archived.
    pub fn first_hot(now: DateTime<Utc>, hot: u32) -> Month {
        (0..hot).fold(Month::of(now), |m, _| m.previous())
    }

    pub fn previous(self) -> Month {
        if self.month == 1 {
            Month { year: self.year - 1, month: 12 }
        } else {
            Month { year: self.year, month: self.month - 1 }
        }
    }

    /// The month of a key under its folder (`events/year=2026/month=10/…`).
    pub fn of_key(key: &str) -> Option<Month> {
        let mut parts = key.strip_prefix("events/")?.split('/');
        let (year, month) = (parts.next()?.strip_prefix("year=")?, parts.next()?.strip_prefix("month=")?);
        Month::parse(&format!("{year}-{month}"))
    }

    /// The Hive-style folder of its files: `events/year=2026/month=10/`.
    pub fn prefix(self) -> String {
        format!("events/year={}/month={:02}/", self.year, self.month)
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{:02}", self.year, self.month)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_under_a_month_folder_name_their_month() {
        assert_eq!(Month::of_key("events/year=2026/month=08/dropped.json"), Month::parse("2026-08"));
        assert_eq!(Month::of_key("events/year=2026/month=08"), Month::parse("2026-08"));
        assert_eq!(Month::of_key("dead-letters/date=2026-08-01/part-00000.jsonl.zst"), None);
        assert_eq!(crate::manifest::version_of("events/year=2026/month=08/manifest-v0003.json"), Some(3));
        assert_eq!(crate::manifest::version_of("events/year=2026/month=08/v0001-part-00000.parquet"), None);
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn months_parse_print_and_step() {
        let oct = Month::parse("2026-10").unwrap();
        assert_eq!(oct, Month::from_partition("202610").unwrap());
        assert_eq!((oct.to_string(), oct.partition()), ("2026-10".into(), 202610));
        assert_eq!(Month::parse("2026-12").unwrap().next(), Month::parse("2027-01").unwrap());
        assert_eq!(Month::parse("2027-01").unwrap().previous(), Month::parse("2026-12").unwrap());
        assert_eq!(oct.prefix(), "events/year=2026/month=10/");
        for bad in ["2026-13", "2026-1", "26-10", "2026/10", ""] {
            assert_eq!(Month::parse(bad), None, "{bad}");
        }
        assert_eq!(Month::from_partition("202600"), None);
    }

    #[test]
    fn a_month_closes_35_days_and_the_margin_after_its_end() {
        let oct = Month::parse("2026-10").unwrap();
        let margin = Duration::hours(24);
        assert_eq!(oct.end(), at("2026-11-01T00:00:00Z"));
        // 35 days after Nov 1 is Dec 6, plus a day of margin.
        assert_eq!(oct.closed_at(margin), at("2026-12-07T00:00:00Z"));
        assert!(!oct.is_closed(at("2026-12-06T23:59:59Z"), margin));
        assert!(oct.is_closed(at("2026-12-07T00:00:00Z"), margin));
        // The last instant an October event can be accepted (35 days old) is just before Dec 6;
        // the margin covers its way to ClickHouse.
        let oldest = |accepted: &str| Month::of(at(accepted) - Duration::milliseconds(MAX_EVENT_AGE_MS));
        assert_eq!(oldest("2026-12-05T23:59:59.999Z"), oct);
        assert_eq!(oldest("2026-12-06T00:00:00Z"), oct.next());
        // The current month never is.
        assert!(!Month::of(at("2026-11-30T12:00:00Z")).is_closed(at("2026-11-30T12:00:00Z"), margin));
    }

    #[test]
    fn the_hot_months_count_back_from_the_current_one() {
        let now = at("2027-02-15T00:00:00Z");
        assert_eq!(Month::first_hot(now, 0), Month::parse("2027-02").unwrap());
        assert_eq!(Month::first_hot(now, 3), Month::parse("2026-11").unwrap());
    }
}
