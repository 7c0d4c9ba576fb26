//! Typed query parameters shared by the handlers: checked text filters and the timeseries'
//! bucket, grouping and time zone. Each parser answers a 400 that says what is accepted.

use chrono_tz::Tz;

use crate::error::ApiError;

/// Checks an optional text filter from a query string: bounded length, no control characters.
pub fn text_param<'a>(
    name: &str,
    value: &'a Option<String>,
    max: usize,
) -> Result<Option<&'a str>, ApiError> {
    match value.as_deref() {
        None => Ok(None),
        Some("") => Err(ApiError::BadRequest(format!("{name} must not be empty"))),
        Some(v) if v.len() > max => Err(ApiError::BadRequest(format!("{name} is longer than {max} bytes"))),
        Some(v) if v.chars().any(char::is_control) => {
            Err(ApiError::BadRequest(format!("{name} must not contain control characters")))
        }
        Some(v) => Ok(Some(v)),
    }
}

/// The width of a timeseries point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bucket {
    /// UTC hours.
    Hour,
    /// Calendar days in the request's time zone.
    Day,
}

impl Bucket {
    pub fn parse(text: Option<&str>) -> Result<Bucket, ApiError> {
        match text.unwrap_or("hour") {
            "hour" => Ok(Bucket::Hour),
            "day" => Ok(Bucket::Day),
            other => Err(ApiError::BadRequest(format!("bucket must be hour or day, not {other:?}"))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Bucket::Hour => "hour",
            Bucket::Day => "day",
        }
    }
}

/// The dimension a timeseries is split by: a column both the raw table and the rollup have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    Model,
    Service,
    Provider,
}

impl GroupBy {
    pub fn parse(text: Option<&str>) -> Result<Option<GroupBy>, ApiError> {
        match text {
            None => Ok(None),
            Some("model") => Ok(Some(GroupBy::Model)),
            Some("service") => Ok(Some(GroupBy::Service)),
            Some("provider") => Ok(Some(GroupBy::Provider)),
            Some(other) => Err(ApiError::BadRequest(format!(
                "groupBy must be model, service or provider, not {other:?}"
            ))),
        }
    }

    /// Its column (a fixed identifier, never request text).
    pub fn column(self) -> &'static str {
        match self {
            GroupBy::Model => "model",
            GroupBy::Service => "service",
            GroupBy::Provider => "provider",
        }
    }
}

/// An IANA time zone from the tz database (`Europe/Paris`, `Asia/Kolkata`); UTC by default.
pub fn time_zone(text: Option<&str>) -> Result<Tz, ApiError> {
    match text {
        None => Ok(Tz::UTC),
        Some(name) if name.len() <= 64 => name.parse::<Tz>().map_err(|_| unknown_zone(name)),
        Some(name) => Err(unknown_zone(name)),
    }
}

fn unknown_zone(name: &str) -> ApiError {
    let shown: String = name.chars().take(64).collect();
    ApiError::BadRequest(format!(
        "unknown time zone {shown:?}: tz must be an IANA time zone name such as Europe/Paris"
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn buckets_and_groupings_parse_their_names_only() {
        assert_eq!(Bucket::parse(None).unwrap(), Bucket::Hour);
        assert_eq!(Bucket::parse(Some("day")).unwrap(), Bucket::Day);
        assert!(Bucket::parse(Some("week")).is_err());
        assert_eq!(GroupBy::parse(Some("service")).unwrap(), Some(GroupBy::Service));
        assert_eq!(GroupBy::parse(None).unwrap(), None);
        assert!(GroupBy::parse(Some("model; DROP TABLE x")).is_err());
    }

    #[test]
    fn time_zones_are_names_of_the_tz_database() {
        assert_eq!(time_zone(None).unwrap(), Tz::UTC);
        assert_eq!(time_zone(Some("Asia/Kolkata")).unwrap(), Tz::Asia__Kolkata);
        for bad in ["Mars/Olympus", "x'; DROP TABLE", "", "../../etc/passwd"] {
            assert!(time_zone(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn text_filters_are_bounded_and_printable() {
        assert_eq!(text_param("model", &Some("gpt-4o".into()), 10).unwrap(), Some("gpt-4o"));
        assert_eq!(text_param("model", &None, 10).unwrap(), None);
        for bad in ["", "0123456789a", "a\nb"] {
            assert!(text_param("model", &Some(bad.into()), 10).is_err(), "{bad:?}");
        }
    }
}
