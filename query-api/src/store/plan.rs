//! How a read of a scope (an org, or one user of it) over a time range is planned, without I/O.
//!
//! An org's whole UTC hours come from `rollup_hourly`; the partial hours at the two ends of the
//! range come from the raw table. One user of an org reads the raw table only (the rollups have no
//! user column), inside the org's range of the sort key. Day buckets in a zone whose midnight is
//! not on a whole UTC hour (Asia/Kolkata, Australia/Adelaide, …) also read the hours that hold a
//! local midnight from the raw table, so every event lands on its own local day. The org is
//! always a bound parameter taken from the API key, never from the request.
//!
//! Two shapes of query: `sums` (one query per source, whose rows the caller adds up; plain sums
//! are cheaper that way on ClickHouse 18.16) and `merged` (one query merging the states of both
//! sources, for quantiles).

use chrono::{DateTime, Duration, DurationRound, Utc};
use chrono_tz::Tz;

use super::archived;
use super::measures::{self, Measure};
use super::sql::{seconds, Bind, RawBounds, Sql};
use crate::range::Range;

/// Whose rows, and which of them.
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    pub org_id: &'a str,
    pub user_id: Option<&'a str>,
    pub provider: Option<&'a str>,
    pub model: Option<&'a str>,
}

impl<'a> Scope<'a> {
    /// Every event of an org.
    pub fn org(org_id: &'a str) -> Scope<'a> {
        Scope { org_id, user_id: None, provider: None, model: None }
    }
}

/// The qualified names of the tables a plan reads.
#[derive(Clone, Debug)]
pub struct Tables {
    pub events: String,
    pub rollup_hourly: String,
    /// Whether raw reads also take rows of dropped months, loaded from the archive into the
    /// request's `archived::TABLE` (see `archived`).
    pub archived: bool,
}

impl Tables {
    /// Each source of raw rows with the condition that keeps a row from being read twice:
    /// `events`, less the rows the archived ones hold, and the archived rows.
    pub fn raw_sources(&self) -> Vec<(&str, String)> {
        if !self.archived {
            return vec![(&self.events, String::new())];
        }
        let identity = archived::IDENTITY;
        let columns = identity.trim_start_matches('(').trim_end_matches(')');
        vec![
            (&self.events, format!(" AND {identity} NOT IN (SELECT {columns} FROM {})", archived::TABLE)),
            (archived::TABLE, String::new()),
        ]
    }
}

/// The grouping keys: as selected from the rollup, as selected from raw rows, the GROUP BY list
/// (their aliases), and the values bound in the key expressions (the same for both sources).
#[derive(Clone, Debug, Default)]
pub struct Keys {
    pub rollup: String,
    pub raw: String,
    pub group: String,
    pub binds: Vec<Bind>,
}

impl Keys {
    /// No grouping: one row.
    pub fn none() -> Keys {
        Keys::default()
    }

    /// Plain columns both tables have, e.g. "provider, model".
    pub fn columns(columns: &str) -> Keys {
        Keys { rollup: columns.into(), raw: columns.into(), group: columns.into(), binds: Vec::new() }
    }
}

/// Where a scope's range is read from. At least one source is set.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// Whole hours `[first, last)` of `rollup_hourly`, less the hours starting at `except`.
    pub rollup: Option<RollupHours>,
    /// Raw rows in these `[from, to)` intervals (an empty list reads nothing).
    pub raw: Option<Vec<(DateTime<Utc>, DateTime<Utc>)>>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct RollupHours {
    pub first: DateTime<Utc>,
    pub last: DateTime<Utc>,
    pub except: Vec<DateTime<Utc>>,
}

/// No event is older than 1970 (the ingest refuses them), so earlier bounds mean 1970.
fn epoch_or_later(t: DateTime<Utc>) -> DateTime<Utc> {
    t.max(DateTime::UNIX_EPOCH)
}

impl Plan {
    /// A user: the raw rows of the whole range. An org: the rollup's whole hours and the raw rows
    /// of the partial edge hours.
    pub fn new(scope: &Scope, range: &Range) -> Plan {
        let (from, to) = (epoch_or_later(range.from), epoch_or_later(range.to));
        if scope.user_id.is_some() {
            return Plan { rollup: None, raw: Some(vec![(from, to)]) };
        }
        let hour = Duration::hours(1);
        let first = from.duration_round_up(hour).unwrap_or(from).min(to);
        let last = to.duration_trunc(hour).unwrap_or(to).max(first);
        let edges: Vec<_> = [(from, first), (last, to)].into_iter().filter(|(a, b)| a < b).collect();
        if first >= last {
            return Plan { rollup: None, raw: Some(vec![(from, to)]) };
        }
        Plan {
            rollup: Some(RollupHours { first, last, except: Vec::new() }),
            raw: (!edges.is_empty()).then_some(edges),
        }
    }

