//! The model prices of ClickHouse's `model_prices` (the newest version of each price), as the
//! ingest prices events with them and the control topic carries them.

use clickhouse::Row;
use serde::Deserialize;
use tally_schemas::pricing::ModelPrice;

use crate::ch::ChConfig;

#[derive(Row, Deserialize)]
struct PriceRow {
    provider: String,
    model: String,
    from_s: u32,
    input_price: i64,
    output_price: i64,
}

pub async fn load_entries(config: &ChConfig) -> Result<Vec<ModelPrice>, clickhouse::error::Error> {
    let sql = format!(
        "SELECT provider, model, toUInt32(effective_from) AS from_s, argMax(input_nanos_per_mtok, version) AS input_price, \
         argMax(output_nanos_per_mtok, version) AS output_price FROM {} GROUP BY provider, model, effective_from",
        config.table("model_prices")
    );
    let rows: Vec<PriceRow> = config.client().query(&sql).fetch_all().await?;
    Ok(rows
        .into_iter()
        .map(|row| ModelPrice {
            provider: row.provider,
            model: row.model,
            effective_from_ms: i64::from(row.from_s) * 1000,
            input_nanos_per_mtok: row.input_price,
            output_nanos_per_mtok: row.output_price,
        })
        .collect())
}
