//! Runtime pieces every Tally service shares: typed configuration from an injected environment,
//! telemetry, the operational HTTP routes, ClickHouse access and migrations, and the API key set.

pub mod ch;
pub mod config;
pub mod keyset;
pub mod migrate;
pub mod server;
pub mod snapshot;
pub mod telemetry;
