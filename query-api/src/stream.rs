//! `GET /api/telemetry/stream`: the org's running totals pushed as server-sent events, for the
//! dashboard's live view (issue 16).
//!
//! One poller serves every open stream: each `interval` it reads the totals of all the orgs that
//! have a stream open in one query (the daily rollup, a few rows per org and day), and hands each
//! org's totals to its streams through a `watch` channel when they changed. A watch channel holds
//! only the latest value, so a client that reads slowly (or not at all) never makes the server
//! queue frames for it: when it reads again it gets the newest totals, and memory stays one frame
//! per watched org whatever the clients do. Streams are limited per org and in total; they end
//! when the server shuts down (so a drain never waits on them), and the browser reconnects.
//!
//! Events: `totals` (`{"totalEvents", "errors", "totalTokens", "costNanos", "cost"}`, all time,
//! sent first and whenever they change) and `unavailable` (ClickHouse did not answer; the stream
//! stays open and `totals` follow when it answers again).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::State;
use axum::http::header::{HeaderName, CACHE_CONTROL};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use clickhouse::Row;
use serde::{Deserialize, Serialize};
use tally_common::ch::{self, ChConfig};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::auth::Org;
use crate::error::ApiError;
use crate::range::usd;
use crate::AppState;

/// How streams are served (`TALLY_QUERY_STREAM_*`).
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// How often the watched orgs' totals are read (`TALLY_QUERY_STREAM_INTERVAL_MS`, 1000).
    pub interval: Duration,
    /// Most open streams of one org (`TALLY_QUERY_STREAMS_PER_ORG`, 16).
    pub per_org: usize,
    /// Most open streams in all (`TALLY_QUERY_STREAMS_TOTAL`, 2048).
    pub total: usize,
}

/// An org's totals over all its events, as the stream sends them.
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
struct OrgTotals {
    org_id: String,
    events: u64,
    errors: u64,
    tokens: u64,
    cost_nanos: i64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct TotalsBody {
    total_events: u64,
    errors: u64,
    total_tokens: u64,
    cost: f64,
    cost_nanos: i64,
}

/// What an org's streams see last.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Frame {
    /// Nothing read yet for this org.
    Pending,
    Totals(OrgTotals),
    Unavailable,
}

impl Frame {
    fn event(&self) -> Option<Event> {
        match self {
            Frame::Pending => None,
            Frame::Totals(t) => {
                let body = TotalsBody {
                    total_events: t.events,
                    errors: t.errors,
                    total_tokens: t.tokens,
                    cost: usd(t.cost_nanos),
                    cost_nanos: t.cost_nanos,
                };
                Some(Event::default().event("totals").data(serde_json::to_string(&body).unwrap_or_default()))
            }
            Frame::Unavailable => Some(Event::default().event("unavailable").data(
                r#"{"error":"storage_unavailable","message":"ClickHouse did not answer; totals follow when it answers again"}"#,
            )),
        }
    }
}

struct Watched {
    frames: watch::Sender<Frame>,
    streams: usize,
}

/// The open streams, by org, and the poller's state.
pub struct Hub {
    config: StreamConfig,
    orgs: Mutex<HashMap<String, Watched>>,
    total: Arc<Semaphore>,
    shutdown: CancellationToken,
    open: prometheus::IntGauge,
}

impl Hub {
    pub fn new(config: StreamConfig, shutdown: CancellationToken, open: prometheus::IntGauge) -> Arc<Hub> {
        let total = Arc::new(Semaphore::new(config.total));
        Arc::new(Hub { config, orgs: Mutex::new(HashMap::new()), total, shutdown, open })
    }

