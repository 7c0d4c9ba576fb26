//! Runtime pieces every Tally service shares: typed configuration from an injected environment,
//! telemetry, the operational HTTP routes, ClickHouse access and migrations, the API key set and
//! the model prices (what the control topic carries).

pub mod alloc;
pub mod ch;
pub mod config;
pub mod kafka;
pub mod keyset;
pub mod migrate;
pub mod prices;
pub mod scratch;
pub mod server;
pub mod snapshot;
pub mod telemetry;
