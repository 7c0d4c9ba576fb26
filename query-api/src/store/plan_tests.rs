//! Pure tests of the query planning: which source answers which part of a range, and the SQL
//! and bound values each plan produces.

#![allow(clippy::unwrap_used)]

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;

use super::measures::{COST, LATENCY, REQUESTS};
use super::plan::{hours_holding_a_midnight, merged, sums, Keys, Plan, RollupHours, Scope, Tables};
use super::sql::Bind;
use crate::range::Range;

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
}

fn range(from: &str, to: &str) -> Range {
    Range { from: at(from), to: at(to) }
}

fn tables() -> Tables {
    Tables { events: "db.events".into(), rollup_hourly: "db.rollup_hourly".into(), archived: false }
}

const ORG: Scope = Scope { org_id: "org-1", user_id: None, provider: None, model: None };

fn text(bind: &Bind) -> Option<&str> {
    match bind {
        Bind::Text(text) => Some(text),
        Bind::Number(_) => None,
    }
}

#[test]
fn an_org_reads_whole_hours_from_the_rollup_and_the_partial_edges_raw() {
    let plan = Plan::new(&ORG, &range("2026-11-02T10:15:00Z", "2026-11-02T13:00:00.500Z"));
    assert_eq!(
        plan,
        Plan {
            rollup: Some(RollupHours {
                first: at("2026-11-02T11:00:00Z"),
                last: at("2026-11-02T13:00:00Z"),
                except: vec![]
            }),
            raw: Some(vec![
                (at("2026-11-02T10:15:00Z"), at("2026-11-02T11:00:00Z")),
                (at("2026-11-02T13:00:00Z"), at("2026-11-02T13:00:00.500Z")),
            ]),
        }
    );
}

#[test]
fn whole_hours_need_no_raw_rows_and_a_short_range_needs_no_rollup() {
    let whole = Plan::new(&ORG, &range("2026-11-02T10:00:00Z", "2026-11-03T00:00:00Z"));
    assert!(whole.rollup.is_some() && whole.raw.is_none());
    let inside_an_hour = Plan::new(&ORG, &range("2026-11-02T10:15:00Z", "2026-11-02T10:45:00Z"));
    assert_eq!(inside_an_hour.rollup, None);
    assert_eq!(inside_an_hour.raw, Some(vec![(at("2026-11-02T10:15:00Z"), at("2026-11-02T10:45:00Z"))]));
}

#[test]
fn a_user_reads_raw_rows_only_within_the_org() {
    let scope = Scope { user_id: Some("u-7"), ..ORG };
    let plan = Plan::new(&scope, &range("2026-11-02T10:00:00Z", "2026-11-03T00:00:00Z"));
    assert_eq!(plan.rollup, None);
    let queries = sums(&tables(), &scope, &plan, &Keys::none(), &[REQUESTS]);
    assert_eq!(queries.len(), 1);
    let sql = &queries[0];
    assert!(
        sql.text.starts_with("SELECT count() AS requests FROM db.events WHERE org_id = ? AND user_id = ?"),
        "{}",
        sql.text
    );
    let texts: Vec<&str> = sql.binds.iter().filter_map(text).collect();
    assert_eq!(texts, ["org-1", "u-7"]);
}

#[test]
fn ranges_before_1970_read_nothing_older_than_the_epoch() {
    let plan = Plan::new(&ORG, &range("1969-12-31T00:00:00Z", "1969-12-31T10:00:00Z"));
    assert_eq!(plan.rollup, None);
    let sql = merged(&tables(), &ORG, &plan, &Keys::none(), &[COST], "");
    assert!(sql.text.contains("AND (0)"), "{}", sql.text);
}

#[test]
fn sums_are_one_query_per_source_with_the_same_columns() {
    let plan = Plan::new(&ORG, &range("2026-11-02T10:15:00Z", "2026-11-02T13:00:00Z"));
    let queries = sums(&tables(), &ORG, &plan, &Keys::columns("provider, model"), &[REQUESTS, COST]);
    assert_eq!(queries.len(), 2);
    assert_eq!(
        queries[0].text,
        "SELECT provider, model, toUInt64(countMerge(events)) AS requests, sumMerge(cost_nanos_sum) AS cost_nanos \
         FROM db.rollup_hourly WHERE org_id = ? AND hour >= toDateTime(?) AND hour < toDateTime(?) GROUP BY provider, model"
    );
    assert_eq!(
        queries[1].text,
        "SELECT provider, model, count() AS requests, sum(cost_nanos) AS cost_nanos FROM db.events \
         WHERE org_id = ? AND (timestamp >= toDateTime(?) AND timestamp < toDateTime(?)) GROUP BY provider, model"
    );
    for sql in &queries {
        assert_eq!(sql.text.matches('?').count(), sql.binds.len(), "{}", sql.text);
    }
}

