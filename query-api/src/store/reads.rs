//! The org-scoped reads: every query here is bounded by the org of the caller's API key.

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use clickhouse::error::Error;
use clickhouse::Row;
use serde::Deserialize;
use tally_schemas::row::select_list;
use tally_schemas::EventRow;

use super::archived::{Newest, Wanted};
use super::measures::{
    Measure, COMPLETION_TOKENS, COST, ERRORS, INPUT_BYTES, LATENCY, OUTPUT_BYTES, PROMPT_TOKENS, REQUESTS,
    TOKENS,
};
use super::plan::{self, Keys, Plan, Scope};
use super::sql::{Bind, RawBounds, Sql, EVENT_MS};
use super::Store;
use crate::error::ApiError;
use crate::params::{Bucket, GroupBy};
use crate::range::Range;

/// Usage of one (provider, model, service).
#[derive(Row, Deserialize)]
pub struct Usage {
    pub provider: String,
    pub model: String,
    pub service: String,
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub tokens: u64,
    pub cost_nanos: i64,
    pub input_bytes: u64,
    pub output_bytes: u64,
}
const USAGE: [Measure; 8] =
    [REQUESTS, ERRORS, PROMPT_TOKENS, COMPLETION_TOKENS, TOKENS, COST, INPUT_BYTES, OUTPUT_BYTES];

#[derive(Row, Deserialize)]
struct Latency {
    latency: Vec<f32>,
}

/// One point of a timeseries: its bucket (epoch seconds of the UTC hour, or the local date
/// `YYYY-MM-DD`) and the group's value ("" when not grouped).
#[derive(Row, Deserialize)]
pub struct Point {
    pub bucket: String,
    pub key: String,
    pub requests: u64,
    pub errors: u64,
    pub tokens: u64,
    pub cost_nanos: i64,
    pub latency: Vec<f32>,
}
const POINT: [Measure; 5] = [REQUESTS, ERRORS, TOKENS, COST, LATENCY];

#[derive(Row, Deserialize)]
pub struct ModelPerf {
    pub provider: String,
    pub model: String,
    pub requests: u64,
    pub errors: u64,
    pub latency: Vec<f32>,
}

#[derive(Row, Deserialize)]
pub struct ServicePerf {
    pub service: String,
    pub requests: u64,
    pub errors: u64,
    pub latency: Vec<f32>,
}

#[derive(Row, Deserialize)]
pub struct ServiceCost {
    pub service: String,
    pub provider: String,
    pub model: String,
    pub requests: u64,
    pub tokens: u64,
    pub cost_nanos: i64,
}

#[derive(Row, Deserialize)]
pub struct ModelTotals {
    pub provider: String,
    pub model: String,
    pub requests: u64,
    pub tokens: u64,
    pub cost_nanos: i64,
}

#[derive(Row, Deserialize)]
struct Spent {
    cost_nanos: i64,
}

/// An org's event count and its first and last hours, from the hourly rollup.
#[derive(Row, Deserialize)]
struct TelemetryHours {
    total: u64,
    first_hour: u32,
    last_hour: u32,
}

/// The first and last event times within those hours, in epoch milliseconds (0 when none).
#[derive(Row, Deserialize)]
struct TelemetryEdges {
    first_ms: u64,
    last_ms: u64,
}

/// What the org's SDKs have sent so far.
#[derive(Row, Deserialize)]
pub struct Telemetry {
    pub total: u64,
    pub first_ms: u64,
    pub last_ms: u64,
}

/// The filters of the events list (each an exact match).
#[derive(Default)]
pub struct EventFilters<'a> {
    pub model: Option<&'a str>,
    pub provider: Option<&'a str>,
    pub status: Option<&'a str>,
    pub execution_id: Option<&'a str>,
    pub user_id: Option<&'a str>,
}

/// A page of the events list, newest first: after `cursor` (event time in ms, event id) if
/// given, else skipping `offset` events.
pub struct PageRequest {
    pub cursor: Option<(u64, uuid::Uuid)>,
    pub offset: u32,
    /// Rows to return (callers ask one more than they show, to know whether a next page exists).
    pub rows: u32,
}

/// How far back from the newest possible event a page is looked for, in turn; None = the range.
const LOOK_BACK: [Option<Duration>; 4] =
    [Some(Duration::hours(1)), Some(Duration::days(1)), Some(Duration::days(7)), None];

