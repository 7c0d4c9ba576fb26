//! `tally-ingest`: load configuration, set up logging, bind, run until SIGINT/SIGTERM.

use anyhow::Context;
use tally_common::config::Env;
use tally_ingest::config::IngestConfig;

#[global_allocator]
static GLOBAL: tally_common::alloc::Allocator = tally_common::alloc::Allocator;

fn main() -> anyhow::Result<()> {
    let env = Env::from_process()?;
    let config = IngestConfig::from_env(&env).context("invalid configuration")?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if config.worker_threads > 0 {
        runtime.worker_threads(config.worker_threads);
    }
    runtime.build().context("cannot start the runtime")?.block_on(serve(env, config))
}

async fn serve(env: Env, config: IngestConfig) -> anyhow::Result<()> {
    tally_common::telemetry::init(config.common.log_format, env.optional("TALLY_LOG").as_deref());
    let listener = tokio::net::TcpListener::bind(config.common.listen_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.common.listen_addr))?;
    let shutdown = tally_common::server::shutdown_on_signal();
    Ok(tally_ingest::run(config, listener, shutdown).await?)
}
