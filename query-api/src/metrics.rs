//! The query API's own metrics (HTTP metrics come from `tally_common::server`).

use prometheus::{GaugeVec, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub struct QueryMetrics {
    pub budget_percent_used: GaugeVec,
    pub budget_threshold_crossed: IntGaugeVec,
    pub streams_open: IntGauge,
}

impl QueryMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let metrics = QueryMetrics {
            budget_percent_used: GaugeVec::new(
                Opts::new("tally_budget_percent_used", "percent of the monthly budget spent, at the last read"),
                &["org_id"],
            )?,
            budget_threshold_crossed: IntGaugeVec::new(
                Opts::new(
                    "tally_budget_threshold_crossed",
                    "highest alert threshold (percent) the month's spend crossed, 0 for none, at the last read",
                ),
                &["org_id"],
            )?,
            streams_open: IntGauge::new("tally_query_streams_open", "live totals streams open (/api/telemetry/stream)")?,
        };
        registry.register(Box::new(metrics.streams_open.clone()))?;
        registry.register(Box::new(metrics.budget_percent_used.clone()))?;
        registry.register(Box::new(metrics.budget_threshold_crossed.clone()))?;
        Ok(metrics)
    }
}
