//! The model-price registry, loaded from ClickHouse and refreshed in the background.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use clickhouse::Row;
use serde::Deserialize;
use tally_common::ch::ChConfig;
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
#[derive(Default)]
pub struct Prices {
    book: RwLock<Arc<PriceBook>>,
    loaded: std::sync::atomic::AtomicBool,
}

impl Prices {
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn current(&self) -> Arc<PriceBook> {
        Arc::clone(&self.book.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn replace(&self, book: PriceBook) {
        *self.book.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(book);
        self.loaded.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Reloads the prices every `interval` until `shutdown`; a failure keeps the previous prices.
    pub fn spawn_refresher(
        self: &Arc<Self>,
        config: ChConfig,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let prices = Arc::clone(self);
        tally_common::server::spawn_every(interval, shutdown, move || {
            let (prices, config) = (Arc::clone(&prices), config.clone());
            async move {
                match load(&config).await {
                    Ok(book) => prices.replace(book),
                    Err(error) => {
                        tracing::warn!(error = %error, "price refresh failed, keeping the previous prices")
                    }
                }
            }
        })
    }
}
