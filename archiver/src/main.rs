//! `tally-archiver run` (one pass, for a CronJob), `verify` (re-check every published manifest
//! against its files) and `serve` (a pass every interval, with the ops routes). Exit status: 0 all well, 1 an error, 2 a month needs
//! attention (rows in ClickHouse that its archive does not hold, or a manifest that fails).

use anyhow::Context;
use tally_archiver::archive::{self, Outcome};
use tally_archiver::config::ArchiverConfig;
use tally_archiver::store::Archive;
use tally_common::config::Env;

#[global_allocator]
static GLOBAL: tally_common::alloc::Allocator = tally_common::alloc::Allocator;

const USAGE: &str = "usage: tally-archiver run | verify | serve | restore YYYY-MM\n\
  run     archive every closed month not yet archived (and drop archived months older than\n\
          TALLY_ARCHIVE_HOT_MONTHS, if set), then every closed day of the dead-letter topic;\n\
          prints one JSON line per month and per day\n\
  verify  read every published manifest's files back and check them; one JSON line per month\n\
  serve   a pass every TALLY_ARCHIVE_INTERVAL_S, with /healthz, /readyz and /metrics on TALLY_LISTEN_ADDR\n\
  restore load an archived month back into ClickHouse (an empty month; once)";

/// One thread: a pass reads one stream and encodes it in turn, and the multi-thread runtime's
/// cross-thread wake-ups per HTTP chunk cost a third of its CPU (ClickHouse has the other core).
/// `serve` runs its passes on a thread of their own, the ops routes on this one.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let env = Env::from_process()?;
    let config = ArchiverConfig::from_env(&env).context("invalid configuration")?;
    tally_common::telemetry::init(config.common.log_format, env.optional("TALLY_LOG").as_deref());
    let archive = Archive::open(&config).context("cannot open the archive")?;
    let command = std::env::args().nth(1).unwrap_or_default();
    let attention = match command.as_str() {
        "run" => {
            let reports = archive::run(&config, &archive, chrono::Utc::now()).await?;
            for report in &reports {
                println!("{}", serde_json::to_string(report)?);
            }
            let days = tally_archiver::dead_letters::run(&config, &archive, chrono::Utc::now()).await;
            for day in &days {
                println!("{}", serde_json::to_string(day)?);
            }
            let day_failed = days
                .iter()
                .any(|d| matches!(d.outcome, tally_archiver::dead_letters::DayOutcome::Failed { .. }));
            if day_failed || reports.iter().any(|r| matches!(r.outcome, Outcome::Failed { .. })) {
                std::process::exit(1);
            }
            reports.iter().any(|r| matches!(r.outcome, Outcome::ChangedSinceArchived { .. }))
        }
        "verify" => {
            let results = archive::verify_all(&archive).await?;
            for (month, result) in &results {
                let line = match result {
                    Ok(version) => serde_json::json!({"month": month, "verified": true, "version": version}),
                    Err(reason) => serde_json::json!({"month": month, "verified": false, "reason": reason}),
                };
                println!("{line}");
            }
            results.iter().any(|(_, r)| r.is_err())
        }
        "restore" => {
            let Some(month) =
                std::env::args().nth(2).as_deref().and_then(tally_archiver::month::Month::parse)
            else {
                eprintln!("{USAGE}");
                std::process::exit(2);
            };
            let outcome = archive::restore(&config, &archive, month).await?;
            println!("{}", serde_json::json!({"month": month.to_string(), "restore": outcome}));
            false
        }
        "serve" => {
            let listener = tokio::net::TcpListener::bind(config.common.listen_addr)
                .await
                .with_context(|| format!("cannot listen on {}", config.common.listen_addr))?;
            let shutdown = tally_common::server::shutdown_on_signal();
            tally_archiver::serve::serve(config, archive, listener, shutdown).await?;
            false
        }
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    if attention {
        std::process::exit(2);
    }
    Ok(())
}
