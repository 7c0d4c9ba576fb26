//! `tally-archiver serve`: a pass every `TALLY_ARCHIVE_INTERVAL_S` (default an hour), with
//! `/healthz`, `/readyz` (ClickHouse and the archive reachable) and `/metrics`, for deployments
//! that run the archiver as a service rather than a CronJob.

use std::sync::Arc;

use futures::future::BoxFuture;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tally_common::server::{self, OpsState, Readiness};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::archive::{self, MonthReport, Outcome};
use crate::config::ArchiverConfig;
use crate::store::Archive;

#[derive(Clone)]
pub struct ArchiverMetrics {
    pub passes: IntCounterVec,
    pub months: IntGaugeVec,
    pub rows_archived: IntCounter,
    pub months_dropped: IntCounter,
    pub last_success: IntGauge,
    pub dead_letter_days: IntCounterVec,
}

impl ArchiverMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = ArchiverMetrics {
            passes: IntCounterVec::new(
                Opts::new("tally_archiver_passes_total", "archiver passes by result"),
                &["result"],
            )?,
            months: IntGaugeVec::new(
                Opts::new(
                    "tally_archiver_months",
                    "months by outcome in the last pass (archived, up_to_date, failed, …)",
                ),
                &["outcome"],
            )?,
            rows_archived: IntCounter::new(
                "tally_archiver_rows_archived_total",
                "rows written to published archive files",
            )?,
            months_dropped: IntCounter::new(
                "tally_archiver_months_dropped_total",
                "months dropped from ClickHouse after archiving",
            )?,
            last_success: IntGauge::new(
                "tally_archiver_last_success_timestamp_seconds",
                "when the last pass without a failed month ended (alert when it grows old)",
            )?,
            dead_letter_days: IntCounterVec::new(
                Opts::new(
                    "tally_archiver_dead_letter_days_total",
                    "days of the dead-letter topic looked at, by outcome (archived, up_to_date, failed)",
                ),
                &["outcome"],
            )?,
        };
        registry.register(Box::new(metrics.dead_letter_days.clone()))?;
        registry.register(Box::new(metrics.passes.clone()))?;
        registry.register(Box::new(metrics.months.clone()))?;
        registry.register(Box::new(metrics.rows_archived.clone()))?;
        registry.register(Box::new(metrics.months_dropped.clone()))?;
        registry.register(Box::new(metrics.last_success.clone()))?;
        Ok(metrics)
    }

    fn record(&self, reports: &[MonthReport]) {
        self.months.reset();
        let mut failed = false;
        for report in reports {
            let name = serde_json::to_value(&report.outcome)
                .ok()
                .and_then(|v| v.get("outcome").and_then(|o| o.as_str()).map(str::to_owned))
                .unwrap_or_default();
            self.months.with_label_values(&[name.as_str()]).inc();
            match &report.outcome {
                Outcome::Archived { rows, .. } => self.rows_archived.inc_by(*rows),
                Outcome::DroppedNow { .. } => self.months_dropped.inc(),
                Outcome::Failed { .. } => failed = true,
                _ => {}
            }
        }
        self.passes.with_label_values(&[if failed { "failed_months" } else { "ok" }]).inc();
        if !failed {
            self.last_success.set(chrono::Utc::now().timestamp());
        }
    }
}

struct ArchiverReadiness {
    clickhouse: clickhouse::Client,
    archive: Archive,
}

impl Readiness for ArchiverReadiness {
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            if !tally_common::ch::ping(&self.clickhouse).await {
                return Err("clickhouse unreachable".into());
            }
            self.archive.list("events/year=").await.map(|_| ()).map_err(|e| e.to_string())
        })
    }
}

/// Runs `make()`'s future to completion on a current-thread runtime of its own, on a blocking
/// thread: a pass is one stream read and encoded in turn, and on the multi-thread runtime the
/// wake-ups between the HTTP connection's task and the reader on another worker cost a third of
/// its CPU (`perf`, loadtest/RESULTS.md "Archiver"); the ops routes keep their own thread.
async fn on_a_thread_of_its_own<F, Fut, T>(make: F) -> std::io::Result<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(runtime.block_on(make()))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Serves the ops routes on `listener` and runs a pass every interval until `shutdown`.
pub async fn serve(
    config: ArchiverConfig,
    archive: Archive,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), server::RunError> {
    let registry = Registry::new();
    let metrics = ArchiverMetrics::register(&registry)?;
    let readiness = Arc::new(ArchiverReadiness {
        clickhouse: config.common.clickhouse.client(),
        archive: archive.clone(),
    });
    let ops = OpsState { registry, readiness, shutdown: shutdown.clone() };
    let config = Arc::new(config);
    let passes = server::spawn_every(config.interval, shutdown.clone(), move || {
        let (config, archive, metrics) = (Arc::clone(&config), archive.clone(), metrics.clone());
        async move {
            let (pass_config, pass_archive) = (Arc::clone(&config), archive.clone());
            let pass = on_a_thread_of_its_own(move || async move {
                archive::run(&pass_config, &pass_archive, chrono::Utc::now()).await
            })
            .await;
            match pass {
                Ok(Ok(reports)) => metrics.record(&reports),
                Ok(Err(error)) => {
                    tracing::error!(error = %error, "archiver pass failed");
                    metrics.passes.with_label_values(&["error"]).inc();
                }
                Err(error) => {
                    tracing::error!(error = %error, "archiver pass could not start");
                    metrics.passes.with_label_values(&["error"]).inc();
                }
            }
            for day in crate::dead_letters::run(&config, &archive, chrono::Utc::now()).await {
                let outcome = serde_json::to_value(&day.outcome)
                    .ok()
                    .and_then(|v| v.get("outcome").and_then(|o| o.as_str()).map(str::to_owned))
                    .unwrap_or_default();
                metrics.dead_letter_days.with_label_values(&[&outcome]).inc();
            }
        }
    });
    tracing::info!(addr = %listener.local_addr()?, "archiver serving");
    server::serve(listener, server::ops_routes(ops), shutdown).await?;
    let _ = passes.await;
    Ok(())
}