    fn orgs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Watched>> {
        self.orgs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new stream of `org_id`, within the limits.
    fn subscribe(self: &Arc<Self>, org_id: &str) -> Result<Subscription, ApiError> {
        let permit = Arc::clone(&self.total).try_acquire_owned().map_err(|_| ApiError::StreamsFull)?;
        let mut orgs = self.orgs();
        let watched = orgs
            .entry(org_id.to_owned())
            .or_insert_with(|| Watched { frames: watch::Sender::new(Frame::Pending), streams: 0 });
        if watched.streams >= self.config.per_org {
            return Err(ApiError::TooManyStreams(self.config.per_org));
        }
        watched.streams += 1;
        self.open.inc();
        Ok(Subscription {
            hub: Arc::clone(self),
            org_id: org_id.to_owned(),
            frames: watched.frames.subscribe(),
            _permit: permit,
        })
    }

    /// Reads the totals of every watched org from `table` (the daily rollup) and hands them to
    /// its streams when they changed.
    pub async fn poll(&self, client: &clickhouse::Client, table: &str) {
        let watched: Vec<String> = self.orgs().keys().cloned().collect();
        if watched.is_empty() {
            return;
        }
        let mut read: HashMap<String, OrgTotals> = HashMap::with_capacity(watched.len());
        for chunk in watched.chunks(500) {
            let sql = format!(
                "SELECT org_id, toUInt64(countMerge(events)) AS events, sumMerge(errors) AS errors, \
                 sumMerge(total_tokens_sum) AS tokens, sumMerge(cost_nanos_sum) AS cost_nanos \
                 FROM {table} WHERE org_id IN ({}) GROUP BY org_id",
                ch::placeholders(chunk.len(), "?")
            );
            match ch::bind_all(client.query(&sql), chunk.iter().map(String::as_str))
                .fetch_all::<OrgTotals>()
                .await
            {
                Ok(rows) => read.extend(rows.into_iter().map(|t| (t.org_id.clone(), t))),
                Err(error) => {
                    let orgs = self.orgs();
                    if orgs.values().any(|w| *w.frames.borrow() != Frame::Unavailable) {
                        tracing::warn!(error = %error, streams = orgs.len(), "live totals: clickhouse unavailable");
                    }
                    for watched in orgs.values() {
                        watched.frames.send_if_modified(|frame| replace(frame, Frame::Unavailable));
                    }
                    return;
                }
            }
        }
        for (org_id, watched) in self.orgs().iter() {
            let totals = read.remove(org_id).unwrap_or_else(|| OrgTotals {
                org_id: org_id.clone(),
                events: 0,
                errors: 0,
                tokens: 0,
                cost_nanos: 0,
            });
            watched.frames.send_if_modified(|frame| replace(frame, Frame::Totals(totals)));
        }
    }

    /// Polls every `interval` until shutdown, through one client (its connections are kept
    /// from one poll to the next).
    pub fn spawn_poller(self: &Arc<Self>, clickhouse: &ChConfig) -> tokio::task::JoinHandle<()> {
        let hub = Arc::clone(self);
        let client = clickhouse.client().with_setting("max_threads", "1");
        let table: Arc<str> = Arc::from(clickhouse.read_table("rollup_daily"));
        tally_common::server::spawn_every(self.config.interval, self.shutdown.clone(), move || {
            let (hub, client, table) = (Arc::clone(&hub), client.clone(), Arc::clone(&table));
            async move { hub.poll(&client, &table).await }
        })
    }
}

/// Sets `frame` to `new` if it differs; whether it did.
fn replace(frame: &mut Frame, new: Frame) -> bool {
    if *frame == new {
        false
    } else {
        *frame = new;
        true
    }
}

/// One open stream; leaving frees its place.
struct Subscription {
    hub: Arc<Hub>,
    org_id: String,
    frames: watch::Receiver<Frame>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.open.dec();
        let mut orgs = self.hub.orgs();
        if let Some(watched) = orgs.get_mut(&self.org_id) {
            watched.streams -= 1;
            if watched.streams == 0 {
                orgs.remove(&self.org_id);
            }
        }
    }
}

