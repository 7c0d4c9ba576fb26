//! The one way the query API aggregates: a subquery of aggregate *states* per (hour, provider,
//! model, service), which each endpoint merges the way it needs.
//!
//! For an org, whole hours come from `rollup_hourly` and the partial hours at the two ends of the
//! range from the raw table (states built on the fly with the same functions the rollup's view
//! uses), so every range is exact to the millisecond and costs a rollup read plus two partial
//! hours. For one user of an org (the rollups have no user column) everything comes from the raw
//! table, still inside the org's range of the sort key. Either way the org is a bound parameter
//! taken from the API key, never from the request.

use chrono::{DateTime, Duration, DurationRound, Utc};

use crate::costs::Range;
use crate::error::ApiError;
use crate::AppState;

/// An aggregate the subquery carries: its rollup column and how to build it from raw rows.
#[derive(Clone, Copy)]
pub struct Agg {
    pub column: &'static str,
    raw: &'static str,
}

pub const EVENTS: Agg = Agg { column: "events", raw: "countState()" };
pub const ERRORS: Agg = Agg { column: "errors", raw: "sumState(toUInt64(status = 'error'))" };
pub const PROMPT_TOKENS: Agg = Agg { column: "prompt_tokens_sum", raw: "sumState(toUInt64(prompt_tokens))" };
pub const COMPLETION_TOKENS: Agg =
    Agg { column: "completion_tokens_sum", raw: "sumState(toUInt64(completion_tokens))" };
pub const TOTAL_TOKENS: Agg = Agg { column: "total_tokens_sum", raw: "sumState(toUInt64(total_tokens))" };
pub const COST: Agg = Agg { column: "cost_nanos_sum", raw: "sumState(cost_nanos)" };
pub const INPUT_BYTES: Agg = Agg { column: "input_bytes_sum", raw: "sumState(input_bytes)" };
pub const OUTPUT_BYTES: Agg = Agg { column: "output_bytes_sum", raw: "sumState(output_bytes)" };
pub const LATENCY: Agg =
    Agg { column: "latency_quantiles", raw: "quantilesTimingState(0.5, 0.95, 0.99)(latency_ms)" };

/// Merge expressions for the outer query, named like the Rust fields that read them.
pub const M_EVENTS: &str = "toUInt64(countMerge(events)) AS requests";
pub const M_ERRORS: &str = "sumMerge(errors) AS errors";
pub const M_PROMPT: &str = "sumMerge(prompt_tokens_sum) AS prompt_tokens";
pub const M_COMPLETION: &str = "sumMerge(completion_tokens_sum) AS completion_tokens";
pub const M_TOKENS: &str = "sumMerge(total_tokens_sum) AS tokens";
pub const M_COST: &str = "sumMerge(cost_nanos_sum) AS cost_nanos";
pub const M_INPUT_BYTES: &str = "sumMerge(input_bytes_sum) AS input_bytes";
pub const M_OUTPUT_BYTES: &str = "sumMerge(output_bytes_sum) AS output_bytes";
pub const M_LATENCY: &str = "quantilesTimingMerge(0.5, 0.95, 0.99)(latency_quantiles) AS latency";

/// Whose rows, and which of them.
pub struct Scope<'a> {
    pub org_id: &'a str,
    pub user_id: Option<&'a str>,
    pub provider: Option<&'a str>,
    pub model: Option<&'a str>,
}

/// A value bound to a `?` of the SQL, in order.
pub enum Bind {
    Text(String),
    Number(u64),
}

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

fn ms(t: DateTime<Utc>) -> u64 {
    u64::try_from(t.timestamp_millis()).unwrap_or(0)
}

fn seconds(t: DateTime<Utc>) -> u64 {
    u64::try_from(t.timestamp()).unwrap_or(0)
}

/// An event's time in epoch milliseconds, from its two columns.
pub(crate) const EVENT_MS: &str = "(toUInt64(timestamp) * 1000 + timestamp_ms)";

