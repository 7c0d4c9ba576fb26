//! Raw rows of months the archiver dropped from ClickHouse, read back from the archive.
//!
//! The rollups keep every month, so whole hours of an org never need this. What needs raw rows of
//! a dropped month (the partial edge hours of a range, the hours holding a local midnight, one
//! user's analytics, the events list) takes them from the archive: the month's latest manifest,
//! and in each of its files only the caller's org's row groups and pages (`tally_archiver::read`).
//! A request that needs them loads them, filtered, into a temporary table of its own ClickHouse
//! session (`_archived`), and its raw queries read `events` less the rows the archive holds (by
//! identity: event id and Kafka position) plus `_archived`; so the same SQL computes the same
//! answer as before the drop, and a row in both places (between the drop record and the drop, or
//! late rows archived but not yet dropped) counts once.
//!
//! Which months are dropped: the drop records (`events/year=…/month=…/dropped.json`), listed at
//! most every `TALLY_QUERY_ARCHIVE_CACHE_S`; the archiver waits longer than that between writing
//! a record and dropping the partition.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use tally_archiver::error::ArchiveError;
use tally_archiver::manifest::{self, Manifest};
use tally_archiver::month::Month;
use tally_archiver::store::Archive;
use tally_schemas::EventRow;
use tokio::sync::Mutex;

/// The temporary table a request's archived rows are loaded into.
pub const TABLE: &str = "_archived";

/// A row's identity, the same in ClickHouse and in the archive.
pub const IDENTITY: &str = "(event_id, kafka_partition, kafka_offset, kafka_index)";

/// The dropped months, each with its latest manifest.
type DroppedMonths = Arc<BTreeMap<Month, Arc<Manifest>>>;

pub struct ArchiveReads {
    archive: Archive,
    ttl: Duration,
    /// Most archived rows one request may load (analytics; the events list keeps only a page).
    pub max_rows: usize,
    /// When the dropped months were listed, and them.
    dropped: Mutex<Option<(Instant, DroppedMonths)>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveReadError {
    #[error("the archive did not answer: {0}")]
    Archive(#[from] ArchiveError),
    #[error(
        "this range holds more than {0} archived rows of the org (months dropped from ClickHouse); \
         narrow from/to, or restore the months (tally-archiver restore MONTH)"
    )]
    TooManyRows(usize),
}

/// Which archived rows a request takes: the org's, in these `[from, to)` intervals, and the
/// filters that every one of its raw queries applies too (so leaving rows out early changes
/// nothing).
pub struct Wanted<'a> {
    pub org_id: &'a str,
    pub intervals: &'a [(DateTime<Utc>, DateTime<Utc>)],
    pub user_id: Option<&'a str>,
    pub provider: Option<&'a str>,
    pub model: Option<&'a str>,
    pub status: Option<&'a str>,
    pub execution_id: Option<&'a str>,
}

impl Wanted<'_> {
    fn admits(&self, row: &EventRow) -> bool {
        let at = row.timestamp_epoch_ms();
        row.org_id == self.org_id
            && self
                .intervals
                .iter()
                .any(|(from, to)| from.timestamp_millis() <= at && at < to.timestamp_millis())
            && self.user_id.is_none_or(|u| row.user_id == u)
            && self.provider.is_none_or(|p| row.provider == p)
            && self.model.is_none_or(|m| row.model == m)
            && self.status.is_none_or(|s| row.status.as_str() == s)
            && self.execution_id.is_none_or(|e| row.execution_id == e)
    }
}

/// How many rows of the newest a request keeps (the events list: a page after a cursor).
pub struct Newest {
    /// Event time in ms of the cursor: rows at it are all kept (their order by id is ClickHouse's
    /// to apply), rows after it are not wanted.
    pub cursor_ms: Option<i64>,
    pub rows: usize,
}

impl ArchiveReads {
    pub fn new(archive: Archive, ttl: Duration, max_rows: usize) -> ArchiveReads {
        ArchiveReads { archive, ttl, max_rows, dropped: Mutex::new(None) }
    }

    /// The dropped months and their latest manifests, listed again when older than the TTL.
    async fn dropped(&self) -> Result<DroppedMonths, ArchiveError> {
        let mut cached = self.dropped.lock().await;
        if let Some((at, months)) = cached.as_ref() {
            if at.elapsed() < self.ttl {
                return Ok(Arc::clone(months));
            }
        }
        let previous = cached.as_ref().map(|(_, months)| Arc::clone(months));
        let mut months = BTreeMap::new();
        for (key, _) in self.archive.list("events/").await? {
            let Some(month) = key.ends_with("/dropped.json").then(|| Month::of_key(&key)).flatten() else {
                continue;
            };
            let listed = self.archive.list(&month.prefix()).await?;
            let latest = listed.iter().filter_map(|(k, _)| manifest::version_of(k)).max();
            let Some(version) = latest else { continue };
            // Manifests never change once published: keep the one read last time.
            let known =
                previous.as_ref().and_then(|p| p.get(&month)).filter(|m| m.version == version).cloned();
            let manifest = match known {
                Some(manifest) => manifest,
                None => Arc::new(Manifest::read(&self.archive, month, version).await?),
            };
            months.insert(month, manifest);
        }
        let months = Arc::new(months);
        *cached = Some((Instant::now(), Arc::clone(&months)));
        Ok(months)
    }

