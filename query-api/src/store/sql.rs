//! SQL text with its bound values, and the conditions that select raw rows by time. Values are
//! always bound (`?`), never pasted; only fixed identifiers and the table names from the
//! configuration are part of the text.

use chrono::{DateTime, Utc};

/// A value bound to a `?` of the SQL, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bind {
    Text(String),
    Number(u64),
}

#[derive(Debug)]
pub struct Sql {
    pub text: String,
    pub binds: Vec<Bind>,
}

impl Sql {
    pub fn query(&self, client: &clickhouse::Client) -> clickhouse::query::Query {
        let mut query = client.query(&self.text);
        for bind in &self.binds {
            query = match bind {
                Bind::Text(text) => query.bind(text.as_str()),
                Bind::Number(number) => query.bind(*number),
            };
        }
        query
    }
}

/// Epoch seconds of an instant at or after 1970.
pub fn seconds(t: DateTime<Utc>) -> u64 {
    u64::try_from(t.timestamp()).unwrap_or(0)
}

/// An event's time in epoch milliseconds, from its two columns.
pub const EVENT_MS: &str = "(toUInt64(timestamp) * 1000 + timestamp_ms)";

/// Which raw rows to read: conditions on the sort key's `timestamp` in seconds (so ClickHouse
/// reads only those granules), refined by `timestamp_ms` only where a bound falls inside a second.
/// ClickHouse 18.16 spends most of a small query's CPU analysing its expressions, so the text is
/// kept as short as exactness allows.
#[derive(Debug)]
pub struct RawBounds {
    text: String,
    binds: Vec<u64>,
}

impl RawBounds {
    /// The rows of the non-empty intervals among `intervals` (each `[from, to)`, at or after
    /// 1970); no rows at all when every interval is empty.
    pub fn of(intervals: &[(DateTime<Utc>, DateTime<Utc>)]) -> RawBounds {
        let mut binds = Vec::new();
        let parts: Vec<String> = intervals
            .iter()
            .filter(|(from, to)| from < to)
            .map(|(from, to)| interval(*from, *to, &mut binds))
            .collect();
        let text = match parts.len() {
            0 => "0".to_owned(),
            1 => parts.into_iter().next().unwrap_or_default(),
            _ => format!("({})", parts.join(") OR (")),
        };
        RawBounds { text, binds }
    }

    /// `AND (<condition>)`, to append to a WHERE clause.
    pub fn condition(&self) -> String {
        format!(" AND ({})", self.text)
    }

    pub fn binds(&self) -> impl Iterator<Item = Bind> + '_ {
        self.binds.iter().map(|n| Bind::Number(*n))
    }
}

/// `[from, to)` on (timestamp, timestamp_ms).
fn interval(from: DateTime<Utc>, to: DateTime<Utc>, binds: &mut Vec<u64>) -> String {
    let lower = match from.timestamp_subsec_millis() {
        0 => {
            binds.push(seconds(from));
            "timestamp >= toDateTime(?)"
        }
        from_ms => {
            binds.extend([seconds(from), seconds(from), u64::from(from_ms)]);
            "timestamp >= toDateTime(?) AND (timestamp > toDateTime(?) OR timestamp_ms >= ?)"
        }
    };
    let upper = match to.timestamp_subsec_millis() {
        0 => {
            binds.push(seconds(to));
            "timestamp < toDateTime(?)"
        }
        to_ms => {
            binds.extend([seconds(to), seconds(to), u64::from(to_ms)]);
            "timestamp <= toDateTime(?) AND (timestamp < toDateTime(?) OR timestamp_ms < ?)"
        }
    };
    format!("{lower} AND {upper}")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn whole_seconds_need_no_millisecond_condition() {
        let bounds = RawBounds::of(&[(at("2026-11-01T00:00:00Z"), at("2026-11-01T01:00:00Z"))]);
        assert_eq!(bounds.text, "timestamp >= toDateTime(?) AND timestamp < toDateTime(?)");
        assert_eq!(bounds.binds, [1_793_491_200, 1_793_494_800]);
    }

    #[test]
    fn bounds_inside_a_second_refine_by_milliseconds() {
        let bounds = RawBounds::of(&[(at("2026-11-01T00:00:00.250Z"), at("2026-11-01T00:00:01.500Z"))]);
        assert_eq!(
            bounds.text,
            "timestamp >= toDateTime(?) AND (timestamp > toDateTime(?) OR timestamp_ms >= ?) AND \
             timestamp <= toDateTime(?) AND (timestamp < toDateTime(?) OR timestamp_ms < ?)"
        );
        assert_eq!(bounds.binds, [1_793_491_200, 1_793_491_200, 250, 1_793_491_201, 1_793_491_201, 500]);
    }

    #[test]
    fn empty_intervals_are_left_out_and_none_selects_nothing() {
        let (a, b, c) = (at("2026-11-01T00:00:00Z"), at("2026-11-01T01:00:00Z"), at("2026-11-01T02:00:00Z"));
        assert_eq!(RawBounds::of(&[(a, a), (b, a)]).text, "0");
        let two = RawBounds::of(&[(a, b), (b, b), (b, c)]);
        assert!(two.text.starts_with("(timestamp") && two.text.contains(") OR ("), "{}", two.text);
        assert_eq!(two.binds.len(), 4);
    }
}
