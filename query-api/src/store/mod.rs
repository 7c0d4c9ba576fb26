//! The query API's data access: every read and write of ClickHouse, as typed functions. Handlers
//! call these and never see SQL. Each request gets a `Store` through `AppState::store`, whose
//! client carries the service's settings.
//!
//! - `sql`: SQL text with bound values, raw-row time bounds;
//! - `measures`: the rollup's measures (held to migration 0002 by a test);
//! - `plan`: which source answers which part of a range (pure, unit-tested);
//! - `reads`: the org-scoped reads (usage, analytics, events, budget spend, telemetry status);
//! - `admin`: orgs, keys, prices, budgets and the admin's cross-org reads.

pub mod admin;
pub mod measures;
pub mod plan;
pub mod reads;
pub mod sql;

#[cfg(test)]
mod plan_tests;

use tally_common::ch::ChConfig;

pub use plan::{Plan, Scope, Tables};

pub struct Store<'a> {
    client: clickhouse::Client,
    config: &'a ChConfig,
    tables: Tables,
}

impl<'a> Store<'a> {
    pub fn new(client: clickhouse::Client, config: &'a ChConfig) -> Store<'a> {
        let tables = Tables { events: config.table("events"), rollup_hourly: config.table("rollup_hourly") };
        Store { client, config, tables }
    }

    fn table(&self, name: &str) -> String {
        self.config.table(name)
    }

    /// Runs each query concurrently and returns all their rows.
    async fn fetch_all_of<T>(&self, queries: &[sql::Sql]) -> Result<Vec<T>, clickhouse::error::Error>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        let results =
            futures::future::try_join_all(queries.iter().map(|sql| sql.query(&self.client).fetch_all::<T>()))
                .await?;
        Ok(results.into_iter().flatten().collect())
    }
}
