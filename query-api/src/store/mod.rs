//! The query API's data access: every read and write of ClickHouse, as typed functions. Handlers
//! call these and never see SQL. Each request gets a `Store` through `AppState::store`, whose
//! client carries the service's settings.
//!
//! - `sql`: SQL text with bound values, raw-row time bounds;
//! - `measures`: the rollup's measures (held to migration 0002 by a test);
//! - `plan`: which source answers which part of a range (pure, unit-tested);
//! - `reads`: the org-scoped reads (usage, analytics, events, budget spend, telemetry status);
//! - `admin`: orgs, keys, prices, budgets and the admin's cross-org reads;
//! - `archived`: raw rows of months dropped from ClickHouse, from the archive.

pub mod admin;
pub mod archived;
pub mod measures;
pub mod plan;
pub mod reads;
pub mod sql;

#[cfg(test)]
mod plan_tests;

use archived::{ArchiveReadError, ArchiveReads, Newest, Wanted};
use tally_common::ch::ChConfig;
use tally_schemas::EventRow;

use crate::error::ApiError;

pub use plan::{Plan, Scope, Tables};

#[derive(Clone)]
pub struct Store<'a> {
    client: clickhouse::Client,
    config: &'a ChConfig,
    tables: Tables,
    archive: Option<&'a ArchiveReads>,
}

impl<'a> Store<'a> {
    pub fn new(
        client: clickhouse::Client,
        config: &'a ChConfig,
        archive: Option<&'a ArchiveReads>,
    ) -> Store<'a> {
        let tables = Tables {
            // On a cluster: the Distributed tables over every shard.
            events: config.read_table("events"),
            rollup_hourly: config.read_table("rollup_hourly"),
            archived: false,
        };
        Store { client, config, tables, archive }
    }

    fn table(&self, name: &str) -> String {
        self.config.table(name)
    }

    /// The store to read `wanted`'s raw rows with: this one, or when they reach into months
    /// dropped from ClickHouse, one whose raw reads also take those months' archived rows, loaded
    /// into a temporary table of a ClickHouse session of its own (queries of a session run one at
    /// a time).
    async fn covering(&self, wanted: &Wanted<'_>, newest: Option<&Newest>) -> Result<Store<'a>, ApiError> {
        let Some(archive) = self.archive else { return Ok(self.clone()) };
        let months = archive.months_of(wanted.intervals).await.map_err(ArchiveReadError::from)?;
        if months.is_empty() {
            return Ok(self.clone());
        }
        let rows = archive.rows(&months, wanted, newest).await?;
        let client = self.client.clone().with_setting("session_id", uuid::Uuid::new_v4().to_string());
        client
            .query(&format!(
                "CREATE TEMPORARY TABLE {} AS {} ENGINE = Memory",
                archived::TABLE,
                self.tables.events
            ))
            .execute()
            .await?;
        if !rows.is_empty() {
            let mut insert = client.insert_unescaped::<EventRow>(archived::TABLE).await?;
            for row in &rows {
                insert.write(row).await?;
            }
            insert.end().await?;
        }
        let tables = Tables { archived: true, ..self.tables.clone() };
        Ok(Store { client, config: self.config, tables, archive: self.archive })
    }

    /// Runs each query (concurrently, unless in a session) and returns all their rows.
    async fn fetch_all_of<T>(&self, queries: &[sql::Sql]) -> Result<Vec<T>, clickhouse::error::Error>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        if self.tables.archived {
            let mut rows = Vec::new();
            for sql in queries {
                rows.extend(sql.query(&self.client).fetch_all::<T>().await?);
            }
            return Ok(rows);
        }
        let results =
            futures::future::try_join_all(queries.iter().map(|sql| sql.query(&self.client).fetch_all::<T>()))
                .await?;
        Ok(results.into_iter().flatten().collect())
    }
}
