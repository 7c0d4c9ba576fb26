//! The model-price registry, loaded from ClickHouse (or the control topic) and refreshed in the
//! background.

use std::sync::Arc;
use std::time::Duration;

use tally_common::ch::ChConfig;
use tally_common::snapshot::{spawn_reloader, Snapshot};
use tally_schemas::pricing::PriceBook;
use tokio_util::sync::CancellationToken;

/// The price book of ClickHouse's `model_prices`.
pub async fn load(config: &ChConfig) -> Result<PriceBook, clickhouse::error::Error> {
    Ok(PriceBook::new(tally_common::prices::load_entries(config).await?))
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
