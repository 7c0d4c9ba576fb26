//! The model-price registry, loaded from ClickHouse and refreshed in the background.

use std::sync::Arc;
use std::time::Duration;

use clickhouse::Row;
use serde::Deserialize;
use tally_common::ch::ChConfig;
use tally_common::snapshot::{spawn_reloader, Snapshot};
use tally_schemas::pricing::{ModelPrice, PriceBook};
use tokio_util::sync::CancellationToken;

#[derive(Row, Deserialize)]
struct PriceRow {
    provider: String,
    model: String,
    from_s: u32,
    input_price: i64,
    output_price: i64,
}

pub async fn load(config: &ChConfig) -> Result<PriceBook, clickhouse::error::Error> {
    let sql = format!(
        "SELECT provider, model, toUInt32(effective_from) AS from_s, argMax(input_nanos_per_mtok, version) AS input_price, \
         argMax(output_nanos_per_mtok, version) AS output_price FROM {} GROUP BY provider, model, effective_from",
        config.table("model_prices")
    );
    let rows: Vec<PriceRow> = config.client().query(&sql).fetch_all().await?;
    Ok(PriceBook::new(rows.into_iter().map(|row| ModelPrice {
        provider: row.provider,
        model: row.model,
        effective_from_ms: i64::from(row.from_s) * 1000,
        input_nanos_per_mtok: row.input_price,
        output_nanos_per_mtok: row.output_price,
    })))
}

/// The current price book. Until the first load succeeds the ingest is not ready: pricing events
/// against an empty book would record them as `unknown` cost for good.
pub type Prices = Snapshot<PriceBook>;

/// Reloads the prices every `interval` until `shutdown`; a failure keeps the previous prices.
pub fn spawn_refresher(
    prices: &Arc<Prices>,
    config: ChConfig,
    interval: Duration,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    spawn_reloader(Arc::clone(prices), "prices", interval, shutdown, move || {
        let config = config.clone();
        async move { load(&config).await }
    })
}
