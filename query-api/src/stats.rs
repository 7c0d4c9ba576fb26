//! How the query API aggregates a scope (an org, or one user of it) over a time range.
//!
//! `sums`: plain sums, exact to the millisecond: for an org, whole hours from `rollup_hourly` and
//! the partial hours at the two ends of the range from the raw table, as two concurrent queries
//! whose rows the caller adds up. `over_states`: anything with quantile states, in one query: from
//! the rollup when an org's range is whole hours (the analytics ask for whole hours), else from
//! raw rows with states built by the same functions the rollup's view uses. For one user of an
//! org (the rollups have no user column) both read the raw table, inside the org's range of the
//! sort key. Either way the org is a bound parameter taken from the API key, never from the
//! request.

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

fn seconds(t: DateTime<Utc>) -> u64 {
    u64::try_from(t.timestamp()).unwrap_or(0)
}

/// An event's time in epoch milliseconds, from its two columns.
pub(crate) const EVENT_MS: &str = "(toUInt64(timestamp) * 1000 + timestamp_ms)";

/// Which raw rows to read: conditions on the sort key's `timestamp` in seconds (so ClickHouse
/// reads only those granules), refined by `timestamp_ms` only where a bound falls inside a second.
/// ClickHouse 18.16 spends most of a small query's CPU analysing its expressions, so the text is
/// kept as short as exactness allows.
pub(crate) struct RawBounds {
    text: String,
    binds: Vec<u64>,
}

impl RawBounds {
    /// The rows of the non-empty intervals among `intervals` (each `[from, to)`), or None when all
    /// are empty.
    fn of(intervals: &[(DateTime<Utc>, DateTime<Utc>)]) -> Option<RawBounds> {
        let mut binds = Vec::new();
        let parts: Vec<String> = intervals
            .iter()
            .filter(|(from, to)| from < to)
            .map(|(from, to)| interval(*from, *to, &mut binds))
            .collect();
        match parts.len() {
            0 => None,
            1 => Some(RawBounds { text: parts.into_iter().next().unwrap_or_default(), binds }),
            _ => Some(RawBounds { text: format!("({})", parts.join(") OR (")), binds }),
        }
    }

    /// `AND (<condition>)`, to append to a WHERE clause.
    pub(crate) fn condition(&self) -> String {
        format!(" AND ({})", self.text)
    }

    pub(crate) fn binds(&self) -> impl Iterator<Item = Bind> + '_ {
        self.binds.iter().map(|n| Bind::Number(*n))
    }
}

/// `[from, to)` on (timestamp, timestamp_ms); both bounds at or after 1970.
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

/// All of [from, to): what a user scope reads from the raw table.
pub(crate) fn whole_range(range: &Range) -> RawBounds {
    RawBounds::of(&[(epoch_or_later(range.from), epoch_or_later(range.to))])
        .unwrap_or(RawBounds { text: "0".into(), binds: Vec::new() })
}

/// No event is older than 1970 (the ingest refuses them), so earlier bounds mean 1970.
fn epoch_or_later(t: DateTime<Utc>) -> DateTime<Utc> {
    t.max(DateTime::UNIX_EPOCH)
}

/// For an org scope: the whole hours [first, last) the rollup answers, and the partial edge
/// hours left to the raw table (None when the range starts and ends on whole hours).
fn split_hours(range: &Range) -> (DateTime<Utc>, DateTime<Utc>, Option<RawBounds>) {
    let hour = Duration::hours(1);
    let (from, to) = (epoch_or_later(range.from), epoch_or_later(range.to));
    let first = from.duration_round_up(hour).unwrap_or(from).min(to);
    let last = to.duration_trunc(hour).unwrap_or(to).max(first);
    (first, last, RawBounds::of(&[(from, first), (last, to)]))
}

/// What one source (the rollup, or the raw table) selects and groups by; an empty `group` means
/// no GROUP BY.
#[derive(Clone, Copy)]
struct Source<'a> {
    select: &'a str,
    group: &'a str,
}

/// Where a scope's range is read from: the rollup's whole hours [first, last) and/or raw rows.
/// At least one of the two is set.
struct Plan {
    whole_hours: Option<(DateTime<Utc>, DateTime<Utc>)>,
    raw: Option<RawBounds>,
}

impl Plan {
    /// For a user, the raw rows of the whole range (the rollups have no user column); for an org,
    /// the rollup's whole hours and the raw rows of the partial edge hours.
    fn new(scope: &Scope, range: &Range) -> Plan {
        if scope.user_id.is_some() {
            return Plan { whole_hours: None, raw: Some(whole_range(range)) };
        }
        let (first, last, edges) = split_hours(range);
        let whole_hours = (first < last).then_some((first, last));
        let raw = if whole_hours.is_none() && edges.is_none() { Some(whole_range(range)) } else { edges };
        Plan { whole_hours, raw }
    }
}

