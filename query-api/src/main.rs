//! `tally-query-api`: load configuration, set up logging, bind, run until SIGINT/SIGTERM.

use anyhow::Context;
use tally_common::config::Env;
use tally_query_api::config::QueryConfig;

#[global_allocator]
static GLOBAL: tally_common::alloc::Allocator = tally_common::alloc::Allocator;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env = Env::from_process()?;
    let config = QueryConfig::from_env(&env).context("invalid configuration")?;
    tally_common::telemetry::init(config.common.log_format, env.optional("TALLY_LOG").as_deref());
    let listener = tokio::net::TcpListener::bind(config.common.listen_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.common.listen_addr))?;
    let shutdown = tally_common::server::shutdown_on_signal();
    Ok(tally_query_api::run(config, listener, shutdown).await?)
}