    /// The manifests of the dropped months that `intervals` reach into.
    pub async fn months_of(
        &self,
        intervals: &[(DateTime<Utc>, DateTime<Utc>)],
    ) -> Result<Vec<Arc<Manifest>>, ArchiveError> {
        if !may_reach_a_closed_month(intervals, Utc::now()) {
            return Ok(Vec::new()); // most requests: no listing, no lock
        }
        let dropped = self.dropped().await?;
        Ok(dropped
            .iter()
            .filter(|(month, _)| {
                intervals.iter().any(|(from, to)| *from < month.end() && month.start() < *to)
            })
            .map(|(_, manifest)| Arc::clone(manifest))
            .collect())
    }

    /// The archived rows `wanted` takes from `manifests`: all of them (at most `max_rows`), or
    /// with `newest`, only those that can be among the newest `rows` (ties at the edge kept).
    pub async fn rows(
        &self,
        manifests: &[Arc<Manifest>],
        wanted: &Wanted<'_>,
        newest: Option<&Newest>,
    ) -> Result<Vec<EventRow>, ArchiveReadError> {
        let columns: Vec<String> =
            tally_archiver::columns::schema()?.fields().iter().map(|f| f.name().clone()).collect();
        let columns: Vec<&str> = columns.iter().map(String::as_str).collect();
        let mut kept = Vec::new();
        for manifest in manifests {
            for entry in &manifest.files {
                let mut read =
                    tally_archiver::read::org_batches(&self.archive, entry, wanted.org_id, &columns).await?;
                while let Some(batch) = read.batches.next().await {
                    let batch = batch.map_err(ArchiveError::from)?;
                    let rows = tally_archiver::rows::rows_of(&batch)?;
                    kept.extend(rows.into_iter().filter(|r| wanted.admits(r)));
                    match newest {
                        Some(newest) => keep_newest(&mut kept, EventRow::timestamp_epoch_ms, newest),
                        None if kept.len() > self.max_rows => {
                            return Err(ArchiveReadError::TooManyRows(self.max_rows))
                        }
                        None => {}
                    }
                }
            }
        }
        Ok(kept)
    }
}

/// Whether an interval starts before the end of some month that is closed at `now` (ended at
/// least the oldest accepted event age ago): only a closed month can have been dropped.
fn may_reach_a_closed_month(intervals: &[(DateTime<Utc>, DateTime<Utc>)], now: DateTime<Utc>) -> bool {
    let closed_before = now - chrono::Duration::milliseconds(tally_schemas::limits::MAX_EVENT_AGE_MS);
    intervals.iter().any(|(from, to)| from < to && *from < closed_before)
}

/// Keeps the rows after `newest.cursor_ms` out, and of the rest those at the cursor's time and
/// the newest `rows` before it, with every row tied with the last of them (ClickHouse orders
/// ties by event id). `at`: a row's event time in ms.
fn keep_newest<T>(rows: &mut Vec<T>, at: impl Fn(&T) -> i64, newest: &Newest) {
    let cursor = newest.cursor_ms.unwrap_or(i64::MAX);
    rows.retain(|r| at(r) <= cursor);
    let mut before: Vec<i64> = rows.iter().map(&at).filter(|&t| t < cursor).collect();
    if before.len() <= newest.rows.saturating_mul(2).max(1024) {
        return; // not worth sorting yet
    }
    let nth = newest.rows.saturating_sub(1).min(before.len() - 1);
    before.select_nth_unstable_by(nth, |a, b| b.cmp(a));
    let edge = before[nth];
    rows.retain(|r| at(r) >= edge);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_intervals_starting_before_a_closed_month_ends_look_at_the_archive() {
        let at = |t: &str| DateTime::parse_from_rfc3339(t).map(|t| t.with_timezone(&Utc)).unwrap_or_default();
        let now = at("2026-11-30T12:00:00Z");
        // 35 days before now: 2026-10-26T12:00Z. October ends later, so it cannot be closed yet.
        assert!(!may_reach_a_closed_month(&[(at("2026-10-27T00:00:00Z"), now)], now));
        assert!(may_reach_a_closed_month(&[(at("2026-10-26T11:00:00Z"), at("2026-10-26T12:00:00Z"))], now));
        assert!(!may_reach_a_closed_month(&[(at("2026-08-02T10:00:00Z"), at("2026-08-02T10:00:00Z"))], now));
        assert!(may_reach_a_closed_month(
            &[(at("2026-11-01T00:00:00Z"), now), (at("2026-08-02T10:00:00Z"), at("2026-08-02T11:00:00Z"))],
            now
        ));
    }

    #[test]
    fn the_newest_rows_before_the_cursor_are_kept_with_every_tie_and_every_row_at_the_cursor() {
        // 3000 rows at 1000, 1001, …; a cursor at 3500 and pages of 10.
        let mut times: Vec<i64> = (0..3000).map(|i| 1000 + i).collect();
        times.extend([3490; 5]); // ties with the 10th newest before the cursor
        times.extend([3500; 3]); // at the cursor: ClickHouse decides by id
        keep_newest(&mut times, |t| *t, &Newest { cursor_ms: Some(3500), rows: 10 });
        times.sort_unstable();
        let expected: Vec<i64> = [3490; 6].into_iter().chain(3491..3500).chain([3500; 4]).collect();
        assert_eq!(times, expected);
    }
}