impl Subscription {
    /// The next frame to send: the current one first, then each change. None at shutdown.
    async fn next(&mut self, first: bool) -> Option<Event> {
        if first {
            if let Some(event) = self.frames.borrow_and_update().event() {
                return Some(event);
            }
        }
        loop {
            tokio::select! {
                () = self.hub.shutdown.cancelled() => return None,
                changed = self.frames.changed() => changed.ok()?,
            }
            if let Some(event) = self.frames.borrow_and_update().event() {
                return Some(event);
            }
        }
    }
}

/// `GET /api/telemetry/stream`.
pub async fn stream(State(state): State<AppState>, Org(org): Org) -> Result<impl IntoResponse, ApiError> {
    let subscription = state.streams.subscribe(&org.org_id)?;
    let events = futures::stream::unfold((subscription, true), |(mut subscription, first)| async move {
        let event = subscription.next(first).await?;
        Some((Ok::<Event, Infallible>(event), (subscription, false)))
    });
    // Proxies (nginx, ingress controllers) must pass each event on at once, not buffer them.
    let headers = [(HeaderName::from_static("x-accel-buffering"), "no"), (CACHE_CONTROL, "no-store")];
    Ok((headers, Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(events: u64) -> Frame {
        Frame::Totals(OrgTotals { org_id: "o".into(), events, errors: 0, tokens: 0, cost_nanos: 0 })
    }

    fn hub(per_org: usize, total: usize) -> Arc<Hub> {
        let config = StreamConfig { interval: Duration::from_secs(1), per_org, total };
        Hub::new(
            config,
            CancellationToken::new(),
            prometheus::IntGauge::new("open", "open").unwrap_or_else(|_| unreachable!()),
        )
    }

    fn publish(hub: &Hub, org: &str, frame: Frame) {
        hub.orgs()[org].frames.send_if_modified(|f| replace(f, frame));
    }

    #[tokio::test]
    async fn a_slow_reader_gets_the_newest_totals_not_a_backlog() {
        let hub = hub(4, 8);
        let mut subscription = hub.subscribe("o").unwrap_or_else(|_| unreachable!());
        for events in 1..=10_000 {
            publish(&hub, "o", totals(events));
        }
        // Ten thousand changes while it did not read: one frame waits, the last.
        assert_eq!(subscription.frames.borrow().clone(), totals(10_000));
        assert!(subscription.next(true).await.is_some());
        let nothing_more = tokio::time::timeout(Duration::from_millis(100), subscription.next(false)).await;
        assert!(nothing_more.is_err(), "a second frame was waiting");
    }

    #[tokio::test]
    async fn nothing_is_sent_before_the_first_read_and_unchanged_totals_are_not_sent_again() {
        let hub = hub(4, 8);
        let mut subscription = hub.subscribe("o").unwrap_or_else(|_| unreachable!());
        assert!(tokio::time::timeout(Duration::from_millis(50), subscription.next(true)).await.is_err());
        publish(&hub, "o", totals(3));
        assert!(subscription.next(false).await.is_some());
        publish(&hub, "o", totals(3));
        assert!(tokio::time::timeout(Duration::from_millis(50), subscription.next(false)).await.is_err());
    }

    #[test]
    fn the_last_stream_of_an_org_leaving_forgets_the_org() {
        let hub = hub(2, 3);
        let first = hub.subscribe("o").unwrap_or_else(|_| unreachable!());
        let second = hub.subscribe("o").unwrap_or_else(|_| unreachable!());
        assert!(matches!(hub.subscribe("o"), Err(ApiError::TooManyStreams(2))));
        let other = hub.subscribe("p").unwrap_or_else(|_| unreachable!());
        assert!(matches!(hub.subscribe("q"), Err(ApiError::StreamsFull)));
        assert_eq!(hub.open.get(), 3);
        drop((first, second));
        assert!(!hub.orgs().contains_key("o"));
        assert_eq!(hub.open.get(), 1);
        drop(other);
        assert!(hub.orgs().is_empty());
        assert!(hub.subscribe("q").is_ok());
    }
}
