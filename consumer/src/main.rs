//! `tally-consumer`: load configuration, set up logging, run until SIGINT/SIGTERM.

use anyhow::Context;
use tally_common::config::Env;
use tally_consumer::config::ConsumerConfig;

#[global_allocator]
static GLOBAL: tally_common::alloc::Allocator = tally_common::alloc::Allocator;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let env = Env::from_process()?;
    let config = ConsumerConfig::from_env(&env).context("invalid configuration")?;
    tally_common::telemetry::init(config.common.log_format, env.optional("TALLY_LOG").as_deref());
    // `tally-consumer dlq list [LIMIT]` prints the dead letters as JSON lines;
    // `tally-consumer dlq replay` stores again the consumer's dead letters that decode now;
    // `tally-consumer migrate` applies the missing migrations (their cluster form on a cluster) and exits.
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        [] => {}
        ["dlq", "list", rest @ ..] => {
            let limit =
                rest.first().map(|n| n.parse()).transpose().context("LIMIT must be a number")?.unwrap_or(100);
            for letter in tally_consumer::dlq::list(&config, limit)? {
                println!("{}", serde_json::to_string(&letter)?);
            }
            return Ok(());
        }
        ["migrate"] => {
            let applied = tally_common::migrate::migrate(&config.common.clickhouse).await?;
            println!(
                "{}",
                serde_json::json!({ "database": config.common.clickhouse.database, "applied": applied })
            );
            return Ok(());
        }
        ["dlq", "replay"] => {
            let report = tally_consumer::dlq::replay(&config).await?;
            println!("{}", serde_json::to_string(&report)?);
            return Ok(());
        }
        _ => anyhow::bail!("usage: tally-consumer [migrate | dlq list [LIMIT] | dlq replay]"),
    }
    let listener = tokio::net::TcpListener::bind(config.common.listen_addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.common.listen_addr))?;
    let shutdown = tally_common::server::shutdown_on_signal();
    Ok(tally_consumer::run(config, listener, shutdown).await?)
}