    /// As `new`, for grouping by local day in `tz`: the rollup's hours that hold a local midnight
    /// (none in zones offset by whole hours) are read from raw rows instead.
    pub fn for_days(scope: &Scope, range: &Range, tz: Tz) -> Plan {
        let mut plan = Plan::new(scope, range);
        let Some(hours) = &mut plan.rollup else { return plan };
        let split = hours_holding_a_midnight(hours.first, hours.last, tz);
        if split.is_empty() {
            return plan;
        }
        let raw = plan.raw.get_or_insert_with(Vec::new);
        raw.extend(split.iter().map(|h| (*h, *h + Duration::hours(1))));
        raw.sort();
        hours.except = split;
        plan
    }
}

/// The UTC hours in `[first, last)` during which a local day of `tz` ends (the local date of the
/// hour's first second differs from that of its last).
pub fn hours_holding_a_midnight(first: DateTime<Utc>, last: DateTime<Utc>, tz: Tz) -> Vec<DateTime<Utc>> {
    let mut hours = Vec::new();
    let mut hour = first;
    while hour < last {
        let end = hour + Duration::seconds(3599);
        if hour.with_timezone(&tz).date_naive() != end.with_timezone(&tz).date_naive() {
            hours.push(hour);
        }
        hour += Duration::hours(1);
    }
    hours
}

fn group_by(group: &str) -> String {
    if group.is_empty() {
        String::new()
    } else {
        format!(" GROUP BY {group}")
    }
}

/// `keys, rest`, or `rest` without keys.
fn with_keys(keys: &str, rest: &str) -> String {
    if keys.is_empty() {
        rest.to_owned()
    } else {
        format!("{keys}, {rest}")
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

/// `SELECT <select> FROM rollup_hourly WHERE <org, hours, filters> [GROUP BY <group>]`.
fn rollup_query(tables: &Tables, scope: &Scope, hours: &RollupHours, select: &str, keys: &Keys) -> Sql {
    let mut binds = keys.binds.clone();
    binds.extend([
        Bind::Text(scope.org_id.to_owned()),
        Bind::Number(seconds(hours.first)),
        Bind::Number(seconds(hours.last)),
    ]);
    let mut text = format!(
        "SELECT {select} FROM {} WHERE org_id = ? AND hour >= toDateTime(?) AND hour < toDateTime(?)",
        tables.rollup_hourly
    );
    if !hours.except.is_empty() {
        text.push_str(&format!(
            " AND toUInt32(hour) NOT IN ({})",
            tally_common::ch::placeholders(hours.except.len(), "?")
        ));
        binds.extend(hours.except.iter().map(|h| Bind::Number(seconds(*h))));
    }
    let (filters, filter_binds) = filters(scope);
    text.push_str(&filters);
    binds.extend(filter_binds);
    Sql { text, binds }
}

/// `SELECT <select> FROM <source> WHERE <org, user, intervals, filters>`, one per raw source.
fn raw_query(
    tables: &Tables,
    scope: &Scope,
    intervals: &[(DateTime<Utc>, DateTime<Utc>)],
    select: &str,
    keys: &Keys,
) -> Vec<Sql> {
    let bounds = RawBounds::of(intervals);
    let (filters, filter_binds) = filters(scope);
    tables
        .raw_sources()
        .into_iter()
        .map(|(table, once)| {
            let mut binds = keys.binds.clone();
            binds.push(Bind::Text(scope.org_id.to_owned()));
            let mut text = format!("SELECT {select} FROM {table} WHERE org_id = ?");
            if let Some(user) = scope.user_id {
                text.push_str(" AND user_id = ?");
                binds.push(Bind::Text(user.to_owned()));
            }
            text.push_str(&format!("{}{filters}{once}", bounds.condition()));
            binds.extend(bounds.binds());
            binds.extend(filter_binds.iter().cloned());
            Sql { text, binds }
        })
        .collect()
}

/// Plain sums (no quantiles): one query per source of `plan`, each returning the keys and then
/// `measures` under their aliases, so the caller adds up the rows of equal keys.
pub fn sums(tables: &Tables, scope: &Scope, plan: &Plan, keys: &Keys, measures: &[Measure]) -> Vec<Sql> {
    let mut queries = Vec::new();
    if let Some(hours) = &plan.rollup {
        let mut sql =
            rollup_query(tables, scope, hours, &with_keys(&keys.rollup, &measures::merges(measures)), keys);
        sql.text.push_str(&group_by(&keys.group));
        queries.push(sql);
    }
    if let Some(intervals) = &plan.raw {
        let select = with_keys(&keys.raw, &measures::plains(measures));
        for mut sql in raw_query(tables, scope, intervals, &select, keys) {
            sql.text.push_str(&group_by(&keys.group));
            queries.push(sql);
        }
    }
    queries
}

/// One query returning the keys and `measures` merged over both sources of `plan`, then `tail`
/// (ORDER BY …). The rollup alone is read directly; otherwise the states of each source (the
/// rollup's columns as stored, raw rows' states built as the rollup's view builds them) are
/// merged in an outer query.
pub fn merged(
    tables: &Tables,
    scope: &Scope,
    plan: &Plan,
    keys: &Keys,
    measures: &[Measure],
    tail: &str,
) -> Sql {
    let merges = measures::merges(measures);
    let finish = |sql: Sql, select_keys: &str| Sql {
        text: format!(
            "SELECT {} FROM ({}){} {tail}",
            with_keys(select_keys, &merges),
            sql.text,
            group_by(&keys.group)
        )
        .trim_end()
        .to_owned(),
        binds: sql.binds,
    };
    let raw_states = |intervals: &[(DateTime<Utc>, DateTime<Utc>)]| {
        let select = with_keys(&keys.raw, &measures::states(measures));
        let parts = raw_query(tables, scope, intervals, &select, keys);
        let text: Vec<String> =
            parts.iter().map(|sql| format!("{}{}", sql.text, group_by(&keys.group))).collect();
        Sql { text: text.join(" UNION ALL "), binds: parts.into_iter().flat_map(|sql| sql.binds).collect() }
    };
    match (&plan.rollup, &plan.raw) {
        (Some(hours), None) => {
            let mut sql = rollup_query(tables, scope, hours, &with_keys(&keys.rollup, &merges), keys);
            sql.text = format!("{}{} {tail}", sql.text, group_by(&keys.group)).trim_end().to_owned();
            sql
        }
        (Some(hours), Some(intervals)) => {
            let stored = rollup_query(
                tables,
                scope,
                hours,
                &with_keys(&keys.rollup, &measures::columns(measures)),
                keys,
            );
            let raw = raw_states(intervals);
            let mut binds = stored.binds;
            binds.extend(raw.binds);
            finish(Sql { text: format!("{} UNION ALL {}", stored.text, raw.text), binds }, &keys.group)
        }
        (None, raw) => finish(raw_states(raw.as_deref().unwrap_or_default()), &keys.group),
    }
}