impl Store<'_> {
    /// Usage by (provider, model, service): exact to the millisecond.
    pub async fn usage(&self, scope: &Scope<'_>, range: &Range) -> Result<Vec<Usage>, ApiError> {
        let keys = Keys::columns("provider, model, service");
        self.sums(scope, &Plan::new(scope, range), &keys, &USAGE).await
    }

    /// p50, p95, p99 of the latency in ms (empty without events).
    pub async fn latency(&self, scope: &Scope<'_>, range: &Range) -> Result<Vec<f32>, ApiError> {
        let rows: Vec<Latency> =
            self.merged(scope, &Plan::new(scope, range), &Keys::none(), &[LATENCY], "").await?;
        Ok(rows.into_iter().next().map(|r| r.latency).unwrap_or_default())
    }

    /// The points of a timeseries, in no particular order. Hour buckets: each hour comes whole
    /// from one source, so one plain query per source, run concurrently. Day buckets: the local
    /// days of `tz`, states of both sources merged in one query.
    pub async fn timeseries(
        &self,
        scope: &Scope<'_>,
        range: &Range,
        bucket: Bucket,
        group_by: Option<GroupBy>,
        tz: Tz,
    ) -> Result<Vec<Point>, ApiError> {
        // `materialize`: a constant key column breaks a merge over Distributed tables on 18.16 ("non
        // constant in source stream but must be constant in result"), seen on the cluster.
        let key = group_by.map_or("materialize('')", GroupBy::column);
        match bucket {
            Bucket::Hour => {
                let keys = Keys {
                    rollup: format!("toString(toUInt32(hour)) AS bucket, {key} AS key"),
                    raw: format!("toString(toUInt32(toStartOfHour(timestamp))) AS bucket, {key} AS key"),
                    group: "bucket, key".into(),
                    binds: Vec::new(),
                };
                self.sums(scope, &Plan::new(scope, range), &keys, &POINT).await
            }
            Bucket::Day => {
                let keys = Keys {
                    rollup: format!("toString(toDate(hour, ?)) AS bucket, {key} AS key"),
                    raw: format!("toString(toDate(timestamp, ?)) AS bucket, {key} AS key"),
                    group: "bucket, key".into(),
                    binds: vec![Bind::Text(tz.name().to_owned())],
                };
                self.merged(scope, &Plan::for_days(scope, range, tz), &keys, &POINT, "ORDER BY bucket, key")
                    .await
            }
        }
    }

    /// Requests, errors and latency by model, most used first.
    pub async fn perf(&self, scope: &Scope<'_>, range: &Range) -> Result<Vec<ModelPerf>, ApiError> {
        let tail = "ORDER BY requests DESC, provider, model";
        self.merged_by(scope, range, "provider, model", &[REQUESTS, ERRORS, LATENCY], tail).await
    }

    /// Requests, errors and latency by service, most used first.
    pub async fn perf_by_service(
        &self,
        scope: &Scope<'_>,
        range: &Range,
    ) -> Result<Vec<ServicePerf>, ApiError> {
        self.merged_by(
            scope,
            range,
            "service",
            &[REQUESTS, ERRORS, LATENCY],
            "ORDER BY requests DESC, service",
        )
        .await
    }

    /// Cost by (service, provider, model), most expensive first.
    pub async fn costs(&self, scope: &Scope<'_>, range: &Range) -> Result<Vec<ServiceCost>, ApiError> {
        let tail = "ORDER BY cost_nanos DESC, service, provider, model";
        self.merged_by(scope, range, "service, provider, model", &[REQUESTS, TOKENS, COST], tail).await
    }

    /// `measures` merged over both sources, grouped by plain `columns`, then `tail`.
    async fn merged_by<T>(
        &self,
        scope: &Scope<'_>,
        range: &Range,
        columns: &str,
        measures: &[Measure],
        tail: &str,
    ) -> Result<Vec<T>, ApiError>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        self.merged(scope, &Plan::new(scope, range), &Keys::columns(columns), measures, tail).await
    }

    /// The store for `plan`'s raw rows of `scope` (with a dropped month's rows from the archive).
    async fn for_plan(&self, scope: &Scope<'_>, plan: &Plan) -> Result<Store<'_>, ApiError> {
        let wanted = Wanted {
            org_id: scope.org_id,
            intervals: plan.raw.as_deref().unwrap_or_default(),
            user_id: scope.user_id,
            provider: scope.provider,
            model: scope.model,
            status: None,
            execution_id: None,
        };
        self.covering(&wanted, None).await
    }

    /// `plan::sums`, run.
    async fn sums<T>(
        &self,
        scope: &Scope<'_>,
        plan: &Plan,
        keys: &Keys,
        measures: &[Measure],
    ) -> Result<Vec<T>, ApiError>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        let store = self.for_plan(scope, plan).await?;
        Ok(store.fetch_all_of(&plan::sums(&store.tables, scope, plan, keys, measures)).await?)
    }

    /// `plan::merged`, run.
    async fn merged<T>(
        &self,
        scope: &Scope<'_>,
        plan: &Plan,
        keys: &Keys,
        measures: &[Measure],
        tail: &str,
    ) -> Result<Vec<T>, ApiError>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        let store = self.for_plan(scope, plan).await?;
        let sql = plan::merged(&store.tables, scope, plan, keys, measures, tail);
        Ok(sql.query(&store.client).fetch_all().await?)
    }

    /// Requests, tokens and cost by (provider, model): exact to the millisecond.
    pub async fn model_totals(&self, scope: &Scope<'_>, range: &Range) -> Result<Vec<ModelTotals>, ApiError> {
        let keys = Keys::columns("provider, model");
        self.sums(scope, &Plan::new(scope, range), &keys, &[REQUESTS, TOKENS, COST]).await
    }

    /// The org's cost over `range`, in nano-dollars.
    pub async fn spent(&self, org_id: &str, range: &Range) -> Result<i64, ApiError> {
        let scope = Scope::org(org_id);
        let parts: Vec<Spent> = self.sums(&scope, &Plan::new(&scope, range), &Keys::none(), &[COST]).await?;
        Ok(parts.iter().map(|p| p.cost_nanos).sum())
    }

    /// How many events the org has sent, and when its first and last arrived.
    ///
    /// The count and the first and last hours come from the hourly rollup (a few thousand small
    /// rows for a month of an org); the events table is read only within those two hours, for
    /// the milliseconds. Counting the org's raw rows instead read every one of them (~170 000 rows
    /// per request for 50 000 events a month, which saturated a two-core ClickHouse at 200
    /// requests/s). The rollups keep the months the archiver dropped from the events table, so the
    /// total counts them too; when the first hour is in such a month its event is no longer in the
    /// table and the first event is given as the start of its hour.
    pub async fn telemetry(&self, org_id: &str) -> Result<Telemetry, Error> {
        let hours: TelemetryHours = self
            .client
            .query(&format!(
                "SELECT toUInt64(countMerge(events)) AS total, toUInt32(min(hour)) AS first_hour, \
                 toUInt32(max(hour)) AS last_hour FROM {} WHERE org_id = ?",
                self.tables.rollup_hourly
            ))
            .bind(org_id)
            .fetch_one()
            .await?;
        if hours.total == 0 {
            return Ok(Telemetry { total: 0, first_ms: 0, last_ms: 0 });
        }
        let (first_end, last_hour) = (hours.first_hour + 3600, hours.last_hour);
        let sql = format!(
            "SELECT minIf({EVENT_MS}, timestamp < toDateTime(?, 'UTC')) AS first_ms, \
             maxIf({EVENT_MS}, timestamp >= toDateTime(?, 'UTC')) AS last_ms FROM {} \
             WHERE org_id = ? AND timestamp >= toDateTime(?, 'UTC') \
             AND (timestamp < toDateTime(?, 'UTC') OR timestamp >= toDateTime(?, 'UTC'))",
            self.tables.events
        );
        let edges: TelemetryEdges = self
            .client
            .query(&sql)
            .bind(first_end)
            .bind(last_hour)
            .bind(org_id)
            .bind(hours.first_hour)
            .bind(first_end)
            .bind(last_hour)
            .fetch_one()
            .await?;
        let hour_ms = |hour: u32| u64::from(hour) * 1000;
        Ok(Telemetry {
            total: hours.total,
            // 0: no row of that hour left in the events table (an archived month): its hour.
            first_ms: if edges.first_ms == 0 { hour_ms(hours.first_hour) } else { edges.first_ms },
            last_ms: if edges.last_ms == 0 { hour_ms(last_hour) } else { edges.last_ms },
        })
    }

    /// A page of the org's events in `range`, newest first. Without reading and sorting the whole
    /// range: looks back from the newest possible event over growing windows. A window that holds
    /// the whole page (offset + rows) holds the newest ones, since every event outside it is older
    /// than every event in it.
    pub async fn events_page(
        &self,
        org_id: &str,
        range: &Range,
        filters: &EventFilters<'_>,
        page: &PageRequest,
    ) -> Result<Vec<EventRow>, ApiError> {
        let newest = match page.cursor {
            Some((at_ms, _)) => i64::try_from(at_ms)
                .ok()
                .and_then(|ms| DateTime::from_timestamp_millis(ms.saturating_add(1)))
                .map_or(range.to, |t| t.min(range.to)),
            None => range.to,
        };
        // Of a dropped month's archived rows, a page needs at most the newest offset + rows.
        let keep = Newest {
            cursor_ms: page.cursor.and_then(|(at_ms, _)| i64::try_from(at_ms).ok()),
            rows: page.offset as usize + page.rows as usize,
        };
        let mut rows = Vec::new();
        for window in LOOK_BACK {
            let from =
                window.and_then(|w| newest.checked_sub_signed(w)).map_or(range.from, |t| t.max(range.from));
            let intervals = [(from.max(DateTime::UNIX_EPOCH), range.to.max(DateTime::UNIX_EPOCH))];
            let wanted = Wanted {
                org_id,
                intervals: &intervals,
                user_id: filters.user_id,
                provider: filters.provider,
                model: filters.model,
                status: filters.status,
                execution_id: filters.execution_id,
            };
            let store = self.covering(&wanted, Some(&keep)).await?;
            rows =
                store.events_sql(org_id, &intervals, filters, page).query(&store.client).fetch_all().await?;
            if rows.len() >= page.rows as usize || from == range.from {
                break;
            }
        }
        Ok(rows)
    }

    /// The page among the events in `intervals` (and before the cursor), from each raw source.
    fn events_sql(
        &self,
        org_id: &str,
        intervals: &[(DateTime<Utc>, DateTime<Utc>)],
        filters: &EventFilters<'_>,
        page: &PageRequest,
    ) -> Sql {
        let bounds = RawBounds::of(intervals);
        let at = EVENT_MS;
        let parts: Vec<Sql> = self
            .tables
            .raw_sources()
            .into_iter()
            .map(|(table, once)| {
                let mut text =
                    format!("SELECT {} FROM {table} WHERE org_id = ?{}", select_list(), bounds.condition());
                let mut binds = vec![Bind::Text(org_id.to_owned())];
                binds.extend(bounds.binds());
                for (column, value) in [
                    ("model", filters.model),
                    ("provider", filters.provider),
                    ("toString(status)", filters.status),
                    ("execution_id", filters.execution_id),
                    ("user_id", filters.user_id),
                ] {
                    if let Some(value) = value {
                        text.push_str(&format!(" AND {column} = ?"));
                        binds.push(Bind::Text(value.to_owned()));
                    }
                }
                if let Some((at_ms, id)) = page.cursor {
                    text.push_str(&format!(" AND ({at} < ? OR ({at} = ? AND event_id < toUUID(?)))"));
                    binds.extend([Bind::Number(at_ms), Bind::Number(at_ms), Bind::Text(id.to_string())]);
                }
                text.push_str(&once);
                Sql { text, binds }
            })
            .collect();
        let mut sql = match <[Sql; 1]>::try_from(parts) {
            Ok([one]) => one,
            Err(parts) => Sql {
                text: format!(
                    "SELECT {} FROM ({})",
                    select_list(),
                    parts.iter().map(|p| p.text.as_str()).collect::<Vec<_>>().join(" UNION ALL ")
                ),
                binds: parts.into_iter().flat_map(|p| p.binds).collect(),
            },
        };
        sql.text.push_str(&format!(" ORDER BY {at} DESC, event_id DESC LIMIT ?, ?"));
        sql.binds.extend([Bind::Number(u64::from(page.offset)), Bind::Number(u64::from(page.rows))]);
        sql
    }
}