fn group_by(group: &str) -> String {
    if group.is_empty() {
        String::new()
    } else {
        format!(" GROUP BY {group}")
    }
}

fn filters(scope: &Scope) -> (String, Vec<Bind>) {
    let mut text = String::new();
    let mut binds = Vec::new();
    for (column, value) in [("provider", scope.provider), ("model", scope.model)] {
        if let Some(value) = value {
            text.push_str(&format!(" AND {column} = ?"));
            binds.push(Bind::Text(value.to_owned()));
        }
    }
    (text, binds)
}

/// The rollup's whole hours [first, last) of an org scope.
fn rollup_query(
    state: &AppState,
    scope: &Scope,
    (first, last): (DateTime<Utc>, DateTime<Utc>),
    source: Source,
) -> Sql {
    let (filters, filter_binds) = filters(scope);
    let mut binds =
        vec![Bind::Text(scope.org_id.to_owned()), Bind::Number(seconds(first)), Bind::Number(seconds(last))];
    binds.extend(filter_binds);
    Sql {
        text: format!(
            "SELECT {} FROM {} WHERE org_id = ? AND hour >= toDateTime(?) AND hour < toDateTime(?){filters}{}",
            source.select,
            state.clickhouse.table("rollup_hourly"),
            group_by(source.group)
        ),
        binds,
    }
}

/// The raw rows of a scope within `bounds`.
fn raw_query(state: &AppState, scope: &Scope, bounds: &RawBounds, source: Source) -> Sql {
    let mut binds = vec![Bind::Text(scope.org_id.to_owned())];
    let mut text =
        format!("SELECT {} FROM {} WHERE org_id = ?", source.select, state.clickhouse.table("events"));
    if let Some(user) = scope.user_id {
        text.push_str(" AND user_id = ?");
        binds.push(Bind::Text(user.to_owned()));
    }
    let (filters, filter_binds) = filters(scope);
    text.push_str(&format!("{}{filters}{}", bounds.condition(), group_by(source.group)));
    binds.extend(bounds.binds());
    binds.extend(filter_binds);
    Sql { text, binds }
}

/// The queries that read a scope and range (see `Plan`): the rollup's, then the raw table's.
fn source_queries(state: &AppState, scope: &Scope, range: &Range, rollup: Source, raw: Source) -> Vec<Sql> {
    let plan = Plan::new(scope, range);
    let mut queries = Vec::new();
    if let Some(hours) = plan.whole_hours {
        queries.push(rollup_query(state, scope, hours, rollup));
    }
    if let Some(bounds) = &plan.raw {
        queries.push(raw_query(state, scope, bounds, raw));
    }
    queries
}

/// One query merging the `aggs` states of a scope and range, grouped by `keys`. An org's range of
/// whole hours (what the analytics ask for, see `analytics`) is read from the rollup alone:
/// `SELECT <keys.rollup>, <merges> FROM rollup_hourly … GROUP BY <keys.group> <tail>`. Anything
/// else (one user, or partial hours) is read from the raw table, whose states, grouped by the
/// keys, are merged the same way: `SELECT <keys.group>, <merges> FROM (<raw states>) GROUP BY
/// <keys.group> <tail>`. `merges` use the `aggs` columns (the `M_*` expressions).
pub fn over_states(
    state: &AppState,
    scope: &Scope,
    range: &Range,
    keys: Keys,
    aggs: &[Agg],
    merges: &str,
    tail: &str,
) -> Sql {
    let with_keys =
        |keys: &str, rest: &str| if keys.is_empty() { rest.to_owned() } else { format!("{keys}, {rest}") };
    let plan = Plan::new(scope, range);
    if let (Some(hours), None) = (plan.whole_hours, &plan.raw) {
        let sql = rollup_query(
            state,
            scope,
            hours,
            Source { select: &with_keys(keys.rollup, merges), group: keys.group },
        );
        return Sql { text: format!("{} {tail}", sql.text), binds: sql.binds };
    }
    let raw_states = aggs.iter().map(|a| format!("{} AS {}", a.raw, a.column)).collect::<Vec<_>>().join(", ");
    let inner = raw_query(
        state,
        scope,
        &whole_range(range),
        Source { select: &with_keys(keys.raw, &raw_states), group: keys.group },
    );
    Sql {
        text: format!(
            "SELECT {} FROM ({}){} {tail}",
            with_keys(keys.group, merges),
            inner.text,
            group_by(keys.group)
        ),
        binds: inner.binds,
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

/// The grouping keys of `sums` and `over_states`: as selected from the rollup, as selected from
/// raw rows (where the hour is `toStartOfHour(timestamp)`), and the GROUP BY list (their aliases).
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
