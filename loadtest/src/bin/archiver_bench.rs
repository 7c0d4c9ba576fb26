//! `tally-archiver-bench`: the tools `make bench-archiver` drives (loadtest/bench_archiver.py).
//! Settings as the archiver's (`TALLY_CLICKHOUSE_*`, `TALLY_ARCHIVE_*`, `TALLY_S3_*`, `AWS_*`).
//!
//! - `ceiling YYYY-MM`: the raw read ceiling: the archiver's own chunked SELECTs of the month,
//!   streamed by the same client to nowhere (rows counted, nothing kept).
//! - `archive YYYY-MM`: archives the month (`archive::archive_month`: stream, write, upload, read
//!   every file back, check, publish), end to end.
//! - `org-read YYYY-MM ORG`: one org's rows of the archived month read as the query API reads them
//!   (footer, then that org's row groups by ranged requests) against reading the whole files.
//!
//! Prints one JSON line; `peak_rss_mib` is this process's high-water mark.

use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Context;
use arrow_array::cast::AsArray;
use futures::StreamExt;
use tally_archiver::config::ArchiverConfig;
use tally_archiver::manifest::Manifest;
use tally_archiver::month::Month;
use tally_archiver::read::org_batches;
use tally_archiver::source;
use tally_archiver::store::Archive;
use tally_common::config::Env;

#[global_allocator]
static GLOBAL: tally_common::alloc::Allocator = tally_common::alloc::Allocator;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

async fn ceiling(config: &ArchiverConfig, month: Month) -> anyhow::Result<serde_json::Value> {
    let ch = &config.common.clickhouse;
    let started = Instant::now();
    let mut rows = 0u64;
    for chunk in source::plan(ch, month, config.chunk_rows).await? {
        let mut cursor = source::rows(ch, month, &chunk)?;
        while let Some(row) = cursor.next().await? {
            std::hint::black_box(&row);
            rows += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(
        serde_json::json!({"rows": rows, "seconds": seconds, "rows_per_s": rows as f64 / seconds, "peak_rss_mib": peak_rss_mib()}),
    )
}

async fn archive(config: &ArchiverConfig, month: Month) -> anyhow::Result<serde_json::Value> {
    let store = Archive::open(config)?;
    let spool = std::env::temp_dir().join(format!("tally-archiver-bench-{}", std::process::id()));
    std::fs::create_dir_all(&spool)?;
    let started = Instant::now();
    let outcome = tally_archiver::archive::archive_month(config, &store, month, &spool).await;
    let seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&spool);
    let outcome = outcome?;
    let manifest = Manifest::latest(&store, month).await?.context("no manifest after the run")?;
    let bytes: u64 = manifest.files.iter().map(|f| f.bytes).sum();
    let rows = manifest.totals.rows;
    let row_groups: usize = manifest.files.iter().map(|f| f.row_groups).sum();
    Ok(serde_json::json!({
        "outcome": outcome, "rows": rows, "seconds": seconds, "rows_per_s": rows as f64 / seconds,
        "bytes": bytes, "bytes_per_event": bytes as f64 / rows.max(1) as f64, "files": manifest.files.len(),
        "row_groups": row_groups, "peak_rss_mib": peak_rss_mib(),
    }))
}

async fn org_read(config: &ArchiverConfig, month: Month, org: &str) -> anyhow::Result<serde_json::Value> {
    let store = Archive::open(config)?;
    let manifest = Manifest::latest(&store, month).await?.context("the month is not archived")?;
    let columns: Vec<String> =
        tally_archiver::columns::schema()?.fields().iter().map(|f| f.name().clone()).collect();
    let columns: Vec<&str> = columns.iter().map(String::as_str).collect();

    let started = Instant::now();
    let (mut rows, mut fetched, mut groups, mut groups_read) = (0u64, 0u64, 0usize, 0usize);
    for entry in &manifest.files {
        let mut read = org_batches(&store, entry, org, &columns).await?;
        while let Some(batch) = read.batches.next().await {
            let batch = batch?;
            let orgs = batch.column(0).as_string::<i32>();
            rows += (0..batch.num_rows()).filter(|&i| orgs.value(i) == org).count() as u64;
        }
        fetched += read.fetched.load(Ordering::Relaxed);
        groups += read.row_groups;
        groups_read += read.row_groups_read;
    }
    let per_org_ms = started.elapsed().as_secs_f64() * 1000.0;

    // The same rows by reading every file whole (what a reader without the footer's statistics
    // or the sort order would do).
    let started = Instant::now();
    let (mut whole_rows, mut whole_bytes) = (0u64, 0u64);
    for entry in &manifest.files {
        let bytes = store.get(&entry.path).await?.context("a file of the manifest is missing")?;
        whole_bytes += bytes.len() as u64;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)?
            .with_batch_size(65_536)
            .build()?;
        for batch in reader {
            let batch = batch?;
            let orgs = batch.column(0).as_string::<i32>();
            whole_rows += (0..batch.num_rows()).filter(|&i| orgs.value(i) == org).count() as u64;
        }
    }
    let whole_ms = started.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(rows == whole_rows, "the per-org read found {rows} rows, the whole read {whole_rows}");
    Ok(serde_json::json!({
        "org": org, "rows": rows, "month_rows": manifest.totals.rows,
        "per_org": {"ms": per_org_ms, "bytes_fetched": fetched, "row_groups_read": groups_read, "row_groups": groups},
        "whole_files": {"ms": whole_ms, "bytes_fetched": whole_bytes},
    }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let env = Env::from_process()?;
    let config = ArchiverConfig::from_env(&env)?;
    let month = args.get(2).and_then(|m| Month::parse(m));
    let result = match (args.get(1).map(String::as_str), month) {
        (Some("ceiling"), Some(month)) => ceiling(&config, month).await?,
        (Some("archive"), Some(month)) => archive(&config, month).await?,
        (Some("org-read"), Some(month)) if args.len() > 3 => org_read(&config, month, &args[3]).await?,
        _ => anyhow::bail!(
            "usage: tally-archiver-bench ceiling YYYY-MM | archive YYYY-MM | org-read YYYY-MM ORG"
        ),
    };
    println!("{result}");
    Ok(())
}