/// Which raw rows to read: a condition on the sort key's `timestamp` in seconds (so ClickHouse
/// reads only those granules) and the exact condition in milliseconds, each with its binds.
pub(crate) struct RawBounds {
    seconds: &'static str,
    second_binds: Vec<u64>,
    ms: String,
    ms_binds: Vec<u64>,
}

impl RawBounds {
    /// `AND (<seconds>) AND (<ms>)`, to append to a WHERE clause.
    pub(crate) fn condition(&self) -> String {
        format!(" AND ({}) AND ({})", self.seconds, self.ms)
    }

    pub(crate) fn binds(&self) -> impl Iterator<Item = Bind> + '_ {
        self.second_binds.iter().chain(&self.ms_binds).map(|n| Bind::Number(*n))
    }
}

/// All of [from, to): what a user scope reads from the raw table.
pub(crate) fn whole_range(range: &Range) -> RawBounds {
    RawBounds {
        seconds: "timestamp >= toDateTime(?) AND timestamp <= toDateTime(?)",
        second_binds: vec![seconds(range.from), seconds(range.to)],
        ms: format!("{EVENT_MS} >= ? AND {EVENT_MS} < ?"),
        ms_binds: vec![ms(range.from), ms(range.to)],
    }
}

/// For an org scope: the whole hours [first, last) the rollup answers, and the partial edge
/// hours left to the raw table.
fn split_hours(range: &Range) -> (DateTime<Utc>, DateTime<Utc>, RawBounds) {
    let hour = Duration::hours(1);
    let first = range.from.duration_round_up(hour).unwrap_or(range.from).min(range.to);
    let last = range.to.duration_trunc(hour).unwrap_or(range.to).max(first);
    let edges = RawBounds {
        seconds: "(timestamp >= toDateTime(?) AND timestamp < toDateTime(?)) \
                  OR (timestamp >= toDateTime(?) AND timestamp <= toDateTime(?))",
        second_binds: vec![seconds(range.from), seconds(first), seconds(last), seconds(range.to)],
        ms: format!("({EVENT_MS} >= ? AND {EVENT_MS} < ?) OR ({EVENT_MS} >= ? AND {EVENT_MS} < ?)"),
        ms_binds: vec![ms(range.from), ms(first), ms(last), ms(range.to)],
    };
    (first, last, edges)
}

/// What one source (the rollup, or the raw table) selects and groups by; an empty `group` means
/// no GROUP BY.
#[derive(Clone, Copy)]
struct Source<'a> {
    select: &'a str,
    group: &'a str,
}

/// The queries that read a scope and range: for a user, the raw rows of the whole range; for an
/// org, the rollup's whole hours and the raw rows of the edge hours, in that order.
fn source_queries(state: &AppState, scope: &Scope, range: &Range, rollup: Source, raw: Source) -> Vec<Sql> {
    let events = state.clickhouse.table("events");
    let table = state.clickhouse.table("rollup_hourly");
    let filters: String = [("provider", scope.provider), ("model", scope.model)]
        .iter()
        .filter(|(_, value)| value.is_some())
        .map(|(column, _)| format!(" AND {column} = ?"))
        .collect();
    let filter_binds =
        || [scope.provider, scope.model].into_iter().flatten().map(|value| Bind::Text(value.to_owned()));
    let group_by = |group: &str| if group.is_empty() { String::new() } else { format!(" GROUP BY {group}") };
    let raw_rows = |bounds: RawBounds| {
        let mut binds = vec![Bind::Text(scope.org_id.to_owned())];
        let mut text = format!("SELECT {} FROM {events} WHERE org_id = ?", raw.select);
        if let Some(user) = scope.user_id {
            text.push_str(" AND user_id = ?");
            binds.push(Bind::Text(user.to_owned()));
        }
        text.push_str(&format!("{}{filters}{}", bounds.condition(), group_by(raw.group)));
        binds.extend(bounds.binds());
        binds.extend(filter_binds());
        Sql { text, binds }
    };
    if scope.user_id.is_some() {
        return vec![raw_rows(whole_range(range))];
    }
    let (first_hour, last_hour, edge_bounds) = split_hours(range);
    let mut binds = vec![
        Bind::Text(scope.org_id.to_owned()),
        Bind::Number(seconds(first_hour)),
        Bind::Number(seconds(last_hour)),
    ];
    binds.extend(filter_binds());
    let whole_hours = Sql {
        text: format!(
            "SELECT {} FROM {table} WHERE org_id = ? AND hour >= toDateTime(?) AND hour < toDateTime(?){filters}{}",
            rollup.select,
            group_by(rollup.group)
        ),
        binds,
    };
    vec![whole_hours, raw_rows(edge_bounds)]
}