#[test]
fn filters_are_bound_never_pasted() {
    let scope = Scope { provider: Some("openai'; DROP TABLE x"), model: Some("gpt-4o"), ..ORG };
    let plan = Plan::new(&scope, &range("2026-11-02T10:15:00Z", "2026-11-02T13:00:00Z"));
    for sql in sums(&tables(), &scope, &plan, &Keys::none(), &[REQUESTS]) {
        assert!(
            !sql.text.contains("DROP") && sql.text.ends_with("AND provider = ? AND model = ?"),
            "{}",
            sql.text
        );
        let texts: Vec<&str> = sql.binds.iter().filter_map(text).collect();
        assert_eq!(texts, ["org-1", "openai'; DROP TABLE x", "gpt-4o"]);
    }
}

#[test]
fn merged_reads_the_rollup_alone_when_it_answers_all() {
    let plan = Plan::new(&ORG, &range("2026-11-02T10:00:00Z", "2026-11-02T13:00:00Z"));
    let sql = merged(
        &tables(),
        &ORG,
        &plan,
        &Keys::columns("model"),
        &[REQUESTS, LATENCY],
        "ORDER BY requests DESC",
    );
    assert_eq!(
        sql.text,
        "SELECT model, toUInt64(countMerge(events)) AS requests, \
         quantilesTimingMerge(0.5, 0.95, 0.99)(latency_quantiles) AS latency FROM db.rollup_hourly \
         WHERE org_id = ? AND hour >= toDateTime(?) AND hour < toDateTime(?) GROUP BY model ORDER BY requests DESC"
    );
}

#[test]
fn merged_unions_the_states_of_both_sources_with_binds_in_text_order() {
    let plan = Plan::new(&ORG, &range("2026-11-02T10:30:00Z", "2026-11-02T13:00:00Z"));
    let keys = Keys {
        rollup: "toString(toDate(hour, ?)) AS bucket".into(),
        raw: "toString(toDate(timestamp, ?)) AS bucket".into(),
        group: "bucket".into(),
        binds: vec![Bind::Text("Asia/Kolkata".into())],
    };
    let sql = merged(&tables(), &ORG, &plan, &keys, &[REQUESTS], "ORDER BY bucket");
    assert_eq!(
        sql.text,
        "SELECT bucket, toUInt64(countMerge(events)) AS requests FROM (\
         SELECT toString(toDate(hour, ?)) AS bucket, events FROM db.rollup_hourly \
         WHERE org_id = ? AND hour >= toDateTime(?) AND hour < toDateTime(?) \
         UNION ALL SELECT toString(toDate(timestamp, ?)) AS bucket, countState() AS events FROM db.events \
         WHERE org_id = ? AND (timestamp >= toDateTime(?) AND timestamp < toDateTime(?)) GROUP BY bucket) \
         GROUP BY bucket ORDER BY bucket"
    );
    let texts: Vec<&str> = sql.binds.iter().filter_map(text).collect();
    assert_eq!(texts, ["Asia/Kolkata", "org-1", "Asia/Kolkata", "org-1"]);
    assert_eq!(sql.text.matches('?').count(), sql.binds.len());
}

#[test]
fn zones_on_whole_hours_have_no_hour_holding_a_midnight_even_across_dst() {
    // Paris changes from +02:00 to +01:00 on 2026-10-25.
    let paris =
        hours_holding_a_midnight(at("2026-10-20T00:00:00Z"), at("2026-10-30T00:00:00Z"), Tz::Europe__Paris);
    assert!(paris.is_empty(), "{paris:?}");
    assert!(
        hours_holding_a_midnight(at("2026-10-20T00:00:00Z"), at("2026-10-30T00:00:00Z"), Tz::UTC).is_empty()
    );
}

