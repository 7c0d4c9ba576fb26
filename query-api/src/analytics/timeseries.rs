//! `timeseries`: requests, errors, tokens, cost and latency per UTC hour or per local day,
//! optionally split by model, service or provider.

use chrono::DateTime;
use chrono_tz::Tz;
use serde::Serialize;

use super::{request, Params, Percentiles};
use crate::error::ApiError;
use crate::params::{time_zone, Bucket, GroupBy};
use crate::range::{rfc3339, usd};
use crate::store::reads::Point;
use crate::AppState;

/// Hour buckets cover at most this many days (a point per hour and group).
const MAX_HOURLY_DAYS: i64 = 93;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TimePoint {
    /// Bucket start: RFC 3339 for hours, `YYYY-MM-DD` (in `tz`) for days.
    time: String,
    /// The group's value (model, service or provider), or "" when not grouped.
    key: String,
    requests: u64,
    errors: u64,
    tokens: u64,
    cost: f64,
    cost_nanos: i64,
    latency_ms: Option<Percentiles>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Timeseries {
    from: String,
    to: String,
    bucket: &'static str,
    group_by: Option<&'static str>,
    tz: String,
    points: Vec<TimePoint>,
}

/// The bucket, grouping and zone of a request, checked together.
fn shape(params: &Params) -> Result<(Bucket, Option<GroupBy>, Tz), ApiError> {
    let bucket = Bucket::parse(params.bucket.as_deref())?;
    let group_by = GroupBy::parse(params.group_by.as_deref())?;
    let tz = time_zone(params.tz.as_deref())?;
    if bucket == Bucket::Hour && tz != Tz::UTC {
        return Err(ApiError::BadRequest("tz applies to day buckets; hour buckets are UTC".into()));
    }
    Ok((bucket, group_by, tz))
}

/// In time order, then key: hour buckets by their epoch seconds (comparing the RFC 3339 texts of
/// 700 points cost a quarter of the endpoint's CPU), day buckets by their ISO dates.
fn in_order(points: Vec<Point>, bucket: Bucket) -> Vec<TimePoint> {
    let mut points: Vec<(i64, Point)> = points
        .into_iter()
        .map(|p| (if bucket == Bucket::Hour { p.bucket.parse::<i64>().unwrap_or(i64::MAX) } else { 0 }, p))
        .collect();
    points.sort_unstable_by(|(ta, a), (tb, b)| {
        ta.cmp(tb).then_with(|| a.bucket.cmp(&b.bucket)).then_with(|| a.key.cmp(&b.key))
    });
    points
        .into_iter()
        .map(|(seconds, p)| TimePoint {
            time: match bucket {
                Bucket::Hour => DateTime::from_timestamp(seconds, 0).map_or(p.bucket.clone(), rfc3339),
                Bucket::Day => p.bucket.clone(),
            },
            key: p.key,
            latency_ms: Percentiles::from(&p.latency, p.requests),
            requests: p.requests,
            errors: p.errors,
            tokens: p.tokens,
            cost: usd(p.cost_nanos),
            cost_nanos: p.cost_nanos,
        })
        .collect()
}

pub(super) async fn timeseries(
    state: AppState,
    org_id: &str,
    params: Params,
    path_user: Option<&str>,
) -> Result<Timeseries, ApiError> {
    let request = request(org_id, &params, path_user)?;
    let (bucket, group_by, tz) = shape(&params)?;
    if bucket == Bucket::Hour
        && request.range.to - request.range.from > chrono::Duration::days(MAX_HOURLY_DAYS)
    {
        return Err(ApiError::BadRequest(format!(
            "hour buckets cover at most {MAX_HOURLY_DAYS} days; use bucket=day"
        )));
    }
    let points = state
        .store()
        .timeseries(&request.scope, &request.range, bucket, group_by, tz)
        .await
        // A zone of the tz database that this ClickHouse's does not have: code 1000 (a Poco
        // exception) on 18.16, 36 (BAD_ARGUMENTS) on current versions.
        .map_err(|error| match &error {
            ApiError::Storage(ch)
                if tz != Tz::UTC && matches!(tally_common::ch::error_code(ch), Some(1000 | 36)) =>
            {
                ApiError::BadRequest(format!(
                    "time zone {:?} is not known to this ClickHouse server; use another name for it",
                    tz.name()
                ))
            }
            _ => error,
        })?;
    Ok(Timeseries {
        from: rfc3339(request.range.from),
        to: rfc3339(request.range.to),
        bucket: bucket.as_str(),
        group_by: group_by.map(GroupBy::column),
        tz: tz.name().to_owned(),
        points: in_order(points, bucket),
    })
}