/// `SELECT <outer> FROM (<states of scope in range>) <tail>`: `outer` merges the `aggs` states and
/// may use the key columns hour, provider, model and service.
pub fn over_states(
    state: &AppState,
    scope: &Scope,
    range: &Range,
    aggs: &[Agg],
    outer: &str,
    tail: &str,
) -> Sql {
    let columns = aggs.iter().map(|a| a.column).collect::<Vec<_>>().join(", ");
    let raw_states = aggs.iter().map(|a| format!("{} AS {}", a.raw, a.column)).collect::<Vec<_>>().join(", ");
    let parts = source_queries(
        state,
        scope,
        range,
        Source { select: &format!("hour, provider, model, service, {columns}"), group: "" },
        Source {
            select: &format!("toStartOfHour(timestamp) AS hour, provider, model, service, {raw_states}"),
            group: "hour, provider, model, service",
        },
    );
    let inner = parts.iter().map(|part| part.text.as_str()).collect::<Vec<_>>().join(" UNION ALL ");
    Sql {
        text: format!("SELECT {outer} FROM ({inner}) {tail}"),
        binds: parts.into_iter().flat_map(|part| part.binds).collect(),
    }
}

/// Plain sums (no quantiles) of a scope and range, as one query per source instead of one query
/// merging states: for an org, the rollup's whole hours and the raw edge hours, run concurrently
/// (ClickHouse 18.16 spends more on a UNION ALL of states than on the two reads). Both queries
/// return the same columns (`keys`, then the aggregates under the same aliases and types), so the
/// caller adds up the rows of equal keys. `rollup_aggs` are -Merge expressions over the rollup's
/// columns, `raw_aggs` the same aggregates over raw rows.
pub async fn sums<T>(
    state: &AppState,
    scope: &Scope<'_>,
    range: &Range,
    keys: Keys<'_>,
    rollup_aggs: &str,
    raw_aggs: &str,
) -> Result<Vec<T>, clickhouse::error::Error>
where
    T: clickhouse::RowOwned + clickhouse::RowRead,
{
    let select =
        |keys: &str, aggs: &str| if keys.is_empty() { aggs.to_owned() } else { format!("{keys}, {aggs}") };
    let parts = source_queries(
        state,
        scope,
        range,
        Source { select: &select(keys.rollup, rollup_aggs), group: keys.group },
        Source { select: &select(keys.raw, raw_aggs), group: keys.group },
    );
    let client = state.client();
    let results =
        futures::future::try_join_all(parts.iter().map(|sql| sql.query(&client).fetch_all::<T>())).await?;
    Ok(results.into_iter().flatten().collect())
}

/// The grouping keys of `sums`: as selected from the rollup, as selected from raw rows (where the
/// hour is `toStartOfHour(timestamp)`), and the GROUP BY list (their aliases).
#[derive(Clone, Copy)]
pub struct Keys<'a> {
    pub rollup: &'a str,
    pub raw: &'a str,
    pub group: &'a str,
}

impl<'a> Keys<'a> {
    /// Plain columns both tables have, e.g. "provider, model"; "" for no grouping.
    pub fn columns(columns: &'a str) -> Keys<'a> {
        Keys { rollup: columns, raw: columns, group: columns }
    }
}

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

/// USD from nano-dollars, for display; the exact integer is always returned beside it.
pub fn usd(nanos: i64) -> f64 {
    nanos as f64 / 1e9
}