#[test]
fn zones_offset_by_half_and_quarter_hours_split_one_hour_per_day() {
    // After St John's DST ended (2026-11-01, when its midnight moved from 02:30Z to 03:30Z).
    let from = at("2026-11-10T00:00:00Z");
    let to = at("2026-11-13T00:00:00Z");
    // Kolkata +05:30: local midnight at 18:30Z. Kathmandu +05:45: 18:15Z. St John's -03:30: 03:30Z.
    for (tz, hour) in [(Tz::Asia__Kolkata, 18), (Tz::Asia__Kathmandu, 18), (Tz::America__St_Johns, 3)] {
        let hours = hours_holding_a_midnight(from, to, tz);
        assert_eq!(hours.len(), 3, "{tz}: {hours:?}");
        assert!(hours.iter().all(|h| h.format("%H").to_string() == format!("{hour:02}")), "{tz}: {hours:?}");
    }
}

#[test]
fn adelaide_moves_its_split_hour_across_its_dst_change() {
    // Adelaide: +09:30 until 2026-10-04 02:00 local, then +10:30: midnight at 14:30Z, then 13:30Z.
    let hours = hours_holding_a_midnight(
        at("2026-10-01T00:00:00Z"),
        at("2026-10-07T00:00:00Z"),
        Tz::Australia__Adelaide,
    );
    let texts: Vec<String> = hours.iter().map(|h| h.format("%m-%dT%H").to_string()).collect();
    assert_eq!(texts, ["10-01T14", "10-02T14", "10-03T14", "10-04T13", "10-05T13", "10-06T13"]);
}

#[test]
fn day_plans_move_the_split_hours_from_the_rollup_to_raw_rows() {
    let whole = range("2026-11-01T00:00:00Z", "2026-11-03T00:00:00Z");
    assert_eq!(Plan::for_days(&ORG, &whole, Tz::Europe__Paris), Plan::new(&ORG, &whole));
    let plan = Plan::for_days(&ORG, &whole, Tz::Asia__Kolkata);
    let split = [at("2026-11-01T18:00:00Z"), at("2026-11-02T18:00:00Z")];
    assert_eq!(plan.rollup.as_ref().unwrap().except, split);
    assert_eq!(plan.raw, Some(split.iter().map(|h| (*h, *h + Duration::hours(1))).collect()));
    let sql = merged(&tables(), &ORG, &plan, &Keys::none(), &[REQUESTS], "");
    assert!(sql.text.contains("AND toUInt32(hour) NOT IN (?, ?)"), "{}", sql.text);
    assert_eq!(sql.text.matches('?').count(), sql.binds.len());
    // A user has no rollup to split.
    let user = Scope { user_id: Some("u"), ..ORG };
    assert_eq!(Plan::for_days(&user, &whole, Tz::Asia__Kolkata), Plan::new(&user, &whole));
}

#[test]
fn with_archived_rows_each_raw_read_takes_events_less_them_and_them_with_the_same_binds() {
    let archived = Tables { archived: true, ..tables() };
    let user = Scope { user_id: Some("u-1"), model: Some("gpt-4o"), ..ORG };
    let plan = Plan::new(&ORG, &range("2026-08-02T10:15:00Z", "2026-08-02T13:00:00.500Z"));
    let queries = sums(&archived, &user, &plan, &Keys::columns("model"), &[COST]);
    // The rollup (org scope plan), then events without the archived identities, then _archived.
    assert_eq!(queries.len(), 3);
    assert!(
        queries[1].text.contains("FROM db.events WHERE org_id = ? AND user_id = ?"),
        "{}",
        queries[1].text
    );
    assert!(
        queries[1].text.contains(
            " AND (event_id, kafka_partition, kafka_offset, kafka_index) NOT IN (SELECT event_id, kafka_partition, \
             kafka_offset, kafka_index FROM _archived)"
        ),
        "{}",
        queries[1].text
    );
    assert!(
        queries[2].text.contains("FROM _archived WHERE org_id = ? AND user_id = ?"),
        "{}",
        queries[2].text
    );
    assert!(!queries[2].text.contains("NOT IN"));
    assert_eq!(queries[1].binds, queries[2].binds);

    // Merged states: the rollup's, then both raw sources', in one UNION ALL.
    let sql = merged(&archived, &user, &plan, &Keys::none(), &[LATENCY], "");
    assert_eq!(sql.text.matches(" UNION ALL ").count(), 2, "{}", sql.text);
    assert_eq!(sql.binds.len(), sql.text.matches('?').count());
    // Without archived rows, nothing changes.
    assert_eq!(sums(&tables(), &user, &plan, &Keys::columns("model"), &[COST]).len(), 2);
}
